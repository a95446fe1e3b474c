"""Packed batches in the stream layout (``packed_layout="stream"``): the whole pack cut into ``2*cp`` chunks.

Float64 parity of both strategies with the plain mixer (outputs and every gradient) in real gloo processes, with
documents of any length (not multiples of ``2*cp``), starting anywhere: at a segment's first token, inside a
segment, wholly inside one segment, shorter than the conv halo. Planted bugs in each of the stream's rules are
caught. The plan's document index against a brute-force reading of the pack, the chain scan with barriers against
the sequential recurrence, sharding, positions and the errors.
"""

from __future__ import annotations

import functools

import pytest
import torch

import mamba_cp
from mamba_cp.context import local_positions
from mamba_cp.layout import build_token_plan
from mamba_cp.segments import StreamIndex, build_segment_plan
from mamba_cp.ssm_block import SSMShape
from mamba_cp.strategies import Workload, choose_strategy, estimate_ms
from mamba_cp.strategies.state_chain import chain_scan
from mamba_cp.strategies.state_passing import StatePassing
from mamba_cp.testing import run_on_ranks
from mamba_cp.testing.parity import ParityCase, case_dict, parity_worker, run_named_parity_cases, worst_relative

RTOL = 1e-10  # float64 rounding is ~1e-15; any real mistake shows up at >= 1e-3


def stream(strategy: str = "state_passing", **kw) -> ParityCase:
    return ParityCase(layout="thd", packed_layout="stream", strategy=strategy, **kw)


# (cp, id, case). Segments hold T / (2 cp) tokens; sizes: hidden 16, head_dim 4, state 8.
PARITY = [
    (2, "odd_lengths_mid_segment_starts", stream(seqlens=[3, 17, 1, 11])),
    (2, "starts_at_every_segment_start", stream(seqlens=[8, 8, 8, 8])),
    (2, "one_document", stream(seqlens=[32], chunk_size=4)),
    (2, "one_token_documents", stream(seqlens=[1] * 8)),
    (2, "conv5_short_first_doc", stream(seqlens=[5, 27], conv_kernel=5)),
    (2, "conv1_no_halo", stream(seqlens=[2, 30], conv_kernel=1)),
    (2, "conv2_H3_G1", stream(seqlens=[9, 6, 13], conv_kernel=2, num_heads=3, n_groups=1)),
    (4, "odd_lengths_cp4", stream(seqlens=[3, 17, 1, 11, 16])),
    (4, "long_doc_through_many_segments_G3", stream(seqlens=[7, 9, 48], num_heads=6, n_groups=3)),
    (4, "one_token_docs_conv3", stream(seqlens=[1] * 16, conv_kernel=3)),
    (4, "the_planted_bugs_case", stream(seqlens=[3, 9, 12, 10, 5, 5, 20], chunk_size=4)),
    (8, "cp8_mixed", stream(seqlens=[1, 30, 2, 15, 16], num_heads=2, n_groups=1, chunk_size=4)),
    (16, "cp16_segments_of_two", stream(seqlens=[5, 40, 19], num_heads=2, n_groups=2, chunk_size=4, conv_kernel=3)),
    # Hidden-parallel (heads divide by cp) sees whole streams after its all-to-all.
    (2, "hidden_odd_lengths", stream("hidden", seqlens=[3, 17, 1, 11])),
    (2, "hidden_unfused_conv5", stream("hidden", seqlens=[5, 27], conv_kernel=5, fuse_projection=False)),
    (4, "hidden_cp4", stream("hidden", seqlens=[7, 9, 48], num_heads=4, n_groups=2)),
    (8, "hidden_cp8", stream("hidden", seqlens=[1, 30, 2, 15, 16], num_heads=8, n_groups=1, chunk_size=4)),
]


@functools.cache
def _results(cp: int) -> dict[str, dict[str, float]]:
    return run_named_parity_cases(cp, [(name, case) for c, name, case in PARITY if c == cp])


@pytest.mark.parametrize(("cp", "name"), [pytest.param(cp, name, id=f"cp{cp}-{name}") for cp, name, _ in PARITY])
def test_parity_float64(cp: int, name: str) -> None:
    worst = _results(cp)[name]
    assert {"output", "input.grad", "conv1d.weight.grad", "A_log.grad", "dt_bias.grad", "D.grad"} <= set(worst)
    bad = {k: v for k, v in worst.items() if not v <= RTOL}
    assert not bad, f"relative errors above {RTOL}: {bad}"


# ------------------------------------------------------------------------------------------------ planted bugs


def _without(field: str, value):
    """A ``_stream_index`` whose ``field`` is replaced by ``value(index)``."""
    from mamba_cp import segments

    real = segments._stream_index

    def planted(*args, **kw) -> StreamIndex:
        index = real(*args, **kw)
        fields = {f: getattr(index, f) for f in StreamIndex.__dataclass_fields__}
        fields[field] = value(index)
        return StreamIndex(**fields)

    return planted


