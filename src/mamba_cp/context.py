"""The per-batch context: what every layer of a context-parallel model needs to know about the current batch.

Shape legend: ``B`` batch, ``L`` global tokens per row, ``L_local = L / cp``; packed batches have ``B = 1``
and ``T`` / ``T_local`` tokens; ``S`` packed sequences.

A training step sets it once and every layer reads it::

    with mamba_cp.batch_context(cu_seqlens=cu_seqlens, cp_group=group) as batch:
        ids_local = batch.shard(input_ids)                   # [1, T_local] (or mamba_cp.shard)
        out = model(input_ids=ids_local, labels=batch.shard(input_ids))  # layers read the context
        out.loss.backward()                                  # inside: checkpointing re-runs forwards here

(:func:`mamba_cp.shard_batch` opens one for a whole global batch, see :mod:`mamba_cp.training`.) Layers read only
``cu_seqlens`` from it (the global boundaries of a packed batch): the Mamba mixers stop their conv and scan at
sequence boundaries, attention layers build a block-diagonal causal mask (once per batch) and models with rotary
embeddings get every token's position inside its own sequence. A parallelized transformers model's pre-hook also
checks the local length against :attr:`BatchContext.seq_len` (or the lengths :meth:`BatchContext.shard` cut), so
the whole batch passed where this rank's shard belongs raises. BSHD batches need no context. It lives in a
``contextvars.ContextVar`` (nested blocks restore the outer batch; concurrent tasks and threads keep their own); a
thread that has none of its own, such as the autograd engine's device threads that run backward (and with
activation checkpointing, layers' forwards again), sees the innermost block still open in the process. So keep
backward inside the block.
"""

from __future__ import annotations

import contextvars
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch

from .groups import CPGroup, resolve_cp_group
from .layout import head_tail_positions, packed_positions
from .sharding import shard
from .validation import check_packed_batch, check_packed_layout

_CURRENT: contextvars.ContextVar[BatchContext | None] = contextvars.ContextVar("mamba_cp_batch", default=None)
_OPEN: list[BatchContext] = []
"""Blocks open in this process, innermost last: what threads without a context of their own see."""


@dataclass(frozen=True, slots=True, eq=False)
class BatchContext:
    """One batch's layout, shared by every layer of a step (see :func:`batch_context`)."""

    cu_seqlens: torch.Tensor | None
    """``[S + 1]`` int32/int64 *global* boundaries of a packed batch (None for BSHD)."""
    cp_group: CPGroup
    """The CP group the batch is sharded over (size 1 when CP is off)."""
    seq_len: int | None = None
    """Global tokens per row: BSHD ``L`` when known (given to :func:`batch_context` or by
    :func:`mamba_cp.shard_batch`), packed ``T`` (``cu_seqlens[-1]``); None when unknown."""
    packed_layout: str = "sequences"
    """How a packed batch is cut over the ranks: ``"sequences"`` or ``"stream"`` (the model must be parallelized
    with the same; its pre-hook checks)."""
    shard_lengths: set[int] = field(default_factory=set, compare=False, repr=False)
    """Global lengths :meth:`shard` has cut in this block (BSHD): a model call whose local length times ``cp``
    is none of them was given a tensor that was not sharded (:meth:`check_local_length`)."""

    @property
    def packed(self) -> bool:
        """Whether the batch is packed (THD)."""
        return self.cu_seqlens is not None

    def shard(self, x: torch.Tensor, seq_dim: int = 1) -> torch.Tensor:
        """This rank's head-tail shard of a global tensor (see :func:`mamba_cp.shard`).

        BSHD: ``[B, L, ...]`` -> ``[B, L_local, ...]``; packed: ``[1, T, ...]`` -> ``[1, T_local, ...]`` (or
        ``[T, ...]`` with ``seq_dim=0``), cut with this context's ``cu_seqlens`` in its ``packed_layout``.
        """
        if self.cu_seqlens is None:
            self.shard_lengths.add(int(x.shape[seq_dim]))
        if self.cp_group.size == 1:
            return x
        return shard(
            x, self.cp_group.size, self.cp_group.rank, seq_dim, self.cu_seqlens, packed_layout=self.packed_layout
        )

    def check_local_length(self, local_len: int, cp_size: int | None = None) -> None:
        """``ValueError`` when this rank's ``local_len`` tokens per row contradict the batch's global length.

        Packed: ``local_len * cp`` must be ``cu_seqlens[-1]``. BSHD: it must be :attr:`seq_len` when known, else
        one of the lengths :meth:`shard` cut in this block (no check when neither is known). Catches the whole
        batch passed where this rank's shard belongs. ``cp_size``: the CP size of the model that runs the batch
        (default: this context's). Local: every rank that passes the same shapes decides alike.
        """
        cp = self.cp_group.size if cp_size is None else cp_size
        if self.seq_len is not None:
            if local_len * cp != self.seq_len:
                what = "cu_seqlens describe" if self.packed else "the batch has"
                raise ValueError(
                    f"this rank's batch has {local_len} tokens per row, but {what} {self.seq_len} tokens over "
                    f"{cp} CP rank(s), {self.seq_len // cp} per rank: under context parallelism pass this rank's "
                    "shard (batch.shard(x), mamba_cp.shard_batch), not the whole batch"
                )
        elif self.shard_lengths and local_len * cp not in self.shard_lengths:
            raise ValueError(
                f"this rank's batch has {local_len} tokens per row ({local_len * cp} over {cp} CP rank(s)), but "
                f"this batch context sharded tensors of global length {sorted(self.shard_lengths)}: pass this "
                "rank's shard (batch.shard(x)), not the whole batch"
            )

    def position_ids(self, local_len: int, device: torch.device | str | None = None) -> torch.Tensor:
        """``[1, L_local]`` int64: each of this rank's tokens' position in its own sequence."""
        return local_positions(
            self.cp_group.size, self.cp_group.rank, local_len, self.cu_seqlens, device, self.packed_layout
        )


