"""``parallelize``: switch every Mamba2 mixer inside a module to context-parallel mode, in place."""

from __future__ import annotations

import functools
from collections.abc import Callable

import torch.nn as nn

from .consistency import check_ranks_agree, debug_from_env
from .groups import CPGroup, resolve_cp_group
from .hidden_parallel import MambaContextParallel
from .layout import TokenPlanCache
from .mixer import Mamba2Mixer


def _hidden_parallel(group: CPGroup, mixer: Mamba2Mixer, plans: TokenPlanCache) -> MambaContextParallel:
    return MambaContextParallel(
        group, mixer.num_heads, mixer.head_dim, mixer.n_groups, mixer.ssm_state_size, mixer, plans
    )


STRATEGIES: dict[str, Callable[[CPGroup, Mamba2Mixer, TokenPlanCache], object]] = {"hidden": _hidden_parallel}
"""Strategy name -> factory ``(group, mixer, shared plan cache) -> strategy``. A strategy has
``plan_for(hidden_states, cu_seqlens)`` (validates the batch, returns its cached plan) and
``conv_ssd(xBC [B, L_local, conv_dim], dt [B, L_local, H], plan) -> y [B, L_local, H*P]``."""


def find_mixers(module: nn.Module) -> list[tuple[str, Mamba2Mixer]]:
    """The ``(qualified name, mixer)`` pairs of every :class:`Mamba2Mixer` in ``module`` (itself included)."""
    return [(name, m) for name, m in module.named_modules() if isinstance(m, Mamba2Mixer)]


def parallelize(module: nn.Module, cp_group, strategy: str = "hidden", debug: bool | None = None) -> nn.Module:
    """Run every Mamba2 mixer in ``module`` context-parallel over ``cp_group``; returns ``module``.

    Args:
        module: a model or a single mixer; its parameters are untouched (same objects, same names).
        cp_group: a ``ProcessGroup`` or a 1-D ``DeviceMesh``; ``None`` or a group of one rank turns CP off.
        strategy: ``"hidden"`` (hidden-parallel: heads sharded by an all-to-all).
        debug: check on every call, with one small collective, that all ranks agree on the local shape,
            dtype and ``cu_seqlens`` (``ValueError`` naming the disagreement); default: ``MAMBA_CP_DEBUG``.

    All mixers share one per-batch plan cache, so a packed batch's index maps are built once per step.
    Every check (head and group divisibility) runs here, on every rank, before any collective.
    """
    if strategy in ("hidden_parallel", "hidden-parallel"):
        strategy = "hidden"
    if strategy not in STRATEGIES:
        raise ValueError(f"unknown CP strategy {strategy!r}; choose one of {sorted(STRATEGIES)}")
    mixers = find_mixers(module)
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
            mixer.context_parallel = STRATEGIES[strategy](group, mixer, plans)
        except ValueError as err:
            raise ValueError(f"cannot parallelize mixer {name or type(mixer).__name__!r}: {err}") from err
    return module
