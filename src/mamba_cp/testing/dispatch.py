"""A dispatch mode that records the collectives and host syncs a region of code issues.

A *host sync* is an op that makes the host wait for a value computed on the device: reading a scalar
(``.item()``, ``int()``, ``bool()``), an op whose output size depends on tensor values (``nonzero``, a boolean
mask index, ``unique``, ``repeat_interleave`` without ``output_size``...), an op that returns a Python value
computed from tensors (``torch.equal``, ``torch.allclose``), or a copy from the device to the host.

The tests run on CPU, where nothing waits for anything: :class:`OpRecorder` therefore flags the *ops* that
would make a GPU run wait, by op name and argument kinds, not actual waits. Most are seen at the dispatcher
(below autograd, so backward ops count too). Some host reads never reach the dispatcher on a CPU tensor and are
seen one level up, as ``torch.Tensor`` method calls (wrapped while a recorder is active, forward and backward):

* ``.tolist()``, ``.numpy()`` and ``__array__`` read CPU memory directly (on a GPU they copy to the host first);
* ``.cpu()`` and ``.to("cpu")`` of a CPU tensor return the tensor itself (on a GPU they are a device-to-host
  copy): they are flagged as ``to_cpu`` whenever the call names the CPU (``.cpu()``, or ``"cpu"`` as a string),
  and whenever a tensor that is not on the CPU is moved there. ``.to(t.device)`` with ``t`` on the CPU is not
  flagged on a CPU run (the device object cannot tell a literal CPU from "wherever ``t`` lives").

Tensors that live in host memory in the real run too (a collator's CPU ``cu_seqlens``) can be declared with
``OpRecorder(host_tensors=...)``: reading them waits for no device, and is not counted.

Not seen: explicit waits that are not tensor ops (``torch.cuda.synchronize()``, ``Event.synchronize()``,
``Stream.synchronize()``) and host reads inside custom C++/Triton kernels that do not dispatch.
"""

from __future__ import annotations

import functools
import os
import traceback
from collections import Counter
from collections.abc import Iterable

import torch
from torch.utils._python_dispatch import TorchDispatchMode

HOST_SYNC_OPS = frozenset(
    {
        "aten._local_scalar_dense",  # .item(), int(t), float(t), bool(t), t.__index__()
        "aten.is_nonzero",  # bool(t) through the op
        "aten.nonzero",  # also torch.where(cond) and argwhere
        "aten.nonzero_numpy",
        "aten.masked_select",
        "aten._unique",
        "aten._unique2",  # torch.unique
        "aten.unique_dim",
        "aten.unique_consecutive",
        "aten.unique_dim_consecutive",
        "aten.equal",  # torch.equal returns a Python bool
        "aten.allclose",  # returns a Python bool
        "aten.bincount",  # the output length is max(input) + 1
    }
)
"""Ops that make the host wait for a device value whatever their arguments (the output size or a Python value
depends on tensor values). Conditional ones: see :func:`host_sync_name`."""

_INDEX_OPS = frozenset({"aten.index", "aten.index_put", "aten.index_put_", "aten._index_put_impl_"})
_REPEAT_INTERLEAVE = "aten.repeat_interleave"
_COPIES = frozenset({"aten._to_copy", "aten.copy_"})


def host_sync_name(name: str, args: tuple, kwargs: dict) -> str | None:
    """The name to report when the op ``name`` (an overload packet, ``"aten.nonzero"``) called with ``args`` and
    ``kwargs`` would make the host wait for the device; None when it would not."""
    if name in HOST_SYNC_OPS:
        return name
    if name in _INDEX_OPS:  # a boolean mask index is a nonzero() first: its output size depends on the mask
        indices = args[1] if len(args) > 1 else kwargs.get("indices", ())
        if any(isinstance(i, torch.Tensor) and i.dtype in (torch.bool, torch.uint8) for i in indices or ()):
            return f"{name} (boolean mask)"
        return None
    if name == _REPEAT_INTERLEAVE:  # overloads .Tensor(repeats) and .self_Tensor(self, repeats): the output size is
        # read from the repeats unless output_size is given (.self_int has a Python int: no sync)
        repeats = args[1] if len(args) > 1 else (args[0] if args else kwargs.get("repeats"))
        if isinstance(repeats, torch.Tensor) and kwargs.get("output_size") is None:
            return f"{name} (no output_size)"
        return None
    if name == "aten.histc":  # min == max (the default 0, 0): the range is read from the data
        lo = args[2] if len(args) > 2 else kwargs.get("min", 0)
        hi = args[3] if len(args) > 3 else kwargs.get("max", 0)
        return f"{name} (range from the data)" if lo == hi else None
    if name in _COPIES:
        return "to_cpu" if _device_to_host(name, args, kwargs) else None
    return None


