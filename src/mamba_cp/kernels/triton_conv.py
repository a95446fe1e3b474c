"""A Triton depthwise causal conv1d (channels last, ``seq_idx``-aware, SiLU, an optional history), forward and
backward.

Shape legend: ``B`` batch, ``L`` tokens, ``C`` channels, ``K`` taps (at most 4; tap ``K - 1`` multiplies the
current token). The oracle is :func:`mamba_cp.kernels.conv_reference.causal_conv1d_ref`.

Used on CUDA when the ``causal_conv1d`` package is not installed. The kernels read ``x`` through its row
stride, so the strided ``xBC`` column view of an in_proj output is consumed without a copy. No offset can
overflow (checked expression by expression, see :mod:`mamba_cp.kernels.index_width`): row offsets are
``pos.to(int64) * stride``, batch offsets use an int64 program id, the partial-sum index ``b * n_t + pid_t``
is int64, channel offsets stay below ``4 * C`` and seq_idx loads add ``pos < L`` to an int64 row base. The
one limit is the backward's grid: ``ceil(L / 256)`` programs on axis y, so a call takes at most
:data:`MAX_TOKENS` tokens (the dispatcher cuts longer ones).

A ``history`` ``[B, K-1, C]`` (the tokens before each row, state passing's halos) is read by a row's first
block only; that block is launched by itself with ``HAS_HIST``, so the rest of the row runs the history-free
kernel (a runtime branch in every block made the backward about 30% slower on an H200).

Narrow filters are run as 4-tap filters whose leading taps are zero: one specialised kernel pair serves
``K`` in 1..4. The backward recomputes the pre-activation from ``x`` (nothing but ``x`` and the history are
saved) from the shifted ``x`` tiles it keeps in registers; the weight and bias gradients are reduced per 256
tokens into a small float32 buffer and summed by torch (deterministic, no atomics). Its tile shape is autotuned
per channel count.
"""

from __future__ import annotations

import contextlib

import torch
import triton
import triton.language as tl

from ..double_backward import refuse_double_backward
from .conv_reference import check_history

__all__ = ["MAX_TOKENS", "MAX_WIDTH", "causal_conv1d_triton"]

MAX_WIDTH = 4
"""Widest filter the kernels handle; wider ones go to the reference."""

_FWD_BLOCK_L, _FWD_BLOCK_C = 32, 128
_BWD_TOKENS_PER_PROGRAM = 256
"""Tokens one backward program walks: enough programs to fill the GPU at 16K tokens, and a partial-sum
buffer of ``5 * C`` floats per 256 tokens (52 MB at 128K tokens and 10240 channels)."""
MAX_TOKENS = 65535 * _BWD_TOKENS_PER_PROGRAM
"""Longest ``L`` of one call: the backward's token programs sit on CUDA's grid axis y (at most 65535)."""


@triton.jit
def _load_tile(base, pos, L, offs_c, mask_c, stride_l):
    """``[BLOCK_L, BLOCK_C]`` float32 tile of rows ``pos`` (zero outside ``[0, L)``)."""
    ok = (pos >= 0) & (pos < L)
    ptrs = base + pos.to(tl.int64)[:, None] * stride_l + offs_c[None, :]
    return tl.load(ptrs, mask=ok[:, None] & mask_c[None, :], other=0.0).to(tl.float32)


@triton.jit
def _load_x(x_base, h_base, pos, L, offs_c, mask_c, stride_l, stride_hl, HAS_HIST: tl.constexpr):
    """Input tile of rows ``pos``: ``x`` on ``[0, L)``, the history rows ``pos + 3`` on ``[-3, 0)`` when
    ``HAS_HIST``, zero elsewhere."""
    t = _load_tile(x_base, pos, L, offs_c, mask_c, stride_l)
    if HAS_HIST:
        before = (pos >= -3) & (pos < 0)
        ptrs = h_base + (pos + 3).to(tl.int64)[:, None] * stride_hl + offs_c[None, :]
        t += tl.load(ptrs, mask=before[:, None] & mask_c[None, :], other=0.0).to(tl.float32)
    return t


