"""Per-segment SSD states for state passing: segment summaries and the incoming-state correction.

Shape legend: ``T`` local tokens (one flat axis: BSHD rows ``[2B, c]`` flattened, or a packed stream), ``S``
segments (token ranges that start from a zero state), ``H`` heads, ``P`` head_dim, ``G`` groups, ``m = H / G``
heads per group, ``N`` d_state; ``g(h) = h // m``; ``seg(t)`` the segment holding token ``t``.

Two ops, each with a readable reference in plain torch beside a fast Triton path:

* :func:`segment_states` (the summaries): ``final[s, h, p, n] = sum_{t in s} w[t, h] * x[t, h, p] *
  B[t, g(h), n]`` -> ``[S, H, P, N]`` in ``w``'s dtype; with ``w_t = exp(log decay after t) * dt_t`` it is
  every segment's end state from a zero state. Backward: ``dx, dB, dw``.
* :func:`state_correction`: ``y[t, h, p] = y0[t, h, p] + scale[t, h] * sum_n C[t, g(h), n] *
  h_in[seg(t), h, p, n]`` for tokens inside a segment (others: ``y0``), in ``y0``'s dtype. With ``scale_t =
  exp(log decay from the segment start through t)`` it turns a zero-state SSD output into the output from
  the incoming state ``h_in``. Backward: ``dy0 = dy``, ``dC``, ``dh_in``, ``dscale``.

**Where things are rounded** (Triton path; half activations, float32 ``w``/``scale``/states):

* summaries and ``dh_in``: the state-side operand ``B`` (``C``) is scaled by ``w`` (``scale``) in float32 and
  rounded once to the activation dtype, then multiplied with ``x`` (``dy``) on the tensor cores with float32
  accumulation over the whole segment, partial sums of long segments added in float32 (mamba_ssm's
  chunk-state kernel scales ``B`` the same way). Output float32.
* correction, ``dx``, ``dB``, ``dC``, ``dw``, ``dscale``: the state (``h_in`` or ``d_final``) is rounded once
  to the activation dtype (as mamba_ssm's scan does with its chunk states); every dot accumulates in float32;
  the per-token scales multiply the float32 dot results, so ``y = y0 + scale * u``, ``dx = w * u`` and the
  group sums ``dB``/``dC`` over ``m`` heads are rounded once at the store; ``dw``/``dscale`` stay float32.
* float32 activations use IEEE float32 dots throughout.

The reference computes everything in ``w``'s (``scale``'s) dtype from upcast operands: exact in float64
(the CPU tests), float32 math for half inputs on the CPU. It contracts over a dense ``[S, T]`` membership
matrix with ``einsum`` (no loop over tokens or segments; autograd differentiates it), which costs ``S`` times
the Triton path's work: it is for tests, float64 and CPU runs.

**The work table** (:class:`SegmentWork`, :func:`build_segment_work`): built once per batch on the host from
Python ints, read by every kernel launch (no host sync per call). Segments are cut two ways:

* *pieces* ``[n_pieces, 3]`` int32 ``(segment, first, stop)``: every segment cut into ``ceil(len / piece)``
  near-equal pieces (one for a short or empty one). The reduce kernel runs one program per (piece, head,
  state tile), so a long segment fills the GPU; a segment of one piece writes its state directly, a longer
  one writes float32 partials (``piece_slot``) that a second kernel sums in piece order (``multi_segments``,
  ``multi_bounds``): deterministic, no float atomics. Pieces are long (8K tokens by default) because each
  partial is a whole ``[H, P, N]`` float32 state: 4 MB for the NemotronH-8B mixer, the size of 256 tokens' ``x``.
* *tiles* ``[n_tiles, 3]`` int32 ``(segment or -1, first, stop)`` of at most ``tile_tokens`` tokens, inside
  one segment or one gap between segments, covering ``[0, T)`` in order. The broadcast kernel runs one
  program per (tile, group); every token's outputs are written by exactly one program, gaps included (they
  see a zero state), so no output is zeroed first and nothing is reduced across programs.

Both lists hold at most ``T / length + 2 S + 1`` entries: the work is ``O(T)`` plus one pass over the
``[S, H, P, N]`` states (written once by the reduce kernel; read by each tile of their segment in the broadcast,
from L2 when a segment has many), whatever the lengths (1 token to 1M tokens). A short segment costs a masked
tile, not a padded row.
"""

