"""Pure-PyTorch reference for the depthwise causal conv1d used in Mamba2 blocks.

The layout is channels-last (``[B, L, C]``), matching the ``xBC`` tensor of a Mamba2 layer before it is
split into ``x``, ``B`` and ``C``. Packed sequences are supported through ``seq_idx``: a tap only reads
tokens that carry the same sequence id as the output token, so nothing leaks across packed boundaries.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["causal_conv1d_ref", "check_history", "history_by_window"]


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    # Half types accumulate in float32; float64 stays float64 so tests can check at fp64 rounding.
    return torch.float64 if dtype == torch.float64 else torch.float32


def _shift_right(t: Tensor, shift: int, fill: Tensor | float) -> Tensor:
    """Shift ``t`` right by ``shift`` positions along dim 1, filling the vacated front.

    Args:
        t: ``[B, L, ...]``.
        shift: number of positions, ``0 <= shift < L``.
        fill: value (or ``[B, 1, ...]`` tensor broadcastable to the front block) placed in the first
            ``shift`` positions.

    Returns:
        ``[B, L, ...]`` with ``out[:, i] = t[:, i - shift]`` for ``i >= shift``.
    """
    if shift == 0:
        return t
    front_shape = (t.shape[0], shift, *t.shape[2:])
    front = fill.expand(front_shape) if isinstance(fill, Tensor) else t.new_full(front_shape, fill)
    return torch.cat([front, t[:, : t.shape[1] - shift]], dim=1)


def check_history(
    x: Tensor, weight: Tensor, seq_idx: Tensor | None, history: Tensor | None, history_seq_idx: Tensor | None
) -> Tensor | None:
    """Validate a conv's ``history`` ``[B, K-1, C]`` (the ``K - 1`` tokens before ``x[:, 0]``, in ``x``'s dtype)
    and its ids ``history_seq_idx`` ``[B, K-1]``; returns the ids to use: given ones, else (with ``seq_idx``)
    ``seq_idx[:, :1]`` repeated, so the history continues each row's first sequence; None without ``seq_idx``."""
    if history is None:
        if history_seq_idx is not None:
            raise ValueError("history_seq_idx is given without history")
        return None
    if x.dim() != 3 or weight.dim() != 2:
        raise ValueError(f"x must be [B, L, C] and weight [C, K], got {tuple(x.shape)} and {tuple(weight.shape)}")
    want = (x.shape[0], weight.shape[1] - 1, x.shape[2])
    if tuple(history.shape) != want:
        raise ValueError(f"history must be [B, K-1, C]={want}, got {tuple(history.shape)}")
    if history.dtype != x.dtype or history.device != x.device:
        raise ValueError(f"history must be {x.dtype} on {x.device} like x, got {history.dtype} on {history.device}")
    if seq_idx is None:
        if history_seq_idx is not None:
            raise ValueError("history_seq_idx needs seq_idx (the ids it is compared with)")
        return None
    if history_seq_idx is None:
        if seq_idx.shape[1] == 0:  # no token to compare with
            return seq_idx.new_zeros(want[:2])
        return seq_idx[:, :1].expand(want[0], want[1])
    if tuple(history_seq_idx.shape) != want[:2]:
        raise ValueError(f"history_seq_idx must be [B, K-1]={want[:2]}, got {tuple(history_seq_idx.shape)}")
    if history_seq_idx.dtype not in (torch.int32, torch.int64) or history_seq_idx.device != x.device:
        raise ValueError(
            f"history_seq_idx must be int32 or int64 on {x.device} like x, got {history_seq_idx.dtype} on "
            f"{history_seq_idx.device}"
        )
    return history_seq_idx


