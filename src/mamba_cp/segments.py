"""Per-batch segment plan for state-passing context parallelism: which tokens form which segment, where
each segment's conv halo comes from, and where it sits in its sequence's chain of segments.

Shape legend: ``S`` sequences in the batch (``B`` rows for BSHD, packed sequences for THD), ``cp`` ranks,
``r`` this rank, ``K - 1 = halo`` conv halo width, ``T_local`` / ``L_local`` tokens on this rank,
``Q`` block size (the mixer's SSD chunk size), ``N`` the SSD state size.

The head-tail layout cuts every sequence ``s`` into ``2*cp`` equal chunks of ``c_s = len_s / (2*cp)``
tokens; rank ``r`` holds chunk ``r`` (its *head* piece) and chunk ``2*cp-1-r`` (its *tail* piece) of every
sequence. A **segment** is one such piece: one chunk of one sequence, ``2*S`` of them per rank, numbered
``2*s + half`` (``half`` 0 = head, 1 = tail) in the rank's local token order. A segment never crosses a
sequence boundary, so every sequence is the same *chain* of ``2*cp`` segments (chain position = chunk
index), whatever the packing. Rank 0's tail of sequence ``s`` and head of ``s + 1`` are adjacent in the
global order, but they are kept as two segments: the boundary between them resets the state anyway, and a
uniform ``[S, 2]`` grid of segments keeps every per-layer op a fixed-shape tensor op.

A packed batch in the *stream* layout (``packed_layout="stream"``) is cut like one BSHD row: rank ``r`` holds
chunks ``r`` and ``2*cp-1-r`` of the whole pack, so it has two segments whatever the number of documents, and
one chain of ``2*cp`` segments runs through the pack. Documents may start anywhere inside a segment
(:class:`StreamIndex`): the conv and the SSD take each segment's document ids (``seq_idx``), a segment's summary
counts only its last document, a segment that starts a document takes no incoming state, and a segment that
holds a document start is a *barrier* the chain does not pass through. Per-document work disappears: a document
wholly inside a segment needs nothing beyond the SSD kernel's own ``seq_idx``.

Per-segment reductions (each segment's final state) and broadcasts (its incoming state) run over the
segments as token ranges of the flat local axis (:class:`~mamba_cp.kernels.segment_scan.SegmentWork`, the
work table of the fused kernels): BSHD segments are the rows of ``[2B, c]``, packed segments the pieces of
the local stream; the work is O(T) whatever their lengths.

:func:`build_segment_plan` is a pure function of ``(cp_size, cp_rank, batch, local_len, cu_seqlens, halo,
block_size)``; it reads ``cu_seqlens`` once (to validate and build the index maps) and is
unit-testable without a process group. :func:`segment_plan` builds a batch's plan once (in the shared
:class:`~mamba_cp.plan_cache.PlanCache`) and serves it to every layer.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .kernels.segment_scan import SegmentWork, build_segment_work, row_segments
from .plan_cache import PlanCache, varying
from .validation import ConfigError, check_packed_batch, layout_fingerprint


@dataclass(frozen=True, slots=True)
class PackedIndex:
    """Index maps of a packed (THD) batch on one rank; all int64 ``[...]`` tensors on the tokens' device
    unless said otherwise. Built once per batch; the per-layer path only gathers and scatters with them."""

    seg_idx: torch.Tensor
    """``[1, T_local]`` int32 segment id of each local token (the SSD kernel's and the conv's ``seq_idx``: a
    zero state at every segment start, hence at every sequence start)."""
    token_seg: torch.Tensor
    """``[T_local]`` segment id of each local token."""
    seg_first: torch.Tensor
    """``[2*S]`` local index of each segment's first token."""
    seg_stop: torch.Tensor
    """``[2*S]`` local index one past each segment's last token."""
    tail_tokens: torch.Tensor
    """``[n_tail]`` local tokens sent as conv halo (the last ``min(c_s, halo)`` of each segment)."""
    tail_slots: torch.Tensor
    """``[n_tail]`` where each of them goes in the ``[2*S*halo]`` tail buffer (the rest stays zero)."""
    head_src: torch.Tensor
    """``[2*S*halo]`` the token at offset ``j`` of segment ``g`` for head slot ``g*halo + j`` of the conv
    windows ``[2*S, halo | halo, C]`` (clamped into the batch past a segment's end: such slots only feed
    window outputs that are dropped)."""
    head_slots: torch.Tensor
    """``[n_head]`` the head slots ``g*halo + j`` with ``j < min(halo, c_g)``: outputs that need the halo."""
    head_tokens: torch.Tensor
    """``[n_head]`` their local tokens ``seg_first[g] + j``."""


