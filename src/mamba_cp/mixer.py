"""``Mamba2Mixer``: a Mamba2 mixer layer that runs with or without context parallelism.

Shape legend: ``B`` batch, ``L_local`` tokens per row on this rank (``L`` without CP), ``T_local`` packed
tokens on this rank, ``D`` hidden_size, ``H`` heads, ``P`` head_dim, ``G`` groups, ``N`` state_size.

Constructor keywords and parameter names follow transformers' ``Mamba2Config`` / ``Mamba2Mixer``
(``in_proj``, ``conv1d``, ``dt_bias``, ``A_log``, ``D``, ``norm.weight``, ``out_proj``), so state dicts
move between the two. The mixer knows nothing of collectives: it always runs through a strategy
(``self.strategy``: :class:`~mamba_cp.strategies.local.LocalStrategy` until ``mamba_cp.parallelize`` attaches a
context-parallel one) and hands it its tokens, its in_proj and its SSM parameters
(:class:`~mamba_cp.strategies.base.SSMParams`); see :mod:`mamba_cp.strategies.base` for the seam.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn

from . import kernels
from .ssm_block import SSMShape
from .strategies.base import SSMConfig, SSMParams, Strategy
from .strategies.local import LocalStrategy
from .validation import as_cu_seqlens, check_divisible


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

        self.strategy: Strategy = LocalStrategy()
        """How the conv + scan runs: :class:`~mamba_cp.strategies.local.LocalStrategy` (no CP) until
        :func:`mamba_cp.parallelize` attaches a context-parallel strategy."""

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

    @property
    def ssm_config(self) -> SSMConfig:
        """The static description of this mixer's SSM that strategies plan with."""
        return SSMConfig(
            shape=self.shape,
            conv_kernel=self.conv_kernel_size,
            chunk_size=self.chunk_size,
            dt_limit=self.time_step_limit,
        )

    def ssm_params(self) -> SSMParams:
        """References to this mixer's SSM parameters for one call (read on every call, so parameters that FSDP
        swaps in are picked up)."""
        return SSMParams(
            config=self.ssm_config,
            conv_weight_CK=self.conv1d.weight.squeeze(1),
            conv_bias_C=self.conv1d.bias,
            dt_bias_H=self.dt_bias,
            A_log_H=self.A_log,
            D_H=self.D,
        )

    def mix(self, hidden_states: torch.Tensor, cu_seqlens: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        """Validate the batch, then in_proj + conv1d + SSD through the strategy.

        ``hidden_states`` ``[B, L_local, D]`` (or packed ``[T_local, D]`` / ``[1, T_local, D]`` with global
        ``cu_seqlens`` ``[S + 1]``) -> ``y`` ``[B, L_local, H*P]`` (with the ``D`` skip, before gating) and the
        gate ``z`` ``[B, L_local, H*P]`` (``B = 1`` for packed batches).
        """
        cu_seqlens = as_cu_seqlens(cu_seqlens)
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
        plan = self.strategy.plan_for(hidden_states, cu_seqlens)  # every check, before any collective
        h = hidden_states.unsqueeze(0) if hidden_states.dim() == 2 else hidden_states
        return self.strategy.scan(h, self.in_proj, self.ssm_params(), plan)

    def forward(self, hidden_states: torch.Tensor, cu_seqlens: torch.Tensor | None = None) -> torch.Tensor:
        """``[B, L_local, D]`` -> ``[B, L_local, D]``; packed ``[T_local, D]`` / ``[1, T_local, D]`` with global
        ``cu_seqlens`` ``[S + 1]`` -> same shape. Under CP each rank passes its head-tail shard."""
        y, z = self.mix(hidden_states, cu_seqlens)
        out = self.out_proj(self.norm(y, z))
        return out.squeeze(0) if hidden_states.dim() == 2 else out

    _FLOAT32_PARAMS = ("A_log", "D", "dt_bias")
    """The decay parameters that a cast to float16 / bfloat16 leaves in float32 (see :meth:`_apply`)."""

    def _apply(self, fn, recurse: bool = True):
        """``nn.Module._apply`` (``.to``, ``.half()``, ``.bfloat16()``, ``.cuda()``, ...), except that a cast of
        ``A_log``, ``D`` or ``dt_bias`` from float32 / float64 to float16 / bfloat16 leaves them in float32.

        They set the decay ``exp(dt * A)``, whose error compounds over the sequence; ``Mamba2Mixer(dtype=...)``
        keeps them in float32 too. The Parameter objects stay the same (optimizers keep working) and their values
        are the ones before the cast (the float32 values exactly; float64 ones rounded once to float32); a moved
        device is followed. Gradients are kept the same way. Converted transformers mixers inherit this.
        """
        kept = {}
        for name in self._FLOAT32_PARAMS:
            p = self._parameters.get(name)
            if p is not None and p.dtype in (torch.float32, torch.float64):
                kept[name] = (p.detach(), None if p.grad is None else p.grad.detach())
        super()._apply(fn, recurse)
        half = (torch.float16, torch.bfloat16)
        for name, (data, grad) in kept.items():
            p = self._parameters[name]
            if p.dtype in half:
                p.data = data.to(device=p.device, dtype=torch.float32)
                if grad is not None and p.grad is not None and p.grad.dtype in half:
                    p.grad = grad.to(device=p.device, dtype=torch.float32)
        return self

    def extra_repr(self) -> str:
        return (
            f"heads={self.num_heads}, head_dim={self.head_dim}, groups={self.n_groups}, "
            f"state={self.ssm_state_size}, chunk={self.chunk_size}, strategy={self.strategy!r}"
        )