PLANTED = {
    "summary_sees_every_document": ("last_doc", lambda i: torch.ones_like(i.last_doc)),
    "no_barriers": ("barrier", lambda i: torch.zeros_like(i.barrier)),
    "incoming_kept_at_document_start": ("keep_incoming", lambda i: torch.ones_like(i.keep_incoming)),
    "conv_halos_cross_documents": ("halo_seq_idx", lambda i: torch.zeros_like(i.halo_seq_idx)),
}


PLANTED_CASE = case_dict(stream(seqlens=[3, 9, 12, 10, 5, 5, 20], chunk_size=4))
"""Document starts 0, 3, 12, 24, 34, 39, 44; segments start every 8 tokens."""


def _planted_worker(rank: int, world: int, bug: str, case: dict) -> dict:
    from mamba_cp import segments

    field, value = PLANTED[bug]
    segments._stream_index = _without(field, value)  # this forked process only
    return parity_worker(rank, world, case)


@pytest.mark.parametrize("bug", sorted(PLANTED))
def test_planted_bugs_are_caught(bug: str) -> None:
    """Each rule of the stream layout, broken alone, fails the float64 parity check by orders of magnitude: a
    summary that counts the documents before a segment's last, a chain that passes states through a document
    start, an incoming state given to a segment that starts a document, a conv window that reads the document
    before. The pack (cp 4, segments of 8 tokens) has a document starting at a segment's first token (24), segments
    holding one or two starts before one that does not (32, 40), and a segment with three documents."""
    worst = worst_relative(run_on_ranks(_planted_worker, 4, bug, PLANTED_CASE))
    assert max(worst.values()) > 1e3 * RTOL, worst


def _no_seq_idx_worker(rank: int, world: int, case: dict) -> dict:
    real = StatePassing._kernel

    def planted(self, *args, **kw):
        kw.pop("seq_idx", None)  # the SSD kernel of the segments no longer stops at document starts
        return real(self, *args, **kw)

    StatePassing._kernel = planted
    return parity_worker(rank, world, case)


def test_planted_kernel_without_document_ids_is_caught() -> None:
    assert max(worst_relative(run_on_ranks(_no_seq_idx_worker, 4, PLANTED_CASE)).values()) > 1e3 * RTOL


# ------------------------------------------------------------------------------------------------ the plan


@pytest.mark.parametrize(("seqlens", "cp", "halo"), [([3, 17, 1, 11], 2, 3), ([1] * 16, 4, 2), ([8, 8, 16], 2, 4)])
def test_stream_index_matches_the_pack(seqlens: list[int], cp: int, halo: int) -> None:
    """Every field of each rank's :class:`StreamIndex`, read off the pack token by token."""
    bounds = [0, *torch.tensor(seqlens).cumsum(0).tolist()]
    total = bounds[-1]
    doc_of = [d for d, n in enumerate(seqlens) for _ in range(n)]
    starts = set(bounds[:-1])
    c = total // (2 * cp)
    for rank in range(cp):
        plan = build_segment_plan(
            cp, rank, 1, total // cp, torch.tensor(bounds), halo=halo, block_size=4, packed_layout="stream"
        )
        st = plan.stream
        assert plan.num_seqs == 1 and plan.seg_len == c and plan.packed is None
        for half, chunk in enumerate([rank, 2 * cp - 1 - rank]):
            pos = range(chunk * c, (chunk + 1) * c)
            first = doc_of[pos[0]]
            assert st.seq_idx[half].tolist() == [doc_of[p] - first for p in pos]
            assert st.last_doc[half].tolist() == [doc_of[p] == doc_of[pos[-1]] for p in pos]
            assert bool(st.barrier[half]) == any(p in starts for p in pos)
            assert bool(st.keep_incoming[half]) == (pos[0] not in starts)
            before = [max(p, 0) for p in range(pos[0] - halo, pos[0])]
            assert st.halo_seq_idx[half].tolist() == [doc_of[p] - first for p in before]


@pytest.mark.parametrize("links", [2, 8, 32])
def test_chain_scan_with_barriers_equals_the_sequential_recurrence(links: int) -> None:
    """With barriers, the closed-form scan equals ``h_{c+1} = [c not a barrier] exp(a_c) h_c + final_c``,
    values and gradients (float64), links given shuffled."""
    g = torch.Generator().manual_seed(links)
    finals = torch.randn(links, 3, 5, dtype=torch.float64, generator=g, requires_grad=True)
    decays = (-3 * torch.rand(links, 3, dtype=torch.float64, generator=g)).requires_grad_()
    barrier = (torch.rand(links, 3, generator=g) < 0.3).double()
    h, want = torch.zeros(3, 5, dtype=torch.float64), []
    for c in range(links):
        want.append(h)
        h = (1 - barrier[c])[:, None] * decays[c].exp()[:, None] * h + finals[c]
    want = torch.stack(want)
    cot = torch.randn(want.shape, dtype=torch.float64, generator=g)
    want_g = torch.autograd.grad(want, (finals, decays), cot)
    position = torch.randperm(links, generator=g)  # link k sits at chain position position[k]
    got = chain_scan(finals[position], decays[position], position, barrier[position]).transpose(0, 1)
    assert (got - want[position]).abs().max() < 1e-13
    got_g = torch.autograd.grad(got, (finals, decays), cot[position])
    assert max(float((a - b).abs().max()) for a, b in zip(got_g, want_g, strict=True)) < 1e-13
    assert barrier.sum() > 0  # the draw has barriers


