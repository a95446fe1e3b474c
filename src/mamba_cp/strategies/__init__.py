"""The strategies a mixer's conv + scan can run with, and the registry ``parallelize`` picks from.

* :class:`~mamba_cp.strategies.local.LocalStrategy`: no CP (a plain mixer, or a CP group of one rank);
* :class:`~mamba_cp.strategies.hidden.HiddenParallel` (``"hidden"``): heads sharded by all-to-all;
* :class:`~mamba_cp.strategies.state_passing.StatePassing` (``"state_passing"``): tokens stay home.

All implement :class:`~mamba_cp.strategies.base.Strategy`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from ..groups import CPGroup
from ..plan_cache import PlanCache
from .base import SSMConfig, SSMParams, Strategy
from .cost import Choice, Workload, choose_strategy, estimate_ms, hidden_can_run, measure_bandwidth_gbps
from .hidden import HeadShard, HiddenParallel
from .local import LocalStrategy
from .state_passing import StatePassing


@dataclass(frozen=True, slots=True, kw_only=True)
class StrategyOptions:
    """Options ``parallelize`` passes to the strategies it builds."""

    fuse_projection: bool = True
    """Hidden-parallel: run a plain ``nn.Linear`` in_proj fused with the all-to-all (see :class:`HiddenParallel`)."""
    debug: bool = False
    """Check with one small collective per call that every rank passes the same batch layout."""
    note: str = ""
    """Why this strategy was chosen (``strategy="auto"``): shown in the strategy's repr."""


def _hidden(group: CPGroup, config: SSMConfig, plans: PlanCache, options: StrategyOptions) -> HiddenParallel:
    return HiddenParallel(
        group, config, plans, fuse_projection=options.fuse_projection, debug=options.debug, note=options.note
    )


def _state_passing(group: CPGroup, config: SSMConfig, plans: PlanCache, options: StrategyOptions) -> StatePassing:
    return StatePassing(group, config, plans, debug=options.debug, note=options.note)


STRATEGIES: dict[str, Callable[[CPGroup, SSMConfig, PlanCache, StrategyOptions], Strategy]] = {
    "hidden": _hidden,
    "state_passing": _state_passing,
}
"""Strategy name -> builder ``(group, config, shared plan cache, options) -> strategy``."""

__all__ = [
    "STRATEGIES",
    "Choice",
    "Workload",
    "choose_strategy",
    "estimate_ms",
    "hidden_can_run",
    "measure_bandwidth_gbps",
    "HeadShard",
    "HiddenParallel",
    "LocalStrategy",
    "SSMConfig",
    "SSMParams",
    "StatePassing",
    "Strategy",
    "StrategyOptions",
]