from __future__ import annotations

import functools
import operator
from dataclasses import dataclass
from typing import Literal

import torch

from ..double_backward import refuse_double_backward
from ..plan_cache import varying

__all__ = [
    "SegmentWork",
    "build_segment_work",
    "implementation",
    "row_segments",
    "segment_states",
    "segment_states_ref",
    "state_correction",
    "state_correction_ref",
]

Impl = Literal["auto", "triton", "reference"]

_INT32_MAX = 2**31 - 1


# ------------------------------------------------------------------------------------------------ work table


@dataclass(frozen=True, slots=True)
class SegmentWork:
    """How one batch's local tokens split into segments, as the kernels walk them (see the module docstring).

    Every tensor lives on the activations' device; the kernels only read them.
    """

    total_tokens: int
    """``T``: tokens on the flat local axis."""
    num_segments: int
    """``S``."""
    piece_tokens: int
    """Longest piece the table was built with (the reduce kernel's unit of work)."""
    tile_tokens: int
    """Longest tile (the broadcast kernel's ``BLOCK_T``: a power of two >= 16)."""
    pieces: torch.Tensor
    """``[n_pieces, 3]`` int32 ``(segment, first, stop)``, by segment then position; every segment has one or more."""
    piece_slot: torch.Tensor
    """``[n_pieces]`` int32: ``-1`` where the piece is its segment's only one (it writes the state itself),
    else its row in the float32 partial buffer ``[num_partials, H, P, N]``."""
    num_partials: int
    """Rows of the partial buffer: the pieces of segments with more than one."""
    multi_segments: torch.Tensor
    """``[n_multi]`` int32 segments with more than one piece."""
    multi_bounds: torch.Tensor
    """``[n_multi + 1]`` int32: segment ``multi_segments[j]``'s partials are rows ``multi_bounds[j] ..
    multi_bounds[j+1]-1``."""
    tiles: torch.Tensor
    """``[n_tiles, 3]`` int32 ``(segment or -1, first, stop)`` covering ``[0, T)`` in order."""
    seg_first: torch.Tensor
    """``[S]`` int64 first token of each segment (the reference's membership matrix)."""
    seg_stop: torch.Tensor
    """``[S]`` int64 one past each segment's last token."""
    longest_piece_bucket: int
    """The longest piece rounded up to a power of two (>= 16): part of the reduce kernel's autotuning key."""

    @property
    def num_pieces(self) -> int:
        return self.pieces.shape[0]

    @property
    def num_tiles(self) -> int:
        return self.tiles.shape[0]

    @property
    def device(self) -> torch.device:
        return self.tiles.device

    def membership(self, dtype: torch.dtype) -> torch.Tensor:
        """``[S, T]`` 0/1 matrix: ``1`` where token ``t`` lies in segment ``s`` (built on the device, no sync)."""
        t = torch.arange(self.total_tokens, device=self.device)
        inside = (t[None, :] >= self.seg_first[:, None]) & (t[None, :] < self.seg_stop[:, None])
        return inside.to(dtype)


def _pow2_at_least_16(n: int) -> int:
    return max(16, 1 << max(0, n - 1).bit_length())


