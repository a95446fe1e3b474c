"""Triton kernels for the per-segment SSD states of state passing: summaries, the incoming-state correction,
and their backward passes.

Shape legend: ``T`` local tokens, ``S`` segments, ``H`` heads, ``P`` head_dim, ``G`` groups, ``m = H / G``
heads per group, ``N`` d_state; ``g(h) = h // m``. The contracts, the readable references and the autograd
Functions are in :mod:`mamba_cp.kernels.segment_scan`; this module only launches kernels.

Two kernels do all the work; a third sums partial states:

* **reduce** (tokens -> segments): ``out[s, h, p, n] = sum_{t in s} w[t, h] * x[t, h, p] * B[t, g(h), n]``.
  One program per (piece, head, ``[BLOCK_P, BLOCK_N]`` tile of the state) walks its piece in ``BLOCK_T``-token
  steps: ``B`` is scaled by ``w`` in float32 and rounded once to the activation dtype (as mamba_ssm's
  chunk-state kernel does), then ``dot(x^T, wB)`` accumulates in float32. A segment of one piece is written
  straight into ``out``; a longer one writes one float32 partial per piece, summed in piece order by
  :func:`_sum_partials_kernel` (deterministic: no atomics). Used for the summaries (``x, B, w``) and for the
  correction's ``dh_in`` (``dy, C, scale``).
* **broadcast** (segments -> tokens): for a tile of at most ``BLOCK_T`` tokens inside one segment (or a gap
  between segments) and a group ``g``, loop over the group's heads: ``u[t, p] = sum_n B[t, g, n] *
  hs[s, h, p, n]`` (``hs`` rounded to the activation dtype, float32 accumulation), then any of
  ``y = y0 + w * u`` (the correction), ``dx = w * u``, ``dw = sum_p x * u``, and ``dB[t, g, n] = sum_h w[t, h] *
  sum_p x[t, h, p] * hs[s, h, p, n]`` (float32 across the group's heads, rounded once). The per-token scales
  are applied to float32 dot results, so only ``hs`` is rounded on the way in. Used for the correction
  (``C, h_in, scale``), the summaries' backward (``B, d_final, w``: ``dx, dw, dB``) and the correction's
  backward (``C, h_in, scale`` with ``x = dy``: ``dscale, dC``). Gap tiles (tokens in no segment) see a zero
  state: they copy ``y0`` and write zero gradients, so no output needs zeroing first.

Every token offset is int64 (no 2**31 limit on a strided view's span). float32 inputs use IEEE dots (what
``torch.bmm`` does without TF32). Under Triton's CPU interpreter (``TRITON_INTERPRET=1``) the dot operands are
cast to float32 first: the interpreter multiplies bfloat16 tiles as their raw 16-bit integers (Triton 3.9),
and a float32 product of two bfloat16 values is exact, so the result is what a tensor-core dot gives up to
the order of the float32 sums. On CUDA the tile shapes are autotuned (Triton's autotuner, one fixed
configuration under the interpreter).
"""

from __future__ import annotations

import contextlib
import functools
import os
from typing import TYPE_CHECKING

import torch
import triton
import triton.language as tl

if TYPE_CHECKING:
    from .segment_scan import SegmentWork

__all__ = ["correction_backward", "correction_forward", "states_backward", "states_forward"]

_SUM_BLOCK = 1024
"""State elements one program of the partial-sum kernel adds up."""


# ------------------------------------------------------------------------------------------------ kernels


@triton.jit
def _dot(a, b, IEEE: tl.constexpr, UPCAST: tl.constexpr):
    """``a @ b`` accumulated in float32 (see the module docstring for ``IEEE`` and ``UPCAST``)."""
    if UPCAST:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="ieee")
    elif IEEE:
        return tl.dot(a, b, input_precision="ieee")
    else:
        return tl.dot(a, b)