def causal_conv1d_ref(
    x: Tensor,
    weight: Tensor,
    bias: Tensor | None = None,
    seq_idx: Tensor | None = None,
    activation: str | None = "silu",
    history: Tensor | None = None,
    history_seq_idx: Tensor | None = None,
) -> Tensor:
    """Depthwise causal 1D convolution over the sequence dimension.

    ``out[b, t, c] = act(bias[c] + sum_k weight[c, k] * x[b, t - (K - 1) + k, c])`` where tokens before
    position 0, and tokens whose ``seq_idx`` differs from ``seq_idx[b, t]``, read as zero. With ``history`` the
    tokens before position 0 are its rows instead (``x[b, -j] = history[b, K-1-j]``), with ids
    ``history_seq_idx``: one conv over ``[history | x]`` whose first ``K - 1`` outputs are dropped.

    Args:
        x: ``[B, L, C]`` input, channels last.
        weight: ``[C, K]`` depthwise filter; tap ``K - 1`` multiplies the current token.
        bias: ``[C]`` or None.
        seq_idx: ``[B, L]`` integer sequence ids of packed sequences (non-decreasing), or None.
        activation: ``"silu"`` (alias ``"swish"``) or None.
        history: ``[B, K-1, C]`` the tokens before ``x[:, 0]``, or None (zeros).
        history_seq_idx: ``[B, K-1]`` their sequence ids, compared with ``seq_idx`` (see :func:`check_history`).

    Returns:
        ``[B, L, C]`` in ``x.dtype`` (computed in float32 for half types, float64 for float64).
    """
    if activation not in (None, "silu", "swish"):
        raise ValueError(f"activation must be None or 'silu', got {activation!r}")
    if x.dim() != 3:
        raise ValueError(f"x must be [B, L, C], got shape {tuple(x.shape)}")
    batch, seqlen, channels = x.shape
    if weight.dim() != 2 or weight.shape[0] != channels:
        raise ValueError(f"weight must be [C={channels}, K], got shape {tuple(weight.shape)}")
    if bias is not None and bias.shape != (channels,):
        raise ValueError(f"bias must be [C={channels}], got shape {tuple(bias.shape)}")
    if seq_idx is not None and seq_idx.shape != (batch, seqlen):
        raise ValueError(f"seq_idx must be [B={batch}, L={seqlen}], got shape {tuple(seq_idx.shape)}")
    width = weight.shape[1]
    history_seq_idx = check_history(x, weight, seq_idx, history, history_seq_idx)
    if history is not None:
        seq = None if seq_idx is None else torch.cat([history_seq_idx.to(seq_idx.dtype), seq_idx], dim=1)
        out = causal_conv1d_ref(torch.cat([history, x], dim=1), weight, bias, seq, activation)
        return out[:, width - 1 :]

    cdtype = _compute_dtype(x.dtype)
    xc = x.to(cdtype)
    wc = weight.to(cdtype)

    out = xc * wc[:, width - 1]  # current-token tap, never masked
    for k in range(width - 1):
        shift = width - 1 - k
        if shift >= seqlen:
            continue  # this tap only ever reads the zero left padding
        tap = _shift_right(xc, shift, 0.0)
        if seq_idx is not None:
            # The fill value is irrelevant: the shifted x is already zero there.
            prev_ids = _shift_right(seq_idx, shift, seq_idx[:, :1])
            tap = tap * (prev_ids == seq_idx).unsqueeze(-1).to(cdtype)
        out = out + tap * wc[:, k]
    if bias is not None:
        out = out + bias.to(cdtype)
    if activation is not None:
        out = F.silu(out)
    return out.to(x.dtype)


def history_by_window(
    conv: Callable,
    x: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    seq_idx: Tensor | None,
    activation: str | None,
    history: Tensor,
    history_seq_idx: Tensor | None,
) -> Tensor:
    """A conv with ``history`` (:func:`causal_conv1d_ref`'s contract) out of a ``conv`` that takes none: ``conv``
    over ``x`` from zeros, then its first ``min(K-1, L)`` outputs recomputed from ``[history | x[:, :K-1]]``
    windows ``[B, K-1 + min(K-1, L), C]`` and written over (per position the same arithmetic as one conv over
    ``[history | x]``). For kernels without a history input (the ``causal_conv1d`` package's, with ``seq_idx``);
    ``history_seq_idx`` as :func:`check_history` returns it."""
    halo = weight.shape[1] - 1
    out = conv(x, weight, bias, seq_idx, activation)
    head = min(halo, x.shape[1])
    window = torch.cat([history, x[:, :head]], dim=1)
    window_seq = None if seq_idx is None else torch.cat([history_seq_idx.to(seq_idx.dtype), seq_idx[:, :head]], 1)
    out[:, :head] = conv(window, weight, bias, window_seq, activation)[:, halo:]
    return out