def local_positions(
    cp_size: int,
    cp_rank: int,
    local_len: int,
    cu_seqlens: torch.Tensor | None = None,
    device: torch.device | str | None = None,
    packed_layout: str = "sequences",
) -> torch.Tensor:
    """``[1, L_local]`` int64 positions of rank ``cp_rank``'s tokens, each counted from its sequence's start.

    BSHD: the head-tail positions of a row of ``L = L_local * cp`` tokens. Packed: for every token of this
    rank's shard (cut in ``packed_layout``), its offset inside its own sequence (global ``cu_seqlens``
    ``[S + 1]``). These are the positions rotary embeddings need to see. Raises ``ValueError`` when the lengths
    do not fit the layout.
    """
    total = local_len * cp_size
    if cu_seqlens is None:
        if cp_size == 1:
            return torch.arange(local_len, device=device)[None]
        return head_tail_positions(total, cp_size)[cp_rank].to(device)[None]
    bounds = check_packed_batch(cu_seqlens, total, cp_size, packed_layout)
    cu = torch.tensor(bounds, dtype=torch.int64)
    positions = torch.arange(total) if cp_size == 1 else packed_positions(cu, cp_size, total, packed_layout)[cp_rank]
    starts = cu[torch.bucketize(positions, cu[1:], right=True)]
    return (positions - starts).to(device)[None]


@contextmanager
def batch_context(
    cu_seqlens: torch.Tensor | None = None,
    cp_group=None,
    seq_len: int | None = None,
    *,
    packed_layout: str = "sequences",
) -> Iterator[BatchContext]:
    """Make a batch's layout visible to every layer of a parallelized model for the ``with`` block.

    Keep the backward pass inside the block when layers use activation checkpointing: their forwards run
    again during backward and must see the same batch.

    Args:
        cu_seqlens: ``[S + 1]`` *global* boundaries of a packed batch (int32/int64, starting at 0); None
            for BSHD. Under CP every sequence length must divide by ``2 * cp`` (``packed_layout="sequences"``), or
            the token count ``T`` (``"stream"``).
        cp_group: the CP ``ProcessGroup`` / 1-D ``DeviceMesh`` (None: no CP); used by :meth:`BatchContext.shard`
            and :meth:`BatchContext.position_ids`.
        seq_len: optional global tokens per row of a BSHD batch (packed: ``cu_seqlens[-1]``, checked when
            given); a parallelized transformers model then refuses a local length that is not ``seq_len / cp``.
        packed_layout: how a packed batch is cut over the ranks (``"sequences"`` or ``"stream"``, as the model
            was parallelized).

    The boundaries are validated here, once per batch (``ValueError`` naming the offending sequence), so a
    bad batch fails before any layer issues a collective. Pass the *same* tensor object for the whole step:
    per-batch index maps and masks are cached on it.
    """
    group = resolve_cp_group(cp_group)
    check_packed_layout(packed_layout)
    multiple = 2 * group.size if group.size > 1 else 1
    if seq_len is not None and (isinstance(seq_len, bool) or not isinstance(seq_len, int) or seq_len <= 0):
        raise ValueError(f"seq_len must be a positive int, got {seq_len!r}")
    if cu_seqlens is not None:
        if not isinstance(cu_seqlens, torch.Tensor):
            raise ValueError(f"cu_seqlens must be a torch.Tensor, got {type(cu_seqlens).__name__}")
        total = int(cu_seqlens[-1]) if cu_seqlens.numel() else 0
        check_packed_batch(cu_seqlens, total, group.size, packed_layout)
        if seq_len is not None and seq_len != total:
            raise ValueError(f"seq_len ({seq_len}) must equal the packed batch's token count cu_seqlens[-1] ({total})")
        seq_len = total
    elif seq_len is not None and seq_len % multiple:
        raise ValueError(f"global sequence length seq_len ({seq_len}) must be divisible by 2*cp_size ({multiple})")
    context = BatchContext(cu_seqlens=cu_seqlens, cp_group=group, seq_len=seq_len, packed_layout=packed_layout)
    with activate(context) as ctx:
        yield ctx


@contextmanager
def activate(ctx: BatchContext) -> Iterator[BatchContext]:
    """Make an already validated :class:`BatchContext` the current one for the ``with`` block (what
    :func:`batch_context` and :class:`mamba_cp.ShardedBatch` do)."""
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
    """``explicit`` when given, else the current batch context's ``cu_seqlens`` (None for BSHD / no context).

    Code traced by ``torch.compile`` gets ``explicit`` only: its layers read the batch's pinned plans instead
    (:func:`mamba_cp.prepare_batch`), and a context variable cannot be traced."""
    if explicit is not None or torch.compiler.is_compiling():
        return explicit
    ctx = current_batch()
    return None if ctx is None else ctx.cu_seqlens
