"""All-to-all transport between the sequence-sharded and the head-sharded layouts.

Shape legend: ``B`` batch, ``L`` global tokens per row, ``L_local = L / cp``, ``W`` full width,
``W_local = W / cp``; for packed batches ``B = 1`` and ``L = T``.

``seq_to_heads`` and ``heads_to_seq`` are the hot path: any number of tensors travel in ONE collective
each way, and the head-tail undo/redo plus the packed-sequence interleaving are a single row gather by the
batch's :class:`~mamba_cp.layout.TokenPlan`. The spec's ``all_to_all_cp2hp`` / ``all_to_all_hp2cp`` (one
tensor, rank-major order, no reorder) are kept for API compatibility.
"""

from __future__ import annotations

from collections.abc import Sequence

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
    input_ = input_.contiguous()
    output = torch.empty_like(input_)
    try:
        dist.all_to_all_single(output, input_, group=group)
    except RuntimeError as err:  # a peer died, timed out, or sent a different shape
        rank, size = dist.get_rank(group), dist.get_world_size(group)
        raise RuntimeError(
            f"mamba_cp all-to-all ({direction}) failed on CP rank {rank} of {size} with a local buffer of shape "
            f"{tuple(input_.shape)}: another rank probably raised, crashed or passed a batch of another shape "
            f"(MAMBA_CP_DEBUG=1 checks shapes and cu_seqlens across ranks first). Cause: {err}"
        ) from err
    return output


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


# The spec's underscore names.
_AllToAll = AllToAll
_all_to_all = all_to_all
_all_to_all_cp2hp = all_to_all_cp2hp
_all_to_all_hp2cp = all_to_all_hp2cp
