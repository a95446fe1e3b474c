"""The hot-path transport between the sequence-sharded and the head-sharded layouts.

Shape legend: ``B`` batch, ``L`` global tokens per row, ``L_local = L / cp``, ``W`` full width,
``W_local = W / cp``; for packed batches ``B = 1`` and ``L = T``.

``seq_to_heads`` and ``heads_to_seq``: any number of tensors travel in ONE all-to-all each way, and the
head-tail undo/redo plus the packed-sequence interleaving are a single row gather by the batch's
:class:`~mamba_cp.layout.TokenPlan`. Hidden-parallel's fused projection (:mod:`mamba_cp.projection`) moves
the same bytes with its own pack. The spec's one-tensor ``_all_to_all_cp2hp`` / ``_all_to_all_hp2cp`` live in
:mod:`mamba_cp.hidden_parallel`.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from .collectives import AllToAll
from .layout import TokenPlan, permute_rows


def seq_to_heads(parts: Sequence[torch.Tensor], plan: TokenPlan, group: object) -> torch.Tensor:
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
    recv = AllToAll.apply(send, group).view(cp * b * l_local, sum(widths))
    return permute_rows(recv, plan.to_sequence, plan.to_ranks).view(b, cp * l_local, sum(widths))


def heads_to_seq(y: torch.Tensor, plan: TokenPlan, group: object) -> torch.Tensor:
    """Return this rank's tokens for all ranks' columns: ``[B, L, w]`` (true order) -> ``[B, L_local, cp*w]``.

    Column block ``r`` of the result comes from rank ``r``. One gather, one all-to-all, one unpack copy.
    """
    cp, b, l_local = plan.cp_size, plan.batch, plan.local_len
    width = y.shape[-1]
    send = permute_rows(y.reshape(b * cp * l_local, width), plan.to_ranks, plan.to_sequence)
    recv = AllToAll.apply(send, group).view(cp, b * l_local, width)
    return recv.transpose(0, 1).reshape(b, l_local, cp * width)