@triton.jit
def _load_seq(seq_base, hseq_base, pos, L, HAS_SEQ: tl.constexpr, HAS_HIST: tl.constexpr):
    """Sequence ids at ``pos``: ``seq_idx`` on ``[0, L)``, the history's ids on ``[-3, 0)`` when ``HAS_HIST``,
    ``-1`` elsewhere (where the input tile is zero anyway)."""
    if HAS_SEQ:
        ok = (pos >= 0) & (pos < L)
        q = tl.load(seq_base + pos, mask=ok, other=-1)
        if HAS_HIST:
            before = (pos >= -3) & (pos < 0)
            q = tl.where(before, tl.load(hseq_base + (pos + 3), mask=before, other=-1), q)
        return q
    return tl.zeros_like(pos)


@triton.jit
def _same(a, b):
    """``[BLOCK_L, 1]`` float32 mask: 1 where two positions belong to the same packed sequence."""
    return (a == b).to(tl.float32)[:, None]


@triton.jit
def _conv_fwd_kernel(
    X, W, BIAS, SEQ, HIST, HSEQ, OUT,
    L, C,
    stride_xb, stride_xl, stride_ob, stride_ol, stride_sb, stride_hb, stride_hl, stride_hsb, BLOCK_OFFSET,
    HAS_BIAS: tl.constexpr, HAS_SEQ: tl.constexpr, HAS_HIST: tl.constexpr, SILU: tl.constexpr,
    BLOCK_L: tl.constexpr, BLOCK_C: tl.constexpr,
):  # fmt: skip
    """Blocks ``BLOCK_OFFSET + program_id(0)`` of ``BLOCK_L`` tokens; with ``HAS_HIST`` launched for block 0 alone
    (the one that reads the history), the other blocks being launched without it."""
    pid_l = tl.program_id(0) + BLOCK_OFFSET
    pid_c = tl.program_id(1)
    b = tl.program_id(2).to(tl.int64)
    pos = pid_l * BLOCK_L + tl.arange(0, BLOCK_L)
    offs_c = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    mask_c = offs_c < C
    x_base = X + b * stride_xb
    h_base = HIST + b * stride_hb
    seq_base = SEQ + b * stride_sb
    hseq_base = HSEQ + b * stride_hsb
    q0 = _load_seq(seq_base, hseq_base, pos, L, HAS_SEQ, HAS_HIST)

    w3 = tl.load(W + offs_c * 4 + 3, mask=mask_c, other=0.0).to(tl.float32)[None, :]
    acc = _load_tile(x_base, pos, L, offs_c, mask_c, stride_xl) * w3
    for d in tl.static_range(1, 4):
        w = tl.load(W + offs_c * 4 + (3 - d), mask=mask_c, other=0.0).to(tl.float32)[None, :]
        xd = _load_x(x_base, h_base, pos - d, L, offs_c, mask_c, stride_xl, stride_hl, HAS_HIST)
        if HAS_SEQ:
            xd = xd * _same(_load_seq(seq_base, hseq_base, pos - d, L, HAS_SEQ, HAS_HIST), q0)
        acc += xd * w
    if HAS_BIAS:
        acc += tl.load(BIAS + offs_c, mask=mask_c, other=0.0).to(tl.float32)[None, :]
    if SILU:
        acc = acc * tl.sigmoid(acc)
    ok = pos < L
    out_ptrs = OUT + b * stride_ob + pos.to(tl.int64)[:, None] * stride_ol + offs_c[None, :]
    tl.store(out_ptrs, acc.to(OUT.dtype.element_ty), mask=ok[:, None] & mask_c[None, :])


@triton.jit
def _dact(dy, a, SILU: tl.constexpr):
    """Gradient through the activation at pre-activation ``a``."""
    if SILU:
        s = tl.sigmoid(a)
        return dy * s * (1.0 + a * (1.0 - s))
    return dy


