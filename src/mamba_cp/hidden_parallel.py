"""Hidden-parallel context parallelism for a Mamba2 mixer (the spec's ``MambaContextParallel``).

Shape legend: ``B`` batch, ``L`` global tokens per row, ``L_local = L / cp``, ``H`` heads, ``P`` head_dim,
``G`` groups, ``N`` d_state; ``_local`` sizes are this rank's share of heads / groups.

One all-to-all turns the sequence-sharded ``[B, L_local, ...]`` into the head-sharded ``[B, L, .../cp]``;
each rank runs conv1d + SSD over whole sequences for its heads; one all-to-all brings ``y`` back. In the
mixer's path only ``x | B | C | dt`` travel (``z`` stays home: it gates ``y`` after the return trip), and
the head-tail / packed reorders are one gather by the batch's :class:`~mamba_cp.layout.TokenPlan`.

The object owns no parameters: it reads the mixer's ``conv1d``, ``dt_bias``, ``A_log`` and ``D`` on every
call and slices them in the forward pass, so gradients land in the full parameters (and parameters that
FSDP swaps in are picked up).
"""

from __future__ import annotations

import torch
import torch.nn as nn

from .groups import resolve_cp_group
from .layout import TokenPlan, TokenPlanCache
from .projection import ProjectionLayout, gather_gate, project_scatter, projection_layout
from .ssm_block import SSMShape, conv_ssd
from .transport import heads_to_seq, heads_to_seq_chunked, seq_to_heads, seq_to_heads_chunked_segments
from .validation import batch_dims, check_divisible


