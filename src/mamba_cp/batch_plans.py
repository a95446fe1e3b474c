"""Everything a model's CP layers need for one batch, built before a compiled call: :func:`prepare_batch`.

Eagerly, each layer looks its batch's plan up in the shared :class:`~mamba_cp.plan_cache.PlanCache` (building and
checking it on first use). Code traced by ``torch.compile`` cannot: the lookup reads ``cu_seqlens`` on the host
and the build runs host-side Python. So under ``torch.compile`` the layers read the *pinned* plans of the batch
(plain data: frozen dataclasses of index tensors and ints, so a new batch of the same shapes reuses the graph),
and :func:`prepare_batch` builds and pins them, outside the graph, once per step. transformers models prepared
by :func:`mamba_cp.parallelize` call it in their forward pre-hook (compile their layers, torchtitan-style, not
the whole model); a stack of :class:`~mamba_cp.Mamba2Mixer` s calls it before the compiled call.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from . import integrations
from .collectives import check_same_batch
from .context import current_cu_seqlens
from .mixer import Mamba2Mixer
from .strategies.state_passing import StatePassing
from .validation import as_cu_seqlens, describe_fingerprint


def prepare_batch(
    module: nn.Module,
    batch_size: int,
    local_len: int,
    cu_seqlens: torch.Tensor | None = None,
    device: torch.device | str | None = None,
) -> None:
    """Build, check and pin the plans of one batch for every CP layer in ``module`` (see the module docstring).

    Args:
        module: a model parallelized by :func:`mamba_cp.parallelize`.
        batch_size: ``B`` (1 for a packed batch).
        local_len: tokens per row on this rank (``L_local`` or ``T_local``).
        cu_seqlens: the *global* boundaries of a packed batch (default: the current batch context's).
        device: the activations' device (default: that of the module's first parameter).

    Every check a layer would make eagerly runs here (``ValueError`` on every rank before any collective, then
    the once-per-batch cross-rank checks), so the compiled layers run on validated plans.
    """
    cu = as_cu_seqlens(current_cu_seqlens(cu_seqlens))
    if device is None:
        device = next(module.parameters()).device
    # A stand-in with the batch's leading dims: plan_for reads only shapes and the device.
    probe = torch.empty((local_len, 0) if cu is not None else (batch_size, local_len, 0), device=device)
    for mixer in (m for m in module.modules() if isinstance(m, Mamba2Mixer)):
        plan = mixer.strategy.plan_for(probe, cu)
        if isinstance(mixer.strategy, StatePassing) and mixer.strategy.group.size > 1:
            # Eagerly this check rides with the first layer's summaries; compiled layers skip it, so it runs here.
            mixer.strategy.plans.get(
                "peer-check",
                (id(plan),),
                None,
                lambda s=mixer.strategy, p=plan: (
                    check_same_batch(s.group.group, p.fingerprint.tolist(), describe_fingerprint) or p
                ),
            )
    integrations.prepare_attention(module, batch_size, local_len, cu, device)