_BWD_CONFIGS = [
    triton.Config({"BLOCK_L": bl, "BLOCK_C": bc, "ACC_2D": acc}, num_warps=nw)
    for bl, bc, nw in ((16, 128, 8), (16, 64, 4), (32, 64, 8), (8, 128, 4), (32, 128, 8))
    for acc in (False, True)
]
"""Tile shapes tried once per channel count (Triton's autotuner; the best depends on the card's registers)."""
_BWD_DEFAULT = {"BLOCK_L": 16, "BLOCK_C": 64, "ACC_2D": True, "num_warps": 4}
"""The configuration used without autotuning (Triton's CPU interpreter)."""


@triton.jit
def _conv_bwd_kernel(
    X, W, BIAS, SEQ, HIST, HSEQ, DOUT, DX, DHIST, DW_PART, DB_PART,
    L, C,
    stride_xb, stride_xl, stride_gb, stride_gl, stride_dxb, stride_dxl, stride_sb, stride_hb, stride_hl, stride_hsb,
    N_T, PROGRAM_OFFSET,
    HAS_BIAS: tl.constexpr, HAS_SEQ: tl.constexpr, HAS_HIST: tl.constexpr, SILU: tl.constexpr,
    TOKENS_PER_PROGRAM: tl.constexpr,
    BLOCK_L: tl.constexpr, BLOCK_C: tl.constexpr, ACC_2D: tl.constexpr,
):  # fmt: skip
    """One program: ``TOKENS_PER_PROGRAM`` tokens x ``BLOCK_C`` channels, in blocks of ``BLOCK_L`` rows.

    The statements are ordered so that each shifted ``x`` tile dies as soon as the last pre-activation that
    reads it is formed (at most five ``x`` tiles live). Register pressure and 1024-token programs made the first
    version take 41.9 ms per backward of ``[1, 128K, 10240]`` bf16 on an H200; this one takes 9.7 ms, still
    about 5x the time its ~8 GB of traffic needs.
    ``ACC_2D`` keeps the weight/bias sums as ``[BLOCK_L, BLOCK_C]`` tiles reduced once at the end instead
    of five cross-row reductions per block.
    Token programs are ``PROGRAM_OFFSET + program_id(1)`` of ``N_T``. A history is read by program 0 alone,
    launched by itself with ``HAS_HIST`` (the others run the history-free kernel): it also walks the block before
    position 0, whose ``dx`` at positions ``-3..-1`` is the history's gradient (``DHIST``, same strides as
    ``HIST``); its ``g0`` is zero there, so the weight sums gain nothing from it.
    """
    pid_c = tl.program_id(0)
    pid_t = tl.program_id(1) + PROGRAM_OFFSET
    b = tl.program_id(2).to(tl.int64)
    n_t = N_T
    offs_c = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    mask_c = offs_c < C
    x_base = X + b * stride_xb
    h_base = HIST + b * stride_hb
    g_base = DOUT + b * stride_gb
    seq_base = SEQ + b * stride_sb
    hseq_base = HSEQ + b * stride_hsb

    w0 = tl.load(W + offs_c * 4 + 0, mask=mask_c, other=0.0).to(tl.float32)[None, :]
    w1 = tl.load(W + offs_c * 4 + 1, mask=mask_c, other=0.0).to(tl.float32)[None, :]
    w2 = tl.load(W + offs_c * 4 + 2, mask=mask_c, other=0.0).to(tl.float32)[None, :]
    w3 = tl.load(W + offs_c * 4 + 3, mask=mask_c, other=0.0).to(tl.float32)[None, :]
    if HAS_BIAS:
        bias = tl.load(BIAS + offs_c, mask=mask_c, other=0.0).to(tl.float32)[None, :]
    else:
        bias = tl.zeros((1, BLOCK_C), tl.float32)

    if ACC_2D:
        acc0 = tl.zeros((BLOCK_L, BLOCK_C), tl.float32)
        acc1 = tl.zeros((BLOCK_L, BLOCK_C), tl.float32)
        acc2 = tl.zeros((BLOCK_L, BLOCK_C), tl.float32)
        acc3 = tl.zeros((BLOCK_L, BLOCK_C), tl.float32)
        accb = tl.zeros((BLOCK_L, BLOCK_C), tl.float32)
    else:
        acc0 = tl.zeros((BLOCK_C,), tl.float32)
        acc1 = tl.zeros((BLOCK_C,), tl.float32)
        acc2 = tl.zeros((BLOCK_C,), tl.float32)
        acc3 = tl.zeros((BLOCK_C,), tl.float32)
        accb = tl.zeros((BLOCK_C,), tl.float32)

    start = pid_t * TOKENS_PER_PROGRAM
    first = -BLOCK_L if HAS_HIST else 0
    for i in range(first, TOKENS_PER_PROGRAM, BLOCK_L):
        s = start + i + tl.arange(0, BLOCK_L)
        q0 = _load_seq(seq_base, hseq_base, s, L, HAS_SEQ, HAS_HIST)
        qm1 = _load_seq(seq_base, hseq_base, s - 1, L, HAS_SEQ, HAS_HIST)
        qm2 = _load_seq(seq_base, hseq_base, s - 2, L, HAS_SEQ, HAS_HIST)
        qm3 = _load_seq(seq_base, hseq_base, s - 3, L, HAS_SEQ, HAS_HIST)
        x0 = _load_x(x_base, h_base, s, L, offs_c, mask_c, stride_xl, stride_hl, HAS_HIST)
        xm1 = _load_x(x_base, h_base, s - 1, L, offs_c, mask_c, stride_xl, stride_hl, HAS_HIST)
        xm2 = _load_x(x_base, h_base, s - 2, L, offs_c, mask_c, stride_xl, stride_hl, HAS_HIST)
        # Output s reads x[s-3..s] (taps across a sequence boundary read zero); its gradient g0 gives the
        # weight and bias gradients and the first term of dx[s].
        xm3 = _load_x(x_base, h_base, s - 3, L, offs_c, mask_c, stride_xl, stride_hl, HAS_HIST) * _same(qm3, q0)
        a0 = bias + w3 * x0 + w2 * xm1 * _same(qm1, q0) + w1 * xm2 * _same(qm2, q0) + w0 * xm3
        g0 = _dact(_load_tile(g_base, s, L, offs_c, mask_c, stride_gl), a0, SILU)
        if ACC_2D:
            acc3 += g0 * x0
            acc2 += g0 * xm1 * _same(qm1, q0)
            acc1 += g0 * xm2 * _same(qm2, q0)
            acc0 += g0 * xm3
            accb += g0
        else:
            acc3 += tl.sum(g0 * x0, axis=0)
            acc2 += tl.sum(g0 * xm1 * _same(qm1, q0), axis=0)
            acc1 += tl.sum(g0 * xm2 * _same(qm2, q0), axis=0)
            acc0 += tl.sum(g0 * xm3, axis=0)
            accb += tl.sum(g0, axis=0)
        dx = w3 * g0
        # x[s] also feeds outputs s+1..s+3 through taps 2..0 (when they are in its sequence).
        qp1 = _load_seq(seq_base, hseq_base, s + 1, L, HAS_SEQ, HAS_HIST)
        xp1 = _load_x(x_base, h_base, s + 1, L, offs_c, mask_c, stride_xl, stride_hl, HAS_HIST)
        a1 = bias + w3 * xp1 + w2 * x0 * _same(q0, qp1) + w1 * xm1 * _same(qm1, qp1) + w0 * xm2 * _same(qm2, qp1)
        dx += w2 * _dact(_load_tile(g_base, s + 1, L, offs_c, mask_c, stride_gl), a1, SILU) * _same(q0, qp1)
        qp2 = _load_seq(seq_base, hseq_base, s + 2, L, HAS_SEQ, HAS_HIST)
        xp2 = _load_x(x_base, h_base, s + 2, L, offs_c, mask_c, stride_xl, stride_hl, HAS_HIST)
        a2 = bias + w3 * xp2 + w2 * xp1 * _same(qp1, qp2) + w1 * x0 * _same(q0, qp2) + w0 * xm1 * _same(qm1, qp2)
        dx += w1 * _dact(_load_tile(g_base, s + 2, L, offs_c, mask_c, stride_gl), a2, SILU) * _same(q0, qp2)
        qp3 = _load_seq(seq_base, hseq_base, s + 3, L, HAS_SEQ, HAS_HIST)
        xp3 = _load_x(x_base, h_base, s + 3, L, offs_c, mask_c, stride_xl, stride_hl, HAS_HIST)
        a3 = bias + w3 * xp3 + w2 * xp2 * _same(qp2, qp3) + w1 * xp1 * _same(qp1, qp3) + w0 * x0 * _same(q0, qp3)
        dx += w0 * _dact(_load_tile(g_base, s + 3, L, offs_c, mask_c, stride_gl), a3, SILU) * _same(q0, qp3)
        ok = (s >= 0) & (s < L)
        dx_ptrs = DX + b * stride_dxb + s.to(tl.int64)[:, None] * stride_dxl + offs_c[None, :]
        tl.store(dx_ptrs, dx.to(DX.dtype.element_ty), mask=ok[:, None] & mask_c[None, :])
        if HAS_HIST:
            before = (s >= -3) & (s < 0)
            dh_ptrs = DHIST + b * stride_hb + (s + 3).to(tl.int64)[:, None] * stride_hl + offs_c[None, :]
            tl.store(dh_ptrs, dx.to(DHIST.dtype.element_ty), mask=before[:, None] & mask_c[None, :])

    if ACC_2D:
        dw0, dw1, dw2, dw3 = tl.sum(acc0, axis=0), tl.sum(acc1, axis=0), tl.sum(acc2, axis=0), tl.sum(acc3, axis=0)
        db = tl.sum(accb, axis=0)
    else:
        dw0, dw1, dw2, dw3, db = acc0, acc1, acc2, acc3, accb
    part = b * n_t + pid_t
    dw_base = DW_PART + part * 4 * C
    tl.store(dw_base + 0 * C + offs_c, dw0, mask=mask_c)
    tl.store(dw_base + 1 * C + offs_c, dw1, mask=mask_c)
    tl.store(dw_base + 2 * C + offs_c, dw2, mask=mask_c)
    tl.store(dw_base + 3 * C + offs_c, dw3, mask=mask_c)
    tl.store(DB_PART + part * C + offs_c, db, mask=mask_c)


