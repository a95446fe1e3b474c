"""All-to-all transport between the sequence-sharded and the head-sharded layouts.

Shape legend: ``B`` batch, ``L`` global tokens per row, ``L_local = L / cp``, ``W`` full width,
``W_local = W / cp``; for packed batches ``B = 1`` and ``L = T``.

``seq_to_heads`` and ``heads_to_seq`` are the hot path: any number of tensors travel in ONE collective
each way, and the head-tail undo/redo plus the packed-sequence interleaving are a single row gather by the
batch's :class:`~mamba_cp.layout.TokenPlan`. The spec's ``all_to_all_cp2hp`` / ``all_to_all_hp2cp`` (one
tensor, rank-major order, no reorder) are kept for API compatibility.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
import torch.distributed as dist

from .layout import TokenPlan, permute_rows
from .validation import check_divisible


class AllToAll(torch.autograd.Function):
    """Autograd-aware ``all_to_all_single`` with equal splits along dim 0.

    With equal splits the all-to-all is its own adjoint: the backward pass is one more all-to-all of the
    gradient on the same group.
    """

    @staticmethod
    def forward(ctx, input_: torch.Tensor, group: dist.ProcessGroup) -> torch.Tensor:
        ctx.group = group
        return _exchange(input_, group, "forward")

    @staticmethod
    def backward(ctx, grad_output: torch.Tensor):
        return _exchange(grad_output, ctx.group, "backward"), None


def _exchange(input_: torch.Tensor, group: dist.ProcessGroup, direction: str) -> torch.Tensor:
    """``all_to_all_single`` with equal splits; a failure says where it happened and what likely caused it."""
    return start_exchange(input_, group, direction)[1].wait()


def _exchange_error(err: Exception, group: dist.ProcessGroup, direction: str, shape) -> RuntimeError:
    rank, size = dist.get_rank(group), dist.get_world_size(group)
    return RuntimeError(
        f"mamba_cp all-to-all ({direction}) failed on CP rank {rank} of {size} with a local buffer of shape "
        f"{shape}: another rank probably raised, crashed or passed a batch of another shape "
        f"(MAMBA_CP_DEBUG=1 checks shapes and cu_seqlens across ranks first). Cause: {err}"
    )


class PendingExchange:
    """An all-to-all in flight: :meth:`wait` makes the current stream wait for it and returns its output."""

    def __init__(self, work, output: torch.Tensor, group: dist.ProcessGroup, direction: str) -> None:
        self._work, self.output, self._group, self._direction = work, output, group, direction

    def wait(self) -> torch.Tensor:
        try:
            self._work.wait()
        except RuntimeError as err:  # gloo reports a dead or stalled peer here, NCCL at the watchdog
            raise _exchange_error(err, self._group, self._direction, tuple(self.output.shape)) from err
        return self.output


def start_exchange(
    input_: torch.Tensor, group: dist.ProcessGroup, direction: str
) -> tuple[torch.Tensor, PendingExchange]:
    """Launch an equal-split ``all_to_all_single`` of ``input_`` (block ``r`` of dim 0 to rank ``r``) without
    waiting: work queued on the current stream before :meth:`PendingExchange.wait` overlaps the transfer.

    Returns the (not yet valid) output buffer and the pending exchange.
    """
    input_ = input_.contiguous()
    output = torch.empty_like(input_)
    try:
        work = dist.all_to_all_single(output, input_, group=group, async_op=True)
    except RuntimeError as err:  # a peer died, timed out, or sent a different shape
        raise _exchange_error(err, group, direction, tuple(input_.shape)) from err
    return output, PendingExchange(work, output, group, direction)


def all_to_all(input_: torch.Tensor, group: dist.ProcessGroup) -> torch.Tensor:
    """All-to-all of ``input_`` (``[cp * n, ...]``, block ``r`` goes to rank ``r``), differentiable."""
    size = dist.get_world_size(group)
    check_divisible(input_.shape[0], size, "all_to_all input's dim 0", "the group size")
    return AllToAll.apply(input_, group)


def _as_batch_first(input_: torch.Tensor) -> tuple[torch.Tensor, bool]:
    if input_.dim() == 2:
        return input_.unsqueeze(0), True
    if input_.dim() != 3:
        raise ValueError(f"expected [B, L, W] or packed [T, W], got shape {tuple(input_.shape)}")
    return input_, False


def all_to_all_cp2hp(input_: torch.Tensor, cp_group: dist.ProcessGroup, batch_size: int | None = None) -> torch.Tensor:
    """Sequence-sharded ``[B, L_local, W]`` (or ``[T_local, W]``) to hidden-sharded ``[B, L, W_local]``.

    The result's sequence dim is rank-major: rank 0's local tokens, then rank 1's, ...; no reorder.
    ``batch_size`` is accepted for compatibility with the spec and checked when given.
    """
    x, squeeze = _as_batch_first(input_)
    cp = dist.get_world_size(cp_group)
    b, l_local, width = x.shape
    if batch_size is not None and batch_size != b:
        raise ValueError(f"batch_size ({batch_size}) does not match the input's batch dim ({b})")
    check_divisible(width, cp, "hidden width", "cp_size")
    send = x.reshape(b * l_local, cp, width // cp).transpose(0, 1)  # [cp, B*L_local, W_local]
    recv = all_to_all(send, cp_group).view(cp, b, l_local, width // cp)
    out = recv.transpose(0, 1).reshape(b, cp * l_local, width // cp)
    return out.squeeze(0) if squeeze else out


def all_to_all_hp2cp(input_: torch.Tensor, cp_group: dist.ProcessGroup, batch_size: int | None = None) -> torch.Tensor:
    """Hidden-sharded ``[B, L, W_local]`` (rank-major sequence) to sequence-sharded ``[B, L_local, W]``.

    Inverse of :func:`all_to_all_cp2hp`.
    """
    x, squeeze = _as_batch_first(input_)
    cp = dist.get_world_size(cp_group)
    b, length, w_local = x.shape
    if batch_size is not None and batch_size != b:
        raise ValueError(f"batch_size ({batch_size}) does not match the input's batch dim ({b})")
    check_divisible(length, cp, "sequence length", "cp_size")
    send = x.reshape(b, cp, length // cp, w_local).transpose(0, 1)  # [cp, B, L_local, W_local]
    recv = all_to_all(send, cp_group).view(cp, b * (length // cp), w_local)
    out = recv.transpose(0, 1).reshape(b, length // cp, cp * w_local)
    return out.squeeze(0) if squeeze else out


def seq_to_heads(parts: Sequence[torch.Tensor], plan: TokenPlan, group: dist.ProcessGroup) -> torch.Tensor:
    """Send every part's per-destination columns to their rank; return whole sequences in true order.

    Args:
        parts: tensors ``[B, L_local, cp, w_i]``: slot ``r`` of dim 2 is what rank ``r`` receives.
        plan: the batch's token plan.
        group: the CP group.

    Returns:
        ``[B, L, sum(w_i)]``: this rank's columns of every part, side by side, for every token of the batch
        in true sequence order. One pack copy, one all-to-all, one gather.
    """
    cp, b, l_local = plan.cp_size, plan.batch, plan.local_len
    widths = [p.shape[-1] for p in parts]
    # The concatenation writes straight into the rank-major send layout [cp, B*L_local, sum(w)].
    send = torch.cat([p.reshape(b * l_local, cp, p.shape[-1]).transpose(0, 1) for p in parts], dim=-1)
    recv = all_to_all(send, group).view(cp * b * l_local, sum(widths))
    return permute_rows(recv, plan.to_sequence, plan.to_ranks).view(b, cp * l_local, sum(widths))


def heads_to_seq(y: torch.Tensor, plan: TokenPlan, group: dist.ProcessGroup) -> torch.Tensor:
    """Return this rank's tokens for all ranks' columns: ``[B, L, w]`` (true order) -> ``[B, L_local, cp*w]``.

    Column block ``r`` of the result comes from rank ``r``. One gather, one all-to-all, one unpack copy.
    """
    cp, b, l_local = plan.cp_size, plan.batch, plan.local_len
    width = y.shape[-1]
    send = permute_rows(y.reshape(b * cp * l_local, width), plan.to_ranks, plan.to_sequence)
    recv = all_to_all(send, group).view(cp, b * l_local, width)
    return recv.transpose(0, 1).reshape(b, l_local, cp * width)


# --------------------------------------------------------------------------------------------------
# Pipelined hot path: the same traffic in row chunks, each chunk's all-to-all overlapping the next
# chunk's pack and the previous chunk's unpack (used by the hidden-parallel mixer on CUDA).
# --------------------------------------------------------------------------------------------------

Segment = tuple[int, int, int]
"""``(source index, first column, width)``: a column range of a source, split equally over the ranks."""


def _chunk_bounds(rows: int, chunks: int) -> list[tuple[int, int]]:
    step = -(-rows // max(1, chunks))
    return [(r0, min(rows, r0 + step)) for r0 in range(0, rows, step)]


def _rank_rows(plan: TokenPlan, r0: int, r1: int) -> torch.Tensor:
    """Sequence-order rows of local rows ``[r0, r1)`` of every rank: ``[cp * (r1 - r0)]``, rank-major."""
    return plan.to_ranks.view(plan.cp_size, plan.batch * plan.local_len)[:, r0:r1].reshape(-1)


def _pipeline(
    chunks: list[tuple[int, int]], send: Callable, finish: Callable, group: dist.ProcessGroup, direction: str
) -> None:
    """For each chunk: ``buf = send(r0, r1)``, an async all-to-all, then ``finish(r0, r1, recv)`` one chunk
    later, so a chunk's collective runs while the compute stream packs the next one and unpacks the last."""
    pending: list[tuple] = []
    buf = None
    try:
        for r0, r1 in chunks:
            buf = send(r0, r1)
            recv = torch.empty_like(buf)
            pending.append((dist.all_to_all_single(recv, buf, group=group, async_op=True), buf, recv, r0, r1))
            if len(pending) > 1:
                work, _, done, a, b = pending.pop(0)
                work.wait()
                finish(a, b, done)
        for work, _, done, a, b in pending:
            work.wait()
            finish(a, b, done)
    except RuntimeError as err:  # a peer died, timed out, or sent a different shape: same message as _exchange
        shape = tuple(buf.shape) if buf is not None else None
        raise _exchange_error(err, group, direction, shape) from err


