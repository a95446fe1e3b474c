"""Kernels behind one interface: depthwise causal conv1d, the chunked SSD scan, gated RMSNorm.

Each op has a readable pure-PyTorch reference (``*_reference.py``, exact in float64 against the plain
sequential recurrence in ``ssd_naive.py``) that runs on any device. The functions here are what the rest
of the library calls; they pick an implementation from the tensors' device.

On CUDA tensors of a half or float32 dtype the fast kernels are chosen when they import (see
:mod:`mamba_cp.kernels.cuda`): the SSD scan and the gated RMSNorm from mamba_ssm's Triton kernels; the
conv from the ``causal_conv1d`` package, else our Triton conv (:mod:`mamba_cp.kernels.triton_conv`).
Everything else (CPU tensors, float64, a missing package) runs the references. ``MAMBA_CP_KERNELS=reference``
forces the references everywhere; :func:`selected` says what a device would get.

Every CUDA kernel call goes through :mod:`mamba_cp.kernels.index_width` with that kernel's index width (int32
for mamba_ssm, uint32 for ``causal_conv1d``, a token cap for our Triton conv): a call past it is cut into calls
that fit, a call that fits is made as it is. The references are not cut (the splitters take them too, with
any limit, which is how the cuts are tested on the CPU).
"""

from __future__ import annotations

import functools
import os

import torch

from ..double_backward import first_order_only
from . import cuda, index_width
from .conv_reference import causal_conv1d_ref, check_history, history_by_window
from .norm_reference import rmsnorm_gated_ref
from .ssd_reference import ssd_chunk_scan_ref

KERNELS_ENV = "MAMBA_CP_KERNELS"
"""Environment variable: ``auto`` (default) picks per device, ``reference`` forces the references."""

_FAST_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def _mode() -> str:
    mode = os.environ.get(KERNELS_ENV, "auto").strip().lower() or "auto"
    if mode not in ("auto", "reference"):
        raise ValueError(f"{KERNELS_ENV} must be 'auto' or 'reference', got {mode!r}")
    return mode


def _fast(t: torch.Tensor) -> bool:
    """Whether ``t`` may go to a CUDA kernel (float64 stays on the references, for exact tests)."""
    return _mode() == "auto" and t.is_cuda and t.dtype in _FAST_DTYPES


def _conv_impl(t: torch.Tensor, width: int) -> tuple[str, object]:
    if _fast(t):
        if 2 <= width <= 4 and (fn := cuda.causal_conv1d_pkg()) is not None:
            return "causal_conv1d", fn
        if (fn := cuda.triton_conv()) is not None and width <= 4:
            return "triton", fn
    return "reference", causal_conv1d_ref


def _ssd_impl(t: torch.Tensor) -> tuple[str, object]:
    if _fast(t) and (fn := cuda.mamba_ssd()) is not None:
        return "mamba_ssm", fn
    return "reference", ssd_chunk_scan_ref


def _norm_impl(t: torch.Tensor) -> tuple[str, object]:
    if _fast(t) and (fn := cuda.mamba_rmsnorm()) is not None:
        return "mamba_ssm", fn
    return "reference", rmsnorm_gated_ref


def selected(device: torch.device | str = "cpu", dtype: torch.dtype = torch.bfloat16, conv_width: int = 4) -> dict:
    """The implementation each op gets for tensors on ``device`` of ``dtype``: ``{"causal_conv1d": name,
    "ssd_chunk_scan": name, "rmsnorm_gated": name}`` (names: ``reference``, ``triton``, ``causal_conv1d``,
    ``mamba_ssm``)."""
    probe = torch.empty(0, device=device, dtype=dtype)
    return {
        "causal_conv1d": _conv_impl(probe, conv_width)[0],
        "ssd_chunk_scan": _ssd_impl(probe)[0],
        "rmsnorm_gated": _norm_impl(probe)[0],
    }