@dataclass(frozen=True, slots=True)
class StreamIndex:
    """Where documents start inside this rank's two segments ``[2, c]`` of a pack in the stream layout; all on the
    tokens' device."""

    seq_idx: torch.Tensor
    """``[2, c]`` int32 document id of each token, counted from the segment's first document (0): the conv's and
    the SSD kernel's ``seq_idx`` (the kernel's ``initial_states`` feeds document 0 only)."""
    last_doc: torch.Tensor
    """``[2, c]`` bool: the token belongs to the segment's last document, the only one its end state sees."""
    halo_seq_idx: torch.Tensor
    """``[2, halo]`` int32 document ids of the ``halo`` tokens before each segment (the conv's
    ``history_seq_idx``), on ``seq_idx``'s count: 0 where the segment's first document goes on into the halo,
    negative before it (the halo slots before the pack's start read zeros, whatever their ids)."""
    barrier: torch.Tensor
    """``[2]`` bool: the segment holds a document start (its first token included), so no state passes through it
    (it rides with the summaries)."""
    keep_incoming: torch.Tensor
    """``[2]`` bool: False where the segment's first token starts a document (its incoming state is dropped)."""


@dataclass(frozen=True, slots=True)
class SegmentPlan:
    """How one batch's tokens on one rank split into segments, and how segments connect across ranks."""

    cp_size: int
    cp_rank: int
    batch: int
    """``B`` (1 for packed batches)."""
    local_len: int
    """``L_local`` (``T_local`` for packed batches): tokens per batch row on this rank."""
    num_seqs: int
    """``S``: chains of segments: sequences (``B`` for BSHD, 1 for a pack in the stream layout); this rank holds
    ``2*S`` segments."""
    halo: int
    """``K - 1``: pre-conv tokens each segment needs from the tokens before it."""
    block_size: int
    """``Q``: the mixer's SSD chunk size."""
    seg_len: int | None
    """BSHD and stream: tokens per segment (``L_local / 2``); None for per-sequence packs (lengths vary)."""
    halo_rows: torch.Tensor
    """``[n_halo]`` rows of the all-gathered tail buffer ``[cp * 2*S * halo]`` that feed a halo slot."""
    halo_slots: torch.Tensor
    """``[n_halo]`` the halo slot (of ``[2*S * halo]``) each feeds; slots before a sequence start stay 0."""
    packed: PackedIndex | None
    """THD index maps of a per-sequence pack (None for BSHD and stream)."""
    stream: StreamIndex | None
    """Document starts of a pack in the stream layout (None otherwise)."""
    work: SegmentWork
    """This rank's segments as token ranges, for the fused summary and correction kernels."""
    fingerprint: torch.Tensor
    """``[FINGERPRINT_SIZE]`` int64 on the tokens' device: :func:`~mamba_cp.validation.layout_fingerprint`, the
    batch as every rank must see it. It travels with the state summaries, so ranks that pass different batches
    fail instead of mixing them."""

    @property
    def num_segments(self) -> int:
        """Segments on this rank: ``2*S``."""
        return 2 * self.num_seqs