_conv_bwd_tuned = triton.autotune(configs=_BWD_CONFIGS, key=["C", "HAS_SEQ", "HAS_HIST"])(_conv_bwd_kernel)


def _on_device(t: torch.Tensor):
    """Launch on ``t``'s GPU (a no-op context for CPU tensors, which only Triton's interpreter runs)."""
    return torch.cuda.device(t.device) if t.is_cuda else contextlib.nullcontext()


def _as_rows(x: torch.Tensor) -> torch.Tensor:
    """``x`` ``[B, L, C]`` with unit channel stride (a copy only when the channels are strided)."""
    return x if x.stride(2) == 1 else x.contiguous()


def _pad_weight(weight: torch.Tensor) -> torch.Tensor:
    """``[C, K]`` -> ``[C, 4]`` float32 with ``4 - K`` leading zero taps (same output, one kernel for all K)."""
    width = weight.shape[1]
    w = weight.float()
    if width < MAX_WIDTH:
        w = torch.nn.functional.pad(w, (MAX_WIDTH - width, 0))
    return w.contiguous()


def _as_history(history: torch.Tensor | None, history_seq_idx: torch.Tensor | None):
    """``history`` ``[B, K-1, C]`` -> ``[B, 3, C]`` contiguous with ``3 - (K-1)`` leading zero rows (the taps that
    read them are zero), and its ``[B, K-1]`` ids -> ``[B, 3]`` int32 (the padded rows get id -1: whatever they
    compare with, they multiply a zero tap)."""
    if history is None:
        return None, None
    pad = MAX_WIDTH - 1 - history.shape[1]
    hist = torch.nn.functional.pad(history, (0, 0, pad, 0)).contiguous()
    hseq = None
    if history_seq_idx is not None:
        hseq = torch.nn.functional.pad(history_seq_idx.to(torch.int32), (pad, 0), value=-1).contiguous()
    return hist, hseq


