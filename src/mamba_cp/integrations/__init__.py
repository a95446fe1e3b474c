"""Apply context parallelism to models from other libraries, in place.

:func:`mamba_cp.parallelize` calls the two entry points here: :func:`convert_mixers` before it looks for
Mamba2 mixers, :func:`parallelize_attention` after it has attached their strategies. Each entry point only
acts on libraries that are already imported (a model built with transformers implies transformers is in
``sys.modules``), so importing mamba_cp never imports them.
"""

from __future__ import annotations

import sys

import torch
import torch.nn as nn

from ..groups import CPGroup
from ..plan_cache import PlanCache


def convert_mixers(module: nn.Module) -> nn.Module:
    """Turn every supported third-party Mamba2 mixer inside ``module`` into a :class:`mamba_cp.Mamba2Mixer`,
    in place (same module objects, same parameters, same state-dict keys); returns ``module``."""
    if "transformers" in sys.modules:
        from . import transformers as hf

        hf.convert_mixers(module)
    return module


def parallelize_attention(module: nn.Module, group: CPGroup, plans: PlanCache) -> nn.Module:
    """Make the attention layers of a converted hybrid model context-parallel over ``group`` (head-parallel
    all-to-all) and give the model's forward the true token positions; returns ``module``."""
    if "transformers" in sys.modules:
        from . import transformers as hf

        hf.parallelize_attention(module, group, plans)
    return module


def prepare_attention(
    module: nn.Module, batch: int, local_len: int, cu_seqlens: torch.Tensor | None, device: torch.device | str
) -> None:
    """Build and pin the plan and mask of one batch for every CP attention layer in ``module`` (see
    :func:`mamba_cp.prepare_batch`)."""
    if "transformers" in sys.modules:
        from . import transformers as hf

        hf.prepare_attention(module, batch, local_len, cu_seqlens, device)


__all__ = ["convert_mixers", "parallelize_attention", "prepare_attention"]
