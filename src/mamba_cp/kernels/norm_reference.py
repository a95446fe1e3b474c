"""Pure-PyTorch reference for the gated (grouped) RMSNorm at the output of a Mamba2 layer."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["rmsnorm_gated_ref"]


def rmsnorm_gated_ref(
    x: Tensor,
    z: Tensor | None,
    weight: Tensor,
    eps: float = 1e-5,
    group_size: int | None = None,
    norm_before_gate: bool = False,
) -> Tensor:
    """Grouped RMSNorm with an optional ``silu(z)`` gate.

    ``norm_before_gate=False``: ``h = x * silu(z)``, then each group of ``group_size`` consecutive channels
    is scaled by ``1 / sqrt(mean(h^2) + eps)`` and multiplied by ``weight``.
    ``norm_before_gate=True``: ``x`` is normalised (and weighted) first, then multiplied by ``silu(z)``.
    With ``z=None`` this is a plain grouped RMSNorm.

    Args:
        x: ``[..., D]``.
        z: ``[..., D]`` gate or None.
        weight: ``[D]``.
        eps: added to the mean square.
        group_size: channels per normalisation group (None: the whole ``D``); must divide ``D``.
        norm_before_gate: normalise before (True) or after (False) gating.

    Returns:
        ``[..., D]`` in ``x.dtype`` (computed in float32, or float64 for float64 input).
    """
    dim = x.shape[-1]
    if group_size is None:
        group_size = dim
    if group_size <= 0 or dim % group_size != 0:
        raise ValueError(f"group_size={group_size} must be positive and divide D={dim}")
    if weight.shape != (dim,):
        raise ValueError(f"weight must be [D={dim}], got {tuple(weight.shape)}")
    if z is not None and z.shape != x.shape:
        raise ValueError(f"z must have x's shape {tuple(x.shape)}, got {tuple(z.shape)}")

    cdtype = torch.float64 if x.dtype == torch.float64 else torch.float32
    h = x.to(cdtype)
    gate = F.silu(z.to(cdtype)) if z is not None else None
    if gate is not None and not norm_before_gate:
        h = h * gate
    grouped = h.reshape(*h.shape[:-1], dim // group_size, group_size)
    rstd = torch.rsqrt(grouped.pow(2).mean(dim=-1, keepdim=True) + eps)
    out = (grouped * rstd).reshape(h.shape) * weight.to(cdtype)
    if gate is not None and norm_before_gate:
        out = out * gate
    return out.to(x.dtype)
