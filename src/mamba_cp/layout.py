"""Token orders under context parallelism: the head-tail layout, chunk reorders and packed interleaving.

Shape legend: ``B`` batch, ``L`` global sequence length, ``L_local = L / cp``, ``T`` global packed tokens,
``T_local = T / cp``, ``W`` any trailing width.

The head-tail ("DualChunkSwap") layout cuts every sequence into ``2 * cp`` equal chunks; rank ``r`` holds
chunks ``r`` and ``2*cp - 1 - r`` in that order. A packed batch is cut either per sequence (``packed_layout
"sequences"``: every sequence in ``2*cp`` chunks, a rank's pieces in sequence order) or as one stream (``"stream"``:
the whole pack in ``2*cp`` chunks, as a BSHD row; sequences may straddle chunks).

Two families live here:

* the reorders behind the spec's stand-alone functions (``reorder_chunks`` with :func:`undo_order` /
  :func:`redo_order`, ``deinterleave/reinterleave_packed_seqs``; their spec names live in
  :mod:`mamba_cp.hidden_parallel`), each one gather;
* ``TokenPlan``: per batch, the single permutation between the rank-major all-to-all buffer and the true
  sequence order. The mixers use only this: one gather on the way in, its inverse on the way out, built
  once per batch and reused by every layer.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from .collectives import check_same_batch
from .groups import CPGroup
from .plan_cache import PlanCache, varying
from .validation import (
    ConfigError,
    check_cu_seqlens,
    check_divisible,
    check_packed_batch,
    describe_fingerprint,
    layout_fingerprint,
)

# --------------------------------------------------------------------------------------------------
# Positions of a rank's tokens in the global sequence
# --------------------------------------------------------------------------------------------------


def head_tail_positions(seq_len: int, cp_size: int, device: torch.device | str | None = None) -> torch.Tensor:
    """Global positions held by every rank for one sequence of ``seq_len`` tokens.

    Returns ``[cp, seq_len / cp]`` int64: row ``r`` lists, in local order, the positions rank ``r`` holds
    (chunk ``r`` then chunk ``2*cp-1-r``).
    """
    check_divisible(seq_len, 2 * cp_size, "sequence length", "2*cp_size")
    chunk = seq_len // (2 * cp_size)
    ranks = torch.arange(cp_size, device=device)
    within = torch.arange(chunk, device=device)
    head = ranks[:, None] * chunk + within  # [cp, chunk]
    tail = (2 * cp_size - 1 - ranks)[:, None] * chunk + within
    return torch.cat([head, tail], dim=1)


def packed_head_tail_positions(cu_seqlens: torch.Tensor, cp_size: int, total: int | None = None) -> torch.Tensor:
    """Global positions held by every rank for a packed batch with *global* ``cu_seqlens`` ``[S + 1]``.

    ``cu_seqlens`` must be validated (every length a multiple of ``2*cp``); the result lives on its device.
    ``total`` is the token count ``T`` when the caller knows it (else it is read from ``cu_seqlens[-1]``).
    Returns ``[cp, T / cp]`` int64: row ``r`` lists rank ``r``'s tokens in local order (for each sequence in
    turn, its chunk ``r`` then its chunk ``2*cp-1-r``).
    """
    cu = cu_seqlens.to(torch.int64)
    total = int(cu[-1]) if total is None else total
    cu_local = cu // cp_size
    local = torch.arange(total // cp_size, device=cu.device)
    seq = torch.bucketize(local, cu_local[1:], right=True)  # [T_local] sequence of each local token
    offset = local - cu_local[seq]
    half = (cu[seq + 1] - cu[seq]) // (2 * cp_size)  # chunk length of that sequence
    ranks = torch.arange(cp_size, device=cu.device)[:, None]  # [cp, 1]
    in_tail = offset >= half
    chunk = torch.where(in_tail, 2 * cp_size - 1 - ranks, ranks)  # [cp, T_local]
    return cu[seq] + chunk * half + torch.where(in_tail, offset - half, offset)


def packed_positions(cu_seqlens: torch.Tensor, cp_size: int, total: int, packed_layout: str) -> torch.Tensor:
    """``[cp, T / cp]`` global positions of every rank's tokens of a validated packed batch in ``packed_layout``
    (``"sequences"``: :func:`packed_head_tail_positions`; ``"stream"``: :func:`head_tail_positions` of the whole
    pack), on ``cu_seqlens``' device."""
    if packed_layout == "stream":
        return head_tail_positions(total, cp_size, cu_seqlens.device)
    return packed_head_tail_positions(cu_seqlens, cp_size, total)