def causal_conv1d(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    seq_idx: torch.Tensor | None = None,
    activation: str | None = "silu",
    history: torch.Tensor | None = None,
    history_seq_idx: torch.Tensor | None = None,
) -> torch.Tensor:
    """Depthwise causal conv1d: ``x`` ``[B, L, C]``, ``weight`` ``[C, K]``, ``bias`` ``[C]`` -> ``[B, L, C]``.

    ``seq_idx`` ``[B, L]`` stops the window at packed-sequence boundaries. ``history`` ``[B, K-1, C]``: the tokens
    before ``x[:, 0]`` (zeros when None), with ids ``history_seq_idx`` ``[B, K-1]`` (default: each row's first
    sequence), as :func:`~mamba_cp.kernels.conv_reference.causal_conv1d_ref` defines them. Our Triton conv and the
    reference read it; for the ``causal_conv1d`` package it goes through
    :func:`~mamba_cp.kernels.conv_reference.history_by_window`.
    """
    history_seq_idx = check_history(x, weight, seq_idx, history, history_seq_idx)
    name, fn = _conv_impl(x, weight.shape[-1])
    if name == "causal_conv1d":
        weight = first_order_only(weight, "the causal_conv1d package's kernel")  # backward not differentiable again
        conv = functools.partial(
            index_width.causal_conv1d_split, functools.partial(cuda.causal_conv1d_cuda, fn),
            limit=cuda.CAUSAL_CONV1D_LIMIT, max_tokens=cuda.CAUSAL_CONV1D_MAX_TOKENS,
        )  # fmt: skip
        if history is None:
            return conv(x, weight, bias, seq_idx, activation)
        return history_by_window(conv, x, weight, bias, seq_idx, activation, history, history_seq_idx)
    if name == "triton":
        return index_width.causal_conv1d_split(
            fn, x, weight, bias, seq_idx, activation, limit=None, max_tokens=cuda.TRITON_CONV_MAX_TOKENS,
            history=history, history_seq_idx=history_seq_idx,
        )  # fmt: skip
    return fn(x, weight, bias, seq_idx=seq_idx, activation=activation, history=history, history_seq_idx=history_seq_idx)


def ssd_chunk_scan(
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
    """The SSD scan (signature of mamba_ssm's ``mamba_chunk_scan_combined``).

    ``x`` ``[B, L, H, P]``, ``dt`` ``[B, L, H]``, ``A`` ``[H]``, ``B``/``C`` ``[B, L, G, N]`` -> ``y``
    ``[B, L, H, P]`` (and the final states ``[B, H, P, N]`` when asked). On mamba_ssm the call is cut where
    its int32 offsets would overflow (:func:`mamba_cp.kernels.index_width.ssd_chunk_scan_split`).
    """
    name, fn = _ssd_impl(x)
    if name == "mamba_ssm":
        dt = first_order_only(dt, "mamba_ssm's SSD kernel")  # its backward is not differentiable again
        return index_width.ssd_chunk_scan_split(
            functools.partial(cuda.ssd_chunk_scan_cuda, fn), x, dt, A, B, C, chunk_size, D, z, dt_bias,
            initial_states, seq_idx, dt_softplus, dt_limit, return_final_states, limit=cuda.MAMBA_SSM_LIMIT,
        )  # fmt: skip
    return fn(
        x, dt, A, B, C, chunk_size, D, z, dt_bias, initial_states, seq_idx, dt_softplus, dt_limit, return_final_states
    )


def rmsnorm_gated(
    x: torch.Tensor,
    z: torch.Tensor | None,
    weight: torch.Tensor,
    eps: float = 1e-5,
    group_size: int | None = None,
    norm_before_gate: bool = False,
) -> torch.Tensor:
    """Grouped RMSNorm of ``x * silu(z)`` (``[..., D]``, groups of ``group_size`` channels) times ``weight``."""
    name, fn = _norm_impl(x)
    if name == "mamba_ssm":
        weight = first_order_only(weight, "mamba_ssm's gated RMSNorm kernel")  # backward not differentiable again
        return cuda.rmsnorm_gated_cuda(fn, x, z, weight, eps, group_size, norm_before_gate)
    return fn(x, z, weight, eps=eps, group_size=group_size, norm_before_gate=norm_before_gate)


mamba_chunk_scan_combined = ssd_chunk_scan

__all__ = ["KERNELS_ENV", "causal_conv1d", "mamba_chunk_scan_combined", "rmsnorm_gated", "selected", "ssd_chunk_scan"]
