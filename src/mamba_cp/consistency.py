"""Debug mode: check, with one small collective, that every CP rank sees the same batch layout.

Off by default (it costs a collective per layer call). Turn it on with ``parallelize(..., debug=True)``
or ``MAMBA_CP_DEBUG=1`` in the environment when ``parallelize`` runs. Ranks that disagree on the local
shape, the dtype or ``cu_seqlens`` would otherwise exchange mismatched buffers or hang in a collective;
with the check, every rank raises the same ``ValueError`` naming the disagreement.
"""

from __future__ import annotations

import os

import torch
import torch.distributed as dist

from .groups import CPGroup

ENV_FLAG = "MAMBA_CP_DEBUG"


def debug_from_env() -> bool:
    """Whether ``MAMBA_CP_DEBUG`` asks for debug mode (``1``, ``true``, ``yes``, ``on``)."""
    return os.environ.get(ENV_FLAG, "").strip().lower() in ("1", "true", "yes", "on")


def batch_fingerprint(hidden_states: torch.Tensor, cu_seqlens: torch.Tensor | None) -> dict:
    """What every rank must agree on: local shape, dtype and the global ``cu_seqlens`` values."""
    return {
        "local shape": tuple(hidden_states.shape),
        "dtype": str(hidden_states.dtype),
        "cu_seqlens": None if cu_seqlens is None else cu_seqlens.detach().cpu().tolist(),
    }


def check_ranks_agree(group: CPGroup, hidden_states: torch.Tensor, cu_seqlens: torch.Tensor | None) -> None:
    """All-gather this rank's :func:`batch_fingerprint`; raise ``ValueError`` on every rank if any differ."""
    if group.size == 1:
        return
    mine = batch_fingerprint(hidden_states, cu_seqlens)
    everyone: list = [None] * group.size
    dist.all_gather_object(everyone, mine, group=group.group)
    problems = []
    for key in mine:
        values = [fp[key] for fp in everyone]
        if any(v != values[0] for v in values):
            listed = ", ".join(f"rank {r}: {v}" for r, v in enumerate(values))
            problems.append(f"{key} differs across CP ranks ({listed})")
    if problems:
        raise ValueError("mamba_cp debug check failed: " + "; ".join(problems))