# --------------------------------------------------------------------------------------------------
# Gathers with a cheap, deterministic backward
# --------------------------------------------------------------------------------------------------


class _PermuteRows(torch.autograd.Function):
    """``out = x[perm]`` along dim 0 for a permutation; backward gathers with the inverse permutation.

    A plain ``index_select`` would scatter-add its gradient (atomics on GPU); a permutation's adjoint is
    another gather, which is faster and bitwise deterministic.
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, perm: torch.Tensor, inverse: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(inverse)
        return x.index_select(0, perm)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        (inverse,) = ctx.saved_tensors
        return grad.index_select(0, inverse), None, None


def permute_rows(x: torch.Tensor, perm: torch.Tensor, inverse: torch.Tensor | None = None) -> torch.Tensor:
    """Return ``x[perm]`` (dim 0) where ``perm`` is a permutation; ``inverse`` is ``argsort(perm)``."""
    if inverse is None:
        inverse = invert_permutation(perm)
    return _PermuteRows.apply(x, perm, inverse)


def invert_permutation(perm: torch.Tensor) -> torch.Tensor:
    """``inv`` with ``inv[perm] = arange``: the inverse of a permutation, by one scatter."""
    inv = torch.empty_like(perm)
    inv[perm] = torch.arange(perm.numel(), device=perm.device, dtype=perm.dtype)
    return inv


# --------------------------------------------------------------------------------------------------
# The spec's stand-alone reorders
# --------------------------------------------------------------------------------------------------


def reorder_chunks(
    input_: torch.Tensor, order: Sequence[int] | torch.Tensor, cu_seqlens: torch.Tensor | None = None
) -> torch.Tensor:
    """Permute equal-sized chunks: output chunk ``i`` is input chunk ``order[i]``.

    Args:
        input_: ``[B, L, W]`` (chunks along dim 1) or, with ``cu_seqlens``, packed ``[T, W]`` (chunks of each
            sequence along dim 0, each sequence permuted on its own).
        order: a permutation of ``range(num_chunks)``.
        cu_seqlens: ``[S + 1]`` boundaries of the packed sequences in ``input_``.

    Raises ``ValueError`` when a length does not divide into ``num_chunks`` equal chunks (nothing is cut).
    """
    order_t = torch.as_tensor(order, dtype=torch.int64).flatten()
    num_chunks = order_t.numel()
    if sorted(order_t.tolist()) != list(range(num_chunks)):
        raise ValueError(f"order must be a permutation of range({num_chunks}), got {order_t.tolist()}")
    if cu_seqlens is None:
        if input_.dim() < 2:
            raise ValueError(f"reorder_chunks expects [B, L, ...] without cu_seqlens, got {tuple(input_.shape)}")
        seq_len = input_.shape[1]
        check_divisible(seq_len, num_chunks, "sequence length", "the number of chunks")
        chunk = seq_len // num_chunks
        src = (order_t[:, None] * chunk + torch.arange(chunk)).flatten().to(input_.device)
        return input_.index_select(1, src)
    bounds = check_cu_seqlens(cu_seqlens, input_.shape[0], multiple_of=num_chunks)
    cu = torch.tensor(bounds, dtype=torch.int64, device=input_.device)
    pos = torch.arange(input_.shape[0], device=input_.device)
    seq = torch.bucketize(pos, cu[1:], right=True)
    start = cu[seq]
    chunk = (cu[seq + 1] - start) // num_chunks
    offset = pos - start
    src = start + order_t.to(input_.device)[offset // chunk] * chunk + offset % chunk
    return permute_rows(input_, src)


def undo_order(cp_size: int) -> list[int]:
    """Chunk order that turns ``[c0, c_{2cp-1}, c1, c_{2cp-2}, ...]`` (ranks' chunks back to back) into
    ``[c0, c1, ..., c_{2cp-1}]``."""
    n = 2 * cp_size
    return [2 * c if c < cp_size else 2 * (n - c) - 1 for c in range(n)]


def redo_order(cp_size: int) -> list[int]:
    """Inverse of :func:`undo_order`: true order back to ranks' chunks back to back."""
    n = 2 * cp_size
    return [p // 2 if p % 2 == 0 else n - 1 - p // 2 for p in range(n)]


def _interleave_index(cu_seqlens_local: torch.Tensor, cp_size: int, total: int, device) -> torch.Tensor:
    """Index ``src`` with ``seq_major = rank_major[src]`` for packed tokens after an all-to-all.

    Rank-major: ``[r0 s0 | r0 s1 | ... | r1 s0 | ...]``; sequence-major: ``[r0 s0 | r1 s0 | ... | r0 s1 | ...]``.
    """
    check_divisible(total, cp_size, "token count", "cp_size")
    t_local = total // cp_size
    bounds = check_cu_seqlens(cu_seqlens_local, t_local)
    cu = torch.tensor(bounds, dtype=torch.int64, device=device)
    pos = torch.arange(total, device=device)
    seq = torch.bucketize(pos, cu[1:] * cp_size, right=True)
    start = cu[seq]
    length = cu[seq + 1] - start
    offset = pos - start * cp_size
    return (offset // length) * t_local + start + offset % length


def deinterleave_packed_seqs(input_: torch.Tensor, cu_seqlens: torch.Tensor, cp_size: int) -> torch.Tensor:
    """Rank-major packed tokens ``[T, W]`` (after the all-to-all) to sequence-major order.

    ``cu_seqlens`` are the *local* boundaries ``[S + 1]`` (global ones divided by ``cp_size``).
    """
    src = _interleave_index(cu_seqlens, cp_size, input_.shape[0], input_.device)
    return permute_rows(input_, src)


def reinterleave_packed_seqs(input_: torch.Tensor, cu_seqlens: torch.Tensor, cp_size: int) -> torch.Tensor:
    """Inverse of :func:`deinterleave_packed_seqs`: sequence-major back to rank-major."""
    src = _interleave_index(cu_seqlens, cp_size, input_.shape[0], input_.device)
    inverse = invert_permutation(src)
    return permute_rows(input_, inverse, src)


# --------------------------------------------------------------------------------------------------
# The per-batch plan used by the mixers
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class TokenPlan:
    """How one batch's tokens are laid out under CP; built once per batch, read by every layer.

    Row numbering: the *rank-major* buffer has rows ``(r, b, j)`` flattened (source/destination rank
    ``r``, batch row ``b``, local token ``j``); the *sequence* order has rows ``(b, l)`` flattened, ``l``
    the true position. ``to_sequence[i]`` is the rank-major row of sequence row ``i``; ``to_ranks`` is its
    inverse.
    """

    cp_size: int
    batch: int
    """``B`` (1 for packed batches)."""
    local_len: int
    """Tokens per batch row on each rank: ``L_local`` or ``T_local``."""
    to_sequence: torch.Tensor | None
    """``[B * L]`` int64 gather index, rank-major -> sequence order (None when ``cp_size == 1``)."""
    to_ranks: torch.Tensor | None
    """``[B * L]`` int64 gather index, sequence order -> rank-major (None when ``cp_size == 1``)."""
    seq_idx: torch.Tensor | None
    """``[1, T]`` int32 sequence id of each token in true order (packed batches; None for BSHD)."""
    cu_seqlens: torch.Tensor | None
    """``[S + 1]`` int64 global boundaries on the tokens' device (packed batches; None for BSHD)."""

    @property
    def global_len(self) -> int:
        """``L`` (or ``T``): tokens per batch row over the whole CP group."""
        return self.local_len * self.cp_size


def build_token_plan(*args, **kwargs) -> TokenPlan:
    """Validate a batch's layout and build its :class:`TokenPlan` (a pure function of its arguments; see
    :func:`_build_token_plan` for them)."""
    return _build_token_plan(*args, **kwargs)[0]


def _build_token_plan(
    cp_size: int,
    batch: int,
    local_len: int,
    cu_seqlens: torch.Tensor | None = None,
    device: torch.device | str | None = None,
    packed_layout: str = "sequences",
) -> tuple[TokenPlan, list[int] | None]:
    """Validate a batch's layout and build its :class:`TokenPlan`, with the validated boundaries on the host
    (None for BSHD). The host values stay out of the plan: code traced by ``torch.compile`` would specialise on
    them, and every new batch would compile again.

    Args:
        cp_size: ranks in the CP group.
        batch: ``B`` (must be 1 with ``cu_seqlens``).
        local_len: ``L_local`` (``T_local`` for packed batches) on each rank.
        cu_seqlens: ``[S + 1]`` *global* boundaries of a packed batch, or None for BSHD.
        device: where the index tensors live (the activations' device).
        packed_layout: how a packed batch is cut over the ranks (``"sequences"`` or ``"stream"``).
    """
    global_len = local_len * cp_size
    multiple = 2 * cp_size if cp_size > 1 else 1
    dev = torch.device(device) if device is not None else torch.device("cpu")
    # Index maps are built where they are used, in int64: rows reach B * L, past 2**31 at long contexts.
    seq_idx = cu_dev = bounds = None
    if cu_seqlens is None:
        if cp_size > 1:
            check_divisible(global_len, multiple, "global sequence length L (local length x cp_size)", "2*cp_size")
            positions = head_tail_positions(global_len, cp_size, dev)
    else:
        if batch != 1:
            raise ConfigError(f"a packed batch (cu_seqlens given) must have batch size 1, got {batch}")
        bounds = check_packed_batch(cu_seqlens, global_len, cp_size, packed_layout)
        cu_dev = varying(torch.tensor(bounds, dtype=torch.int64, device=dev))
        if cp_size > 1:
            positions = packed_positions(cu_dev, cp_size, global_len, packed_layout)
        seq_idx = torch.bucketize(torch.arange(global_len, device=dev), cu_dev[1:], right=True)
        seq_idx = seq_idx.to(torch.int32)[None]
    if cp_size == 1:
        return TokenPlan(1, batch, local_len, None, None, seq_idx, cu_dev), bounds
    # rank-major row (r, b, j) holds sequence row b * L + positions[r, j]
    rows = torch.arange(batch, device=dev)[None, :, None] * global_len + positions[:, None, :]  # [cp, B, L_local]
    to_ranks = rows.reshape(-1)
    return TokenPlan(cp_size, batch, local_len, invert_permutation(to_ranks), to_ranks, seq_idx, cu_dev), bounds


def token_plan(
    cache: PlanCache,
    group: CPGroup,
    batch: int,
    local_len: int,
    cu_seqlens: torch.Tensor | None,
    device: torch.device | str,
) -> TokenPlan:
    """The batch's :class:`TokenPlan` over ``group`` from ``cache`` (every layer of a step gets the same object).

    On first use the plan is built and validated (:func:`build_token_plan`: ``ValueError`` before any
    collective), then, with more than one rank, one tiny all-gather checks that every rank describes the same
    batch (:func:`~mamba_cp.collectives.check_same_batch`): ranks that pass different lengths, different
    ``cu_seqlens`` or ``cu_seqlens`` on some ranks only would otherwise exchange buffers of the same size and
    all finish with wrong results. Once per batch, never per layer. The plan is pinned as the batch's current
    one, which is what code traced by ``torch.compile`` gets (:meth:`~mamba_cp.plan_cache.PlanCache.pin`).
    """
    if torch.compiler.is_compiling():  # traced: the plan comes in as data, built before the graph
        return cache.pinned(("token",))
    key = (group.size, batch, local_len, str(device))

    def build() -> TokenPlan:
        plan, bounds = _build_token_plan(group.size, batch, local_len, cu_seqlens, device, cache.packed_layout)
        if group.size > 1:
            check_same_batch(group.group, layout_fingerprint(local_len, batch, bounds), describe_fingerprint)
        return plan

    return cache.pin(("token",), cache.get("token", key, cu_seqlens, build))