def chain_rank(chunk: torch.Tensor, cp_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Owner of chunk index ``chunk`` in the head-tail layout: ``(rank, half)`` (half 0 head, 1 tail)."""
    tail = chunk >= cp_size
    return torch.where(tail, 2 * cp_size - 1 - chunk, chunk), tail.to(torch.int64)


def halo_sources(seg_len_S: torch.Tensor, cp_size: int, cp_rank: int, halo: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Where each conv-halo slot of this rank's segments comes from.

    Every rank sends a tail buffer ``[S, 2, halo]`` (the last ``halo`` tokens of each of its segments,
    left-padded with zeros when a segment is shorter); after the all-gather the buffer is
    ``[cp, S, 2, halo]`` (flattened). Halo slot ``j`` of segment ``(s, half)`` holds the pre-conv token
    at ``start - halo + j`` of its sequence; it may lie several chunks back when ``c_s < halo``.

    Args:
        seg_len_S: ``[S]`` int64 chunk length ``c_s`` of each sequence.
    Returns:
        ``(rows, slots)``: ``[n]`` rows of the gathered flat buffer and ``[n]`` flat halo slots
        ``(2*s + half) * halo + j``, for the slots inside their sequence (the others read zeros).
    """
    num_seqs = seg_len_S.numel()
    c = seg_len_S[:, None, None]  # [S, 1, 1]
    half = torch.arange(2)[None, :, None]  # [1, 2, 1]
    j = torch.arange(halo)[None, None, :]  # [1, 1, halo]
    chunk = torch.where(half == 0, cp_rank, 2 * cp_size - 1 - cp_rank)
    pos = chunk * c - halo + j  # [S, 2, halo] position in the sequence
    src_chunk = torch.div(pos, c, rounding_mode="floor")
    src_rank, src_half = chain_rank(src_chunk, cp_size)
    src_j = pos - src_chunk * c - c + halo  # slot inside the source segment's tail buffer
    seq = torch.arange(num_seqs)[:, None, None]
    rows = ((src_rank * num_seqs + seq) * 2 + src_half) * halo + src_j
    slots = ((seq * 2 + half) * halo + j).expand_as(rows)
    inside = pos >= 0  # (src_j lies in [0, halo) for every slot inside its sequence: tests/test_segments.py)
    return rows[inside], slots[inside]


def _packed_index(seg_len_S: torch.Tensor, halo: int, device) -> tuple[PackedIndex, SegmentWork]:
    """The THD index maps and the segments' work table of one rank, from the chunk length ``[S]`` of every
    sequence (built on the CPU, moved to ``device``)."""
    num_seqs = seg_len_S.numel()
    seg_len = seg_len_S.repeat_interleave(2)  # [2S] head and tail pieces have the same length
    num_segs = 2 * num_seqs
    seg_stop = seg_len.cumsum(0)
    seg_first = seg_stop - seg_len
    total = int(seg_stop[-1])
    seg_ids = torch.arange(num_segs)
    token_seg = seg_ids.repeat_interleave(seg_len)  # [T_local]
    offset = torch.arange(total) - seg_first[token_seg]  # position inside the segment

    # Tail buffer: slot k of segment g holds its token at offset seg_len - halo + k (if >= 0).
    tail_k = offset - seg_len[token_seg] + halo
    is_tail = tail_k >= 0
    tail_tokens = torch.arange(total)[is_tail]
    tail_slots = token_seg[is_tail] * halo + tail_k[is_tail]

    # Conv head windows: slot j of segment g is its token at offset j; the first min(halo, c_g) need the halo.
    j = torch.arange(halo)[None, :]
    head_src = (seg_first[:, None] + j).clamp(max=total - 1).reshape(-1)
    in_seg = (j < seg_len[:, None]).reshape(-1)
    head_slots = torch.arange(num_segs * halo)[in_seg]
    head_tokens = (seg_first[:, None] + j).reshape(-1)[in_seg]

    index = PackedIndex(
        seg_idx=token_seg.to(device, torch.int32)[None],
        token_seg=token_seg.to(device),
        seg_first=varying(seg_first.to(device)),
        seg_stop=varying(seg_stop.to(device)),
        tail_tokens=varying(tail_tokens.to(device)),
        tail_slots=varying(tail_slots.to(device)),
        head_src=varying(head_src.to(device)),
        head_slots=varying(head_slots.to(device)),
        head_tokens=varying(head_tokens.to(device)),
    )
    work = build_segment_work(seg_first.tolist(), seg_stop.tolist(), total, device)
    return index, work


def _stream_index(bounds: list[int], cp_size: int, cp_rank: int, seg_len: int, halo: int, device) -> StreamIndex:
    """This rank's :class:`StreamIndex` for a pack of ``T = 2*cp*seg_len`` tokens with global ``bounds``
    ``[S + 1]`` (built on the CPU, moved to ``device``)."""
    cu = torch.tensor(bounds, dtype=torch.int64)
    chunk = torch.tensor([cp_rank, 2 * cp_size - 1 - cp_rank])[:, None]  # [2, 1] the segments' chunks
    start = chunk * seg_len  # [2, 1] first global position of each segment
    pos = start + torch.arange(seg_len)  # [2, c]
    doc = torch.bucketize(pos, cu[1:], right=True)  # [2, c] global document of each token
    local = doc - doc[:, :1]
    before = (start - halo + torch.arange(halo)).clamp(min=0)  # [2, halo]; slots before 0 hold zeros
    halo_doc = torch.bucketize(before, cu[1:], right=True) - doc[:, :1]  # on the segment's count
    starts_doc = torch.isin(pos, cu[:-1])  # [2, c] tokens that start a document
    return StreamIndex(
        seq_idx=local.to(device, torch.int32),
        last_doc=(doc == doc[:, -1:]).to(device),
        halo_seq_idx=halo_doc.to(device, torch.int32),
        barrier=starts_doc.any(dim=1).to(device),
        keep_incoming=(~starts_doc[:, 0]).to(device),
    )


def build_segment_plan(
    cp_size: int,
    cp_rank: int,
    batch: int,
    local_len: int,
    cu_seqlens: torch.Tensor | None = None,
    *,
    halo: int,
    block_size: int,
    device: torch.device | str | None = None,
    packed_layout: str = "sequences",
) -> SegmentPlan:
    """Validate a batch's layout and build rank ``cp_rank``'s :class:`SegmentPlan` (a pure function).

    Args:
        cp_size: ranks in the CP group.
        cp_rank: this rank, ``0 <= cp_rank < cp_size``.
        batch: ``B`` (must be 1 with ``cu_seqlens``).
        local_len: ``L_local`` (``T_local`` for packed batches).
        cu_seqlens: ``[S + 1]`` *global* boundaries of a packed batch, or None for BSHD.
        halo: ``conv_kernel - 1``.
        block_size: ``Q``, the mixer's SSD chunk size.
        device: where the index tensors live (the activations' device).
        packed_layout: how a packed batch is cut over the ranks (``"sequences"`` or ``"stream"``).

    Raises ``ValueError`` when a length does not split into ``2*cp`` equal chunks.
    """
    if cp_size < 1 or not 0 <= cp_rank < cp_size:
        raise ConfigError(f"cp_rank ({cp_rank}) must be in [0, cp_size={cp_size})")
    if halo < 0 or block_size < 1:
        raise ConfigError(f"halo ({halo}) must be >= 0 and block_size ({block_size}) >= 1")
    global_len = local_len * cp_size
    packed = stream = bounds = None
    if cu_seqlens is not None:
        if batch != 1:
            raise ConfigError(f"a packed batch (cu_seqlens given) must have batch size 1, got {batch}")
        bounds = check_packed_batch(cu_seqlens, global_len, cp_size, packed_layout)
    if bounds is None or packed_layout == "stream":  # rows of two equal segments: BSHD rows, or the pack as one
        if local_len < 2 or local_len % 2 != 0:
            raise ConfigError(
                f"global sequence length L (local length x cp_size = {local_len} x {cp_size}) must be a "
                f"positive multiple of 2*cp_size ({2 * cp_size}): each rank holds two equal chunks"
            )
        num_seqs, seg_len = batch, local_len // 2
        seg_len_S = torch.full((num_seqs,), seg_len, dtype=torch.int64)
        work = build_segment_work(*row_segments(2 * num_seqs, seg_len), 2 * num_seqs * seg_len, device)
        if bounds is not None:
            stream = _stream_index(bounds, cp_size, cp_rank, seg_len, halo, device)
    else:
        seq_lens = torch.tensor(bounds, dtype=torch.int64).diff()
        num_seqs, seg_len = seq_lens.numel(), None
        seg_len_S = seq_lens // (2 * cp_size)
        packed, work = _packed_index(seg_len_S, halo, device)

    fingerprint = torch.tensor(layout_fingerprint(local_len, num_seqs if bounds is None else len(bounds) - 1, bounds))
    halo_rows, halo_slots = halo_sources(seg_len_S, cp_size, cp_rank, halo)

    return SegmentPlan(
        cp_size=cp_size,
        cp_rank=cp_rank,
        batch=batch,
        local_len=local_len,
        num_seqs=num_seqs,
        halo=halo,
        block_size=block_size,
        seg_len=seg_len,
        halo_rows=varying(halo_rows.to(device)),
        halo_slots=varying(halo_slots.to(device)),
        packed=packed,
        stream=stream,
        work=work,
        fingerprint=fingerprint.to(device),
    )


def segment_plan(
    cache: PlanCache,
    cp_size: int,
    cp_rank: int,
    batch: int,
    local_len: int,
    cu_seqlens: torch.Tensor | None,
    *,
    halo: int,
    block_size: int,
    device: torch.device | str,
) -> SegmentPlan:
    """The batch's :class:`SegmentPlan` from ``cache`` (built and validated by :func:`build_segment_plan` on
    first use; every layer of a step with the same conv width and chunk size gets the same object)."""
    name = ("segment", halo, block_size)
    if torch.compiler.is_compiling():  # traced: the plan comes in as data, built before the graph
        return cache.pinned(name)
    key = (cp_size, cp_rank, batch, local_len, halo, block_size, str(device))

    def build() -> SegmentPlan:
        return build_segment_plan(
            cp_size,
            cp_rank,
            batch,
            local_len,
            cu_seqlens,
            halo=halo,
            block_size=block_size,
            device=device,
            packed_layout=cache.packed_layout,
        )

    return cache.pin(name, cache.get("segment", key, cu_seqlens, build))
