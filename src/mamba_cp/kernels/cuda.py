"""Adapters from the kernel interface to the CUDA kernels of mamba_ssm, causal_conv1d and our Triton conv.

Each loader imports its package on first use and returns ``None`` when it cannot be imported (package
missing, no Triton, a compiled extension that fails to load), so callers fall back to the references.
Nothing here touches ``sys.modules``: mamba_ssm 2.3.2's package ``__init__`` imports its compiled
``selective_scan_cuda``, so on a machine without that extension its Triton submodules do not import
either, and the references are used unless the embedding program made the package importable.

mamba_ssm's Triton kernels compute some offsets in int32: a strided view whose span (the distance from
its first to its last element plus one) reaches 2**31 elements is copied to a contiguous tensor before
it is handed to them (the ``z`` or ``dt`` column views of a long in_proj output are such views).
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import torch

__all__ = [
    "causal_conv1d_cuda",
    "causal_conv1d_pkg",
    "int32_safe",
    "mamba_rmsnorm",
    "mamba_ssd",
    "rmsnorm_gated_cuda",
    "ssd_chunk_scan_cuda",
    "triton_conv",
]

_INT32_LIMIT = 2**31 - 1


def span(t: torch.Tensor) -> int:
    """Elements from ``t``'s first to its last addressed element, inclusive (``numel`` when contiguous)."""
    if t.numel() == 0:
        return 0
    return 1 + sum((size - 1) * stride for size, stride in zip(t.shape, t.stride(), strict=True))


def int32_safe(t: torch.Tensor | None) -> torch.Tensor | None:
    """``t``, or a contiguous copy when its span is too large for int32 offsets."""
    if t is None or span(t) <= _INT32_LIMIT:
        return t
    return t.contiguous()


# ------------------------------------------------------------------------------------------------ loaders


@functools.cache
def mamba_ssd() -> Callable | None:
    """mamba_ssm's Triton ``mamba_chunk_scan_combined``, or None."""
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
    D: torch.Tensor | None,
    z: torch.Tensor | None,
    dt_bias: torch.Tensor | None,
    initial_states: torch.Tensor | None,
    seq_idx: torch.Tensor | None,
    dt_softplus: bool,
    dt_limit: tuple[float, float],
    return_final_states: bool,
):
    """mamba_ssm's ``mamba_chunk_scan_combined`` with the int32 guard on every activation.

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

    Its kernels index rows in int32, so a tensor of 2**31 elements or more is normalised in row blocks.
    """
    x, z = int32_safe(x), int32_safe(z)
    dim = x.shape[-1]
    rows = x.numel() // dim if dim else 0
    max_rows = _INT32_LIMIT // max(dim, 1)
    if rows <= max_rows:
        return fn(x, weight, None, z=z, eps=eps, group_size=group_size, norm_before_gate=norm_before_gate)
    x2, z2 = x.reshape(rows, dim), z.reshape(rows, dim) if z is not None else None
    pieces = [
        fn(
            x2[i : i + max_rows],
            weight,
            None,
            z=z2[i : i + max_rows] if z2 is not None else None,
            eps=eps,
            group_size=group_size,
            norm_before_gate=norm_before_gate,
        )
        for i in range(0, rows, max_rows)
    ]
    return torch.cat(pieces).reshape(x.shape)