@triton.jit
def _segment_reduce_kernel(
    X, BM, W, PIECES, SLOT, OUT, PART,
    H, P, N, HEADS_PER_GROUP, LONGEST,
    stride_xt, stride_xh, stride_xp, stride_bt, stride_bg, stride_bn, stride_wt, stride_wh,
    BLOCK_T: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_N: tl.constexpr,
    IEEE: tl.constexpr, UPCAST: tl.constexpr,
):  # fmt: skip
    """One program: one piece ``(segment, first, stop)``, one head, one state tile. ``OUT``/``PART`` are
    contiguous ``[rows, H, P, N]`` float32. ``LONGEST`` (the longest piece, a power of two) only keys the
    autotuner."""
    pid = tl.program_id(0)
    piece = pid // H  # heads vary fastest: programs of one piece share its B tiles in L2
    h = pid - piece * H
    n_tiles_n = tl.cdiv(N, BLOCK_N)
    pid_p = tl.program_id(1) // n_tiles_n
    pid_n = tl.program_id(1) - pid_p * n_tiles_n
    seg = tl.load(PIECES + piece * 3)
    first = tl.load(PIECES + piece * 3 + 1)
    stop = tl.load(PIECES + piece * 3 + 2)
    slot = tl.load(SLOT + piece)
    g = h // HEADS_PER_GROUP

    offs_p = pid_p * BLOCK_P + tl.arange(0, BLOCK_P)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_T)
    mask_p = offs_p < P
    mask_n = offs_n < N
    x_base = X + h.to(tl.int64) * stride_xh + offs_p[:, None] * stride_xp  # [BLOCK_P, 1]
    b_base = BM + g.to(tl.int64) * stride_bg + offs_n[None, :] * stride_bn  # [1, BLOCK_N]
    w_base = W + h.to(tl.int64) * stride_wh

    acc = tl.zeros((BLOCK_P, BLOCK_N), dtype=tl.float32)
    for t0 in range(first, stop, BLOCK_T):
        t = t0 + offs_k
        mask_t = t < stop
        t64 = t.to(tl.int64)
        x = tl.load(x_base + t64[None, :] * stride_xt, mask=mask_p[:, None] & mask_t[None, :], other=0.0)
        b = tl.load(b_base + t64[:, None] * stride_bt, mask=mask_t[:, None] & mask_n[None, :], other=0.0)
        w = tl.load(w_base + t64 * stride_wt, mask=mask_t, other=0.0)
        wb = (b.to(tl.float32) * w[:, None]).to(X.dtype.element_ty)  # the one rounding of the scaled operand
        acc += _dot(x, wb, IEEE, UPCAST)

    state = (h * P + offs_p[:, None]).to(tl.int64) * N + offs_n[None, :]  # offset inside one [H, P, N] row
    mask = mask_p[:, None] & mask_n[None, :]
    if slot < 0:
        tl.store(OUT + seg.to(tl.int64) * H * P * N + state, acc, mask=mask)
    else:
        tl.store(PART + slot.to(tl.int64) * H * P * N + state, acc, mask=mask)


@triton.jit
def _sum_partials_kernel(PART, OUT, MULTI, BOUNDS, STATE, BLOCK: tl.constexpr):
    """``OUT[MULTI[j]] = sum of PART rows BOUNDS[j] .. BOUNDS[j+1]-1``, added in row order (deterministic)."""
    j = tl.program_id(0)
    offs = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < STATE
    seg = tl.load(MULTI + j)
    lo = tl.load(BOUNDS + j)
    hi = tl.load(BOUNDS + j + 1)
    acc = tl.zeros((BLOCK,), dtype=tl.float32)
    ptrs = PART + lo.to(tl.int64) * STATE + offs  # 64-bit pointers: no int32 row * STATE product
    for _ in range(lo, hi):
        acc += tl.load(ptrs, mask=mask, other=0.0)
        ptrs += STATE
    tl.store(OUT + seg.to(tl.int64) * STATE + offs, acc, mask=mask)