class _CausalConv1dFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, seq_idx, silu, history, history_seq_idx):
        x = _as_rows(x)
        batch, length, channels = x.shape
        w4 = _pad_weight(weight)
        bias_c = bias.contiguous() if bias is not None else None
        seq = seq_idx.to(torch.int32).contiguous() if seq_idx is not None else None
        hist, hseq = _as_history(history, history_seq_idx)
        out = torch.empty((batch, length, channels), device=x.device, dtype=x.dtype)
        args = (
            x, w4, bias_c if bias_c is not None else w4, seq if seq is not None else x,
            hist if hist is not None else x, hseq if hseq is not None else x, out,
            length, channels,
            x.stride(0), x.stride(1), out.stride(0), out.stride(1), seq.stride(0) if seq is not None else 0,
            *_history_strides(hist, hseq),
        )  # fmt: skip
        flags = dict(HAS_BIAS=bias_c is not None, HAS_SEQ=seq is not None, SILU=silu)
        flags.update(BLOCK_L=_FWD_BLOCK_L, BLOCK_C=_FWD_BLOCK_C, num_warps=4)
        blocks, c_blocks = triton.cdiv(length, _FWD_BLOCK_L), triton.cdiv(channels, _FWD_BLOCK_C)
        with _on_device(x):
            # The history is read by block 0 alone: it gets its own launch, the rest the history-free kernel.
            first = 0 if hist is None else 1
            if blocks > first:
                _conv_fwd_kernel[(blocks - first, c_blocks, batch)](*args, first, HAS_HIST=False, **flags)
            if hist is not None:
                _conv_fwd_kernel[(1, c_blocks, batch)](*args, 0, HAS_HIST=True, **flags)
        ctx.save_for_backward(x, w4, bias_c, seq, hist, hseq)
        ctx.silu = silu
        ctx.width = weight.shape[1]
        ctx.weight_dtype = weight.dtype
        ctx.has_bias = bias is not None
        return out

    @staticmethod
    def backward(ctx, dout):
        refuse_double_backward("the Triton causal conv1d")
        x, w4, bias_c, seq, hist, hseq = ctx.saved_tensors
        dout = _as_rows(dout)
        batch, length, channels = x.shape
        dx = torch.empty((batch, length, channels), device=x.device, dtype=x.dtype)
        # Program 0 writes every history row; an empty row (L = 0) has no program and no history gradient.
        dhist = None if hist is None else (torch.empty_like(hist) if length > 0 else torch.zeros_like(hist))
        n_t = triton.cdiv(length, _BWD_TOKENS_PER_PROGRAM)
        dw_part = torch.empty((batch * n_t, 4, channels), device=x.device, dtype=torch.float32)
        db_part = torch.empty((batch * n_t, channels), device=x.device, dtype=torch.float32)
        args = (
            x, w4, bias_c if bias_c is not None else w4, seq if seq is not None else x,
            hist if hist is not None else x, hseq if hseq is not None else x, dout, dx,
            dhist if dhist is not None else dx, dw_part, db_part,
            length, channels,
            x.stride(0), x.stride(1), dout.stride(0), dout.stride(1), dx.stride(0), dx.stride(1),
            seq.stride(0) if seq is not None else 0, *_history_strides(hist, hseq), n_t,
        )  # fmt: skip
        flags = {"HAS_BIAS": bias_c is not None, "HAS_SEQ": seq is not None}
        flags.update(SILU=ctx.silu, TOKENS_PER_PROGRAM=_BWD_TOKENS_PER_PROGRAM)
        # Program 0 of each row reads the history: its own launch; the others run the history-free kernel.
        launches = [(0, n_t, False)] if hist is None else [(1, n_t - 1, False), (0, min(n_t, 1), True)]
        with _on_device(x):
            for offset, programs, has_hist in launches:
                if programs <= 0:
                    continue
                if x.is_cuda:
                    grid = lambda meta, n=programs: (triton.cdiv(channels, meta["BLOCK_C"]), n, batch)  # noqa: E731
                    _conv_bwd_tuned[grid](*args, offset, HAS_HIST=has_hist, **flags)
                else:  # Triton's CPU interpreter: one fixed configuration (the autotuner times on a GPU)
                    grid = (triton.cdiv(channels, _BWD_DEFAULT["BLOCK_C"]), programs, batch)
                    _conv_bwd_kernel[grid](*args, offset, HAS_HIST=has_hist, **flags, **_BWD_DEFAULT)
        dw = dw_part.sum(0).t()[:, MAX_WIDTH - ctx.width :].to(ctx.weight_dtype)  # [C, K]
        db = db_part.sum(0).to(bias_c.dtype) if ctx.has_bias else None
        dh = dhist[:, MAX_WIDTH - ctx.width :] if dhist is not None else None  # [B, K-1, C]
        return dx, dw, db, None, None, dh, None