def build_segment_work(
    starts: list[int],
    stops: list[int],
    total_tokens: int,
    device: torch.device | str | None = None,
    *,
    piece_tokens: int = 8192,
    tile_tokens: int = 64,
) -> SegmentWork:
    """The work table of segments ``[starts[s], stops[s])`` on a flat axis of ``total_tokens`` tokens.

    A pure function of Python ints (vectorised on the CPU, then moved to ``device`` once). Segments must be in
    token order and must not overlap; empty segments (their state is zero) and tokens in no segment (the
    correction leaves them unchanged) are allowed.

    Args:
        starts, stops: ``S`` ints each.
        total_tokens: ``T`` (below ``2**31``: the tables are int32).
        device: where the kernels run.
        piece_tokens: longest piece of the summaries' reduction (see the module docstring).
        tile_tokens: longest tile of the per-token kernels; rounded up to a power of two >= 16.
    Raises:
        ValueError: on unordered, overlapping or out-of-range segments, or bad sizes.
    """
    if len(starts) != len(stops):
        raise ValueError(f"starts and stops differ in length: {len(starts)} and {len(stops)}")
    if not 0 <= total_tokens <= _INT32_MAX:
        raise ValueError(f"total_tokens must be in [0, 2**31), got {total_tokens}")
    if piece_tokens < 1 or tile_tokens < 1:
        raise ValueError(f"piece_tokens ({piece_tokens}) and tile_tokens ({tile_tokens}) must be >= 1")
    tile_tokens = _pow2_at_least_16(tile_tokens)
    try:
        first = torch.tensor([operator.index(v) for v in starts], dtype=torch.int64)
        stop = torch.tensor([operator.index(v) for v in stops], dtype=torch.int64)
    except TypeError as err:
        raise ValueError(f"segment bounds must be ints: {err}") from None
    num = first.numel()
    if num:
        bad = (first < 0) | (stop < first) | (stop > total_tokens)
        if bool(bad.any()):
            s = int(bad.nonzero()[0])
            raise ValueError(f"segment {s} = [{starts[s]}, {stops[s]}) is not inside [0, {total_tokens})")
        overlap = first[1:] < stop[:-1]
        if bool(overlap.any()):
            s = int(overlap.nonzero()[0]) + 1
            raise ValueError(
                f"segments must be in token order without overlap: segment {s} = [{starts[s]}, {stops[s]}) "
                f"starts before segment {s - 1} = [{starts[s - 1]}, {stops[s - 1]}) ends"
            )
    lengths = stop - first

    # Pieces: ceil(len / piece_tokens) near-equal pieces per segment, at least one.
    per_seg = ((lengths + piece_tokens - 1) // piece_tokens).clamp(min=1)
    seg_of = torch.arange(num).repeat_interleave(per_seg)
    index = torch.arange(seg_of.numel()) - (per_seg.cumsum(0) - per_seg)[seg_of]  # piece index in its segment
    seg_len, count, base = lengths[seg_of], per_seg[seg_of], first[seg_of]
    pieces = torch.stack([seg_of, base + seg_len * index // count, base + seg_len * (index + 1) // count], 1)
    multi = per_seg > 1
    in_multi = multi[seg_of]
    slot = torch.full((seg_of.numel(),), -1, dtype=torch.int64)
    slot[in_multi] = torch.arange(int(in_multi.sum()))
    multi_bounds = torch.cat([torch.zeros(1, dtype=torch.int64), per_seg[multi].cumsum(0)])
    longest = int((pieces[:, 2] - pieces[:, 1]).max()) if num else 0

    # Tiles: runs alternate gap_0, seg_0, gap_1, ..., seg_{S-1}, gap_S and cover [0, T); each is cut into
    # tiles of tile_tokens from its start (empty runs get none).
    gap_first = torch.cat([torch.zeros(1, dtype=torch.int64), stop])
    gap_stop = torch.cat([first, torch.tensor([total_tokens])])
    run_seg = torch.stack([torch.full((num + 1,), -1), torch.cat([torch.arange(num), torch.tensor([-1])])], 1)
    run_first = torch.stack([gap_first, torch.cat([first, torch.tensor([total_tokens])])], 1)
    run_stop = torch.stack([gap_stop, torch.cat([stop, torch.tensor([total_tokens])])], 1)
    run_seg, run_first, run_stop = run_seg.reshape(-1), run_first.reshape(-1), run_stop.reshape(-1)
    per_run = (run_stop - run_first + tile_tokens - 1) // tile_tokens
    run_of = torch.arange(run_seg.numel()).repeat_interleave(per_run)
    tile_index = torch.arange(run_of.numel()) - (per_run.cumsum(0) - per_run)[run_of]
    tile_first = run_first[run_of] + tile_index * tile_tokens
    tile_stop = torch.minimum(tile_first + tile_tokens, run_stop[run_of])
    tiles = torch.stack([run_seg[run_of], tile_first, tile_stop], 1)

    def dev32(t: torch.Tensor) -> torch.Tensor:
        return varying(t.to(device=device, dtype=torch.int32).contiguous())

    return SegmentWork(
        total_tokens=total_tokens,
        num_segments=num,
        piece_tokens=piece_tokens,
        tile_tokens=tile_tokens,
        pieces=dev32(pieces),
        piece_slot=dev32(slot),
        num_partials=int(in_multi.sum()),
        multi_segments=dev32(torch.arange(num)[multi]),
        multi_bounds=dev32(multi_bounds),
        tiles=dev32(tiles),
        seg_first=varying(first.to(device)),
        seg_stop=varying(stop.to(device)),
        longest_piece_bucket=_pow2_at_least_16(longest),
    )


def row_segments(rows: int, row_len: int) -> tuple[list[int], list[int]]:
    """``(starts, stops)`` of the rows of a ``[rows, row_len]`` batch flattened (BSHD: ``[2B, c]``)."""
    return [r * row_len for r in range(rows)], [(r + 1) * row_len for r in range(rows)]


# ------------------------------------------------------------------------------------------------ references


def segment_states_ref(x: torch.Tensor, B: torch.Tensor, w: torch.Tensor, work: SegmentWork) -> torch.Tensor:
    """Readable reference of :func:`segment_states`: ``x`` ``[T, H, P]``, ``B`` ``[T, G, N]``, ``w`` ``[T, H]``
    -> ``[S, H, P, N]`` in ``w``'s dtype (all math in it; exact in float64; differentiable)."""
    t, h, p = x.shape
    g, n = B.shape[1:]
    member = work.membership(w.dtype)  # [S, T]
    xw = (x.to(w.dtype) * w.unsqueeze(-1)).reshape(t, g, h // g, p)
    final = torch.einsum("st,tgn,tgmp->sgmpn", member, B.to(w.dtype), xw)
    return final.reshape(work.num_segments, h, p, n)


def state_correction_ref(
    y0: torch.Tensor, C: torch.Tensor, h_in: torch.Tensor, scale: torch.Tensor, work: SegmentWork
) -> torch.Tensor:
    """Readable reference of :func:`state_correction`: ``y0`` ``[T, H, P]``, ``C`` ``[T, G, N]``, ``h_in``
    ``[S, H, P, N]``, ``scale`` ``[T, H]`` -> ``y`` ``[T, H, P]`` in ``y0``'s dtype (math in ``scale``'s dtype,
    one rounding at the end; differentiable)."""
    t, h, p = y0.shape
    g, n = C.shape[1:]
    cd = scale.dtype
    member = work.membership(cd)  # [S, T]; a token in no segment gets no correction
    states = h_in.to(cd).reshape(work.num_segments, g, h // g, p, n)
    corr = torch.einsum("st,tgn,sgmpn->tgmp", member, C.to(cd), states).reshape(t, h, p)
    return (y0.to(cd) + scale.unsqueeze(-1) * corr).to(y0.dtype)


# ------------------------------------------------------------------------------------------------ Triton path


@functools.cache
def _triton_backend():
    """:mod:`mamba_cp.kernels.segment_scan_triton`, or None when Triton does not import."""
    try:
        from . import segment_scan_triton
    except Exception:  # noqa: BLE001 - any failure to import means "not available"
        return None
    return segment_scan_triton


class SegmentStatesFn(torch.autograd.Function):
    """:func:`segment_states` on the Triton kernels, with a hand-written backward (one broadcast kernel for
    ``dx``, ``dB`` and ``dw``; nothing is saved but the inputs, which may be views)."""

    @staticmethod
    def forward(ctx, x, B, w, work):
        ctx.save_for_backward(x, B, w)
        ctx.work = work
        return _triton_backend().states_forward(x, B, w, work)

    @staticmethod
    def backward(ctx, d_final):
        refuse_double_backward("the Triton segment-summary kernel")
        x, B, w = ctx.saved_tensors
        dx, dB, dw = _triton_backend().states_backward(x, B, w, d_final, ctx.work)
        need = ctx.needs_input_grad
        return (dx if need[0] else None), (dB if need[1] else None), (dw if need[2] else None), None


class StateCorrectionFn(torch.autograd.Function):
    """:func:`state_correction` on the Triton kernels; ``inplace`` writes ``y`` into ``y0`` (marked dirty).
    Backward: ``dy0 = dy`` (no copy), ``dC`` and ``dscale`` from one broadcast kernel, ``dh_in`` from the
    reduce kernel (the same contraction as the summaries, with ``dy, C, scale``)."""

    @staticmethod
    def forward(ctx, y0, C, h_in, scale, work, inplace):
        y = _triton_backend().correction_forward(y0, C, h_in, scale, work, inplace)
        if inplace:
            ctx.mark_dirty(y0)
        ctx.save_for_backward(C, h_in, scale)
        ctx.work = work
        return y

    @staticmethod
    def backward(ctx, dy):
        refuse_double_backward("the Triton state-correction kernel")
        C, h_in, scale = ctx.saved_tensors
        need = ctx.needs_input_grad
        dC, dh_in, dscale = _triton_backend().correction_backward(
            dy, C, h_in, scale, ctx.work, need_dC_dscale=need[1] or need[3], need_dh_in=need[2]
        )
        return (
            dy if need[0] else None,
            dC if need[1] else None,
            dh_in.to(h_in.dtype) if need[2] else None,
            dscale if need[3] else None,
            None,
            None,
        )


# ------------------------------------------------------------------------------------------------ dispatch


def implementation(*tensors: torch.Tensor, weight: torch.Tensor | None = None) -> str:
    """``"triton"`` when every tensor is a CUDA tensor of one half/float32 dtype, ``weight`` (``w`` or
    ``scale``) is float32, Triton imports and ``MAMBA_CP_KERNELS`` is not ``reference``; else ``"reference"``."""
    from mamba_cp import kernels  # the package's switch (imported late: the package may import this module)

    first = tensors[0]
    if not kernels._fast(first) or _triton_backend() is None:
        return "reference"
    if any(not t.is_cuda or t.dtype != first.dtype or t.device != first.device for t in tensors):
        return "reference"
    if weight is not None and (weight.dtype != torch.float32 or weight.device != first.device):
        return "reference"
    return "triton"


def _check(x: torch.Tensor, B: torch.Tensor, w: torch.Tensor, work: SegmentWork, what: str) -> None:
    if x.dim() != 3 or B.dim() != 3 or w.dim() != 2:
        raise ValueError(f"{what}: expected [T, H, P], [T, G, N], [T, H]; got {tuple(x.shape)}, "
                         f"{tuple(B.shape)}, {tuple(w.shape)}")  # fmt: skip
    t, h, _ = x.shape
    if B.shape[0] != t or tuple(w.shape) != (t, h) or t != work.total_tokens:
        raise ValueError(f"{what}: token counts differ: {tuple(x.shape)}, {tuple(B.shape)}, {tuple(w.shape)}, "
                         f"work table of {work.total_tokens} tokens")  # fmt: skip
    if h % B.shape[1] != 0:
        raise ValueError(f"{what}: heads ({h}) must be a multiple of groups ({B.shape[1]})")


def _pick(impl: Impl, chosen: str) -> str:
    if impl not in ("auto", "triton", "reference"):
        raise ValueError(f"impl must be 'auto', 'triton' or 'reference', got {impl!r}")
    if impl == "triton" and _triton_backend() is None:
        raise RuntimeError("impl='triton' but Triton does not import")
    return chosen if impl == "auto" else impl


def segment_states(
    x: torch.Tensor, B: torch.Tensor, w: torch.Tensor, work: SegmentWork, *, impl: Impl = "auto"
) -> torch.Tensor:
    """Every segment's end state from a zero state: ``final[s, h, p, n] = sum_{t in s} w[t, h] * x[t, h, p] *
    B[t, g(h), n]``.

    Args:
        x: ``[T, H, P]`` activation dtype (a strided column view of the conv output is read in place).
        B: ``[T, G, N]`` same dtype (a view too).
        w: ``[T, H]`` float32 (float64 for float64 inputs).
        work: the batch's :class:`SegmentWork`.
        impl: ``"auto"`` (Triton for CUDA half/float32 tensors with a float32 ``w``, else the reference) or a
            forced choice (tests and benchmarks; ``"triton"`` on CPU tensors needs ``TRITON_INTERPRET=1``).
    Returns:
        ``[S, H, P, N]`` in ``w``'s dtype; differentiable in ``x``, ``B`` and ``w``.
    """
    _check(x, B, w, work, "segment_states")
    if _pick(impl, implementation(x, B, weight=w)) == "triton":
        return SegmentStatesFn.apply(x, B, w, work)
    return segment_states_ref(x, B, w, work)


def state_correction(
    y0: torch.Tensor,
    C: torch.Tensor,
    h_in: torch.Tensor,
    scale: torch.Tensor,
    work: SegmentWork,
    *,
    inplace: bool = False,
    impl: Impl = "auto",
) -> torch.Tensor:
    """The output from the incoming states: ``y = y0 + scale[t, h] * sum_n C[t, g(h), n] * h_in[seg(t), h, p, n]``
    for tokens inside a segment, ``y0`` elsewhere.

    Args:
        y0: ``[T, H, P]`` zero-state output, activation dtype.
        C: ``[T, G, N]`` same dtype (a strided view is read in place).
        h_in: ``[S, H, P, N]`` incoming states (float32; float64 for float64 inputs).
        scale: ``[T, H]`` float32 (float64 for float64 inputs).
        work: the batch's :class:`SegmentWork`.
        inplace: write ``y`` into ``y0`` (no new ``[T, H, P]`` buffer) and return ``y0``. Only where nothing
            saved ``y0`` for its backward: mamba_ssm's scan saves its output, and autograd then raises at
            backward time rather than give a wrong gradient.
        impl: as in :func:`segment_states`.
    Returns:
        ``y`` ``[T, H, P]`` in ``y0``'s dtype; differentiable in ``y0``, ``C``, ``h_in`` and ``scale``.
    """
    _check(y0, C, scale, work, "state_correction")
    t, h, p = y0.shape
    if tuple(h_in.shape) != (work.num_segments, h, p, C.shape[2]):
        raise ValueError(f"state_correction: h_in must be [{work.num_segments}, {h}, {p}, {C.shape[2]}], "
                         f"got {tuple(h_in.shape)}")  # fmt: skip
    chosen = implementation(y0, C, weight=scale)
    if chosen == "triton" and h_in.device != y0.device:
        chosen = "reference"
    if _pick(impl, chosen) == "triton":
        return StateCorrectionFn.apply(y0, C, h_in, scale, work, inplace)
    y = state_correction_ref(y0, C, h_in, scale, work)
    return y0.copy_(y) if inplace else y
