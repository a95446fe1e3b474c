"""Head-parallel ("Ulysses") attention on mamba_cp's transport: equals attention over the whole sequence.

Real gloo processes, float64. The reference masks are built here independently (per-token loops over the
sequences), not with the library's :func:`~mamba_cp.attention.causal_mask`.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.distributed as dist

import mamba_cp
from mamba_cp import CPGroup, UlyssesAttention
from mamba_cp.attention import MaskCache, additive_mask, causal_mask
from mamba_cp.layout import build_token_plan
from mamba_cp.testing import run_on_ranks
from mamba_cp.testing.dispatch import OpRecorder

TOL = 1e-12


def reference_allowed(length: int, cu_seqlens: list[int] | None) -> torch.Tensor:
    """``[L, L]`` bool: query i may see key j iff j <= i in the same sequence (built token by token)."""
    bounds = cu_seqlens or [0, length]
    allowed = torch.zeros(length, length, dtype=torch.bool)
    for start, end in zip(bounds[:-1], bounds[1:], strict=True):
        for i in range(start, end):
            allowed[i, start : i + 1] = True
    return allowed


def attend(q, k, v, allowed, groups: int) -> torch.Tensor:
    """Plain attention: ``[B, H, L, d]`` queries, ``[B, H/groups, L, d]`` keys/values -> ``[B, L, H, d]``."""
    k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)
    scores = (q @ k.transpose(-1, -2)) / math.sqrt(q.shape[-1])
    scores = scores.masked_fill(~allowed, float("-inf"))
    return (scores.softmax(-1) @ v).transpose(1, 2)


CASES = {
    # name: (heads, kv_heads, layout)
    "mha-bshd": (4, 4, "bshd"),
    "gqa-kv<cp-thd": (4, 1, "thd"),
    "gqa-kv==2-bshd": (8, 2, "bshd"),
    "gqa-kv==2-thd": (8, 2, "thd"),
}


def _case(rank: int, world: int, heads: int, kv_heads: int, layout: str) -> dict[str, float]:
    group = dist.group.WORLD
    gen = torch.Generator().manual_seed(heads * 10 + kv_heads)
    d = 4
    if layout == "bshd":
        batch, length, cu = 2, 8 * world, None
    else:
        lengths = [2 * world, 6 * world, 4 * world]  # short, cut across ranks, unequal
        batch, length = 1, sum(lengths)
        cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()])
    q = torch.randn(batch, heads, length, d, generator=gen, dtype=torch.float64)
    k = torch.randn(batch, kv_heads, length, d, generator=gen, dtype=torch.float64)
    v = torch.randn(batch, kv_heads, length, d + 1, generator=gen, dtype=torch.float64)  # d_v != d
    w = torch.randn(batch, length, heads, d + 1, generator=gen, dtype=torch.float64)

    ref_in = [t.clone().requires_grad_(True) for t in (q, k, v)]
    allowed = reference_allowed(length, None if cu is None else cu.tolist())
    ref_out = attend(*ref_in, allowed, heads // kv_heads)
    (ref_out * w).sum().backward()

    def local(t: torch.Tensor, seq_dim: int) -> torch.Tensor:
        return mamba_cp.shard(t, world, rank, seq_dim=seq_dim, cu_seqlens=cu)

    ulysses = UlyssesAttention(group, heads, kv_heads)
    loc_in = [local(t, 2).detach().requires_grad_(True) for t in (q, k, v)]
    plan = ulysses.plan_for(batch, length // world, cu, q.device)
    qs, ks, vs = ulysses.scatter(*loc_in, plan)
    assert qs.shape == (batch, heads // world, length, d)
    assert ks.shape == (batch, max(kv_heads // world, 1), length, d)
    out = ulysses.gather(attend(qs, ks, vs, causal_mask(plan)[0, 0], ulysses.kv_groups_local), plan)
    (out * local(w, 1)).sum().backward()

    def rel(a: torch.Tensor, b: torch.Tensor) -> float:
        return float((a.detach() - b.detach()).abs().max() / b.detach().abs().max())

    return {
        "output": rel(out, local(ref_out, 1)),
        **{f"{n}.grad": rel(t.grad, local(r.grad, 2)) for n, t, r in zip("qkv", loc_in, ref_in, strict=True)},
    }


def ulysses_worker(rank: int, world: int) -> dict[str, dict[str, float]]:
    return {name: _case(rank, world, *case) for name, case in CASES.items()}


@pytest.fixture(scope="module")
def ulysses_results() -> dict[int, list[dict]]:
    return {cp: run_on_ranks(ulysses_worker, cp) for cp in (2, 4)}


@pytest.mark.parametrize("cp", [2, 4])
@pytest.mark.parametrize("case", list(CASES))
def test_ulysses_matches_whole_sequence_attention(ulysses_results, cp, case):
    worst = {k: max(r[case][k] for r in ulysses_results[cp]) for k in ulysses_results[cp][0][case]}
    assert set(worst) == {"output", "q.grad", "k.grad", "v.grad"}
    assert all(v <= TOL for v in worst.values()), f"cp={cp} {case}: {worst}"


# --------------------------------------------------------------------------------------------------
# Masks, plans and head checks: no processes
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("cu", [None, [0, 3, 4, 9, 16]], ids=["causal", "block-diagonal"])
def test_mask_over_true_positions(cu):
    cu_t = None if cu is None else torch.tensor(cu)
    plan = build_token_plan(1, 1, 16, cu_t)
    allowed = causal_mask(plan)
    assert allowed.shape == (1, 1, 16, 16)
    assert torch.equal(allowed[0, 0], reference_allowed(16, cu))
    additive = additive_mask(allowed, torch.float32)
    assert additive.dtype == torch.float32
    assert torch.equal(additive == 0, allowed)
    assert torch.all(additive[~allowed] == torch.finfo(torch.float32).min)


def test_mask_cache_builds_once_per_batch():
    masks = MaskCache()
    plan = build_token_plan(1, 1, 8, torch.tensor([0, 4, 8]))
    first = masks.get(plan, "bool")
    assert masks.get(plan, "bool") is first and masks.builds == 1
    masks.get(plan, "additive", torch.float64)
    assert masks.builds == 2
    assert masks.get(build_token_plan(1, 1, 8, torch.tensor([0, 4, 8])), "bool") is not first  # a new batch
    kw = masks.get(plan, "varlen")
    assert kw["max_length_q"] == 4 and kw["cu_seq_lens_q"].dtype == torch.int32
    builds = masks.builds
    document = masks.get(plan, "document-blocks", block_size=4)  # the O(T) packed mask (FlexAttention's tiles)
    assert masks.get(plan, "document-blocks", block_size=4) is document and masks.builds == builds + 1
    assert masks.get(plan, "document-blocks", block_size=2) is not document  # another tile size: another mask
    with pytest.raises(ValueError, match=r"mask kind must be one of .*got 'sparse'"):
        masks.get(plan, "sparse")


@pytest.mark.parametrize(
    "heads,kv_heads,cp,message",
    [
        (6, 2, 4, r"attention num_heads \(6\) must be divisible by cp_size \(4\)"),
        (12, 3, 4, r"cp_size \(4\) must be divisible by num_key_value_heads when it is < cp_size \(3\)"),
        (12, 6, 4, r"num_key_value_heads \(6\) must be divisible by cp_size when it is >= cp_size \(4\)"),
        (8, 3, 2, r"attention num_heads \(8\) must be divisible by num_key_value_heads \(3\)"),
    ],
)
def test_head_counts_that_do_not_split(heads, kv_heads, cp, message):
    with pytest.raises(ValueError, match=message):
        UlyssesAttention(CPGroup(group=None, size=cp, rank=0), heads, kv_heads)


def test_kv_heads_fewer_than_cp_are_repeated():
    u = UlyssesAttention(CPGroup(group=None, size=4, rank=0), 8, 2)
    assert (u.kv_repeat, u.num_heads_local, u.num_kv_heads_local, u.kv_groups_local) == (2, 2, 1, 2)
    u = UlyssesAttention(CPGroup(group=None, size=2, rank=0), 8, 4)
    assert (u.kv_repeat, u.num_heads_local, u.num_kv_heads_local, u.kv_groups_local) == (1, 4, 2, 2)


# --------------------------------------------------------------------------------------------------
# Inside a transformers hybrid: eager attention with kv heads < cp, one mask and plan per batch,
# one all-to-all each way per layer
# --------------------------------------------------------------------------------------------------


def hybrid_worker(rank: int, world: int) -> dict:
    import copy

    import transformers

    from mamba_cp.integrations.transformers import KeepFloat64

    torch.manual_seed(0)
    config = transformers.NemotronHConfig(
        vocab_size=64, hidden_size=32, num_attention_heads=4, num_key_value_heads=1, head_dim=8,
        intermediate_size=48, mamba_num_heads=8, mamba_head_dim=8, n_groups=2, ssm_state_size=8, chunk_size=8,
        layers_block_type=["linear_attention", "full_attention", "mlp", "linear_attention", "full_attention"],
        attn_implementation="eager",
    )  # fmt: skip
    group = dist.group.WORLD
    with KeepFloat64():  # eager attention's softmax is float32 in transformers; keep it float64
        model = transformers.NemotronHForCausalLM(config).double()
        reference = mamba_cp.parallelize(copy.deepcopy(model), 1)
        mamba_cp.parallelize(model, group)
        ids = torch.randint(0, 64, (1, 16 * world), generator=torch.Generator().manual_seed(0))
        cu = torch.tensor([0, 4 * world, 16 * world])
        with mamba_cp.batch_context(cu_seqlens=cu):
            ref_logits = reference(input_ids=ids).logits
        ref_logits.square().sum().backward()
        with mamba_cp.batch_context(cu_seqlens=cu, cp_group=group) as ctx:
            with OpRecorder() as rec:
                logits = model(input_ids=ctx.shard(ids)).logits
            forward = rec.all_to_alls
            with OpRecorder() as rec:
                logits.square().sum().backward()
            ref_local = ctx.shard(ref_logits.detach())
        mamba_cp.all_reduce_gradients(model, group)
    attention = model.model.layers[1].mixer.context_parallel
    grads = [
        float((p.grad - q.grad).abs().max() / q.grad.abs().max())
        for p, q in zip(model.parameters(), reference.parameters(), strict=True)
    ]
    return {
        "forward": forward,
        "backward": rec.all_to_alls,
        "plans": attention.ulysses.plans.builds["token"],
        "masks": attention.masks.builds,
        "logits": float((logits.detach() - ref_local).abs().max() / ref_local.abs().max()),
        "grads": max(grads),
    }


@pytest.mark.parametrize("cp", [2, 4])
def test_hybrid_eager_attention_kv_heads_below_cp(cp):
    """NemotronH with eager attention and one kv head, packed: equal to no CP; per batch one plan and one mask;
    one all-to-all each way per layer (2 Mamba + 2 attention layers), forward and backward."""
    pytest.importorskip("transformers")
    for counts in run_on_ranks(hybrid_worker, cp):
        assert counts["logits"] <= 1e-10 and counts["grads"] <= 1e-10, counts
        assert {k: counts[k] for k in ("forward", "backward", "plans", "masks")} == {
            "forward": 8,
            "backward": 8,
            "plans": 1,
            "masks": 1,
        }