def _on_device(t: object) -> bool:
    return isinstance(t, torch.Tensor) and t.device.type not in ("cpu", "meta")


def _device_to_host(name: str, args: tuple, kwargs: dict) -> bool:
    """A copy from a device tensor into host memory (seen only when the run has a device)."""
    if name == "aten.copy_":  # copy_(dst, src)
        return (
            len(args) > 1 and isinstance(args[0], torch.Tensor) and args[0].device.type == "cpu" and _on_device(args[1])
        )
    device = kwargs.get("device")
    return device is not None and torch.device(device).type == "cpu" and bool(args) and _on_device(args[0])


def _first_caller() -> str:
    """``file:line in function`` of the innermost frame outside torch and this module: the code that synced."""
    torch_dir = os.path.dirname(torch.__file__) + os.sep
    for frame in reversed(traceback.extract_stack()[:-2]):
        if frame.filename.startswith(torch_dir) or frame.filename == __file__:
            continue
        try:
            where = os.path.relpath(frame.filename)
        except ValueError:  # another drive (Windows)
            where = frame.filename
        if where.startswith(".." + os.sep):
            where = frame.filename
        return f"{where}:{frame.lineno} in {frame.name}"
    return "<unknown>"


_MISSING = object()


def _method_event(name: str, t: torch.Tensor, args: tuple, kwargs: dict) -> str | None:
    """The host-sync event of the ``torch.Tensor`` method ``name`` called on ``t``, or None."""
    if name in ("tolist", "numpy", "__array__"):
        return f"Tensor.{name}"
    if name == "cpu":
        return "to_cpu"
    if name == "to":  # to(device), to(device, dtype), to(tensor), to(dtype), to(device=...)
        target = kwargs.get("device", args[0] if args else None)
        if isinstance(target, str) and torch.device(target).type == "cpu":
            return "to_cpu"  # a literal "cpu": a device-to-host copy on a GPU run
        if isinstance(target, torch.device | torch.Tensor) and _device_type(target) == "cpu" and _on_device(t):
            return "to_cpu"
    return None


def _device_type(target: torch.device | torch.Tensor) -> str:
    return target.device.type if isinstance(target, torch.Tensor) else target.type


class _HostReadMethods:
    """Wraps the ``torch.Tensor`` methods that read a tensor on the host without dispatching any op on a CPU
    tensor (``tolist``, ``numpy``, ``__array__``, ``cpu``, ``to``) while a recorder is active; restores them on
    exit. Wrapping the class, not a ``TorchFunctionMode``, because autograd runs ``Function.backward`` and tensor
    hooks without Python function modes: a mode would miss every such read in backward. The ops these methods
    dispatch themselves (on a GPU, the copy to the host) are not counted again."""

    NAMES = ("tolist", "numpy", "__array__", "cpu", "to")

    def __init__(self, recorder: OpRecorder) -> None:
        self.recorder = recorder
        self._saved: dict[str, object] = {}

    def __enter__(self) -> None:
        self._saved = {name: torch.Tensor.__dict__.get(name, _MISSING) for name in self.NAMES}
        for name in self.NAMES:
            setattr(torch.Tensor, name, self._wrap(name, getattr(torch.Tensor, name)))

    def __exit__(self, *exc) -> None:
        for name, saved in self._saved.items():
            if saved is _MISSING:
                delattr(torch.Tensor, name)
            else:
                setattr(torch.Tensor, name, saved)

    def _wrap(self, name: str, original):
        recorder = self.recorder

        @functools.wraps(original)
        def method(t, *args, **kwargs):
            event = _method_event(name, t, args, kwargs)
            if event is None or recorder.reads_host_memory((t,)):
                return original(t, *args, **kwargs)
            recorder._record_sync(event)
            recorder._quiet += 1  # its own device-to-host copy is the same sync
            try:
                return original(t, *args, **kwargs)
            finally:
                recorder._quiet -= 1

        return method


