"""``parallelize``: switch every Mamba2 mixer inside a module to context-parallel mode, in place."""

from __future__ import annotations

import functools
from collections.abc import Callable

import torch.nn as nn

from . import integrations
from .consistency import check_ranks_agree, debug_from_env
from .groups import CPGroup, resolve_cp_group
from .hidden_parallel import MambaContextParallel
from .layout import TokenPlanCache
from .mixer import Mamba2Mixer
from .state_passing import state_passing_factory


def _hidden_parallel(group: CPGroup, mixer: Mamba2Mixer, plans: TokenPlanCache) -> MambaContextParallel:
    return MambaContextParallel(
        group, mixer.num_heads, mixer.head_dim, mixer.n_groups, mixer.ssm_state_size, mixer, plans
    )


STRATEGIES: dict[str, Callable[[CPGroup, Mamba2Mixer, TokenPlanCache], object]] = {
    "hidden": _hidden_parallel,
    "state_passing": state_passing_factory,
}
"""Strategy name -> factory ``(group, mixer, shared plan cache) -> strategy``. A strategy has
``plan_for(hidden_states, cu_seqlens)`` (validates the batch, returns its cached plan) and
``conv_ssd(xBC [B, L_local, conv_dim], dt [B, L_local, H], plan) -> y [B, L_local, H*P]``."""


def auto_strategy(num_heads: int, n_groups: int, cp_size: int) -> str:
    """The strategy ``strategy="auto"`` picks for a mixer with ``num_heads`` heads and ``n_groups`` groups.

    ``"hidden"`` wherever it can run, since it measured faster: on 2x H200 at cp=2 (BENCHMARKS.md, 128K tokens)
    hidden-parallel took 133 ms (BSHD) and 135 ms (64 packed documents) against 174 ms and 268 ms for state
    passing. ``"state_passing"`` where hidden-parallel cannot run: ``num_heads % cp != 0``, or groups that do
    not split (``cp % G`` for ``G < cp``, ``G % cp`` otherwise). At cp >= 4 state passing's scan may win
    (fewer heads per rank underuse the GPU, DESIGN.md 3b); the rule changes once that is measured.
    """
    groups_split = cp_size % n_groups == 0 if n_groups < cp_size else n_groups % cp_size == 0
    if num_heads % cp_size != 0 or not groups_split:
        return "state_passing"
    return "hidden"


def find_mixers(module: nn.Module) -> list[tuple[str, Mamba2Mixer]]:
    """The ``(qualified name, mixer)`` pairs of every :class:`Mamba2Mixer` in ``module`` (itself included)."""
    return [(name, m) for name, m in module.named_modules() if isinstance(m, Mamba2Mixer)]


def parallelize(module: nn.Module, cp_group, strategy: str = "hidden", debug: bool | None = None) -> nn.Module:
    """Run every Mamba2 mixer in ``module`` context-parallel over ``cp_group``; returns ``module``.

    Args:
        module: a model or a single mixer; its parameters are untouched (same objects, same names).
        cp_group: a ``ProcessGroup`` or a 1-D ``DeviceMesh``; ``None`` or a group of one rank turns CP off.
        strategy: ``"hidden"`` (hidden-parallel: heads sharded by an all-to-all), ``"state_passing"``
            (tokens stay home; segments exchange conv halos and SSD states) or ``"auto"`` (per mixer, by
            :func:`auto_strategy`: hidden-parallel where it can run, the faster measured; state passing where
            its divisibility fails). The mixer's repr names the strategy it got.
        debug: check on every call, with one small collective, that all ranks agree on the local shape,
            dtype and ``cu_seqlens`` (``ValueError`` naming the disagreement); default: ``MAMBA_CP_DEBUG``.

    All mixers share one per-batch plan cache, so a packed batch's index maps are built once per step.
    Every check (head and group divisibility) runs here, on every rank, before any collective.
    """
    if strategy in ("hidden_parallel", "hidden-parallel"):
        strategy = "hidden"
    if strategy == "state-passing":
        strategy = "state_passing"
    if strategy not in STRATEGIES and strategy != "auto":
        raise ValueError(f"unknown CP strategy {strategy!r}; choose one of {sorted([*STRATEGIES, 'auto'])}")
    mixers = find_mixers(integrations.convert_mixers(module))  # transformers mixers become ours, in place
    if not mixers:
        raise ValueError(f"{type(module).__name__} contains no Mamba2Mixer to parallelize")
    group = resolve_cp_group(cp_group)
    plans = TokenPlanCache()
    debug = debug_from_env() if debug is None else debug
    for name, mixer in mixers:
        mixer.batch_check = functools.partial(check_ranks_agree, group) if debug and group.size > 1 else None
        if group.size == 1:
            mixer.context_parallel = None
            continue
        try:
            chosen = auto_strategy(mixer.num_heads, mixer.n_groups, group.size) if strategy == "auto" else strategy
            mixer.context_parallel = STRATEGIES[chosen](group, mixer, plans)
        except ValueError as err:
            raise ValueError(f"cannot parallelize mixer {name or type(mixer).__name__!r}: {err}") from err
    integrations.parallelize_attention(module, group, plans)  # hybrid models: attention layers and positions
    return module
