"""The per-batch context: what every layer of a context-parallel model needs to know about the current batch.

Shape legend: ``B`` batch, ``L`` global tokens per row, ``L_local = L / cp``; packed batches have ``B = 1``
and ``T`` / ``T_local`` tokens; ``S`` packed sequences.

A training step sets it once and every layer reads it::

    with mamba_cp.batch_context(cu_seqlens=cu_seqlens, cp_group=group) as batch:
        ids_local = batch.shard(input_ids)                   # [1, T_local] (or mamba_cp.shard)
        logits = model(ids_local).logits                     # Mamba and attention layers read the context
        loss_fn(logits, batch.shard(labels)).backward()      # inside: checkpointing re-runs forwards here

Layers read only ``cu_seqlens`` from it (the global boundaries of a packed batch): the Mamba mixers stop their
conv and scan at sequence boundaries, attention layers build a block-diagonal causal mask (once per batch) and
models with rotary embeddings get every token's position inside its own sequence. BSHD batches need no
context. It lives in a ``contextvars.ContextVar`` (nested blocks restore the outer batch; concurrent tasks and
threads keep their own); a thread that has none of its own, such as the autograd engine's device threads that
run backward (and with activation checkpointing, layers' forwards again), sees the innermost block still open
in the process. So keep backward inside the block.
"""

from __future__ import annotations

import contextvars
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch

from .groups import CPGroup, resolve_cp_group
from .layout import head_tail_positions, packed_head_tail_positions
from .sharding import shard
from .validation import check_cu_seqlens

_CURRENT: contextvars.ContextVar[BatchContext | None] = contextvars.ContextVar("mamba_cp_batch", default=None)
_OPEN: list[BatchContext] = []
"""Blocks open in this process, innermost last: what threads without a context of their own see."""


@dataclass(frozen=True, slots=True)
class BatchContext:
    """One batch's layout, shared by every layer of a step (see :func:`batch_context`)."""

    cu_seqlens: torch.Tensor | None
    """``[S + 1]`` int32/int64 *global* boundaries of a packed batch (None for BSHD)."""
    cp_group: CPGroup
    """The CP group the batch is sharded over (size 1 when CP is off)."""

    @property
    def packed(self) -> bool:
        """Whether the batch is packed (THD)."""
        return self.cu_seqlens is not None

    def shard(self, x: torch.Tensor, seq_dim: int = 1) -> torch.Tensor:
        """This rank's head-tail shard of a global tensor (see :func:`mamba_cp.shard`).

        BSHD: ``[B, L, ...]`` -> ``[B, L_local, ...]``; packed: ``[1, T, ...]`` -> ``[1, T_local, ...]`` (or
        ``[T, ...]`` with ``seq_dim=0``), cut per sequence with this context's ``cu_seqlens``.
        """
        if self.cp_group.size == 1:
            return x
        return shard(x, self.cp_group.size, self.cp_group.rank, seq_dim, self.cu_seqlens)

    def position_ids(self, local_len: int, device: torch.device | str | None = None) -> torch.Tensor:
        """``[1, L_local]`` int64: each of this rank's tokens' position in its own sequence."""
        return local_positions(self.cp_group.size, self.cp_group.rank, local_len, self.cu_seqlens, device)


def local_positions(
    cp_size: int,
    cp_rank: int,
    local_len: int,
    cu_seqlens: torch.Tensor | None = None,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """``[1, L_local]`` int64 positions of rank ``cp_rank``'s tokens, each counted from its sequence's start.

    BSHD: the head-tail positions of a row of ``L = L_local * cp`` tokens. Packed: for every token of this
    rank's shard, its offset inside its own sequence (global ``cu_seqlens`` ``[S + 1]``). These are the
    positions rotary embeddings need to see. Raises ``ValueError`` when the lengths do not fit the layout.
    """
    total = local_len * cp_size
    if cu_seqlens is None:
        if cp_size == 1:
            return torch.arange(local_len, device=device)[None]
        return head_tail_positions(total, cp_size)[cp_rank].to(device)[None]
    bounds = check_cu_seqlens(cu_seqlens, total, multiple_of=2 * cp_size if cp_size > 1 else 1)
    cu = torch.tensor(bounds, dtype=torch.int64)
    positions = torch.arange(total) if cp_size == 1 else packed_head_tail_positions(cu, cp_size)[cp_rank]
    starts = cu[torch.bucketize(positions, cu[1:], right=True)]
    return (positions - starts).to(device)[None]


@contextmanager
def batch_context(cu_seqlens: torch.Tensor | None = None, cp_group=None) -> Iterator[BatchContext]:
    """Make a batch's layout visible to every layer of a parallelized model for the ``with`` block.

    Keep the backward pass inside the block when layers use activation checkpointing: their forwards run
    again during backward and must see the same batch.

    Args:
        cu_seqlens: ``[S + 1]`` *global* boundaries of a packed batch (int32/int64, starting at 0); None
            for BSHD. Under CP every sequence length must divide by ``2 * cp``.
        cp_group: the CP ``ProcessGroup`` / 1-D ``DeviceMesh`` (None: no CP); used by :meth:`BatchContext.shard`
            and :meth:`BatchContext.position_ids`.

    The boundaries are validated here, once per batch (``ValueError`` naming the offending sequence), so a
    bad batch fails before any layer issues a collective. Pass the *same* tensor object for the whole step:
    per-batch index maps and masks are cached on it.
    """
    group = resolve_cp_group(cp_group)
    if cu_seqlens is not None:
        if not isinstance(cu_seqlens, torch.Tensor):
            raise ValueError(f"cu_seqlens must be a torch.Tensor, got {type(cu_seqlens).__name__}")
        total = int(cu_seqlens[-1]) if cu_seqlens.numel() else 0
        check_cu_seqlens(cu_seqlens, total, multiple_of=2 * group.size if group.size > 1 else 1)
    ctx = BatchContext(cu_seqlens=cu_seqlens, cp_group=group)
    token = _CURRENT.set(ctx)
    _OPEN.append(ctx)
    try:
        yield ctx
    finally:
        _OPEN.remove(ctx)
        _CURRENT.reset(token)


def current_batch() -> BatchContext | None:
    """The innermost open :func:`batch_context` of this thread / task; in a thread that opened none (the
    autograd engine's), the innermost one open in the process; else None."""
    ctx = _CURRENT.get()
    if ctx is None and _OPEN:
        ctx = _OPEN[-1]
    return ctx


def current_cu_seqlens(explicit: torch.Tensor | None = None) -> torch.Tensor | None:
    """``explicit`` when given, else the current batch context's ``cu_seqlens`` (None for BSHD / no context)."""
    if explicit is not None:
        return explicit
    ctx = current_batch()
    return None if ctx is None else ctx.cu_seqlens