@triton.jit
def _segment_broadcast_kernel(
    BM, HS, W, X, Y0, Y, DX, DW, DB, TILES,
    P, N, HEADS_PER_GROUP,
    stride_bt, stride_bg, stride_bn,
    stride_hs, stride_hh, stride_hp, stride_hn,
    stride_wt, stride_wh,
    stride_xt, stride_xh, stride_xp,
    stride_y0t, stride_y0h, stride_y0p,
    stride_yt, stride_yh, stride_yp,
    stride_dxt, stride_dxh, stride_dwt, stride_dbt, stride_dbg,
    WRITE_Y: tl.constexpr, WRITE_DX: tl.constexpr, WRITE_DW: tl.constexpr, WRITE_DB: tl.constexpr,
    BLOCK_T: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_N: tl.constexpr,
    IEEE: tl.constexpr, UPCAST: tl.constexpr,
):  # fmt: skip
    """One program: one tile ``(segment or -1, first, stop)`` of at most ``BLOCK_T`` tokens, one group; the
    whole ``[P, N]`` state of each head is one register tile. ``DX``/``DW``/``DB`` have unit inner strides."""
    tile = tl.program_id(0)  # tiles vary fastest: consecutive programs read one segment's states from L2
    g = tl.program_id(1)
    seg = tl.load(TILES + tile * 3)
    first = tl.load(TILES + tile * 3 + 1)
    stop = tl.load(TILES + tile * 3 + 2)
    seg64 = tl.maximum(seg, 0).to(tl.int64)

    t = first + tl.arange(0, BLOCK_T)
    mask_t = t < stop
    t64 = t.to(tl.int64)
    offs_p = tl.arange(0, BLOCK_P)
    offs_n = tl.arange(0, BLOCK_N)
    mask_p = offs_p < P
    mask_n = offs_n < N
    mask_tp = mask_t[:, None] & mask_p[None, :]
    # A gap tile loads a zero state: it copies y0 and writes zero gradients.
    mask_hs = (mask_n[:, None] & mask_p[None, :]) & ((tl.zeros((BLOCK_N, BLOCK_P), dtype=tl.int32) + seg) >= 0)
    g64 = g.to(tl.int64)

    b = tl.load(
        BM + t64[:, None] * stride_bt + g64 * stride_bg + offs_n[None, :] * stride_bn,
        mask=mask_t[:, None] & mask_n[None, :],
        other=0.0,
    )  # [BLOCK_T, BLOCK_N]
    acc_db = tl.zeros((BLOCK_T, BLOCK_N), dtype=tl.float32)
    for j in range(0, HEADS_PER_GROUP):
        h = g64 * HEADS_PER_GROUP + j
        hs = tl.load(
            HS + seg64 * stride_hs + h * stride_hh + offs_n[:, None] * stride_hn + offs_p[None, :] * stride_hp,
            mask=mask_hs,
            other=0.0,
        ).to(BM.dtype.element_ty)  # [BLOCK_N, BLOCK_P], rounded once to the activation dtype
        u = _dot(b, hs, IEEE, UPCAST)  # [BLOCK_T, BLOCK_P] float32
        w = tl.load(W + t64 * stride_wt + h * stride_wh, mask=mask_t, other=0.0)[:, None]  # [BLOCK_T, 1] fp32
        if WRITE_Y:
            y0 = tl.load(Y0 + t64[:, None] * stride_y0t + h * stride_y0h + offs_p[None, :] * stride_y0p, mask=mask_tp)
            y = y0.to(tl.float32) + w * u
            yp = Y + t64[:, None] * stride_yt + h * stride_yh + offs_p[None, :] * stride_yp
            tl.store(yp, y.to(Y.dtype.element_ty), mask=mask_tp)
        if WRITE_DX:
            dxp = DX + t64[:, None] * stride_dxt + h * stride_dxh + offs_p[None, :]
            tl.store(dxp, (w * u).to(DX.dtype.element_ty), mask=mask_tp)
        if WRITE_DW or WRITE_DB:
            x = tl.load(X + t64[:, None] * stride_xt + h * stride_xh + offs_p[None, :] * stride_xp, mask=mask_tp)
            if WRITE_DW:
                dw = tl.sum(x.to(tl.float32) * u, axis=1)
                tl.store(DW + t64 * stride_dwt + h, dw, mask=mask_t)
            if WRITE_DB:
                acc_db += _dot(x, tl.trans(hs), IEEE, UPCAST) * w
    if WRITE_DB:
        dbp = DB + t64[:, None] * stride_dbt + g64 * stride_dbg + offs_n[None, :]
        tl.store(dbp, acc_db.to(DB.dtype.element_ty), mask=mask_t[:, None] & mask_n[None, :])


