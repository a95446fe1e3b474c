"""Shard a batch into the head-tail layout each CP rank holds, and put shards back together.

The layout is that of torch's ``context_parallel`` load balancer and of Transformer Engine's THD
partitioning: every sequence is cut into ``2 * cp`` equal chunks and rank ``r`` holds chunks ``r`` and
``2*cp - 1 - r``; a packed batch is cut per sequence and a rank's pieces keep the sequences' order
(``packed_layout="sequences"``), or cut as one stream of ``T`` tokens, like a BSHD row (``"stream"``: what
state passing wants for packs of many documents, ``docs/design.md`` §2). Nothing is padded or dropped: a length
that does not divide raises ``ValueError``.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.distributed as dist

from .groups import resolve_cp_group
from .layout import head_tail_positions, invert_permutation, packed_positions
from .validation import check_packed_batch


def _positions(
    length: int, cp_size: int, cu_seqlens: torch.Tensor | None, packed_layout: str = "sequences"
) -> torch.Tensor:
    """``[cp, length / cp]`` global positions of every rank's tokens (validated; one rank holds all)."""
    if cp_size < 1:
        raise ValueError(f"cp_size must be at least 1, got {cp_size}")
    if cu_seqlens is None:
        return head_tail_positions(length, cp_size) if cp_size > 1 else torch.arange(length)[None]
    bounds = check_packed_batch(cu_seqlens, length, cp_size, packed_layout)
    if cp_size == 1:
        return torch.arange(length)[None]
    return packed_positions(torch.tensor(bounds, dtype=torch.int64), cp_size, length, packed_layout)


def shard(
    x: torch.Tensor,
    cp_size: int,
    cp_rank: int,
    seq_dim: int = 1,
    cu_seqlens: torch.Tensor | None = None,
    *,
    packed_layout: str = "sequences",
) -> torch.Tensor:
    """Rank ``cp_rank``'s head-tail shard of ``x`` along ``seq_dim``.

    BSHD: ``x`` ``[B, L, ...]`` -> ``[B, L / cp, ...]``. Packed: pass global ``cu_seqlens`` and the token
    dim as ``seq_dim`` (``[T, ...]`` with ``seq_dim=0``, or ``[1, T, ...]`` with ``seq_dim=1``), and the
    ``packed_layout`` the model was parallelized with (``"sequences"`` or ``"stream"``).
    """
    if not 0 <= cp_rank < cp_size:
        raise ValueError(f"cp_rank ({cp_rank}) must be in [0, cp_size={cp_size})")
    positions = _positions(x.shape[seq_dim], cp_size, cu_seqlens, packed_layout)[cp_rank]
    return x.index_select(seq_dim, positions.to(x.device))


def unshard(
    shards: Sequence[torch.Tensor],
    seq_dim: int = 1,
    cu_seqlens: torch.Tensor | None = None,
    *,
    packed_layout: str = "sequences",
) -> torch.Tensor:
    """Inverse of :func:`shard`: every rank's shard, in rank order, back to the global tensor."""
    cp_size = len(shards)
    stacked = torch.cat(list(shards), dim=seq_dim)
    positions = _positions(stacked.shape[seq_dim], cp_size, cu_seqlens, packed_layout).reshape(-1)
    return stacked.index_select(seq_dim, invert_permutation(positions).to(stacked.device))


def gather_sequence(
    local: torch.Tensor,
    cp_group,
    seq_dim: int = 1,
    cu_seqlens: torch.Tensor | None = None,
    *,
    packed_layout: str = "sequences",
) -> torch.Tensor:
    """All-gather every rank's shard over ``cp_group`` and :func:`unshard` them (not differentiable)."""
    group = resolve_cp_group(cp_group)
    if group.size == 1:
        return local
    shards = [torch.empty_like(local) for _ in range(group.size)]
    dist.all_gather(shards, local.contiguous(), group=group.group)
    return unshard(shards, seq_dim, cu_seqlens, packed_layout=packed_layout)
