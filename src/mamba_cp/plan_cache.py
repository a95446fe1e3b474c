"""One cache for everything built once per batch: token plans, segment plans, attention masks.

Every layer of a model asks for the objects of the batch it is running on; the first layer builds them
(validating the batch, the one host read of ``cu_seqlens``) and the others get the same objects back.
``parallelize`` makes one :class:`PlanCache` per call and hands it to every strategy and attention layer it
creates, so a step builds each plan once however many layers share it.

Keys. Shape-only plans (BSHD) are keyed by their arguments. Packed plans also depend on the values of
``cu_seqlens``:

* a ``cu_seqlens`` on the CPU (the usual case: the collator's tensor) is keyed by its **values**, read
  without any device involved, so a tensor changed in place by any route (``.data``, a NumPy view, an
  optimizer-style in-place op) gets a new plan;
* a ``cu_seqlens`` on a GPU is keyed by the tensor object (held weakly) and its version counter: reading
  its values on every layer would wait for the device. The contract is that such a tensor is not changed
  in place behind autograd's back (through ``.data`` or DLPack) while it is in use; debug mode
  (``MAMBA_CP_DEBUG=1``) checks the values against the plan on every call.
"""

from __future__ import annotations

import sys
import weakref
from collections.abc import Callable, Hashable
from typing import TypeVar

import torch

from .validation import check_packed_layout

T = TypeVar("T")


def cu_seqlens_key(cu_seqlens: torch.Tensor | None) -> tuple[Hashable, weakref.ref | None]:
    """``(key, source)`` for a batch's ``cu_seqlens``: its values when it lives on the CPU, else its version
    counter plus a weak reference to the tensor (``source``), which must still be the same object on a hit."""
    if cu_seqlens is None:
        return ("bshd",), None
    if cu_seqlens.device.type == "cpu":
        # .numpy() reads the host buffer directly: no aten op, no device, and it sees .data / NumPy writes.
        values = cu_seqlens.detach().contiguous().numpy().tobytes()
        return ("thd", str(cu_seqlens.dtype), values), None
    return ("thd", "device", cu_seqlens._version), weakref.ref(cu_seqlens)


class PlanCache:
    """The per-batch objects of recent batches, most recently used first.

    ``get(kind, key, cu_seqlens, build)`` returns the cached object for ``(kind, key, cu_seqlens)`` or calls
    ``build()`` (which validates the batch and may raise ``ValueError``) and remembers its result. ``builds``
    counts the calls to ``build`` per kind (tests use it to prove per-batch reuse).
    """

    def __init__(self, capacity: int = 16, packed_layout: str = "sequences") -> None:
        self.capacity = capacity
        self.packed_layout = check_packed_layout(packed_layout)
        """How the model's packed batches are cut over the ranks (fixed per model: every plan built from this cache
        is in it; see :data:`~mamba_cp.validation.PACKED_LAYOUTS`)."""
        self._entries: list[tuple[tuple, weakref.ref | None, object]] = []
        self._pinned: dict[tuple, object] = {}
        self.builds: dict[str, int] = {}

    def get(self, kind: str, key: tuple, cu_seqlens: torch.Tensor | None, build: Callable[[], T]) -> T:
        batch_key, source = cu_seqlens_key(cu_seqlens)
        full_key = (kind, key, batch_key)
        for i, (entry_key, entry_source, value) in enumerate(self._entries):
            if entry_key == full_key and (entry_source is None or entry_source() is cu_seqlens):
                self._entries.insert(0, self._entries.pop(i))
                return value  # type: ignore[return-value]
        value = build()
        self.builds[kind] = self.builds.get(kind, 0) + 1
        self._entries.insert(0, (full_key, source, value))
        del self._entries[self.capacity :]
        return value

    def keys(self, kind: str) -> list[tuple]:
        """The keys of the cached objects of ``kind``, most recently used first."""
        return [key for (entry_kind, key, _), _, _ in self._entries if entry_kind == kind]

    def pin(self, name: tuple, value: T) -> T:
        """Make ``value`` the current batch's object called ``name`` (e.g. ``("token",)``) and return it.

        Every eager lookup pins what it returns; :func:`mamba_cp.prepare_batch` pins a whole model's objects
        before a compiled call. Code traced by ``torch.compile`` reads them with :meth:`pinned`, since no cache
        lookup (host reads of ``cu_seqlens``, weak references) can run inside a graph; the objects are plain data
        (frozen dataclasses of tensors and ints), so a new batch of the same shapes needs no recompilation.
        """
        self._pinned[name] = value
        return value

    def pinned(self, name: tuple):
        """The current batch's object called ``name`` (see :meth:`pin`)."""
        value = self._pinned.get(name)
        if value is None:
            raise RuntimeError(
                f"mamba_cp: no batch plan {name} was prepared for this compiled call: call "
                "mamba_cp.prepare_batch(model, hidden_states_or_ids, cu_seqlens) before it each step (transformers "
                "models parallelized by mamba_cp do it in their forward pre-hook; compile their layers, not the model)"
            )
        return value

    def clear(self) -> None:
        """Forget every cached and pinned object."""
        self._entries.clear()
        self._pinned.clear()

    def __deepcopy__(self, memo: dict) -> PlanCache:
        # A copy of a model starts with an empty cache (plans are rebuilt on first use): no tensors are copied.
        copy = PlanCache(self.capacity)
        memo[id(self)] = copy
        return copy

    def __getstate__(self) -> dict:
        return {"capacity": self.capacity}

    def __setstate__(self, state: dict) -> None:
        self.__init__(state["capacity"])


def varying(t: torch.Tensor) -> torch.Tensor:
    """``t`` (returned) with its dim 0 marked dynamic for ``torch.compile``: an index list whose length follows the
    batch's documents, so a new pack reuses the compiled graph instead of compiling again for each length."""
    # Only once torch.compile has loaded the compiler (torch.compile(...) imports it when wrapping, before any plan
    # is built): importing it from eager code would keep the default process group alive past
    # destroy_process_group, and an eager run reads no marks.
    dynamo = sys.modules.get("torch._dynamo")
    if dynamo is not None and t.dim() and t.shape[0] > 1:  # sizes 0 and 1 are specialised whatever the mark
        dynamo.maybe_mark_dynamic(t, 0)
    return t
