"""The seam between a Mamba2 mixer and the strategy that runs its scan: what crosses it, and the protocol.

Shape legend: ``B`` batch, ``L_local`` tokens per row on this rank (``T_local`` packed, with ``B = 1``),
``D`` hidden size, ``H`` heads, ``P`` head_dim, ``G`` groups, ``N`` d_state, ``K`` conv width,
``C = H*P + 2*G*N`` conv channels.

The mixer owns its parameters and knows nothing of collectives; a strategy owns the collectives and knows
nothing of the mixer. Per call the mixer hands its strategy exactly three things:

* ``h`` ``[B, L_local, D]``: this rank's tokens (its head-tail shard under CP);
* ``in_proj``: the module projecting ``h`` to ``z | x | B | C | dt`` (a strategy may run it itself, fused
  with its transport, or call it);
* :class:`SSMParams`: references to the SSM parameters (no copies; slicing them in the forward pass sends
  gradients to the full tensors) and the static :class:`SSMConfig`;

plus the batch plan the same strategy returned from ``plan_for``. It gets back ``y`` (the scan output with
the ``D`` skip, before gating) and the gate ``z``, both ``[B, L_local, H*P]``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol, TypeVar

import torch
import torch.nn as nn

from ..gate_projection import plain_linear, project_apart
from ..groups import CPGroup
from ..plan_cache import PlanCache
from ..ssm_block import SSMShape

PlanT = TypeVar("PlanT")


@dataclass(frozen=True, slots=True, kw_only=True)
class SSMConfig:
    """The static description of a mixer's SSM: everything a strategy needs to plan a batch."""

    shape: SSMShape
    """Heads, head_dim, groups and state size of the whole mixer."""
    conv_kernel: int
    """``K``: width of the depthwise causal conv (``K - 1`` tokens of history)."""
    chunk_size: int
    """The SSD chunk length."""
    dt_limit: tuple[float, float]
    """Clamp of ``softplus(dt + dt_bias)``."""


@dataclass(frozen=True, slots=True, kw_only=True)
class SSMParams:
    """The mixer's SSM parameters for one call (references, not copies) and its :class:`SSMConfig`."""

    config: SSMConfig
    conv_weight_CK: torch.Tensor
    """``[C, K]`` depthwise conv weight (``conv1d.weight`` squeezed)."""
    conv_bias_C: torch.Tensor | None
    """``[C]`` conv bias, or None."""
    dt_bias_H: torch.Tensor
    """``[H]``."""
    A_log_H: torch.Tensor
    """``[H]``; ``A = -exp(A_log)``."""
    D_H: torch.Tensor
    """``[H]`` skip weight."""


@dataclass(frozen=True, slots=True, kw_only=True)
class FinalStates:
    """A mixer's state after a prompt, per sequence, in the layout of transformers' generation cache
    (``LinearAttentionLayer``: ``recurrent_states`` and ``conv_states``), on every rank of the CP group.

    ``S`` is the number of sequences: ``B`` for BSHD, one per packed sequence (in ``cu_seqlens`` order).
    """

    ssm: torch.Tensor
    """``[S, H, P, N]`` the SSD state after each sequence's last token, in the scan's compute dtype (float32 for
    half and float32 activations, float64 for float64)."""
    conv: torch.Tensor
    """``[S, C, K]`` the last ``K`` (conv width) pre-conv inputs ``x | B | C`` of each sequence in true order
    (zeros before its start when it is shorter than ``K``), in the activations' dtype."""


class Strategy(Protocol[PlanT]):
    """How a mixer's conv + scan runs: locally (:class:`~mamba_cp.strategies.local.LocalStrategy`) or under
    context parallelism (:mod:`~mamba_cp.strategies.hidden`, :mod:`~mamba_cp.strategies.state_passing`).

    ``plan_for`` validates the batch (``ValueError`` on every rank, before any collective) and returns its
    per-batch plan, cached and shared by every layer; ``scan`` runs the layer.
    """

    name: str
    """Registry name (``"local"``, ``"hidden"``, ``"state_passing"``)."""
    group: CPGroup
    """The CP group (size 1 for the local strategy)."""
    plans: PlanCache
    """The per-batch plan cache the model's layers share (its ``packed_layout`` is the model's)."""

    def plan_for(self, hidden_states: torch.Tensor, cu_seqlens: torch.Tensor | None) -> PlanT: ...

    def scan(
        self, h_BLD: torch.Tensor, in_proj: nn.Module, params: SSMParams, plan: PlanT
    ) -> tuple[torch.Tensor, torch.Tensor]: ...

    def scan_with_states(
        self, h_BLD: torch.Tensor, in_proj: nn.Module, params: SSMParams, plan: PlanT
    ) -> tuple[torch.Tensor, torch.Tensor, FinalStates]:
        """:meth:`scan`, plus every sequence's :class:`FinalStates` (the same on every rank of the group): what
        generation continues from after a prompt (:func:`mamba_cp.prefill`). Forward only (run under
        ``torch.no_grad()``); may issue one more collective than :meth:`scan`."""
        ...


def project(h_BLD: torch.Tensor, in_proj: nn.Module, shape: SSMShape) -> tuple[torch.Tensor, ...]:
    """``in_proj(h)`` split into ``z [B, L, H*P]``, ``xBC [B, L, C]`` and ``dt [B, L, H]``.

    For a plain ``nn.Linear`` ``z`` is a tensor of its own (:func:`~mamba_cp.gate_projection.project_apart`: freed
    after the norm's backward) and ``xBC``, ``dt`` are views of the other buffer; otherwise all three are views of
    ``in_proj(h)``."""
    if plain_linear(h_BLD, in_proj):
        z, rest = project_apart(h_BLD, in_proj.weight, in_proj.bias, shape.d_inner)
        return (z, *torch.split(rest, [shape.conv_dim, shape.num_heads], dim=-1))
    zxbcdt = in_proj(h_BLD)
    return torch.split(zxbcdt, [shape.d_inner, shape.conv_dim, shape.num_heads], dim=-1)
