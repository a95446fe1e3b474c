"""The strategy of a mixer without context parallelism: in_proj, conv1d + SSD over this process's tokens.

Shape legend as in :mod:`mamba_cp.strategies.base`.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from ..groups import CPGroup
from ..layout import TokenPlan, token_plan
from ..plan_cache import PlanCache
from ..ssm_block import conv_ssd
from ..validation import batch_dims
from .base import FinalStates, SSMParams, project
from .final_states import conv_ssd_with_states, sequence_ranges


class LocalStrategy:
    """No CP: the whole batch is here. Its plan only carries ``seq_idx`` for packed batches.

    Args:
        plans: the per-batch plan cache (``parallelize`` shares one between all the layers it touches; a
            plain mixer has its own).
    """

    name = "local"

    def __init__(self, plans: PlanCache | None = None) -> None:
        self.group = CPGroup(group=None, size=1, rank=0)
        self.plans = plans if plans is not None else PlanCache()

    def plan_for(self, hidden_states: torch.Tensor, cu_seqlens: torch.Tensor | None) -> TokenPlan:
        """The batch plan of ``hidden_states`` ``[B, L, D]`` / packed ``[T, D]`` with ``cu_seqlens``."""
        batch, length = batch_dims(hidden_states, cu_seqlens)
        return token_plan(self.plans, self.group, batch, length, cu_seqlens, hidden_states.device)

    def scan(
        self, h_BLD: torch.Tensor, in_proj: nn.Module, params: SSMParams, plan: TokenPlan
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``h`` ``[B, L, D]`` -> ``y`` ``[B, L, H*P]`` (with the D skip) and ``z`` ``[B, L, H*P]``."""
        z, xBC, dt = project(h_BLD, in_proj, params.config.shape)
        return conv_ssd(xBC, dt, **_block_args(params, plan)), z

    def scan_with_states(
        self, h_BLD: torch.Tensor, in_proj: nn.Module, params: SSMParams, plan: TokenPlan
    ) -> tuple[torch.Tensor, torch.Tensor, FinalStates]:
        """:meth:`scan` plus the :class:`FinalStates` of every sequence (rows, or the packed sequences)."""
        z, xBC, dt = project(h_BLD, in_proj, params.config.shape)
        ranges = None if plan.cu_seqlens is None else sequence_ranges(self.plans, plan, h_BLD.device)
        y, states = conv_ssd_with_states(xBC, dt, ranges=ranges, **_block_args(params, plan))
        return y, z, states

    def __repr__(self) -> str:
        return "LocalStrategy()"


def _block_args(params: SSMParams, plan: TokenPlan) -> dict:
    """The keyword arguments of :func:`~mamba_cp.ssm_block.conv_ssd` for the whole mixer."""
    config = params.config
    return dict(
        shape=config.shape,
        conv_weight_CK=params.conv_weight_CK,
        conv_bias_C=params.conv_bias_C,
        dt_bias_H=params.dt_bias_H,
        A_log_H=params.A_log_H,
        D_H=params.D_H,
        chunk_size=config.chunk_size,
        dt_limit=config.dt_limit,
        seq_idx_BL=plan.seq_idx,
    )
