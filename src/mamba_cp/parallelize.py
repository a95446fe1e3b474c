"""``parallelize``: switch every Mamba2 mixer inside a module to context-parallel mode, in place."""

from __future__ import annotations

import dataclasses

import torch.nn as nn

from . import integrations
from .consistency import debug_from_env
from .groups import resolve_cp_group
from .mixer import Mamba2Mixer
from .plan_cache import PlanCache
from .strategies import STRATEGIES, LocalStrategy, StrategyOptions, Workload, choose_strategy, measure_bandwidth_gbps
from .validation import ConfigError, check_packed_layout

_ALIASES = {"hidden_parallel": "hidden", "hidden-parallel": "hidden", "state-passing": "state_passing"}


def find_mixers(module: nn.Module) -> list[tuple[str, Mamba2Mixer]]:
    """The ``(qualified name, mixer)`` pairs of every :class:`Mamba2Mixer` in ``module`` (itself included)."""
    return [(name, m) for name, m in module.named_modules() if isinstance(m, Mamba2Mixer)]


def parallelize(
    module: nn.Module,
    cp_group,
    strategy: str = "hidden",
    *,
    debug: bool | None = None,
    fuse_projection: bool = True,
    workload: Workload | None = None,
    packed_layout: str = "sequences",
) -> nn.Module:
    """Run every Mamba2 mixer in ``module`` context-parallel over ``cp_group``; returns ``module``.

    Args:
        module: a model or a single mixer; its parameters are untouched (same objects, same names).
        cp_group: a ``ProcessGroup`` or a 1-D ``DeviceMesh``; ``None`` or a group of one rank turns CP off.
        strategy: ``"hidden"`` (hidden-parallel: heads sharded by an all-to-all), ``"state_passing"``
            (tokens stay home; segments exchange conv halos and SSD states) or ``"auto"`` (per mixer, the faster
            by the cost model of :mod:`mamba_cp.strategies.cost` for ``workload``; state passing where
            hidden-parallel's divisibility fails). The mixer's repr names the strategy it got and why.
        debug: check on every call, with one small collective, that all ranks agree on the local shape,
            dtype and ``cu_seqlens`` (``ValueError`` naming the disagreement); default: ``MAMBA_CP_DEBUG``.
        fuse_projection: hidden-parallel runs a plain ``nn.Linear`` in_proj fused with its all-to-all (the
            measured default); False always uses the plain in_proj.
        workload: what ``"auto"`` chooses for (tokens per row, documents per row, bandwidth); default
            :class:`~mamba_cp.strategies.cost.Workload` (128K tokens, BSHD, the bandwidth measured once with a
            small timed all-to-all).
        packed_layout: how packed batches are cut over the ranks: ``"sequences"`` (every sequence in ``2*cp``
            chunks, Transformer Engine's THD layout; the default) or ``"stream"`` (the whole pack in ``2*cp``
            chunks, like one BSHD row: state passing then costs what it costs on BSHD, whatever the number of
            documents, and sequence lengths need not divide by ``2*cp``). Shard the batch the same way
            (``shard(..., packed_layout=)``, ``shard_batch(..., packed_layout=)``).

    All mixers and attention layers share one per-batch plan cache, so a batch's index maps are built once
    per step. Every check (head and group divisibility) runs here, on every rank, before any collective.
    """
    check_packed_layout(packed_layout)
    strategy = _ALIASES.get(strategy, strategy)
    if strategy not in STRATEGIES and strategy != "auto":
        raise ConfigError(f"unknown CP strategy {strategy!r}; choose one of {sorted([*STRATEGIES, 'auto'])}")
    mixers = find_mixers(integrations.convert_mixers(module))  # transformers mixers become ours, in place
    if not mixers:
        raise ConfigError(f"{type(module).__name__} contains no Mamba2Mixer to parallelize")
    group = resolve_cp_group(cp_group)
    plans = PlanCache(packed_layout=packed_layout)
    options = StrategyOptions(fuse_projection=fuse_projection, debug=debug_from_env() if debug is None else debug)
    workload = dataclasses.replace(workload or Workload(), packed_layout=packed_layout)  # the model's layout
    bandwidth = workload.bandwidth_gbps
    if strategy == "auto" and group.size > 1 and bandwidth is None:
        bandwidth = measure_bandwidth_gbps(group.group)  # once per call, the same value on every rank
    chosen = []
    for name, mixer in mixers:  # build every strategy first: a refusal leaves the model untouched
        if group.size == 1:
            chosen.append(LocalStrategy(plans))
            continue
        key, opts = strategy, options
        if strategy == "auto":
            choice = choose_strategy(mixer.shape, group.size, workload, bandwidth)
            key, opts = choice.strategy, dataclasses.replace(options, note=choice.reason)
        try:
            chosen.append(STRATEGIES[key](group, mixer.ssm_config, plans, opts))
        except ValueError as err:
            raise ConfigError(f"cannot parallelize mixer {name or type(mixer).__name__!r}: {err}") from err
    for (_, mixer), built in zip(mixers, chosen, strict=True):
        mixer.strategy = built
    integrations.parallelize_attention(module, group, plans)  # hybrid models: attention layers and positions
    return module
