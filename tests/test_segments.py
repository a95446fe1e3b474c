"""The per-batch segment plan of state passing, checked without any process group.

Every index map is compared with a brute-force reading of the head-tail layout
(:func:`mamba_cp.layout.head_tail_positions` / :func:`~mamba_cp.layout.packed_head_tail_positions`).
"""

from __future__ import annotations

import pytest
import torch

from mamba_cp.layout import head_tail_positions, packed_head_tail_positions
from mamba_cp.plan_cache import PlanCache
from mamba_cp.segments import build_segment_plan, chain_rank, segment_plan

PACKED = [
    pytest.param(2, [4, 40, 12, 8], id="cp2_short_and_long_seqs"),
    pytest.param(2, [4], id="cp2_one_seq_of_2cp_tokens"),
    pytest.param(4, [8, 64, 16, 8], id="cp4_pieces_shorter_than_halo"),
    pytest.param(3, [6, 6, 6, 36], id="cp3_many_short_then_long"),
    pytest.param(1, [2, 6, 4], id="cp1"),
    pytest.param(2, [16, 32], id="cp2_segments_whole_blocks"),
    pytest.param(2, [16, 16], id="cp2_one_block_per_segment"),
]


def _positions(cp: int, seqlens: list[int] | None, batch: int = 1, seqlen: int = 0) -> torch.Tensor:
    """``[cp, local]`` global positions of every rank's tokens (packed) or of one BSHD row."""
    if seqlens is None:
        return head_tail_positions(seqlen, cp)
    cu = torch.tensor([0, *torch.tensor(seqlens).cumsum(0).tolist()])
    return packed_head_tail_positions(cu, cp)


def _seq_start_of(pos: int, seqlens: list[int]) -> int:
    start = 0
    for n in seqlens:
        if pos < start + n:
            return start
        start += n
    raise AssertionError(pos)


def _segments(positions_r: torch.Tensor, seqlens: list[int], cp: int) -> list[list[int]]:
    """Brute force: this rank's local tokens cut into (sequence, chunk) pieces, local order."""
    pieces: list[list[int]] = []
    start = 0
    for n in seqlens:
        c = n // (2 * cp)
        for _ in range(2):  # head then tail of this sequence
            pieces.append(list(range(start, start + c)))
            start += c
    assert start == positions_r.numel()
    return pieces


@pytest.mark.parametrize(("cp", "seqlens"), PACKED)
@pytest.mark.parametrize("halo", [0, 1, 3], ids=lambda h: f"halo{h}")
def test_packed_plan_matches_layout(cp: int, seqlens: list[int], halo: int) -> None:
    cu = torch.tensor([0, *torch.tensor(seqlens).cumsum(0).tolist()], dtype=torch.int32)
    positions = _positions(cp, seqlens)
    t_local = positions.shape[1]
    # Every rank's tail buffer, by global position (-1: zero padding), as the all-gather concatenates them.
    tails_by_rank = []
    plans = [build_segment_plan(cp, r, 1, t_local, cu, halo=halo, block_size=4) for r in range(cp)]
    for r, plan in enumerate(plans):
        pk = plan.packed
        buf = torch.full((plan.num_segments * halo,), -1, dtype=torch.int64)
        buf[pk.tail_slots] = positions[r][pk.tail_tokens]
        tails_by_rank.append(buf)
    gathered = torch.cat(tails_by_rank)

    for r, plan in enumerate(plans):
        pk, pos = plan.packed, positions[r]
        pieces = _segments(pos, seqlens, cp)
        assert plan.num_seqs == len(seqlens) and plan.num_segments == len(pieces)
        assert pk.seg_idx.dtype == torch.int32 and pk.seg_idx.shape == (1, t_local)
        assert torch.equal(pk.seg_idx[0].long(), pk.token_seg)
        for g, toks in enumerate(pieces):
            assert pk.token_seg[toks].eq(g).all()
            assert int(pk.seg_first[g]) == toks[0] and int(pk.seg_stop[g]) == toks[-1] + 1
            glob = pos[toks]
            assert torch.equal(glob, torch.arange(int(glob[0]), int(glob[0]) + len(toks))), "segment not contiguous"
            seq_start = _seq_start_of(int(glob[0]), seqlens)
            assert _seq_start_of(int(glob[-1]), seqlens) == seq_start, "segment crosses a sequence boundary"
            # Chain position = chunk index inside the sequence: this rank's head (g even) or tail (g odd).
            c = len(toks)
            chunk = (int(glob[0]) - seq_start) // c
            assert [int(v) for v in chain_rank(torch.tensor(chunk), cp)] == [r, g % 2]
            # Halo slot j holds global position start - halo + j when inside the sequence, else zero.
            halo_pos = torch.full((halo,), -1, dtype=torch.int64)
            inside = plan.halo_slots // max(halo, 1) == g
            halo_pos[plan.halo_slots[inside] % halo] = gathered[plan.halo_rows[inside]]
            want = torch.arange(int(glob[0]) - halo, int(glob[0]))
            want = torch.where(want >= seq_start, want, -1)
            assert torch.equal(halo_pos, want), f"rank {r} segment {g}: halo {halo_pos} != {want}"
        # Conv head windows: slot g*halo + j reads token j of segment g; the first min(halo, c_g) are rewritten.
        assert pk.head_src.shape == (plan.num_segments * halo,) and bool((pk.head_src < t_local).all())
        want_slots, want_tokens = [], []
        for g, toks in enumerate(pieces):
            for j in range(min(halo, len(toks))):
                assert int(pk.head_src[g * halo + j]) == toks[j]
                want_slots.append(g * halo + j)
                want_tokens.append(toks[j])
        assert pk.head_slots.tolist() == want_slots and pk.head_tokens.tolist() == want_tokens
        # The fused kernels' work table: the segments as token ranges of the local stream.
        work = plan.work
        assert work.num_segments == plan.num_segments and work.total_tokens == t_local
        assert [(toks[0], toks[-1] + 1) for toks in pieces] == list(
            zip(work.seg_first.tolist(), work.seg_stop.tolist(), strict=True)
        )


