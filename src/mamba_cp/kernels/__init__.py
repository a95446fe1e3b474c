"""Kernels behind one interface: depthwise causal conv1d, the chunked SSD scan, gated RMSNorm.

Each op has a readable pure-PyTorch reference (``*_reference.py``, exact in float64 against the plain
sequential recurrence in ``ssd_naive.py``) that runs on any device. The functions here are what the rest
of the library calls; they pick an implementation from the tensors' device.
"""

from __future__ import annotations

import torch

from .conv_reference import causal_conv1d_ref
from .norm_reference import rmsnorm_gated_ref
from .ssd_reference import ssd_chunk_scan_ref


def causal_conv1d(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    seq_idx: torch.Tensor | None = None,
    activation: str | None = "silu",
) -> torch.Tensor:
    """Depthwise causal conv1d: ``x`` ``[B, L, C]``, ``weight`` ``[C, K]``, ``bias`` ``[C]`` -> ``[B, L, C]``.

    ``seq_idx`` ``[B, L]`` stops the window at packed-sequence boundaries.
    """
    return causal_conv1d_ref(x, weight, bias, seq_idx=seq_idx, activation=activation)


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
    ``[B, L, H, P]`` (and the final states ``[B, H, P, N]`` when asked).
    """
    return ssd_chunk_scan_ref(
        x,
        dt,
        A,
        B,
        C,
        chunk_size,
        D=D,
        z=z,
        dt_bias=dt_bias,
        initial_states=initial_states,
        seq_idx=seq_idx,
        dt_softplus=dt_softplus,
        dt_limit=dt_limit,
        return_final_states=return_final_states,
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
    return rmsnorm_gated_ref(x, z, weight, eps=eps, group_size=group_size, norm_before_gate=norm_before_gate)


mamba_chunk_scan_combined = ssd_chunk_scan

__all__ = ["causal_conv1d", "ssd_chunk_scan", "mamba_chunk_scan_combined", "rmsnorm_gated"]
