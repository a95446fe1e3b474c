"""conv1d + SSD over whole sequences for a set of heads: the compute every strategy shares.

Shape legend: ``B`` batch, ``L`` tokens per row (whole sequences), ``H`` heads here, ``P`` head_dim,
``G`` groups here, ``N`` d_state, ``K`` conv kernel width, ``conv_dim = H*P + 2*G*N``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from . import kernels


@dataclass(frozen=True, slots=True)
class SSMShape:
    """Head and group counts of the slice of a mixer that one rank computes."""

    num_heads: int
    """``H``: heads computed here."""
    head_dim: int
    """``P``."""
    n_groups: int
    """``G``: B/C groups computed here."""
    d_state: int
    """``N``."""

    @property
    def d_inner(self) -> int:
        return self.num_heads * self.head_dim

    @property
    def conv_dim(self) -> int:
        return self.d_inner + 2 * self.n_groups * self.d_state


def token_cumsum(t: torch.Tensor, dim: int) -> torch.Tensor:
    """``t.cumsum(dim)``, computed along the last, contiguous dim (then laid out like ``t`` again).

    A scan along an outer dim of a ``[..., T, H]`` tensor runs one sequential thread per column on CUDA: at
    64K tokens and 128 heads, 25 ms per step on an H200 (float64, fwd+bwd), where the same scan along the
    innermost dim is a parallel block scan; the two transposing copies are ``T * H`` values each. The
    backward (a reversed cumsum) inherits the fast layout.
    """
    return t.transpose(dim, -1).contiguous().cumsum(-1).transpose(dim, -1).contiguous()


def decay_rates(A_log_H: torch.Tensor) -> torch.Tensor:
    """``A = -exp(A_log)`` ``[H]``: each head's decay rate (float32 for half-precision parameters)."""
    return -torch.exp(A_log_H.float() if A_log_H.dtype in (torch.float16, torch.bfloat16) else A_log_H)


def conv_split(
    xBC_BLC: torch.Tensor,
    conv_weight_CK: torch.Tensor,
    conv_bias_C: torch.Tensor | None,
    seq_idx_BL: torch.Tensor | None,
    shape: SSMShape,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Depthwise causal conv (SiLU) of ``[B, L, conv_dim]``, split into ``x`` ``[B, L, H, P]`` and ``B``, ``C``
    ``[B, L, G, N]`` (``seq_idx_BL`` stops the conv at sequence boundaries)."""
    b, length, _ = xBC_BLC.shape
    xBC = kernels.causal_conv1d(xBC_BLC, conv_weight_CK, conv_bias_C, seq_idx=seq_idx_BL, activation="silu")
    gn = shape.n_groups * shape.d_state
    x, B, C = torch.split(xBC, [shape.d_inner, gn, gn], dim=-1)
    groups = (b, length, shape.n_groups, shape.d_state)
    return x.reshape(b, length, shape.num_heads, shape.head_dim), B.reshape(groups), C.reshape(groups)


def conv_ssd(
    xBC_BLC: torch.Tensor,
    dt_BLH: torch.Tensor,
    *,
    shape: SSMShape,
    conv_weight_CK: torch.Tensor,
    conv_bias_C: torch.Tensor | None,
    dt_bias_H: torch.Tensor,
    A_log_H: torch.Tensor,
    D_H: torch.Tensor,
    chunk_size: int,
    dt_limit: tuple[float, float],
    seq_idx_BL: torch.Tensor | None,
) -> torch.Tensor:
    """Depthwise causal conv (SiLU), split into x/B/C, SSD scan with ``D``; returns ``y`` ``[B, L, H*P]``.

    ``seq_idx_BL`` (packed batches) stops both the conv and the scan at sequence boundaries.
    """
    b, length, _ = xBC_BLC.shape
    x, B, C = conv_split(xBC_BLC, conv_weight_CK, conv_bias_C, seq_idx_BL, shape)
    y = kernels.ssd_chunk_scan(
        x, dt_BLH, decay_rates(A_log_H), B, C, chunk_size,
        D=D_H, dt_bias=dt_bias_H, seq_idx=seq_idx_BL, dt_softplus=True, dt_limit=dt_limit,
    )  # fmt: skip
    return y.reshape(b, length, shape.d_inner)