@pytest.mark.parametrize("cp", [1, 2, 4])
@pytest.mark.parametrize("seqlen_per_chunk", [1, 2, 5], ids=lambda c: f"chunk_len{c}")
def test_bshd_plan_matches_layout(cp: int, seqlen_per_chunk: int) -> None:
    halo, batch = 3, 2
    seqlen = 2 * cp * seqlen_per_chunk
    positions = head_tail_positions(seqlen, cp)  # [cp, L_local]; every row of the batch alike
    c = seqlen_per_chunk
    gathered = []
    for r in range(cp):
        seg = positions[r].view(2, c)
        tail = torch.nn.functional.pad(seg, (max(halo - c, 0), 0), value=-1)[:, -halo:]  # [2, halo]
        # Flat positions over the batch (row b starts at b * L); padding stays -1.
        gathered.append(torch.stack([torch.where(tail >= 0, tail + b * seqlen, -1) for b in range(batch)]))
    gathered = torch.stack(gathered).reshape(-1)  # [cp, B, 2, halo] as the all-gather concatenates them
    for r in range(cp):
        plan = build_segment_plan(cp, r, batch, seqlen // cp, halo=halo, block_size=4)
        assert plan.packed is None and plan.seg_len == c and plan.num_seqs == batch
        assert plan.work.seg_first.tolist() == [g * c for g in range(2 * batch)]
        assert plan.work.seg_stop.tolist() == [(g + 1) * c for g in range(2 * batch)]
        rank, half = chain_rank(torch.tensor([r, 2 * cp - 1 - r]), cp)  # this rank's chunks: its head, its tail
        assert rank.tolist() == [r, r] and half.tolist() == [0, 1]
        got = torch.full((batch * 2 * halo,), -1, dtype=torch.int64)
        got[plan.halo_slots] = gathered[plan.halo_rows]
        for b in range(batch):
            for half in range(2):
                start = int(positions[r].view(2, c)[half, 0])
                want = torch.arange(start - halo, start)
                want = torch.where(want >= 0, want + b * seqlen, -1)
                slots = got[(b * 2 + half) * halo : (b * 2 + half + 1) * halo]
                assert torch.equal(slots, want), (r, b, half)


def test_plan_errors_are_value_errors() -> None:
    with pytest.raises(ValueError, match="multiple of 2\\*cp_size"):
        build_segment_plan(2, 0, 1, 3, halo=3, block_size=4)  # L = 6 not a multiple of 4
    with pytest.raises(ValueError, match="not a multiple of 2\\*cp_size"):
        build_segment_plan(2, 0, 1, 6, torch.tensor([0, 6, 12]), halo=3, block_size=4)
    with pytest.raises(ValueError, match="batch size 1"):
        build_segment_plan(2, 0, 2, 8, torch.tensor([0, 16]), halo=3, block_size=4)
    with pytest.raises(ValueError, match="must end at the global token count"):
        build_segment_plan(2, 0, 1, 8, torch.tensor([0, 8]), halo=3, block_size=4)
    with pytest.raises(ValueError, match="cp_rank"):
        build_segment_plan(2, 2, 1, 8, halo=3, block_size=4)
    with pytest.raises(ValueError, match="dtype"):
        build_segment_plan(2, 0, 1, 8, torch.tensor([0.0, 16.0]), halo=3, block_size=4)


def test_cache_builds_once_per_batch() -> None:
    cache = PlanCache()
    cu = torch.tensor([0, 8, 16], dtype=torch.int32)
    kw = {"halo": 3, "block_size": 4, "device": torch.device("cpu")}
    first = segment_plan(cache, 2, 0, 1, 8, cu, **kw)
    assert segment_plan(cache, 2, 0, 1, 8, cu, **kw) is first and cache.builds["segment"] == 1
    assert segment_plan(cache, 2, 0, 1, 8, cu.clone(), **kw) is first  # same values on the CPU: same batch
    cu[1] = 4  # modified in place: a new plan
    assert segment_plan(cache, 2, 0, 1, 8, cu, **kw).packed.seg_first.tolist() != first.packed.seg_first.tolist()
    assert segment_plan(cache, 2, 0, 2, 8, None, **kw) is segment_plan(cache, 2, 0, 2, 8, None, **kw)
    assert segment_plan(cache, 2, 0, 2, 8, None, halo=1, block_size=4, device=torch.device("cpu")).halo == 1
