"""Hidden-parallel context parallelism: heads sharded by one all-to-all each way, whole sequences local.

Shape legend: ``B`` batch, ``L`` global tokens per row, ``L_local = L / cp``, ``H`` heads, ``P`` head_dim,
``G`` groups, ``N`` d_state; ``_local`` sizes are this rank's share of heads / groups (:class:`HeadShard`).

One all-to-all turns the sequence-sharded ``[B, L_local, ...]`` into the head-sharded ``[B, L, .../cp]``; the
rank runs conv1d + SSD over whole sequences for its heads; one all-to-all brings ``y`` back. Only
``x | B | C | dt`` travel (``z`` stays home: it gates ``y`` after the return trip), and the head-tail /
packed reorders are one gather by the batch's :class:`~mamba_cp.layout.TokenPlan`. With a plain ``nn.Linear``
in_proj the projection is fused with the transport (:mod:`mamba_cp.projection`).

Parameters are sliced in the forward pass from the full tensors the mixer hands over, so gradients land in
the full parameters (and parameters that FSDP swaps in are picked up).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn

from ..collectives import all_gather
from ..consistency import check_ranks_agree
from ..gate_projection import plain_linear
from ..groups import CPGroup
from ..layout import TokenPlan, token_plan
from ..plan_cache import PlanCache
from ..projection import ProjectionLayout, gather_gate, project_scatter, projection_layout
from ..ssm_block import SSMShape, conv_ssd
from ..transport import heads_to_seq, seq_to_heads
from ..validation import batch_dims, check_divisible
from .base import FinalStates, SSMConfig, SSMParams, project
from .final_states import conv_ssd_with_states, sequence_ranges


def own_storage(z_BLW: torch.Tensor) -> torch.Tensor:
    """``z`` copied out of the in_proj output it is a view of (no copy when it has its own storage already).

    The unfused path's scatter packs ``xBC`` and ``dt`` into its send buffer and keeps no reference to them, so
    once ``z`` (which the norm saves for backward) has its own storage the rest of the in_proj output is freed
    after the scatter instead of living until backward (at 128K tokens, cp=2, NemotronH-8B-like: 1.4 of the
    2.4 GB in_proj output per layer; the copy writes 1.1 GB). A plain ``nn.Linear`` in_proj is projected with
    ``z`` apart (:func:`~mamba_cp.strategies.base.project`), so only modules run as they are (hooks, adapters)
    are copied.
    """
    return z_BLW.contiguous()


@dataclass(frozen=True, slots=True)
class HeadShard:
    """Which heads, groups and conv channels one rank of a hidden-parallel group computes.

    Raises ``ConfigError`` (a ``ValueError``) unless ``H % cp == 0`` and the groups split: ``cp % G`` when
    ``G < cp`` (each group is then repeated ``cp / G`` times), ``G % cp`` when ``G >= cp``.
    """

    cp_size: int
    cp_rank: int
    num_heads: int
    head_dim: int
    n_groups: int
    d_state: int

    def __post_init__(self) -> None:
        check_divisible(self.num_heads, self.cp_size, "num_heads", "cp_size")
        if self.n_groups < self.cp_size:
            check_divisible(self.cp_size, self.n_groups, "cp_size", "n_groups when n_groups < cp_size")
        else:
            check_divisible(self.n_groups, self.cp_size, "n_groups", "cp_size when n_groups >= cp_size")
        check_divisible(self.num_heads, self.n_groups, "num_heads", "n_groups")

    @property
    def d_inner(self) -> int:
        return self.num_heads * self.head_dim

    @property
    def num_heads_local(self) -> int:
        return self.num_heads // self.cp_size

    @property
    def d_inner_local(self) -> int:
        return self.num_heads_local * self.head_dim

    @property
    def group_repeat_count(self) -> int:
        """How many consecutive ranks receive each group (1 when ``G >= cp``)."""
        return max(1, self.cp_size // self.n_groups)

    @property
    def n_groups_local(self) -> int:
        return max(1, self.n_groups // self.cp_size)

    @property
    def local_shape(self) -> SSMShape:
        return SSMShape(self.num_heads_local, self.head_dim, self.n_groups_local, self.d_state)

    def slice_vector(self, param: torch.Tensor) -> torch.Tensor:
        """This rank's heads of a per-head tensor: ``[H, ...]`` -> ``[H_local, ...]`` (a view)."""
        start = self.cp_rank * self.num_heads_local
        return param[start : start + self.num_heads_local]

    def slice_conv(self, param: torch.Tensor) -> torch.Tensor:
        """This rank's channels of a conv1d weight ``[conv_dim, ...]`` or bias ``[conv_dim]``: its ``x`` channels,
        then its group(s) of ``B``, then of ``C``: ``[H_local*P + 2*G_local*N, ...]``."""
        gn = self.n_groups * self.d_state
        x, B, C = torch.split(param, [self.d_inner, gn, gn], dim=0)
        x_start = self.cp_rank * self.d_inner_local
        bc = self.n_groups_local * self.d_state
        bc_start = (self.cp_rank // self.group_repeat_count) * bc
        return torch.cat(
            [x[x_start : x_start + self.d_inner_local], B[bc_start : bc_start + bc], C[bc_start : bc_start + bc]]
        )

    def repeat_groups(self, state: torch.Tensor) -> torch.Tensor:
        """Repeat each group ``cp / G`` times so that replicas land on consecutive ranks:
        ``[..., G*N]`` -> ``[..., G*repeat*N]`` (``[B, L, G*N]`` or packed ``[T, G*N]``)."""
        grouped = state.unflatten(-1, (self.n_groups, 1, self.d_state))
        repeated = grouped.expand(*state.shape[:-1], self.n_groups, self.group_repeat_count, self.d_state)
        return repeated.flatten(-3)

    def columns_per_rank(self, t_BLW: torch.Tensor, per_group: bool) -> torch.Tensor:
        """``[B, L_local, width]`` as ``[B, L_local, cp, width/cp]`` (slot ``r`` goes to rank ``r``); ``per_group``
        columns (B, C) are repeated first when groups are fewer than ranks."""
        b, l_local = t_BLW.shape[:2]
        if per_group and self.group_repeat_count > 1:
            t_BLW = self.repeat_groups(t_BLW)
        return t_BLW.reshape(b, l_local, self.cp_size, -1)


class HiddenParallel:
    """Hidden-parallel CP for one mixer.

    Args:
        group: the CP group.
        config: the mixer's :class:`SSMConfig`.
        plans: the per-batch plan cache shared by every layer of the model.
        fuse_projection: run a plain ``nn.Linear`` in_proj inside the transport (:mod:`mamba_cp.projection`):
            its GEMMs write the send buffer and the gate ``z`` is computed while ``x|B|C|dt`` travel (and its
            gradients while theirs travel back); 7% faster at 64K-128K tokens on 2x H200 (BENCHMARKS.md). The
            fused path is taken only for an ``nn.Linear`` that nothing hooks, whose weight has the input's dtype,
            with autocast off; anything else (a LoRA or quantized wrapper, FSDP applied to in_proj alone, a
            hook) gets the unfused path. False always takes the unfused path.
        debug: check on every call, with one small collective, that all ranks agree on the batch.
        note: why this strategy was chosen (shown in the repr).

    Raises ``ConfigError`` (on every rank, before any collective) when the heads or groups do not split.
    """

    name = "hidden"

    def __init__(
        self,
        group: CPGroup,
        config: SSMConfig,
        plans: PlanCache,
        *,
        fuse_projection: bool = True,
        debug: bool = False,
        note: str = "",
    ) -> None:
        s = config.shape
        self.group = group
        self.shard = HeadShard(group.size, group.rank, s.num_heads, s.head_dim, s.n_groups, s.d_state)
        self.config = config
        self.plans = plans
        self.fuse_projection = fuse_projection
        self.debug = debug
        self.note = note
        self._projection_layouts: dict[str, ProjectionLayout] = {}

    # ------------------------------------------------------------------ per-batch plan

    def plan_for(self, hidden_states: torch.Tensor, cu_seqlens: torch.Tensor | None) -> TokenPlan:
        """The batch plan for sequence-sharded ``[B, L_local, W]`` / ``[T_local, W]`` (validated, cached)."""
        batch, local_len = batch_dims(hidden_states, cu_seqlens)
        if not torch.compiler.is_compiling():
            if self.debug:  # first: it names what differs, where the plan's own check can only say that something does
                check_ranks_agree(self.group, hidden_states, cu_seqlens)
            self.projection_layout(hidden_states.device)  # made here, eagerly, not inside a compiled graph
        return token_plan(self.plans, self.group, batch, local_len, cu_seqlens, hidden_states.device)

    # ------------------------------------------------------------------ the layer

    def scan(
        self, h_BLD: torch.Tensor, in_proj: nn.Module, params: SSMParams, plan: TokenPlan
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``h`` ``[B, L_local, D]`` -> ``y`` ``[B, L_local, H*P]`` (with the D skip, before gating) and the gate
        ``z`` ``[B, L_local, H*P]``, which never leaves this rank."""
        y, z, _ = self._scan(h_BLD, in_proj, params, plan, with_states=False)
        return y, z

    def _scan(
        self, h_BLD: torch.Tensor, in_proj: nn.Module, params: SSMParams, plan: TokenPlan, *, with_states: bool
    ) -> tuple[torch.Tensor, torch.Tensor, FinalStates | None]:
        """:meth:`scan`, fused with the in_proj or not, plus (``with_states``) this rank's heads'
        :class:`FinalStates` (:meth:`local_conv_ssd_with_states`)."""

        def local(xBC_local: torch.Tensor, dt_local: torch.Tensor) -> tuple[torch.Tensor, FinalStates | None]:
            if with_states:
                return self.local_conv_ssd_with_states(xBC_local, dt_local, params, plan)
            return self.local_conv_ssd(xBC_local, dt_local, params, plan), None

        if self._fuses(h_BLD, in_proj):
            b, l_local, _ = h_BLD.shape
            h_TD, weight, bias = h_BLD.reshape(b * l_local, -1), in_proj.weight, in_proj.bias
            layout = self.projection_layout(h_BLD.device)
            z, ordered = project_scatter(h_TD, weight, bias, layout, plan, self.group.group)
            shape = self.shard.local_shape
            y_local, states = local(*torch.split(ordered, [shape.conv_dim, shape.num_heads], dim=-1))
            y, z = gather_gate(y_local, z, h_TD, weight, bias, layout, plan, self.group.group)
            return y, z, states
        z, xBC, dt = project(h_BLD, in_proj, self.config.shape)
        y_local, states = local(*self.scatter(xBC, dt, plan))
        return self.gather(y_local, plan), own_storage(z), states

    def _fuses(self, h_BLD: torch.Tensor, in_proj: nn.Module) -> bool:
        # Only a plain nn.Linear that nothing hooks may be bypassed: the fused path reads its weight directly.
        return self.fuse_projection and plain_linear(h_BLD, in_proj)

    def projection_layout(self, device: torch.device) -> ProjectionLayout:
        """Which in_proj rows go to which rank (built once per device)."""
        key = str(device)
        layout = self._projection_layouts.get(key)
        if layout is None:
            s = self.shard
            layout = projection_layout(s.num_heads, s.head_dim, s.n_groups, s.d_state, s.cp_size, device)
            if not torch.compiler.is_compiling():  # a graph must not fill the dict it was traced reading
                self._projection_layouts[key] = layout
        return layout

    def scatter(
        self, xBC_BLC: torch.Tensor, dt_BLH: torch.Tensor, plan: TokenPlan
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``xBC`` ``[B, L_local, conv_dim]`` and ``dt`` ``[B, L_local, H]`` to this rank's heads over whole
        sequences in true order: ``[B, L, conv_dim_local]`` and ``[B, L, H_local]``. One all-to-all."""
        s = self.shard
        gn = s.n_groups * s.d_state
        x, B, C = torch.split(xBC_BLC, [s.d_inner, gn, gn], dim=-1)
        parts = [
            s.columns_per_rank(x, per_group=False),
            s.columns_per_rank(B, per_group=True),
            s.columns_per_rank(C, per_group=True),
            s.columns_per_rank(dt_BLH, per_group=False),
        ]
        ordered = seq_to_heads(parts, plan, self.group.group)
        # split, not two slices: its backward is one cat, where each slice's would be a zero-filled full-width
        # tensor, and the two would then be added.
        local = s.local_shape
        xBC_local, dt_local = torch.split(ordered, [local.conv_dim, local.num_heads], dim=-1)
        return xBC_local, dt_local

    def gather(self, y_BLW: torch.Tensor, plan: TokenPlan) -> torch.Tensor:
        """``y`` ``[B, L, d_inner_local]`` back to this rank's tokens ``[B, L_local, d_inner]``. One all-to-all."""
        return heads_to_seq(y_BLW, plan, self.group.group)

    def local_conv_ssd(
        self, xBC_local: torch.Tensor, dt_local: torch.Tensor, params: SSMParams, plan: TokenPlan
    ) -> torch.Tensor:
        """conv1d + SSD of this rank's heads over whole sequences: ``[B, L, conv_dim_local]``,
        ``[B, L, H_local]`` -> ``y`` ``[B, L, d_inner_local]``, with this rank's parameter slices."""
        return conv_ssd(xBC_local, dt_local, **self._local_args(params, plan))

    def _local_args(self, params: SSMParams, plan: TokenPlan) -> dict:
        """The keyword arguments of :func:`~mamba_cp.ssm_block.conv_ssd` for this rank's heads."""
        s, config = self.shard, params.config
        return dict(
            shape=s.local_shape,
            conv_weight_CK=s.slice_conv(params.conv_weight_CK),
            conv_bias_C=None if params.conv_bias_C is None else s.slice_conv(params.conv_bias_C),
            dt_bias_H=s.slice_vector(params.dt_bias_H),
            A_log_H=s.slice_vector(params.A_log_H),
            D_H=s.slice_vector(params.D_H),
            chunk_size=config.chunk_size,
            dt_limit=config.dt_limit,
            seq_idx_BL=plan.seq_idx,
        )

    # ------------------------------------------------------------------ prefill: the layer and its final states

    def scan_with_states(
        self, h_BLD: torch.Tensor, in_proj: nn.Module, params: SSMParams, plan: TokenPlan
    ) -> tuple[torch.Tensor, torch.Tensor, FinalStates]:
        """:meth:`scan` (the same path, fused or not), plus every sequence's :class:`FinalStates` over all heads on
        every rank: each rank computes its heads' states and conv channels over whole sequences, and one
        all-gather of those (``S * (H*P*N + C*K) / cp`` values per rank) puts them together."""
        y, z, states = self._scan(h_BLD, in_proj, params, plan, with_states=True)
        return y, z, self.gather_final_states(states)

    def local_conv_ssd_with_states(
        self, xBC_local: torch.Tensor, dt_local: torch.Tensor, params: SSMParams, plan: TokenPlan
    ) -> tuple[torch.Tensor, FinalStates]:
        """:meth:`local_conv_ssd` plus this rank's heads' final states ``[S, H_local, P, N]`` and conv channels
        ``[S, conv_dim_local, K]`` of every sequence (whole sequences are here: no collective)."""
        ranges = None if plan.cu_seqlens is None else sequence_ranges(self.plans, plan, xBC_local.device)
        return conv_ssd_with_states(xBC_local, dt_local, ranges=ranges, **self._local_args(params, plan))

    def gather_final_states(self, local: FinalStates) -> FinalStates:
        """Every rank's heads' :class:`FinalStates` -> all heads and conv channels, on every rank. One all-gather
        (the conv inputs travel in the states' dtype, float32 or float64, which holds them exactly).

        Heads are in rank order; conv channels are ``x`` (rank order), then ``B`` and ``C`` groups, each group
        taken from the first rank that holds it (with ``G < cp`` the ``cp / G`` ranks of a group hold copies)."""
        s = self.shard
        ssm, conv = local.ssm, local.conv
        num_seqs, width = conv.shape[0], conv.shape[-1]
        flat = torch.cat([ssm.reshape(-1), conv.to(ssm.dtype).reshape(-1)])
        rows = all_gather(flat, self.group.group)  # [cp, n]
        n_ssm = ssm.numel()
        ssm_all = rows[:, :n_ssm].view(s.cp_size, *ssm.shape).transpose(0, 1).flatten(1, 2)  # [S, H, P, N]
        conv_all = rows[:, n_ssm:].view(s.cp_size, num_seqs, -1, width)  # [cp, S, C_local, K]
        x_w, bc_w = s.d_inner_local, s.n_groups_local * s.d_state
        owners = torch.arange(0, s.cp_size, s.group_repeat_count, device=rows.device)  # one rank per group block

        def channels(part: torch.Tensor) -> torch.Tensor:  # [ranks, S, w, K] -> [S, ranks * w, K]
            return part.transpose(0, 1).flatten(1, 2)

        conv_full = torch.cat(
            [
                channels(conv_all[:, :, :x_w]),
                channels(conv_all.index_select(0, owners)[:, :, x_w : x_w + bc_w]),
                channels(conv_all.index_select(0, owners)[:, :, x_w + bc_w :]),
            ],
            dim=1,
        )
        return FinalStates(ssm=ssm_all, conv=conv_full.to(conv.dtype))

    def __repr__(self) -> str:
        s = self.shard
        return (
            f"HiddenParallel(cp_size={s.cp_size}, cp_rank={s.cp_rank}, heads={s.num_heads_local}/{s.num_heads}, "
            f"groups={s.n_groups_local}/{s.n_groups}, group_repeat={s.group_repeat_count}, "
            f"fuse_projection={self.fuse_projection}{', ' + self.note if self.note else ''})"
        )