# ------------------------------------------------------------------------------------------------ configs


def _interpreting() -> bool:
    """Whether Triton runs on its CPU interpreter (read per call: tests set it in a subprocess)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def _pow2(n: int) -> int:
    """Block size for a dimension of ``n``: the next power of two, at least 16 (``tl.dot``'s minimum)."""
    return max(16, triton.next_power_of_2(n))


_INTERPRETER_BLOCKS = (16, 32, 32)
"""``(BLOCK_T, BLOCK_P, BLOCK_N)`` of the reduce kernel under the interpreter (no autotuning there): small
enough that the tests' pieces take several steps and their ``N`` spans two state tiles, few programs (the
interpreter runs about a hundred a second)."""


@functools.cache
def _reduce_tuned(block_p_max: int, block_n_max: int):
    """The reduce kernel autotuned over tile shapes that fit ``P`` and ``N`` (per ``P, N, m`` and piece length)."""
    shapes = {
        (bt, min(bp, block_p_max), min(bn, block_n_max), nw, ns)
        for bt in (32, 64)
        for bp, bn in ((64, 64), (64, 128))
        for nw, ns in ((4, 2), (4, 3), (8, 3))
    }
    configs = [
        triton.Config({"BLOCK_T": bt, "BLOCK_P": bp, "BLOCK_N": bn}, num_warps=nw, num_stages=ns)
        for bt, bp, bn, nw, ns in sorted(shapes)
    ]
    return triton.autotune(configs=configs, key=["P", "N", "HEADS_PER_GROUP", "LONGEST"])(_segment_reduce_kernel)


@functools.cache
def _broadcast_tuned(writes_y: bool):
    """The broadcast kernel autotuned over warps and stages. The correction may write ``y`` over ``y0`` (in
    place), so its variant restores ``Y`` between the autotuner's trial runs."""
    configs = [triton.Config({}, num_warps=nw, num_stages=ns) for nw in (4, 8) for ns in (1, 2)]
    restore = ["Y"] if writes_y else None
    return triton.autotune(
        configs=configs, key=["P", "N", "HEADS_PER_GROUP", "BLOCK_T", "WRITE_DX", "WRITE_DW"], restore_value=restore
    )(_segment_broadcast_kernel)


def _on_device(t: torch.Tensor):
    """Launch on ``t``'s GPU (a no-op context for CPU tensors, which only the interpreter runs)."""
    return torch.cuda.device(t.device) if t.is_cuda else contextlib.nullcontext()


def _dot_flags(dtype: torch.dtype) -> dict:
    return {"IEEE": dtype == torch.float32, "UPCAST": _interpreting()}


# ------------------------------------------------------------------------------------------------ launchers


def segment_reduce(x: torch.Tensor, B: torch.Tensor, w: torch.Tensor, work: SegmentWork) -> torch.Tensor:
    """``out[s, h, p, n] = sum_{t in s} w[t, h] * x[t, h, p] * B[t, g(h), n]``: ``x`` ``[T, H, P]``, ``B``
    ``[T, G, N]`` (one activation dtype, any strides), ``w`` ``[T, H]`` float32 -> ``[S, H, P, N]`` float32."""
    t, h, p = x.shape
    g, n = B.shape[1:]
    out = torch.empty(work.num_segments, h, p, n, dtype=torch.float32, device=x.device)
    if work.num_pieces == 0:
        return out
    part = torch.empty(work.num_partials, h, p, n, dtype=torch.float32, device=x.device) if work.num_partials else out
    pieces, slot = work.pieces, work.piece_slot
    args = (
        x, B, w, pieces, slot, out, part,
        h, p, n, h // g, work.longest_piece_bucket,
        x.stride(0), x.stride(1), x.stride(2), B.stride(0), B.stride(1), B.stride(2), w.stride(0), w.stride(1),
    )  # fmt: skip
    flags = _dot_flags(x.dtype)
    with _on_device(x):
        if _interpreting():
            bt, bp, bn = _INTERPRETER_BLOCKS
            grid = (work.num_pieces * h, triton.cdiv(p, bp) * triton.cdiv(n, bn))
            _segment_reduce_kernel[grid](*args, **flags, BLOCK_T=bt, BLOCK_P=bp, BLOCK_N=bn, num_warps=4)
        else:

            def grid(meta):
                return (work.num_pieces * h, triton.cdiv(p, meta["BLOCK_P"]) * triton.cdiv(n, meta["BLOCK_N"]))

            _reduce_tuned(_pow2(p), _pow2(n))[grid](*args, **flags)
        if work.num_partials:
            state = h * p * n
            grid = (work.multi_segments.numel(), triton.cdiv(state, _SUM_BLOCK))
            _sum_partials_kernel[grid](part, out, work.multi_segments, work.multi_bounds, state, BLOCK=_SUM_BLOCK)
    return out


def segment_broadcast(
    B: torch.Tensor,
    hs: torch.Tensor,
    w: torch.Tensor,
    work: SegmentWork,
    *,
    x: torch.Tensor | None = None,
    y0: torch.Tensor | None = None,
    y: torch.Tensor | None = None,
    want_dx: bool = False,
    want_dw: bool = False,
    want_db: bool = False,
) -> dict[str, torch.Tensor]:
    """The per-token products of every token with its segment's state ``hs`` ``[S, H, P, N]`` (any float dtype).

    ``u[t, h, p] = sum_n B[t, g(h), n] * hs[seg(t), h, p, n]`` (``B`` ``[T, G, N]``, ``w`` ``[T, H]`` float32);
    returns the asked-for outputs: ``"y"`` ``[T, H, P]`` = ``y0 + w * u`` written into ``y`` (which may be
    ``y0`` itself); ``"dx"`` ``[T, H, P]`` = ``w * u`` (``B``'s dtype); ``"dw"`` ``[T, H]`` float32 = ``sum_p x *
    u``; ``"db"`` ``[T, G, N]`` = ``sum_{h in g} w * (x @ hs)`` (``B``'s dtype). ``x`` ``[T, H, P]`` is needed for
    ``dw`` and ``db``.
    """
    t, g, n = B.shape
    h, p = hs.shape[1], hs.shape[2]
    dev, dtype = B.device, B.dtype
    out: dict[str, torch.Tensor] = {}
    dx = torch.empty(t, h, p, dtype=dtype, device=dev) if want_dx else None
    dw = torch.empty(t, h, dtype=torch.float32, device=dev) if want_dw else None
    db = torch.empty(t, g, n, dtype=dtype, device=dev) if want_db else None
    writes_y = y is not None
    if writes_y:
        out["y"] = y
    for name, tensor in (("dx", dx), ("dw", dw), ("db", db)):
        if tensor is not None:
            out[name] = tensor
    if work.num_tiles == 0:
        return out
    # B stands in for every [T, ., .] pointer a mode does not touch (and for an empty hs: no segments).
    xx, yy0, yy = (x if x is not None else B), (y0 if writes_y else B), (y if writes_y else B)
    ddx, ddw, ddb = (dx if dx is not None else B), (dw if dw is not None else w), (db if db is not None else B)
    hs_ptr = hs if hs.numel() else B
    args = (
        B, hs_ptr, w, xx, yy0, yy, ddx, ddw, ddb, work.tiles,
        p, n, h // g,
        B.stride(0), B.stride(1), B.stride(2),
        hs.stride(0), hs.stride(1), hs.stride(2), hs.stride(3),
        w.stride(0), w.stride(1),
        xx.stride(0), xx.stride(1), xx.stride(2),
        yy0.stride(0), yy0.stride(1), yy0.stride(2),
        yy.stride(0), yy.stride(1), yy.stride(2),
        ddx.stride(0), ddx.stride(1), ddw.stride(0), ddb.stride(0), ddb.stride(1),
    )  # fmt: skip
    flags = dict(
        WRITE_Y=writes_y, WRITE_DX=want_dx, WRITE_DW=want_dw, WRITE_DB=want_db,
        BLOCK_T=work.tile_tokens, BLOCK_P=_pow2(p), BLOCK_N=_pow2(n), **_dot_flags(dtype),
    )  # fmt: skip
    grid = (work.num_tiles, g)
    with _on_device(B):
        if _interpreting():
            _segment_broadcast_kernel[grid](*args, **flags, num_warps=4)
        else:
            _broadcast_tuned(writes_y)[grid](*args, **flags)
    return out


# ------------------------------------------------------------------------------------------------ entry points
# One per autograd method, so that tests can wrap exactly one of them (planted bugs).


def states_forward(x: torch.Tensor, B: torch.Tensor, w: torch.Tensor, work: SegmentWork) -> torch.Tensor:
    """Summaries ``[S, H, P, N]`` float32 of ``x`` ``[T, H, P]``, ``B`` ``[T, G, N]``, ``w`` ``[T, H]``."""
    return segment_reduce(x, B, w, work)


def states_backward(
    x: torch.Tensor, B: torch.Tensor, w: torch.Tensor, d_final: torch.Tensor, work: SegmentWork
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(dx [T, H, P], dB [T, G, N], dw [T, H])`` of the summaries, given ``d_final`` ``[S, H, P, N]``."""
    out = segment_broadcast(B, d_final, w, work, x=x, want_dx=True, want_dw=True, want_db=True)
    return out["dx"], out["db"], out["dw"]


def correction_forward(
    y0: torch.Tensor, C: torch.Tensor, h_in: torch.Tensor, scale: torch.Tensor, work: SegmentWork, inplace: bool
) -> torch.Tensor:
    """``y = y0 + scale * (C . h_in[seg])`` ``[T, H, P]``, into ``y0`` itself when ``inplace``."""
    y = y0 if inplace else torch.empty(y0.shape, dtype=y0.dtype, device=y0.device)
    return segment_broadcast(C, h_in, scale, work, y0=y0, y=y)["y"]


def correction_backward(
    dy: torch.Tensor,
    C: torch.Tensor,
    h_in: torch.Tensor,
    scale: torch.Tensor,
    work: SegmentWork,
    need_dC_dscale: bool = True,
    need_dh_in: bool = True,
) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
    """``(dC [T, G, N], dh_in [S, H, P, N] float32, dscale [T, H] float32)`` of the correction (None where not
    needed: ``dC`` and ``dscale`` come from one kernel, ``dh_in`` from another)."""
    dC = dscale = dh_in = None
    if need_dC_dscale:
        out = segment_broadcast(C, h_in, scale, work, x=dy, want_dw=True, want_db=True)
        dC, dscale = out["db"], out["dw"]
    if need_dh_in:
        dh_in = segment_reduce(dy, C, scale, work)
    return dC, dh_in, dscale
