"""Token orders: head-tail positions, the spec's reorders and the per-batch plan (no process group needed)."""

import pytest
import torch
import torch.distributed as dist

from mamba_cp import hidden_parallel as spec
from mamba_cp import layout
from mamba_cp.groups import resolve_cp_group
from mamba_cp.layout import build_token_plan, head_tail_positions, packed_head_tail_positions
from mamba_cp.plan_cache import PlanCache
from mamba_cp.testing import run_on_ranks


def explicit_head_tail(seq_len: int, cp: int) -> list[list[int]]:
    """Rank r's positions, spelled out chunk by chunk."""
    chunk = seq_len // (2 * cp)
    chunks = [list(range(c * chunk, (c + 1) * chunk)) for c in range(2 * cp)]
    return [chunks[r] + chunks[2 * cp - 1 - r] for r in range(cp)]


@pytest.mark.parametrize("cp,seq_len", [(1, 6), (2, 8), (2, 16), (4, 24), (8, 16)])
def test_head_tail_positions_match_explicit_chunks(cp, seq_len):
    assert head_tail_positions(seq_len, cp).tolist() == explicit_head_tail(seq_len, cp)


@pytest.mark.parametrize("cp,seqlens", [(2, [8, 4, 12]), (4, [8, 16, 8, 32]), (2, [4])])
def test_packed_positions_are_per_sequence_head_tail(cp, seqlens):
    cu = torch.tensor([0, *torch.tensor(seqlens).cumsum(0).tolist()])
    got = packed_head_tail_positions(cu, cp)
    for r in range(cp):
        want = []
        for s, n in enumerate(seqlens):
            want += [int(cu[s]) + p for p in explicit_head_tail(n, cp)[r]]
        assert got[r].tolist() == want


def test_positions_match_torch_context_parallel_head_tail_balancer():
    """BSHD: our layout is the one torch's context_parallel head-tail load balancer produces.

    (Packed batches follow Transformer Engine's THD partitioning, per sequence, checked above; torch's
    per-document balancer orders documents differently and is not what attention CP kernels expect.)
    """
    attention = pytest.importorskip("torch.distributed.tensor.experimental._attention")
    for cp, seq_len in [(2, 16), (4, 32), (8, 64)]:
        balancer = attention._HeadTailLoadBalancer(seq_len, cp, "cpu")
        assert balancer._generate_indices()[0].tolist() == head_tail_positions(seq_len, cp).flatten().tolist()


@pytest.mark.parametrize("cp", [1, 2, 3, 4])
def test_undo_and_redo_orders_are_inverse_permutations(cp):
    undo, redo = layout.undo_order(cp), layout.redo_order(cp)
    assert sorted(undo) == list(range(2 * cp))
    assert [undo[redo[i]] for i in range(2 * cp)] == list(range(2 * cp))


@pytest.mark.parametrize("cp", [2, 4])
def test_spec_pipeline_restores_true_order_bshd(cp):
    """all-to-all output (ranks' head-tail shards back to back) -> undo -> the true sequence."""
    seq_len, batch = 8 * cp, 3
    x = torch.randn(batch, seq_len, 5, dtype=torch.float64)
    rank_major = torch.cat([x[:, head_tail_positions(seq_len, cp)[r]] for r in range(cp)], dim=1)
    assert torch.equal(spec._undo_attention_load_balancing(rank_major, cp), x)
    assert torch.equal(spec._redo_attention_load_balancing(x, cp), rank_major)


