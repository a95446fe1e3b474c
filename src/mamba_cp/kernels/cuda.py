"""Adapters from the kernel interface to the CUDA kernels of mamba_ssm, causal_conv1d and our Triton conv.

Each loader imports its package on first use and returns ``None`` when it cannot be imported (package
missing, no Triton, a compiled extension that fails to load), so callers fall back to the references.
Nothing here touches ``sys.modules``: mamba_ssm 2.3.2's package ``__init__`` imports its compiled
``selective_scan_cuda``, so on a machine without that extension its Triton submodules do not import
either, and the references are used unless the embedding program made the package importable.

Index widths (see :mod:`mamba_cp.kernels.index_width`, which cuts calls to fit them): mamba_ssm's Triton
kernels compute offsets in int32 (:data:`MAMBA_SSM_LIMIT`), the ``causal_conv1d`` package in uint32
(:data:`CAUSAL_CONV1D_LIMIT`, and at most :data:`CAUSAL_CONV1D_MAX_TOKENS` tokens per call); our Triton conv
in int64 (at most :data:`TRITON_CONV_MAX_TOKENS` tokens per call). A strided view whose span (first to last
element, plus one) is past a kernel's limit is copied to a contiguous tensor before it is handed to it (the
``z`` or ``dt`` column views of a long in_proj output are such views).
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import torch

from . import ssd_autograd
from .index_width import GRID_YZ_LIMIT, INT32_LIMIT, UINT32_LIMIT, fit, rmsnorm_gated_split, span

__all__ = [
    "CAUSAL_CONV1D_LIMIT",
    "CAUSAL_CONV1D_MAX_TOKENS",
    "MAMBA_SSM_LIMIT",
    "TRITON_CONV_MAX_TOKENS",
    "causal_conv1d_cuda",
    "causal_conv1d_pkg",
    "int32_safe",
    "mamba_rmsnorm",
    "mamba_ssd",
    "rmsnorm_gated_cuda",
    "span",
    "ssd_chunk_scan_cuda",
    "triton_conv",
]

MAMBA_SSM_LIMIT = INT32_LIMIT
"""Largest element offset mamba_ssm 2.3.2's Triton SSD and gated-norm kernels index correctly (int32)."""
CAUSAL_CONV1D_LIMIT = UINT32_LIMIT
"""Largest element offset of the ``causal_conv1d`` package's channel-last kernels (``uint32_t`` strides)."""
CAUSAL_CONV1D_MAX_TOKENS = GRID_YZ_LIMIT * 64
"""Tokens per ``causal_conv1d`` call: its forward puts one program per 64 tokens on grid axis y."""
TRITON_CONV_MAX_TOKENS = GRID_YZ_LIMIT * 256
"""Tokens per call of our Triton conv: its backward puts one program per 256 tokens on grid axis y."""


def int32_safe(t: torch.Tensor | None) -> torch.Tensor | None:
    """``t``, or a contiguous copy when its span is too large for int32 offsets."""
    return fit(t, INT32_LIMIT)


# ------------------------------------------------------------------------------------------------ loaders


@functools.cache
def mamba_ssd() -> Callable | None:
    """mamba_ssm's Triton SSD with ``mamba_chunk_scan_combined``'s signature, or None.

    Its forward and backward functions under :class:`~mamba_cp.kernels.ssd_autograd.ChunkScan`, which does not
    save the output it does not read (:mod:`~mamba_cp.kernels.ssd_autograd`); the package's public function where
    those do not import."""
    if ssd_autograd.load() is not None:
        return ssd_autograd.chunk_scan
    try:
        from mamba_ssm.ops.triton.ssd_combined import mamba_chunk_scan_combined
    except Exception:  # noqa: BLE001 - any failure to import means "not available"
        return None
    return mamba_chunk_scan_combined


