"""``Mamba2Mixer``: a Mamba2 mixer layer that runs with or without context parallelism.

Shape legend: ``B`` batch, ``L_local`` tokens per row on this rank (``L`` without CP), ``T_local`` packed
tokens on this rank, ``D`` hidden_size, ``H`` heads, ``P`` head_dim, ``G`` groups, ``N`` state_size.

Constructor keywords and parameter names follow transformers' ``Mamba2Config`` / ``Mamba2Mixer``
(``in_proj``, ``conv1d``, ``dt_bias``, ``A_log``, ``D``, ``norm.weight``, ``out_proj``), so state dicts
move between the two. The mixer knows nothing of collectives: ``mamba_cp.parallelize`` attaches a
strategy (``self.context_parallel``) and the mixer hands it the conv + scan.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn

from . import kernels
from .layout import TokenPlan, TokenPlanCache
from .ssm_block import SSMShape, conv_ssd
from .validation import check_divisible


class GatedRMSNorm(nn.Module):
    """RMSNorm of ``y * silu(z)`` over groups of ``group_size`` channels, times ``weight`` ``[d]``."""

    def __init__(self, d: int, eps: float = 1e-5, group_size: int | None = None, device=None, dtype=None):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(d, device=device, dtype=dtype))
        self.eps = eps
        self.group_size = group_size

    def forward(self, y: torch.Tensor, z: torch.Tensor | None = None) -> torch.Tensor:
        return kernels.rmsnorm_gated(y, z, self.weight, eps=self.eps, group_size=self.group_size)

    def extra_repr(self) -> str:
        return f"{self.weight.shape[0]}, eps={self.eps}, group_size={self.group_size}"


class Mamba2Mixer(nn.Module):
    """A Mamba2 mixer: in_proj -> causal conv1d (SiLU) -> SSD scan -> gated grouped RMSNorm -> out_proj.

    Args:
        hidden_size: ``D``.
        num_heads: ``H``.
        head_dim: ``P``; ``H * P`` is the inner width (``expand * hidden_size`` when ``expand`` is given).
        n_groups: ``G`` B/C groups; ``H % G == 0``.
        state_size: ``N``.
        conv_kernel: depthwise conv width.
        chunk_size: SSD chunk length.
        time_step_limit: clamp of ``softplus(dt + dt_bias)``.
        expand: optional; checked against ``H * P / hidden_size``.
        use_bias: bias in ``in_proj`` / ``out_proj``.
        use_conv_bias: bias in ``conv1d``.
        layer_norm_epsilon: the gated RMSNorm's epsilon.
        norm_group_size: channels per norm group; default ``H * P / G`` (mamba_ssm's Mamba2, NemotronH).
        time_step_min, time_step_max, time_step_floor: range of the initial ``dt`` (log-uniform).
        A_init_range: range of the initial ``-A`` (uniform).
        ssm_param_dtype: dtype of ``dt_bias``, ``A_log`` and ``D``; default float32 when ``dtype`` is bf16 or
            fp16 (they set the decay, whose error compounds over the sequence), else ``dtype``.
    """

    def __init__(
        self,
        hidden_size: int,
        num_heads: int,
        head_dim: int,
        n_groups: int = 1,
        state_size: int = 128,
        conv_kernel: int = 4,
        chunk_size: int = 256,
        time_step_limit: tuple[float, float] = (0.0, float("inf")),
        expand: float | None = None,
        use_bias: bool = False,
        use_conv_bias: bool = True,
        layer_norm_epsilon: float = 1e-5,
        norm_group_size: int | None = None,
        time_step_min: float = 0.001,
        time_step_max: float = 0.1,
        time_step_floor: float = 1e-4,
        A_init_range: tuple[float, float] = (1.0, 16.0),
        ssm_param_dtype: torch.dtype | None = None,
        layer_idx: int | None = None,
        device=None,
        dtype=None,
    ) -> None:
        super().__init__()
        factory = {"device": device, "dtype": dtype}
        param_dtype = dtype or torch.get_default_dtype()
        if ssm_param_dtype is None:
            half = param_dtype in (torch.float16, torch.bfloat16)
            ssm_param_dtype = torch.float32 if half else param_dtype
        check_divisible(num_heads, n_groups, "num_heads", "n_groups")
        self.hidden_size = hidden_size
        self.num_heads = num_heads
        self.head_dim = head_dim
        self.n_groups = n_groups
        self.ssm_state_size = state_size
        self.conv_kernel_size = conv_kernel
        self.chunk_size = chunk_size
        self.time_step_limit = (float(time_step_limit[0]), float(time_step_limit[1]))
        self.layer_idx = layer_idx
        self.intermediate_size = num_heads * head_dim
        if expand is not None and not math.isclose(expand * hidden_size, self.intermediate_size):
            raise ValueError(
                f"num_heads * head_dim ({self.intermediate_size}) must equal expand * hidden_size "
                f"({expand} * {hidden_size})"
            )
        self.conv_dim = self.intermediate_size + 2 * n_groups * state_size
        group_size = norm_group_size if norm_group_size is not None else self.intermediate_size // n_groups
        check_divisible(self.intermediate_size, group_size, "num_heads * head_dim", "norm_group_size")

        projection = self.intermediate_size + self.conv_dim + num_heads  # z | xBC | dt
        self.in_proj = nn.Linear(hidden_size, projection, bias=use_bias, **factory)
        self.conv1d = nn.Conv1d(
            self.conv_dim, self.conv_dim, conv_kernel, groups=self.conv_dim, padding=conv_kernel - 1,
            bias=use_conv_bias, **factory,
        )  # fmt: skip
        # dt_bias = softplus^-1(dt) for dt log-uniform in [time_step_min, time_step_max].
        dt = torch.exp(
            torch.rand(num_heads, device=device) * (math.log(time_step_max) - math.log(time_step_min))
            + math.log(time_step_min)
        ).clamp(min=time_step_floor)
        self.dt_bias = nn.Parameter((dt + torch.log(-torch.expm1(-dt))).to(ssm_param_dtype))
        A = torch.empty(num_heads, device=device).uniform_(*A_init_range)
        self.A_log = nn.Parameter(torch.log(A).to(ssm_param_dtype))
        self.D = nn.Parameter(torch.ones(num_heads, device=device, dtype=ssm_param_dtype))
        self.norm = GatedRMSNorm(self.intermediate_size, eps=layer_norm_epsilon, group_size=group_size, **factory)
        self.out_proj = nn.Linear(self.intermediate_size, hidden_size, bias=use_bias, **factory)

        self.context_parallel = None
        """The CP strategy attached by :func:`mamba_cp.parallelize` (None: plain single-device mixer)."""
        self.batch_check = None
        """Optional ``(hidden_states, cu_seqlens) -> None`` run before each call (debug mode's rank check)."""
        self._plans = TokenPlanCache()

    @classmethod
    def from_config(cls, config, layer_idx: int | None = None, **overrides) -> Mamba2Mixer:
        """Build from a transformers-style config (``Mamba2Config``, ``NemotronHConfig``, ...)."""
        names = {
            "hidden_size": "hidden_size",
            "num_heads": ("num_heads", "mamba_num_heads"),
            "head_dim": ("head_dim", "mamba_head_dim"),
            "n_groups": ("n_groups",),
            "state_size": ("state_size", "ssm_state_size"),
            "conv_kernel": ("conv_kernel",),
            "chunk_size": ("chunk_size",),
            "time_step_limit": ("time_step_limit",),
            "use_bias": ("use_bias",),
            "use_conv_bias": ("use_conv_bias",),
            "layer_norm_epsilon": ("layer_norm_epsilon",),
        }
        kwargs = {}
        for key, candidates in names.items():
            for attr in (candidates,) if isinstance(candidates, str) else candidates:
                if hasattr(config, attr):
                    kwargs[key] = getattr(config, attr)
                    break
        kwargs.update(overrides)
        return cls(layer_idx=layer_idx, **kwargs)

    @property
    def shape(self) -> SSMShape:
        return SSMShape(self.num_heads, self.head_dim, self.n_groups, self.ssm_state_size)

    def token_plan(self, hidden_states: torch.Tensor, cu_seqlens: torch.Tensor | None) -> TokenPlan:
        """Validate the batch layout and return its (cached) plan."""
        if cu_seqlens is None:
            if hidden_states.dim() != 3:
                raise ValueError(
                    f"hidden_states must be [B, L, {self.hidden_size}] (or packed [T, {self.hidden_size}] with "
                    f"cu_seqlens), got shape {tuple(hidden_states.shape)}"
                )
        elif hidden_states.dim() not in (2, 3) or (hidden_states.dim() == 3 and hidden_states.shape[0] != 1):
            raise ValueError(
                f"a packed batch must be [T, {self.hidden_size}] or [1, T, {self.hidden_size}], "
                f"got shape {tuple(hidden_states.shape)}"
            )
        if hidden_states.shape[-1] != self.hidden_size:
            raise ValueError(
                f"hidden_states last dim ({hidden_states.shape[-1]}) must equal the mixer's hidden_size "
                f"({self.hidden_size})"
            )
        if self.context_parallel is not None:
            plan = self.context_parallel.plan_for(hidden_states, cu_seqlens)  # local checks first
            if self.batch_check is not None:
                self.batch_check(hidden_states, cu_seqlens)
            return plan
        batch = 1 if cu_seqlens is not None else hidden_states.shape[0]
        return self._plans.get(1, batch, hidden_states.shape[-2], cu_seqlens, hidden_states.device)

    def scan(self, h_BLD: torch.Tensor, plan: TokenPlan) -> tuple[torch.Tensor, torch.Tensor]:
        """in_proj, then conv1d + SSD (through the CP strategy when one is attached).

        ``h`` ``[B, L_local, D]`` -> ``y`` ``[B, L_local, H*P]`` (with the ``D`` skip, before gating) and the
        gate ``z`` ``[B, L_local, H*P]``, which never leaves this rank.
        """
        cp = self.context_parallel
        if cp is not None and getattr(cp, "fuses_projection", None) is not None and cp.fuses_projection(h_BLD):
            # The strategy runs in_proj itself, overlapping its all-to-all with the projection of z.
            return cp.project_conv_ssd(h_BLD, self.in_proj, plan)
        zxbcdt = self.in_proj(h_BLD)
        z, xBC, dt = torch.split(zxbcdt, [self.intermediate_size, self.conv_dim, self.num_heads], dim=-1)
        if cp is not None:
            y = cp.conv_ssd(xBC, dt, plan)
            if getattr(cp, "releases_projection", False):
                # The strategy kept no reference to xBC / dt, so z (saved by the norm for backward) gets its own
                # storage and the rest of the in_proj output is freed now instead of living until backward.
                z = z.contiguous()
            return y, z
        y = conv_ssd(
            xBC,
            dt,
            shape=self.shape,
            conv_weight_CK=self.conv1d.weight.squeeze(1),
            conv_bias_C=self.conv1d.bias,
            dt_bias_H=self.dt_bias,
            A_log_H=self.A_log,
            D_H=self.D,
            chunk_size=self.chunk_size,
            dt_limit=self.time_step_limit,
            seq_idx_BL=plan.seq_idx,
        )
        return y, z

    def forward(self, hidden_states: torch.Tensor, cu_seqlens: torch.Tensor | None = None) -> torch.Tensor:
        """``[B, L_local, D]`` -> ``[B, L_local, D]``; packed ``[T_local, D]`` / ``[1, T_local, D]`` with global
        ``cu_seqlens`` ``[S + 1]`` -> same shape. Under CP each rank passes its head-tail shard."""
        plan = self.token_plan(hidden_states, cu_seqlens)
        h = hidden_states.unsqueeze(0) if hidden_states.dim() == 2 else hidden_states
        y, z = self.scan(h, plan)
        out = self.out_proj(self.norm(y, z))
        return out.squeeze(0) if hidden_states.dim() == 2 else out

    def extra_repr(self) -> str:
        cp = self.context_parallel
        return (
            f"heads={self.num_heads}, head_dim={self.head_dim}, groups={self.n_groups}, "
            f"state={self.ssm_state_size}, chunk={self.chunk_size}, "
            f"context_parallel={'off' if cp is None else repr(cp)}"
        )
