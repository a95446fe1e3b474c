"""Resolve what users pass as a context-parallel group into a process group, its size and this rank."""

from __future__ import annotations

from dataclasses import dataclass

import torch.distributed as dist

try:  # DeviceMesh lives in torch.distributed.device_mesh from torch 2.2 on.
    from torch.distributed.device_mesh import DeviceMesh
except ImportError:  # pragma: no cover - very old torch
    DeviceMesh = None  # type: ignore[assignment,misc]


@dataclass(frozen=True, slots=True)
class CPGroup:
    """A context-parallel process group with its size and this process's rank inside it."""

    group: dist.ProcessGroup | None
    """The process group the collectives run on (None only when ``size == 1`` and no group exists)."""
    size: int
    """Number of ranks the sequence is sharded over."""
    rank: int
    """This process's rank inside ``group`` (0 ≤ rank < size)."""


def resolve_cp_group(cp_group: object) -> CPGroup:
    """Turn a ``ProcessGroup``, a 1-D ``DeviceMesh``, ``None`` (no CP) or a ``CPGroup`` into a ``CPGroup``.

    Raises ``ValueError`` for a mesh that is not one-dimensional and ``TypeError`` for anything else.
    """
    if isinstance(cp_group, CPGroup):
        return cp_group
    if cp_group is None:
        return CPGroup(group=None, size=1, rank=0)
    if DeviceMesh is not None and isinstance(cp_group, DeviceMesh):
        if cp_group.ndim != 1:
            raise ValueError(
                f"a DeviceMesh used as the CP group must be 1-D, got ndim={cp_group.ndim} "
                f"(mesh_dim_names={cp_group.mesh_dim_names}); pass mesh['cp'] instead"
            )
        group = cp_group.get_group()
        return CPGroup(group=group, size=dist.get_world_size(group), rank=dist.get_rank(group))
    if isinstance(cp_group, dist.ProcessGroup):
        return CPGroup(group=cp_group, size=cp_group.size(), rank=cp_group.rank())
    raise TypeError(
        f"cp_group must be a torch.distributed ProcessGroup, a 1-D DeviceMesh or None, got {type(cp_group)!r}"
    )