class OpRecorder(TorchDispatchMode):
    """Counts the ``c10d`` collectives and the host syncs dispatched inside the ``with`` block.

    ``host_tensors``: tensors that live in host memory in the real (GPU) run too, such as a collator's CPU
    ``cu_seqlens``; reads of them (or of views of them) are not host syncs and are not counted.

    ``collectives`` maps op names (``"c10d.alltoall_base_"``) to counts. ``syncs`` maps each host-sync event
    (``"aten._local_scalar_dense"``, ``"aten.index (boolean mask)"``, ``"to_cpu"``, ``"Tensor.tolist"``...; see the
    module docstring for what a CPU run can see) to its count, and ``sync_sites`` to the first place in user code
    that issued it; ``host_syncs`` is their total and :meth:`sync_report` says what synced, for a failure message.
    Ops issued in autograd's backward are recorded too when the backward runs inside the block.
    """

    def __init__(self, host_tensors: Iterable[torch.Tensor] = ()) -> None:
        super().__init__()
        self._host = [t for t in host_tensors if t is not None]  # held: their storage cannot be reused meanwhile
        self._host_storages = {t.untyped_storage().data_ptr() for t in self._host}
        self.collectives: Counter[str] = Counter()
        self.collective_bytes: Counter[str] = Counter()
        """Bytes of the tensors handed to each collective (an all-to-all's whole send buffer)."""
        self.syncs: Counter[str] = Counter()
        self.sync_sites: dict[str, str] = {}
        self._quiet = 0
        self._methods = _HostReadMethods(self)

    def __enter__(self):
        self._methods.__enter__()
        try:
            return super().__enter__()
        except BaseException:
            self._methods.__exit__(None, None, None)
            raise

    def __exit__(self, exc_type, exc_value, tb):
        try:
            return super().__exit__(exc_type, exc_value, tb)
        finally:
            self._methods.__exit__(exc_type, exc_value, tb)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = str(func.overloadpacket)
        if name.startswith("c10d."):
            self.collectives[name] += 1
            self.collective_bytes[name] += _input_bytes(name, args)
        elif not self._quiet:
            event = host_sync_name(name, args, kwargs)
            if event is not None and not self.reads_host_memory(args):
                self._record_sync(event)
        return func(*args, **kwargs)

    def reads_host_memory(self, args: tuple) -> bool:
        """Whether every tensor in ``args`` is (a view of) one of the ``host_tensors``: reading those waits for
        no device, on a GPU run too."""
        if not self._host_storages:
            return False
        tensors = [a for a in args if isinstance(a, torch.Tensor)]
        tensors += [t for a in args if isinstance(a, list | tuple) for t in a if isinstance(t, torch.Tensor)]
        try:
            return bool(tensors) and all(
                t.device.type == "cpu" and t.untyped_storage().data_ptr() in self._host_storages for t in tensors
            )
        except (RuntimeError, NotImplementedError):  # a tensor subclass without a plain storage: not host memory
            return False

    def _record_sync(self, event: str) -> None:
        self.syncs[event] += 1
        self.sync_sites.setdefault(event, _first_caller())

    @property
    def host_syncs(self) -> int:
        """Number of host-sync events recorded."""
        return sum(self.syncs.values())

    def sync_report(self) -> str:
        """``"no host sync"`` or one line per event: name, count and the first place that issued it."""
        if not self.syncs:
            return "no host sync"
        return "; ".join(f"{op} x{n} (first at {self.sync_sites[op]})" for op, n in self.syncs.most_common())

    @property
    def all_to_all_bytes(self) -> int:
        """Bytes of all-to-all send buffers recorded (the off-rank share is ``(cp - 1) / cp`` of it)."""
        return sum(n for op, n in self.collective_bytes.items() if "alltoall" in op)

    @property
    def all_to_alls(self) -> int:
        """Number of all-to-all collectives recorded."""
        return sum(n for op, n in self.collectives.items() if "alltoall" in op)


def _input_bytes(name: str, args: tuple) -> int:
    """Bytes a collective is handed to send: its input tensor.

    The single-tensor ``*_base_`` ops (all-to-all, all-gather, reduce-scatter) take ``(output, input, ...)``;
    the list ops take their tensors first.
    """
    tensors = [a for a in args if isinstance(a, torch.Tensor)]
    if name.endswith("_base_") and len(tensors) >= 2:
        return tensors[1].numel() * tensors[1].element_size()
    flat = [t for a in args if isinstance(a, list | tuple) for t in a if isinstance(t, torch.Tensor)]
    return sum(t.numel() * t.element_size() for t in (tensors or flat)[:1])


def warm_up() -> None:
    """Pay the one-time cost (~0.7 s of lazy imports) of the first dispatch mode over factory ops.

    Call it in a parent process before forking ranks, so that each forked rank does not pay it again.
    """
    with OpRecorder():
        torch.nn.Linear(2, 2)