def _history_strides(hist: torch.Tensor | None, hseq: torch.Tensor | None) -> tuple[int, int, int]:
    """(batch, token) strides of the padded history and the batch stride of its ids (0 where absent)."""
    return (
        hist.stride(0) if hist is not None else 0,
        hist.stride(1) if hist is not None else 0,
        hseq.stride(0) if hseq is not None else 0,
    )


def causal_conv1d_triton(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    seq_idx: torch.Tensor | None = None,
    activation: str | None = "silu",
    history: torch.Tensor | None = None,
    history_seq_idx: torch.Tensor | None = None,
) -> torch.Tensor:
    """Depthwise causal conv1d on CUDA: ``x`` ``[B, L, C]`` (any row stride), ``weight`` ``[C, K<=4]``,
    ``bias`` ``[C]``, ``seq_idx`` ``[B, L]``, ``history`` ``[B, K-1, C]`` (the tokens before ``x[:, 0]``) and its
    ids ``history_seq_idx`` ``[B, K-1]`` -> ``[B, L, C]`` contiguous, in ``x.dtype`` (float32 math).

    Same contract as :func:`mamba_cp.kernels.conv_reference.causal_conv1d_ref`.
    """
    if activation not in (None, "silu", "swish"):
        raise ValueError(f"activation must be None or 'silu', got {activation!r}")
    if x.dim() != 3 or weight.dim() != 2 or weight.shape[0] != x.shape[2]:
        raise ValueError(f"expected x [B, L, C] and weight [C, K], got {tuple(x.shape)} and {tuple(weight.shape)}")
    if not 1 <= weight.shape[1] <= MAX_WIDTH:
        raise ValueError(f"the Triton conv handles 1 to {MAX_WIDTH} taps, got {weight.shape[1]}")
    if seq_idx is not None and seq_idx.shape != x.shape[:2]:
        raise ValueError(f"seq_idx must be [B, L]={tuple(x.shape[:2])}, got {tuple(seq_idx.shape)}")
    if x.shape[1] > MAX_TOKENS:
        raise ValueError(f"the Triton conv takes at most {MAX_TOKENS} tokens per call, got L={x.shape[1]}")
    history_seq_idx = check_history(x, weight, seq_idx, history, history_seq_idx)
    return _CausalConv1dFn.apply(x, weight, bias, seq_idx, activation is not None, history, history_seq_idx)
