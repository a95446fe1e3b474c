"""The collectives every strategy uses, with one error contract.

Shape legend: ``cp`` ranks in the group, ``n`` elements per rank.

* :func:`start_all_to_all` / :func:`all_to_all`: equal-split ``all_to_all_single`` of a ``[cp, ...]`` buffer
  (block ``r`` goes to rank ``r``), asynchronous or not; :class:`AllToAll` is its autograd form (an equal-split
  all-to-all is its own adjoint).
* :func:`all_gather`: ``[n]`` from every rank -> ``[cp, n]``, differentiable (backward: a reduce-scatter).
* :func:`check_same_batch`: one tiny all-gather that makes every rank raise the same error when the ranks
  describe different batches (run once per batch, when its plan is built).

The autograd forms are twice differentiable: each backward is again a differentiable collective.

A failure in any of them (a peer that raised, crashed, stalled or sent a buffer of another size) reaches the
user as one ``RuntimeError`` that names the collective, the direction, this rank, the local buffer's shape
and the likely cause (:func:`collective_error`), whatever the strategy. A group object that cannot run
collectives (NeMo's unit tests construct the spec class with a stand-in that has only ``size()`` and
``rank()``) raises a ``TypeError`` saying so when a collective is first needed.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.distributed as dist
import torch.distributed._functional_collectives as funcol

from .groups import UNPICKLED_GROUP, GroupRef
from .validation import ConfigError

_all_gather_single = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
_reduce_scatter_single = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor


def require_process_group(group: object, op: str) -> dist.ProcessGroup:
    """``group`` when it can run collectives; ``TypeError`` naming ``op`` otherwise."""
    if isinstance(group, dist.ProcessGroup):
        return group
    if group is UNPICKLED_GROUP:
        raise RuntimeError(
            f"mamba_cp {op}: this model was made context-parallel, then pickled and loaded again (torch.save / "
            "torch.load of the whole model, or pickle); process groups are not saved. Call "
            "mamba_cp.parallelize(model, cp_group) again after loading (or save the state_dict instead)"
        )
    raise TypeError(
        f"mamba_cp {op} needs a torch.distributed ProcessGroup, but the CP group is {type(group).__name__!r}, "
        "which only provides size() and rank() (enough for construction and parameter slicing); pass a real "
        "process group to run collectives"
    )


def collective_error(err: Exception, group: dist.ProcessGroup, op: str, direction: str, shape: Sequence[int]):
    """The ``RuntimeError`` a failed collective raises on this rank (``raise collective_error(...) from err``)."""
    try:
        rank, size = dist.get_rank(group), dist.get_world_size(group)
        where = f"CP rank {rank} of {size}"
    except Exception:  # noqa: BLE001 - the group itself may be gone (destroyed, aborted)
        where = "a CP rank whose process group is no longer usable"
    return RuntimeError(
        f"mamba_cp {op} ({direction}) failed on {where} with a local buffer of shape {tuple(shape)}: another rank "
        "probably raised, crashed or passed a batch of another shape (MAMBA_CP_DEBUG=1 checks shapes and "
        f"cu_seqlens across ranks first). Cause: {err}"
    )


class PendingCollective:
    """A collective in flight: :meth:`wait` makes the current stream wait for it and returns its output."""

    __slots__ = ("_work", "output", "_group", "_op", "_direction")

    def __init__(self, work, output: torch.Tensor, group: dist.ProcessGroup, op: str, direction: str) -> None:
        self._work, self.output, self._group, self._op, self._direction = work, output, group, op, direction

    def wait(self) -> torch.Tensor:
        """The collective's output, valid once this returns (use the returned tensor: under ``torch.compile`` it
        is a new one)."""
        if self._work is None:  # traced (torch.compile): a functional collective, waited where the graph says
            return torch.ops._c10d_functional.wait_tensor(self.output)
        work, self._work = self._work, None  # drop the Work object once waited on: nothing outlives the step
        try:
            work.wait()
        except RuntimeError as err:  # gloo reports a dead or stalled peer here, NCCL at its watchdog
            raise collective_error(err, self._group, self._op, self._direction, self.output.shape) from err
        return self.output


def start_all_to_all(send: torch.Tensor, group: object, direction: str) -> PendingCollective:
    """Launch an equal-split all-to-all of ``send`` ``[cp, ...]`` (block ``r`` to rank ``r``) without waiting.

    Work queued on the current stream before :meth:`PendingCollective.wait` overlaps the transfer; ``wait``
    returns the output, shaped like ``send``. Under ``torch.compile`` it is a functional collective (traceable:
    the graph keeps the wait where :meth:`~PendingCollective.wait` is called, after the work meant to overlap).
    """
    pg = require_process_group(group, "all-to-all")
    send = send.contiguous()
    if torch.compiler.is_compiling():
        # The functional op itself, not funcol.all_to_all_single: that wrapper waits at once while tracing, and the
        # graph would then lose the overlap.
        splits = [send.shape[0] // dist.get_world_size(pg)] * dist.get_world_size(pg)
        recv = torch.ops._c10d_functional.all_to_all_single(send, splits, splits, pg.group_name)
        return PendingCollective(None, recv, pg, "all-to-all", direction)
    recv = torch.empty_like(send)
    try:
        work = dist.all_to_all_single(recv, send, group=pg, async_op=True)
    except RuntimeError as err:
        raise collective_error(err, pg, "all-to-all", direction, send.shape) from err
    return PendingCollective(work, recv, pg, "all-to-all", direction)


def all_to_all(send: torch.Tensor, group: object, direction: str = "forward") -> torch.Tensor:
    """Equal-split all-to-all of ``send`` ``[cp, ...]``, waited on (not differentiable: see :class:`AllToAll`)."""
    return start_all_to_all(send, group, direction).wait()


class AllToAll(torch.autograd.Function):
    """Autograd-aware equal-split all-to-all along dim 0; backward is the same all-to-all of the gradient,
    itself differentiable, so double backward (``create_graph=True``) is exact."""

    @staticmethod
    def forward(ctx, input_: torch.Tensor, group: dist.ProcessGroup) -> torch.Tensor:
        ctx.group = GroupRef(group)  # weakly: a graph kept alive must not keep the group alive
        return all_to_all(input_, group, "forward")

    @staticmethod
    def backward(ctx, grad_output: torch.Tensor):
        return AllToAll.apply(grad_output, ctx.group()), None


def _all_gather_into(flat: torch.Tensor, group: dist.ProcessGroup, direction: str) -> torch.Tensor:
    size = dist.get_world_size(group)
    if torch.compiler.is_compiling():  # traceable: a functional collective
        return funcol.wait_tensor(funcol.all_gather_tensor(flat.contiguous(), 0, group)).view(size, flat.numel())
    out = flat.new_empty(size * flat.numel())
    try:
        _all_gather_single(out, flat.contiguous(), group=group)
    except RuntimeError as err:
        raise collective_error(err, group, "all-gather", direction, flat.shape) from err
    return out.view(size, flat.numel())


def _reduce_scatter_rows(rows: torch.Tensor, group: dist.ProcessGroup, direction: str) -> torch.Tensor:
    if torch.compiler.is_compiling():  # traceable: a functional collective
        return funcol.wait_tensor(funcol.reduce_scatter_tensor(rows.contiguous().view(-1), "sum", 0, group))
    out = rows.new_empty(rows.shape[1])
    try:
        _reduce_scatter_single(out, rows.contiguous().view(-1), group=group)
    except RuntimeError as err:
        raise collective_error(err, group, "reduce-scatter", direction, rows.shape) from err
    return out


class _AllGather(torch.autograd.Function):
    """``[n]`` -> ``[cp, n]`` (row ``r`` from rank ``r``). Every rank may use every row, so the gradient of rank
    ``r``'s input is the sum over ranks of their gradients of row ``r``: a reduce-scatter (:class:`_ReduceScatter`,
    whose own backward is this all-gather: double backward is exact)."""

    @staticmethod
    def forward(ctx, flat: torch.Tensor, group: dist.ProcessGroup) -> torch.Tensor:
        ctx.group = GroupRef(group)  # weakly: a graph kept alive must not keep the group alive
        return _all_gather_into(flat, group, "forward")

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return _ReduceScatter.apply(grad, ctx.group()), None


class _ReduceScatter(torch.autograd.Function):
    """``[cp, n]`` -> ``[n]``: on rank ``r`` the sum over ranks of their row ``r`` (the adjoint of
    :class:`_AllGather`)."""

    @staticmethod
    def forward(ctx, rows: torch.Tensor, group: dist.ProcessGroup) -> torch.Tensor:
        ctx.group = GroupRef(group)
        return _reduce_scatter_rows(rows, group, "backward")

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return _AllGather.apply(grad, ctx.group()), None


def all_gather(t: torch.Tensor, group: object | None) -> torch.Tensor:
    """``t`` (any shape, flattened) from every rank: ``[cp, t.numel()]``, differentiable.

    ``group=None`` (a single rank) returns ``t`` as one row.
    """
    flat = t.reshape(-1)
    if group is None:
        return flat[None]
    return _AllGather.apply(flat, require_process_group(group, "all-gather"))


def check_same_batch(group: object, fingerprint: list[int], describe) -> None:
    """``ConfigError`` on every rank unless every rank of ``group`` passes the same ``fingerprint`` (a few ints
    describing its batch: layout, lengths, a hash of ``cu_seqlens``); ``describe(row)`` words one rank's row.

    One all-gather of ``len(fingerprint)`` int64 and one host read: run it once per batch, where the batch's
    plan is built, never per layer. Every rank receives the same rows, so every rank makes the same decision.
    """
    pg = require_process_group(group, "batch check")
    mine = torch.tensor(fingerprint, dtype=torch.int64)
    if dist.get_backend(pg) == "nccl":  # NCCL moves device memory only
        mine = mine.to(torch.device("cuda", torch.cuda.current_device()))
    rows = _all_gather_into(mine, pg, "batch check").tolist()
    if any(row != rows[0] for row in rows):
        seen = ", ".join(f"rank {r}: {describe(row)}" for r, row in enumerate(rows))
        raise ConfigError(
            f"the CP ranks passed different batches ({seen}); every rank must pass its head-tail shard of the same "
            "batch (same local length, the same cu_seqlens or none on every rank)"
        )