@pytest.mark.parametrize("cp,seqlens", [(2, [8, 4, 12]), (4, [16, 8, 32])])
def test_spec_pipeline_restores_true_order_packed(cp, seqlens):
    """Rank-major packed tokens -> deinterleave -> undo -> the true packed sequence, and back."""
    cu = torch.tensor([0, *torch.tensor(seqlens).cumsum(0).tolist()], dtype=torch.int32)
    total = int(cu[-1])
    x = torch.randn(total, 3, dtype=torch.float64)
    positions = packed_head_tail_positions(cu, cp)
    rank_major = torch.cat([x[positions[r]] for r in range(cp)])
    seq_major = spec._deinterleave_packed_seqs(rank_major, cu // cp, cp)
    restored = spec._undo_attention_load_balancing(seq_major, cp, cu)
    assert torch.equal(restored, x)
    back = spec._reinterleave_packed_seqs(spec._redo_attention_load_balancing(x, cp, cu), cu // cp, cp)
    assert torch.equal(back, rank_major)


def test_reorder_chunks_refuses_unequal_chunks():
    with pytest.raises(ValueError, match=r"sequence length \(10\) must be divisible by the number of chunks \(4\)"):
        layout.reorder_chunks(torch.zeros(1, 10, 2), [0, 1, 2, 3])
    with pytest.raises(ValueError, match="sequence 1 has length 6"):
        layout.reorder_chunks(torch.zeros(14, 2), [1, 0, 3, 2], torch.tensor([0, 8, 14]))
    with pytest.raises(ValueError, match="permutation"):
        layout.reorder_chunks(torch.zeros(1, 8, 2), [0, 0, 1, 2])


def test_reorder_backward_is_the_inverse_gather():
    cu = torch.tensor([0, 8, 12])
    x = torch.randn(12, 2, dtype=torch.float64, requires_grad=True)
    y = layout.reorder_chunks(x, [1, 0], cu)
    g = torch.randn_like(y)
    (gx,) = torch.autograd.grad(y, x, g)
    assert torch.equal(layout.reorder_chunks(g, [1, 0], cu), gx)  # a swap of two chunks is its own inverse


@pytest.mark.parametrize("cp,batch,local_len,seqlens", [(2, 3, 4, None), (4, 1, 6, [8, 16]), (2, 1, 10, [4, 8, 8])])
def test_token_plan_maps_rank_major_rows_to_true_order(cp, batch, local_len, seqlens):
    cu = None if seqlens is None else torch.tensor([0, *torch.tensor(seqlens).cumsum(0).tolist()])
    plan = build_token_plan(cp, batch, local_len, cu)
    global_len = cp * local_len
    positions = head_tail_positions(global_len, cp) if cu is None else packed_head_tail_positions(cu, cp)
    # rank-major buffer: row (r, b, j) holds the token at sequence row b * L + positions[r, j]
    seq_rows = torch.arange(batch * global_len)
    rank_major = torch.stack(
        [torch.stack([seq_rows[b * global_len + positions[r]] for b in range(batch)]) for r in range(cp)]
    ).reshape(-1)
    assert torch.equal(rank_major[plan.to_sequence], seq_rows)
    assert torch.equal(seq_rows[plan.to_ranks], rank_major)
    assert plan.to_sequence.dtype == torch.int64


def test_token_plan_seq_idx_for_packed_batches():
    plan = build_token_plan(2, 1, 6, torch.tensor([0, 8, 12], dtype=torch.int32))
    assert plan.seq_idx.tolist() == [[0] * 8 + [1] * 4]
    assert plan.seq_idx.dtype == torch.int32


def _plan_cache_worker(rank: int, world: int) -> dict:
    group, cpu = resolve_cp_group(dist.group.WORLD), torch.device("cpu")
    cache = PlanCache()
    cu = torch.tensor([0, 8, 12])
    first = layout.token_plan(cache, group, 1, 6, cu, cpu)
    same = all(layout.token_plan(cache, group, 1, 6, cu, cpu) is first for _ in range(5))  # every layer
    builds = dict(cache.builds)
    cu_next = torch.tensor([0, 4, 12])  # the next batch: same shape, new boundaries
    new = layout.token_plan(cache, group, 1, 6, cu_next, cpu) is not first
    cu_next[1] = 8  # modified in place: the values on the host key the plan
    rebuilt = layout.token_plan(cache, group, 1, 6, cu_next, cpu)
    bshd = layout.token_plan(cache, group, 2, 8, None, cpu)
    return {
        "same": same,
        "builds": builds,
        "new": new,
        "rebuilt_is_first": rebuilt is first,
        "builds_after": dict(cache.builds),
        "bshd_cached": layout.token_plan(cache, group, 2, 8, None, cpu) is bshd,
    }


def test_plan_cache_builds_once_per_batch():
    for r in run_on_ranks(_plan_cache_worker, 2):
        assert r["same"] and r["builds"] == {"token": 1}
        assert r["new"] and r["rebuilt_is_first"]
        assert r["builds_after"] == {"token": 3}


def _mismatch_worker(rank: int, world: int, what: str) -> str:
    group, cpu = resolve_cp_group(dist.group.WORLD), torch.device("cpu")
    cu = {"cu": torch.tensor([0, 8, 12] if rank == 0 else [0, 4, 12]), "one": torch.tensor([0, 12]) if rank else None}
    try:
        if what == "length":
            layout.token_plan(PlanCache(), group, 1, 6 if rank == 0 else 8, None, cpu)
        else:
            layout.token_plan(PlanCache(), group, 1, 6, cu[what], cpu)
    except ValueError as err:
        return str(err)
    return "no error"


@pytest.mark.parametrize("what", ["length", "cu", "one"], ids=["local_lengths", "cu_seqlens", "cu_on_one_rank"])
def test_ranks_with_different_batches_fail_on_every_rank(what):
    """A batch that every rank validates locally but that differs across ranks (other lengths, other cu_seqlens,
    cu_seqlens on one rank only) raises the same error on every rank when its plan is built."""
    messages = run_on_ranks(_mismatch_worker, 2, what)
    assert all("the CP ranks passed different batches" in m for m in messages), messages
    assert messages[0] == messages[1]


@pytest.mark.parametrize("packed", [False, True], ids=["bshd", "thd"])
def test_plan_index_maps_are_int64_past_2_31(packed):
    """Index maps are int64 when B * L passes 2**31: built on the meta device, so nothing is allocated."""
    if packed:
        cu = torch.tensor([0, 2**31, 2**32 + 2**30], dtype=torch.int64)
        plan = build_token_plan(2, 1, int(cu[-1]) // 2, cu, device="meta")
    else:
        plan = build_token_plan(2, 2, 2**31, device="meta")  # B=2, L=2**32 tokens per row
    assert plan.to_sequence.dtype == plan.to_ranks.dtype == torch.int64
    assert plan.to_sequence.numel() == plan.batch * plan.global_len > 2**32