# ------------------------------------------------------------------------------------------------ sharding


def test_shard_unshard_and_positions() -> None:
    """Rank ``r`` holds stream chunks ``r`` and ``2cp-1-r``; unshard inverts shard; positions restart per
    document; the token plan's gather brings every rank's tokens back to stream order."""
    cu = torch.tensor([0, 3, 20, 21, 32])
    x = torch.arange(32)[:, None]
    cp = 2
    shards = [mamba_cp.shard(x, cp, r, 0, cu, packed_layout="stream") for r in range(cp)]
    assert shards[0][:, 0].tolist() == [*range(0, 8), *range(24, 32)]
    assert shards[1][:, 0].tolist() == [*range(8, 16), *range(16, 24)]
    assert torch.equal(mamba_cp.unshard(shards, 0, cu, packed_layout="stream"), x)
    within = [*range(3), *range(17), 0, *range(11)]  # each token's position in its document
    for r in range(cp):
        pos = local_positions(cp, r, 16, cu, None, "stream")
        assert pos[0].tolist() == [within[int(t)] for t in shards[r][:, 0]]
    plan = build_token_plan(cp, 1, 16, cu, packed_layout="stream")
    assert torch.equal(torch.cat(shards)[plan.to_sequence], x)


def test_layout_errors() -> None:
    cu = torch.tensor([0, 3, 21])  # 21 tokens: not a multiple of 2*cp
    with pytest.raises(ValueError, match=r"21 tokens, which is not a multiple of 2\*cp_size \(4\)"):
        mamba_cp.shard(torch.zeros(21, 2), 2, 0, 0, cu, packed_layout="stream")
    with pytest.raises(ValueError, match=r"packed_layout must be one of \['sequences', 'stream'\], got 'docs'"):
        mamba_cp.shard(torch.zeros(20, 2), 2, 0, 0, torch.tensor([0, 3, 20]), packed_layout="docs")
    with pytest.raises(ValueError, match="packed_layout must be one of"):
        mamba_cp.parallelize(mamba_cp.Mamba2Mixer(hidden_size=8, num_heads=2, head_dim=4), 1, packed_layout="x")
    # per-sequence cuts still need every length to divide; the stream needs only the total
    with pytest.raises(ValueError, match="sequence 0 has length 3"):
        mamba_cp.shard(torch.zeros(20, 2), 2, 0, 0, torch.tensor([0, 3, 20]))
    mine = mamba_cp.shard(torch.zeros(20, 2), 2, 0, 0, torch.tensor([0, 3, 20]), packed_layout="stream")
    assert mine.shape == (10, 2)
    # state passing's two segments need an even local length even on one rank (no token may be dropped)
    with pytest.raises(ValueError, match=r"local length x cp_size = 7 x 1\) must be a positive multiple"):
        build_segment_plan(1, 0, 1, 7, torch.tensor([0, 3, 7]), halo=3, block_size=4, packed_layout="stream")


def _prefill_refused_worker(rank: int, world: int) -> None:
    mixer = mamba_cp.Mamba2Mixer(hidden_size=8, num_heads=2, head_dim=4, state_size=4, dtype=torch.float64)
    mamba_cp.parallelize(mixer, torch.distributed.group.WORLD, "state_passing", packed_layout="stream")
    cu = torch.tensor([0, 3, 8])
    h = torch.randn(4, 8, dtype=torch.float64)
    plan = mixer.strategy.plan_for(h, cu)
    mixer.strategy.scan_with_states(h[None], mixer.in_proj, mixer.ssm_params(), plan)


def test_state_passing_final_states_refuse_the_stream() -> None:
    """Prefill's per-document final states are not built for the stream layout: a clear error on every rank."""
    with pytest.raises(ValueError, match="packed_layout='sequences' for prefill"):
        run_on_ranks(_prefill_refused_worker, 2)


# ------------------------------------------------------------------------------------------------ auto


def test_auto_costs_a_stream_pack_like_a_bshd_row() -> None:
    """The cost model charges a pack cut as one stream what it charges a BSHD row (no per-document term; the
    barrier flags are 2*n more floats), so at cp 8 over 150 GB/s a 64-document pack goes to state passing in the
    stream layout and to hidden-parallel when cut per document."""
    shape = SSMShape(num_heads=128, head_dim=64, n_groups=8, d_state=128)

    def workload(docs: int, layout: str) -> Workload:
        return Workload(tokens=131072, documents=docs, bandwidth_gbps=150.0, packed_layout=layout)

    row = estimate_ms("state_passing", shape, 8, workload(1, "sequences"), 150.0)
    pack = estimate_ms("state_passing", shape, 8, workload(64, "stream"), 150.0)
    assert row <= pack < row * 1.001
    assert choose_strategy(shape, 8, workload(64, "stream"), 150.0).strategy == "state_passing"
    assert choose_strategy(shape, 8, workload(64, "sequences"), 150.0).strategy == "hidden"