@functools.cache
def mamba_rmsnorm() -> Callable | None:
    """mamba_ssm's Triton gated ``rmsnorm_fn``, or None."""
    try:
        from mamba_ssm.ops.triton.layernorm_gated import rmsnorm_fn
    except Exception:  # noqa: BLE001
        return None
    return rmsnorm_fn


@functools.cache
def causal_conv1d_pkg() -> Callable | None:
    """The ``causal_conv1d`` package's ``causal_conv1d_fn``, or None."""
    try:
        from causal_conv1d import causal_conv1d_fn
    except Exception:  # noqa: BLE001
        return None
    return causal_conv1d_fn


@functools.cache
def triton_conv() -> Callable | None:
    """Our Triton ``causal_conv1d_triton``, or None when Triton is not importable."""
    try:
        from .triton_conv import causal_conv1d_triton
    except Exception:  # noqa: BLE001
        return None
    return causal_conv1d_triton


# ------------------------------------------------------------------------------------------------ adapters


def causal_conv1d_cuda(
    fn: Callable,
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    seq_idx: torch.Tensor | None,
    activation: str | None,
) -> torch.Tensor:
    """``causal_conv1d_fn`` on channels-last ``x`` ``[B, L, C]`` -> ``[B, L, C]``.

    The package takes ``[B, C, L]``; ``x.transpose(1, 2)`` is its channels-last layout, which it reads in
    place when the token stride is a multiple of 8 (and which ``seq_idx`` requires).
    """
    if x.stride(2) != 1 or x.stride(1) % 8 != 0:
        x = x.contiguous()
    seq = seq_idx.to(torch.int32).contiguous() if seq_idx is not None else None
    out = fn(x.transpose(1, 2), weight.contiguous(), bias, seq_idx=seq, activation=activation)
    return out.transpose(1, 2)


def ssd_chunk_scan_cuda(
    fn: Callable,
    x: torch.Tensor,
    dt: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    chunk_size: int,
    D: torch.Tensor | None = None,
    z: torch.Tensor | None = None,
    dt_bias: torch.Tensor | None = None,
    initial_states: torch.Tensor | None = None,
    seq_idx: torch.Tensor | None = None,
    dt_softplus: bool = False,
    dt_limit: tuple[float, float] = (0.0, float("inf")),
    return_final_states: bool = False,
):
    """mamba_ssm's ``mamba_chunk_scan_combined`` with the int32 guard on every activation (the keywords and
    defaults of :func:`mamba_cp.kernels.ssd_chunk_scan`).

    ``dt`` ``[B, L, H]`` is small and always made contiguous (it is usually a column view of a wide
    projection); ``seq_idx`` goes in as int32.
    """
    seq = seq_idx.to(torch.int32).contiguous() if seq_idx is not None else None
    return fn(
        int32_safe(x),
        dt.contiguous(),
        A.float().contiguous(),
        int32_safe(B),
        int32_safe(C),
        chunk_size,
        D=D,
        z=int32_safe(z),
        dt_bias=dt_bias,
        initial_states=initial_states,
        seq_idx=seq,
        dt_softplus=dt_softplus,
        dt_limit=tuple(dt_limit),
        return_final_states=return_final_states,
    )


def rmsnorm_gated_cuda(
    fn: Callable,
    x: torch.Tensor,
    z: torch.Tensor | None,
    weight: torch.Tensor,
    eps: float,
    group_size: int | None,
    norm_before_gate: bool,
) -> torch.Tensor:
    """mamba_ssm's gated ``rmsnorm_fn`` on ``[..., D]``.

    Its kernels index rows in int32: past :data:`MAMBA_SSM_LIMIT` elements the rows are normalised in blocks
    (:func:`mamba_cp.kernels.index_width.rmsnorm_gated_split`).
    """

    def norm(xb, zb, w, eps_, gs, nbg):
        return fn(xb, w, None, z=zb, eps=eps_, group_size=gs, norm_before_gate=nbg)

    return rmsnorm_gated_split(norm, x, z, weight, eps, group_size, norm_before_gate, limit=MAMBA_SSM_LIMIT)
