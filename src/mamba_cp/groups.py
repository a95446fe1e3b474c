"""Resolve what users pass as a context-parallel group into a process group, its size and this rank."""

from __future__ import annotations

import weakref
from dataclasses import dataclass, field

import torch.distributed as dist

try:  # DeviceMesh lives in torch.distributed.device_mesh from torch 2.2 on.
    from torch.distributed.device_mesh import DeviceMesh
except ImportError:  # pragma: no cover - very old torch
    DeviceMesh = None  # type: ignore[assignment,misc]


class GroupRef:
    """Holds a CP group for a module or an autograd ``ctx``; call it to get the group.

    A ``torch.distributed`` ``ProcessGroup`` is held only weakly. ``torch.distributed`` owns every group it made
    until ``destroy_process_group``; a group that our objects (a parallelized model, an autograd graph kept by a
    script's globals) kept alive past that call would keep its backend's worker threads running into
    interpreter shutdown, where a gloo worker still releasing its last finished ``Work`` must take the GIL to
    free the Work's tensors and is ended inside a noexcept destructor: ``terminate called without an active
    exception``, SIGABRT. ``None`` and stand-ins (objects with only ``size()`` and ``rank()``) are held as they
    are.
    """

    __slots__ = ("_weak", "_strong")

    def __init__(self, group: object) -> None:
        weak = isinstance(group, dist.ProcessGroup)
        self._weak = weakref.ref(group) if weak else None
        self._strong = None if weak else group

    def __call__(self) -> object:
        if self._weak is None:
            return self._strong
        group = self._weak()
        if group is None:  # never None silently: c10d would take None for the default (WORLD) group
            raise RuntimeError(
                "mamba_cp: the CP process group no longer exists (torch.distributed.destroy_process_group was "
                "called, or the group was never registered with torch.distributed)"
            )
        return group

    def __deepcopy__(self, memo: dict) -> GroupRef:
        return self  # a copy of a model runs on the same ranks: it shares the group (see CPGroup)

    def __reduce__(self):
        # A ProcessGroup cannot be pickled: the copy gets the placeholder that raises at its first collective.
        return (GroupRef, (UNPICKLED_GROUP if self._weak is not None else self._strong,))

    def __eq__(self, other: object) -> bool:
        return isinstance(other, GroupRef) and self() is other()

    def __hash__(self) -> int:
        return id(self())


@dataclass(frozen=True, slots=True, init=False)
class CPGroup:
    """A context-parallel process group with its size and this process's rank inside it.

    ``CPGroup(group=..., size=..., rank=...)``; the group is held through a :class:`GroupRef` (weakly for a
    ``ProcessGroup``), so a model does not keep its group alive past ``destroy_process_group``.
    """

    size: int
    """Number of ranks the sequence is sharded over."""
    rank: int
    """This process's rank inside ``group`` (0 <= rank < size)."""
    ref: GroupRef = field(repr=False)
    """Holds the group; :attr:`group` reads it."""

    def __init__(self, group: object, size: int, rank: int) -> None:
        object.__setattr__(self, "size", size)
        object.__setattr__(self, "rank", rank)
        object.__setattr__(self, "ref", GroupRef(group))

    @property
    def group(self) -> dist.ProcessGroup | None:
        """The process group the collectives run on (None only when ``size == 1`` and no group exists; a
        stand-in object with only ``size()`` and ``rank()`` when one was given)."""
        return self.ref()

    def __deepcopy__(self, memo: dict) -> CPGroup:
        # A process group is a live connection, not data: a copy of a model (an EMA copy, say) runs on the same
        # ranks, so it shares the group.
        return self

    def __reduce__(self):
        # Process groups cannot be pickled (torch.save of a whole model): the copy gets a placeholder that says
        # so as soon as it is used for a collective, never a silent single-rank run.
        if self.group is None:
            return (CPGroup, (None, self.size, self.rank))
        return (CPGroup, (UNPICKLED_GROUP, self.size, self.rank))


class _UnpickledGroup:
    """Stands in for the process group of a CP model that was pickled and loaded again."""

    def __repr__(self) -> str:
        return "UNPICKLED_GROUP"

    def __reduce__(self) -> str:
        return "UNPICKLED_GROUP"


UNPICKLED_GROUP = _UnpickledGroup()
"""The group of a context-parallel model restored by ``pickle`` / ``torch.load``: collectives on it raise and
say to call :func:`mamba_cp.parallelize` again (process groups are not saved)."""


def resolve_cp_group(cp_group: object) -> CPGroup:
    """Turn what users pass as the CP group into a :class:`CPGroup`.

    Accepted: a ``ProcessGroup``; a 1-D ``DeviceMesh``; a :class:`CPGroup`; ``1`` (CP off); ``None`` (CP off,
    but only once ``torch.distributed`` is initialised: before that ``dist.group.WORLD`` is None too, so a
    ``None`` there is refused rather than silently turning CP off); and any object with ``size()`` and
    ``rank()`` methods (NeMo's unit tests pass such a stand-in: enough for construction and slicing; a
    collective on it raises ``TypeError``).

    Raises ``ValueError`` for a mesh that is not one-dimensional, ``None`` before ``init_process_group`` and
    sizes or ranks out of range; ``TypeError`` for anything else.
    """
    if isinstance(cp_group, CPGroup):
        return cp_group
    if cp_group is None:
        if dist.is_available() and not dist.is_initialized():
            raise ValueError(
                "cp_group is None and torch.distributed is not initialised: dist.group.WORLD is None before "
                "init_process_group, so this would silently turn context parallelism off. Call "
                "init_process_group first, or pass cp_group=1 to run without CP"
            )
        return CPGroup(group=None, size=1, rank=0)
    if isinstance(cp_group, int) and not isinstance(cp_group, bool):
        if cp_group != 1:
            raise ValueError(f"an integer cp_group means 'no CP' and must be 1, got {cp_group}; pass a process group")
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
    if callable(getattr(cp_group, "size", None)) and callable(getattr(cp_group, "rank", None)):
        size, rank = int(cp_group.size()), int(cp_group.rank())
        if size < 1 or not 0 <= rank < size:
            raise ValueError(f"cp_group.size() ({size}) must be >= 1 and cp_group.rank() ({rank}) in [0, size)")
        return CPGroup(group=cp_group, size=size, rank=rank)
    raise TypeError(
        "cp_group must be a torch.distributed ProcessGroup, a 1-D DeviceMesh, 1 or None (no CP), or an object "
        f"with size() and rank(), got {type(cp_group)!r}"
    )