class MambaContextParallel:
    """Hidden-parallel CP for one Mamba2 mixer: heads sharded, whole sequences local.

    Args:
        cp_group: the context-parallel ``ProcessGroup`` or a 1-D ``DeviceMesh``.
        num_heads: total SSM heads ``H``.
        head_dim: ``P``.
        n_groups: B/C groups ``G``.
        d_state: ``N``.
        mixer: the module that owns ``conv1d``, ``dt_bias``, ``A_log`` and ``D``.
        plan_cache: shared per-batch plan cache (``parallelize`` passes one for all layers).

    Raises ``ValueError`` (on every rank, before any collective) when ``H % cp != 0`` or the groups do not
    split: ``cp % G`` when ``G < cp``, ``G % cp`` when ``G >= cp``.
    """

    def __init__(
        self,
        cp_group,
        num_heads: int,
        head_dim: int,
        n_groups: int,
        d_state: int,
        mixer: nn.Module,
        plan_cache: TokenPlanCache | None = None,
    ) -> None:
        group = resolve_cp_group(cp_group)
        self.cp_group = group.group
        self.cp_size = group.size
        self.cp_rank = group.rank
        self.num_heads = num_heads
        self.head_dim = head_dim
        self.n_groups = n_groups
        self.d_state = d_state
        self._mixer = mixer
        self.plans = plan_cache if plan_cache is not None else TokenPlanCache()
        self.d_inner = num_heads * head_dim

        check_divisible(num_heads, self.cp_size, "num_heads", "cp_size")
        check_divisible(num_heads, n_groups, "num_heads", "n_groups")
        self.num_heads_local = num_heads // self.cp_size
        self.d_inner_local = self.num_heads_local * head_dim
        if n_groups < self.cp_size:
            check_divisible(self.cp_size, n_groups, "cp_size", "n_groups when n_groups < cp_size")
            self.group_repeat_count = self.cp_size // n_groups
            self.n_groups_local = 1
        else:
            check_divisible(n_groups, self.cp_size, "n_groups", "cp_size when n_groups >= cp_size")
            self.group_repeat_count = 1
            self.n_groups_local = n_groups // self.cp_size
        self.local_shape = SSMShape(self.num_heads_local, head_dim, self.n_groups_local, d_state)
        self.releases_projection = True
        """Unfused path: :meth:`conv_ssd` packs ``xBC`` and ``dt`` into its send buffer and keeps no reference to
        them, so the mixer copies ``z`` out and the in_proj output is freed after the scatter instead of being
        held by the norm's saved ``z`` view until backward (at 128K tokens, cp=2 and the NemotronH-8B-like
        mixer: 1.4 GB of the 2.4 GB in_proj output per layer; the copy of ``z`` writes 1.1 GB)."""
        self.fuse_projection = True
        """Run in_proj inside the transport (:mod:`mamba_cp.projection`): its GEMMs write the send buffer and
        the gate ``z`` is computed while ``x|B|C|dt`` travel (and its gradients while theirs travel back).
        Used when in_proj is a plain ``nn.Linear`` that nothing hooks, its weight has the input's dtype, autocast
        is off and :attr:`transport_chunks` is None (:meth:`fuses_projection`); False forces the plain in_proj +
        :meth:`conv_ssd` path. On 2x H200 at 64K-128K tokens the fused path is 7% faster (BENCHMARKS.md)."""
        self._projection_layouts: dict[torch.device, ProjectionLayout] = {}
        self.transport_chunks: int | None = None
        """None: the mixer's transport is one all-to-all each way (the measured default). ``k >= 1``: the
        pipelined transport in ``k`` row chunks, each chunk's all-to-all overlapping its neighbours' pack and
        unpack copies, with a backward that writes the input gradients directly (CPU-exact; not yet timed on
        GPUs, see BENCHMARKS.md)."""

    # ------------------------------------------------------------------ parameter slices

    def slice_vector_param(self, param: torch.Tensor) -> torch.Tensor:
        """This rank's heads of a per-head parameter: ``[H, ...]`` -> ``[H_local, ...]`` (a view)."""
        start = self.cp_rank * self.num_heads_local
        return param[start : start + self.num_heads_local]

    def slice_conv_param(self, param: torch.Tensor) -> torch.Tensor:
        """This rank's channels of a conv1d weight ``[conv_dim, ...]`` or bias ``[conv_dim]``.

        ``conv_dim = H*P + 2*G*N`` splits into x | B | C; the result is this rank's x channels, then its
        group(s) of B, then of C: ``[H_local*P + 2*G_local*N, ...]``.
        """
        gn = self.n_groups * self.d_state
        x, B, C = torch.split(param, [self.d_inner, gn, gn], dim=0)
        x_start = self.cp_rank * self.d_inner_local
        bc = self.n_groups_local * self.d_state
        bc_start = (self.cp_rank // self.group_repeat_count) * bc
        return torch.cat(
            [x[x_start : x_start + self.d_inner_local], B[bc_start : bc_start + bc], C[bc_start : bc_start + bc]]
        )

    def get_conv1d_weight(self, weight: torch.Tensor | None = None) -> torch.Tensor:
        """``conv1d.weight`` ``[conv_dim, 1, K]`` sliced and squeezed to ``[conv_dim_local, K]``."""
        weight = self._mixer.conv1d.weight if weight is None else weight
        return self.slice_conv_param(weight).squeeze(1)

    def get_conv1d_bias(self, bias: torch.Tensor | None = None) -> torch.Tensor | None:
        """``conv1d.bias`` ``[conv_dim]`` sliced to ``[conv_dim_local]`` (None when the conv has no bias)."""
        bias = self._mixer.conv1d.bias if bias is None else bias
        return None if bias is None else self.slice_conv_param(bias)

    def get_dt_bias(self, dt_bias: torch.Tensor | None = None) -> torch.Tensor:
        """``dt_bias`` ``[H]`` -> ``[H_local]``."""
        return self.slice_vector_param(self._mixer.dt_bias if dt_bias is None else dt_bias)

    def get_A_log(self, A_log: torch.Tensor | None = None) -> torch.Tensor:
        """``A_log`` ``[H]`` -> ``[H_local]``."""
        return self.slice_vector_param(self._mixer.A_log if A_log is None else A_log)

    def get_D(self, D: torch.Tensor | None = None) -> torch.Tensor:
        """``D`` ``[H]`` (or ``[H, P]``) -> ``[H_local]`` (or ``[H_local, P]``)."""
        return self.slice_vector_param(self._mixer.D if D is None else D)

    def repeat_group_state(self, state: torch.Tensor) -> torch.Tensor:
        """Repeat each group ``cp / G`` times so that replicas land on consecutive ranks.

        ``[B, L, G*N]`` (or ``[T, G*N]``) -> ``[B, L, G*repeat*N]``.
        """
        grouped = state.unflatten(-1, (self.n_groups, 1, self.d_state))
        repeated = grouped.expand(*state.shape[:-1], self.n_groups, self.group_repeat_count, self.d_state)
        return repeated.flatten(-3)

    # ------------------------------------------------------------------ per-batch plan

    def plan_for(self, local: torch.Tensor, cu_seqlens: torch.Tensor | None) -> TokenPlan:
        """The batch plan for sequence-sharded ``local`` ``[B, L_local, W]`` / ``[T_local, W]``."""
        batch, local_len = batch_dims(local, cu_seqlens)
        return self.plans.get(self.cp_size, batch, local_len, cu_seqlens, local.device)

    # ------------------------------------------------------------------ the mixer's hot path

    def _columns_per_rank(self, t_BLW: torch.Tensor, kind: str) -> torch.Tensor:
        """View ``[B, L_local, width]`` as ``[B, L_local, cp, width/cp]`` (slot r goes to rank r)."""
        b, l_local = t_BLW.shape[:2]
        if kind == "groups" and self.group_repeat_count > 1:
            t_BLW = self.repeat_group_state(t_BLW)
        return t_BLW.reshape(b, l_local, self.cp_size, -1)

    def scatter(
        self, xBC_BLC: torch.Tensor, dt_BLH: torch.Tensor, plan: TokenPlan
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``xBC`` ``[B, L_local, conv_dim]`` and ``dt`` ``[B, L_local, H]`` to this rank's heads over whole
        sequences in true order: ``[B, L, conv_dim_local]`` and ``[B, L, H_local]``. One all-to-all (one per
        chunk with :attr:`transport_chunks`)."""
        gn = self.n_groups * self.d_state
        if self.transport_chunks is not None and self.group_repeat_count == 1:
            # Column ranges of xBC and dt travel as they are; the backward writes their gradients directly.
            segments = [(0, 0, self.d_inner), (0, self.d_inner, gn), (0, self.d_inner + gn, gn), (1, 0, self.num_heads)]
            chunks = max(1, self.transport_chunks)
            ordered = seq_to_heads_chunked_segments([xBC_BLC, dt_BLH], segments, plan, self.cp_group, chunks)
            return tuple(torch.split(ordered, [self.local_shape.conv_dim, self.num_heads_local], dim=-1))
        x, B, C = torch.split(xBC_BLC, [self.d_inner, gn, gn], dim=-1)
        parts = [
            self._columns_per_rank(x, "heads"),
            self._columns_per_rank(B, "groups"),
            self._columns_per_rank(C, "groups"),
            self._columns_per_rank(dt_BLH, "heads"),
        ]
        ordered = seq_to_heads(parts, plan, self.cp_group)
        # split, not two slices: its backward is one cat, where each slice's would be a zero-filled full-width
        # tensor, and the two would then be added.
        xBC_local, dt_local = torch.split(ordered, [self.local_shape.conv_dim, self.num_heads_local], dim=-1)
        return xBC_local, dt_local

    def gather(self, y_BLD: torch.Tensor, plan: TokenPlan) -> torch.Tensor:
        """``y`` ``[B, L, d_inner_local]`` back to this rank's tokens ``[B, L_local, d_inner]``."""
        if self.transport_chunks is not None:
            return heads_to_seq_chunked(y_BLD, plan, self.cp_group, max(1, self.transport_chunks))
        return heads_to_seq(y_BLD, plan, self.cp_group)

    def conv_ssd(self, xBC_BLC: torch.Tensor, dt_BLH: torch.Tensor, plan: TokenPlan) -> torch.Tensor:
        """The mixer's conv1d + SSD under CP: ``[B, L_local, conv_dim]``, ``[B, L_local, H]`` ->
        ``y`` ``[B, L_local, d_inner]`` (before gating and norm)."""
        xBC_local, dt_local = self.scatter(xBC_BLC, dt_BLH, plan)
        return self.gather(self.local_conv_ssd(xBC_local, dt_local, plan), plan)

    def fuses_projection(self, h_BLD: torch.Tensor) -> bool:
        """Whether the mixer should hand in_proj to :meth:`project_conv_ssd` for this input."""
        in_proj = self._mixer.in_proj
        # Only a plain nn.Linear that nothing hooks (a LoRA or quantized wrapper, FSDP applied to in_proj alone,
        # a user's hook) may be bypassed: the fused path reads its weight and bias directly.
        return (
            self.fuse_projection
            and self.transport_chunks is None
            and type(in_proj) is nn.Linear
            and not (in_proj._forward_hooks or in_proj._forward_pre_hooks)
            and not (nn.modules.module._global_forward_hooks or nn.modules.module._global_forward_pre_hooks)
            and h_BLD.dtype == in_proj.weight.dtype
            and not torch.is_autocast_enabled(h_BLD.device.type)
        )

    def projection_layout(self, device: torch.device) -> ProjectionLayout:
        """Which in_proj rows go to which rank (cached per device)."""
        layout = self._projection_layouts.get(device)
        if layout is None:
            layout = self._projection_layouts[device] = projection_layout(
                self.num_heads, self.head_dim, self.n_groups, self.d_state, self.cp_size, device
            )
        return layout

    def project_conv_ssd(
        self, h_BLD: torch.Tensor, in_proj: nn.Linear, plan: TokenPlan
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """in_proj + conv1d + SSD under CP, both all-to-alls hidden behind the projection of ``z``.

        ``h`` ``[B, L_local, D]`` -> ``y`` ``[B, L_local, d_inner]`` (before gating and norm) and the gate
        ``z`` ``[B, L_local, d_inner]`` (never leaves this rank).
        """
        b, l_local, _ = h_BLD.shape
        h_TD, weight, bias = h_BLD.reshape(b * l_local, -1), in_proj.weight, in_proj.bias
        layout = self.projection_layout(h_BLD.device)
        z, ordered = project_scatter(h_TD, weight, bias, layout, plan, self.cp_group)
        xBC_local, dt_local = torch.split(ordered, [self.local_shape.conv_dim, self.num_heads_local], dim=-1)
        y_local = self.local_conv_ssd(xBC_local, dt_local, plan)
        return gather_gate(y_local, z, h_TD, weight, bias, layout, plan, self.cp_group)

    def local_conv_ssd(self, xBC_local: torch.Tensor, dt_local: torch.Tensor, plan: TokenPlan) -> torch.Tensor:
        """conv1d + SSD of this rank's heads over whole sequences: ``[B, L, conv_dim_local]``,
        ``[B, L, H_local]`` -> ``y`` ``[B, L, d_inner_local]``, with this rank's parameter slices."""
        mixer = self._mixer
        return conv_ssd(
            xBC_local,
            dt_local,
            shape=self.local_shape,
            conv_weight_CK=self.get_conv1d_weight(),
            conv_bias_C=self.get_conv1d_bias(),
            dt_bias_H=self.get_dt_bias(),
            A_log_H=self.get_A_log(),
            D_H=self.get_D(),
            chunk_size=mixer.chunk_size,
            dt_limit=mixer.time_step_limit,
            seq_idx_BL=plan.seq_idx,
        )

    # ------------------------------------------------------------------ the spec's transforms

    def pre_conv_ssm(self, projected_states: torch.Tensor, cu_seqlens: torch.Tensor | None = None) -> torch.Tensor:
        """Sequence-sharded in_proj output to this rank's heads over whole sequences in true order.

        ``[B, L_local, 2*H*P + 2*G*N + H]`` (or packed ``[T_local, ...]`` with global ``cu_seqlens``) holding
        ``z | x | B | C | dt`` -> ``[B, L, 2*H_local*P + 2*G_local*N + H_local]`` (or ``[T, ...]``) holding
        this rank's ``z | x | B | C | dt``. The head-tail layout is undone. One all-to-all.
        """
        if self.cp_size == 1:
            return projected_states
        squeeze = projected_states.dim() == 2
        local = projected_states.unsqueeze(0) if squeeze else projected_states
        width = 2 * self.d_inner + 2 * self.n_groups * self.d_state + self.num_heads
        if local.shape[-1] != width:
            raise ValueError(
                f"projected_states width ({local.shape[-1]}) must be 2*num_heads*head_dim + "
                f"2*n_groups*d_state + num_heads ({width})"
            )
        plan = self.plan_for(local, cu_seqlens)
        gn = self.n_groups * self.d_state
        z, x, B, C, dt = torch.split(local, [self.d_inner, self.d_inner, gn, gn, self.num_heads], dim=-1)
        parts = [
            self._columns_per_rank(z, "heads"),
            self._columns_per_rank(x, "heads"),
            self._columns_per_rank(B, "groups"),
            self._columns_per_rank(C, "groups"),
            self._columns_per_rank(dt, "heads"),
        ]
        out = seq_to_heads(parts, plan, self.cp_group)
        return out.squeeze(0) if squeeze else out

    def post_conv_ssm(self, output: torch.Tensor, cu_seqlens: torch.Tensor | None = None) -> torch.Tensor:
        """Head-sharded ``[B, L, W_local]`` (true order) back to ``[B, L_local, cp*W_local]`` in the head-tail
        layout (packed: ``[T, W_local]`` -> ``[T_local, cp*W_local]``). Inverse of the transport in
        :meth:`pre_conv_ssm`. One all-to-all."""
        if self.cp_size == 1:
            return output
        squeeze = output.dim() == 2
        full = output.unsqueeze(0) if squeeze else output
        check_divisible(full.shape[1], self.cp_size, "sequence length", "cp_size")
        plan = self.plans.get(self.cp_size, full.shape[0], full.shape[1] // self.cp_size, cu_seqlens, full.device)
        out = heads_to_seq(full, plan, self.cp_group)
        return out.squeeze(0) if squeeze else out

    def __repr__(self) -> str:
        return (
            f"MambaContextParallel(cp_size={self.cp_size}, cp_rank={self.cp_rank}, "
            f"heads={self.num_heads_local}/{self.num_heads}, groups={self.n_groups_local}/{self.n_groups}, "
            f"group_repeat={self.group_repeat_count})"
        )

    # The spec's underscore names.
    _slice_vector_param = slice_vector_param
    _slice_conv_param = slice_conv_param
    _repeat_group_state = repeat_group_state
