"""The per-batch segment plan of state passing, checked without any process group.

Every index map is compared with a brute-force reading of the head-tail layout
(:func:`mamba_cp.layout.head_tail_positions` / :func:`~mamba_cp.layout.packed_head_tail_positions`).
"""

from __future__ import annotations

import pytest
import torch

from mamba_cp.layout import head_tail_positions, packed_head_tail_positions
from mamba_cp.plan_cache import PlanCache
from mamba_cp.segments import SlotLayout, build_segment_plan, choose_slot_width, segment_plan

PACKED = [
    pytest.param(2, [4, 40, 12, 8], id="cp2_short_and_long_seqs"),
    pytest.param(2, [4], id="cp2_one_seq_of_2cp_tokens"),
    pytest.param(4, [8, 64, 16, 8], id="cp4_pieces_shorter_than_halo"),
    pytest.param(3, [6, 6, 6, 36], id="cp3_many_short_then_long"),
    pytest.param(1, [2, 6, 4], id="cp1"),
    pytest.param(2, [16, 32], id="cp2_segments_whole_blocks_no_pad_slots"),
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


def _dense(sl: SlotLayout, t_local: int) -> SlotLayout:
    """``sl`` with every identity map (``None``) written out."""
    ident = torch.arange(t_local)
    return SlotLayout(
        sl.rows,
        sl.width,
        sl.num_segments,
        ident if sl.slot_src is None else sl.slot_src,
        ident if sl.slot_token is None else sl.slot_token,
        ident if sl.token_slot is None else sl.token_slot,
        torch.arange(sl.rows) if sl.row_seg is None else sl.row_seg,
    )


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
            # Chain position = chunk index inside the sequence.
            c = len(toks)
            assert (int(glob[0]) - seq_start) // c == int(plan.chain_pos[g % 2])
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
        # Slot grid: rows of 4 slots, each inside one segment, every segment starting a row; tokens map
        # injectively to slots and back; pad slots point one past the end and read a token of their segment.
        sl = plan.slots
        assert sl.width == 4 and sl.num_segments == plan.num_segments
        padded = any(len(toks) % 4 for toks in pieces)
        assert sl.slots_are_tokens == (not padded)  # maps that would be the identity are None
        assert (sl.row_seg is None) == (sl.rows == plan.num_segments)
        sl = _dense(sl, t_local)
        assert sl.slot_token.shape == sl.slot_src.shape == (sl.rows * 4,)
        assert sl.token_slot.unique().numel() == t_local and int(sl.token_slot.max()) < sl.rows * 4
        assert torch.equal(sl.slot_token[sl.token_slot], torch.arange(t_local))
        pad = sl.slot_token == t_local
        assert int(pad.sum()) == sl.rows * 4 - t_local
        assert torch.equal(sl.slot_src[~pad], sl.slot_token[~pad])
        slot_row = torch.arange(sl.rows * 4) // 4
        assert torch.equal(pk.token_seg[sl.slot_src], sl.row_seg[slot_row])  # pads read their own segment
        assert torch.equal(sl.row_seg[sl.token_slot // 4], pk.token_seg)
        assert (sl.token_slot[pk.seg_first] % 4 == 0).all()
        assert torch.equal(sl.row_seg, sl.row_seg.sort().values)
        assert sl.rows == sum(-(-len(toks) // 4) for toks in pieces)  # no row beyond a segment's last block


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
        sl = plan.slots
        assert sl.slots_are_tokens and sl.row_seg is None and (sl.rows, sl.width) == (2 * batch, c)
        assert plan.chain_pos.tolist() == [r, 2 * cp - 1 - r]
        assert plan.chain_before.tolist() == [
            [k < r for k in range(2 * cp)],
            [k < 2 * cp - 1 - r for k in range(2 * cp)],
        ]
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


@pytest.mark.parametrize("seqlens", [[4, 40, 12, 8], [16, 32]], ids=["pad_slots", "no_pad_slots"])
def test_slot_layout_ops(seqlens: list[int]) -> None:
    """The slot grid's gathers and per-segment sums against plain loops over the segments (cp=2, Q=4)."""
    cu = torch.tensor([0, *torch.tensor(seqlens).cumsum(0).tolist()])
    t_local = sum(seqlens) // 2
    plan = build_segment_plan(2, 1, 1, t_local, cu, halo=3, block_size=4)
    sl, pk = plan.slots, plan.packed
    t = torch.randn(t_local, 3, dtype=torch.float64)
    assert torch.equal(sl.to_tokens(sl.to_slots(t)), t)
    padded = sl.to_slots_zero_pad(t)
    dense = _dense(sl, t_local)
    pad = dense.slot_token == t_local
    assert torch.equal(padded[~pad], t[dense.slot_token[~pad]]) and not padded[pad].any()
    rows = torch.randn(sl.rows, 2, dtype=torch.float64)
    sums = sl.rows_to_segments(rows)
    for g in range(plan.num_segments):
        assert torch.allclose(sums[g], rows[dense.row_seg == g].sum(0), rtol=0, atol=1e-15)
    assert torch.equal(sl.segments_to_rows(sums), sums[dense.row_seg])
    assert torch.equal(dense.row_seg[dense.token_slot // 4], pk.token_seg)


@pytest.mark.parametrize(
    ("seg_lens", "want"),
    [
        ([32768, 32768], 32768),  # one long sequence at cp=2: one row per segment, as BSHD
        ([512] * 128, 512),  # 64 equal documents: one row each, no pad slot
        ([1000, 1000, 3000, 3000], 1000),  # no padding at the gcd
        ([7, 7, 130, 130, 1, 1], 64),  # short odd documents: padded rows, fewer states
        ([10, 54, 21, 43] * 16, 64),  # many short documents (gcd 1): one padded row each
    ],
)
def test_choose_slot_width(seg_lens: list[int], want: int) -> None:
    """NemotronH-like state size 128: few rows of float32 states, little padding, and no gathers at all when a
    width divides every segment."""
    assert choose_slot_width(torch.tensor(seg_lens), 128) == want


def test_plan_uses_chosen_width_with_state_size() -> None:
    cu = torch.tensor([0, 64, 192])  # cp=2: segments of 16 and 32 tokens
    plan = build_segment_plan(2, 0, 1, 96, cu, halo=3, block_size=4, state_size=8)
    assert plan.slots.width == choose_slot_width(torch.tensor([16, 16, 32, 32]), 8) == 16
    assert plan.slots.slots_are_tokens and plan.slots.rows == 6
    assert build_segment_plan(2, 0, 1, 96, cu, halo=3, block_size=4).slots.width == 4  # no state size: Q