class _SeqToHeads(torch.autograd.Function):
    """Column segments of sequence-sharded sources -> this rank's columns over whole sequences, true order.

    Forward per chunk: one pack copy, an all-to-all, one row scatter into the output. Backward per chunk:
    one row gather, an all-to-all, one unpack copy straight into contiguous gradients of the sources.
    """

    @staticmethod
    def forward(ctx, plan, group, segments, chunks, *sources):
        cp, bl = plan.cp_size, plan.batch * plan.local_len
        flat = [s.reshape(bl, s.shape[-1]) for s in sources]
        width = sum(w // cp for _, _, w in segments)
        out = sources[0].new_empty(cp * bl, width)

        def send(r0: int, r1: int) -> torch.Tensor:
            n = r1 - r0
            cols = [flat[i][r0:r1, a : a + w].view(n, cp, w // cp).transpose(0, 1) for i, a, w in segments]
            return torch.cat(cols, dim=-1)  # [cp, n, width], the all-to-all's rank-major layout

        def finish(r0: int, r1: int, recv: torch.Tensor) -> None:
            out.index_copy_(0, _rank_rows(plan, r0, r1), recv.view(-1, width))

        _pipeline(_chunk_bounds(bl, chunks), send, finish, group, "forward")
        ctx.plan, ctx.group, ctx.segments, ctx.chunks = plan, group, segments, chunks
        ctx.shapes = [(s.shape, s.dtype) for s in sources]
        return out.view(plan.batch, cp * plan.local_len, width)

    @staticmethod
    def backward(ctx, grad):
        plan, cp, segments = ctx.plan, ctx.plan.cp_size, ctx.segments
        bl = plan.batch * plan.local_len
        g = grad.reshape(cp * bl, grad.shape[-1])
        covered = [0] * len(ctx.shapes)
        for i, _, w in segments:
            covered[i] += w
        grads = [
            (grad.new_empty if covered[i] == shape[-1] else grad.new_zeros)(shape, dtype=dtype)
            for i, (shape, dtype) in enumerate(ctx.shapes)
        ]
        flat = [t.view(bl, t.shape[-1]) for t in grads]

        def send(r0: int, r1: int) -> torch.Tensor:
            return g.index_select(0, _rank_rows(plan, r0, r1)).view(cp, r1 - r0, g.shape[-1])

        def finish(r0: int, r1: int, recv: torch.Tensor) -> None:
            n, off = r1 - r0, 0
            for i, a, w in segments:
                flat[i][r0:r1, a : a + w].view(n, cp, w // cp).transpose(0, 1).copy_(recv[:, :, off : off + w // cp])
                off += w // cp

        _pipeline(_chunk_bounds(bl, ctx.chunks), send, finish, ctx.group, "backward")
        return (None, None, None, None, *grads)


class _HeadsToSeq(torch.autograd.Function):
    """This rank's columns over whole sequences (true order) -> this rank's tokens, every rank's columns."""

    @staticmethod
    def forward(ctx, plan, group, chunks, y):
        cp, bl, width = plan.cp_size, plan.batch * plan.local_len, y.shape[-1]
        yf = y.reshape(cp * bl, width)
        out = y.new_empty(bl, cp, width)

        def send(r0: int, r1: int) -> torch.Tensor:
            return yf.index_select(0, _rank_rows(plan, r0, r1)).view(cp, r1 - r0, width)

        def finish(r0: int, r1: int, recv: torch.Tensor) -> None:
            out[r0:r1].copy_(recv.transpose(0, 1))

        _pipeline(_chunk_bounds(bl, chunks), send, finish, group, "forward")
        ctx.plan, ctx.group, ctx.chunks = plan, group, chunks
        return out.view(plan.batch, plan.local_len, cp * width)

    @staticmethod
    def backward(ctx, grad):
        plan = ctx.plan
        cp, bl = plan.cp_size, plan.batch * plan.local_len
        width = grad.shape[-1] // cp
        g = grad.reshape(bl, cp, width)
        out = grad.new_empty(cp * bl, width)

        def send(r0: int, r1: int) -> torch.Tensor:
            return g[r0:r1].transpose(0, 1).contiguous()

        def finish(r0: int, r1: int, recv: torch.Tensor) -> None:
            out.index_copy_(0, _rank_rows(plan, r0, r1), recv.view(-1, width))

        _pipeline(_chunk_bounds(bl, ctx.chunks), send, finish, ctx.group, "backward")
        return None, None, None, out.view(plan.batch, cp * plan.local_len, width)


def seq_to_heads_chunked_segments(
    sources: Sequence[torch.Tensor],
    segments: Sequence[Segment],
    plan: TokenPlan,
    group: dist.ProcessGroup,
    chunks: int = 1,
) -> torch.Tensor:
    """Like :func:`seq_to_heads`, for column ranges of whole sources, in ``chunks`` pipelined pieces.

    Args:
        sources: tensors ``[B, L_local, W_s]`` (views are fine: e.g. ``xBC`` and ``dt`` of an in_proj output).
        segments: ``(source, first column, width)``; each width splits into ``cp`` equal blocks, block ``r``
            for rank ``r``. A rank's columns come out segment after segment.
        plan: the batch's token plan.
        group: the CP group.
        chunks: row chunks; every chunk is one all-to-all, overlapped with its neighbours' copies.

    Returns:
        ``[B, L, sum(width / cp)]`` in true sequence order. The backward writes each source's gradient
        straight into a contiguous tensor (no per-segment reshape copies and no concatenation).
    """
    for i, _, w in segments:
        check_divisible(w, plan.cp_size, f"segment width of source {i}", "cp_size")
    return _SeqToHeads.apply(plan, group, tuple(segments), chunks, *sources)


def heads_to_seq_chunked(y: torch.Tensor, plan: TokenPlan, group: dist.ProcessGroup, chunks: int = 1) -> torch.Tensor:
    """:func:`heads_to_seq` in ``chunks`` pipelined pieces: ``[B, L, w]`` -> ``[B, L_local, cp*w]``."""
    return _HeadsToSeq.apply(plan, group, chunks, y)


# The spec's underscore names.
_AllToAll = AllToAll
_all_to_all = all_to_all
_all_to_all_cp2hp = all_to_all_cp2hp
_all_to_all_hp2cp = all_to_all_hp2cp
