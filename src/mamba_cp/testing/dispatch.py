"""A dispatch mode that records the collectives and host syncs a region of code issues."""

from __future__ import annotations

from collections import Counter

from torch.utils._python_dispatch import TorchDispatchMode

HOST_SYNC_OPS = ("aten._local_scalar_dense",)
"""Ops that copy a device value to the host (``.item()``, ``.tolist()``, ``bool(tensor)``, ``int(tensor)``)."""


class OpRecorder(TorchDispatchMode):
    """Counts the ``c10d`` collectives and host-sync ops dispatched inside the ``with`` block.

    ``collectives`` maps op names (``"c10d.alltoall_base_"``) to counts; ``host_syncs`` counts reads of
    tensor values into Python. Collectives issued in autograd's backward are recorded too when the
    backward runs inside the block.
    """

    def __init__(self) -> None:
        super().__init__()
        self.collectives: Counter[str] = Counter()
        self.collective_bytes: Counter[str] = Counter()
        """Bytes of the tensors handed to each collective (an all-to-all's whole send buffer)."""
        self.host_syncs = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = str(func.overloadpacket)
        if name.startswith("c10d."):
            self.collectives[name] += 1
            self.collective_bytes[name] += _input_bytes(name, args)
        elif name in HOST_SYNC_OPS:
            self.host_syncs += 1
        return func(*args, **(kwargs or {}))

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
    import torch

    tensors = [a for a in args if isinstance(a, torch.Tensor)]
    if name.endswith("_base_") and len(tensors) >= 2:
        return tensors[1].numel() * tensors[1].element_size()
    flat = [t for a in args if isinstance(a, list | tuple) for t in a if isinstance(t, torch.Tensor)]
    return sum(t.numel() * t.element_size() for t in (tensors or flat)[:1])


def warm_up() -> None:
    """Pay the one-time cost (~0.7 s of lazy imports) of the first dispatch mode over factory ops.

    Call it in a parent process before forking ranks, so that each forked rank does not pay it again.
    """
    import torch

    with OpRecorder():
        torch.nn.Linear(2, 2)
