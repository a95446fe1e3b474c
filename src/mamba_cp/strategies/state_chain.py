"""Passing segment states along every sequence's chain, with the chains split over the CP ranks.

Shape legend: ``S`` sequences, ``H`` heads, ``Q = P*N`` state values per head, ``cp`` ranks, ``F`` the batch
fingerprint's length, ``J = S*H`` chains (one per sequence and head: the decay is a scalar per head, so the
chains of different heads never mix), ``n = ceil(J / cp)`` chains per rank.

Every sequence is a chain of ``2*cp`` segments (chunk ``c < cp`` is rank ``c``'s head segment, chunk ``c >= cp``
rank ``2*cp-1-c``'s tail); each rank holds two links of every chain. The state entering chunk ``i`` is the
exclusive scan ``sum_{c<i} exp(sum_{c<k<i} a_k) * final_c`` of the chunks' final states from zero
(``final_c``) and total log decays (``a_c``).

An all-gather of every rank's summaries would hand each rank all ``2*cp*J`` links, ``cp`` times its own
share, and make it combine them all: per-rank memory and work grow with ``cp * S``, which is what made packs
of many documents slow at large cp. Here one all-to-all deals the chains out instead: rank ``q`` receives every
link of chains ``[q*n, (q+1)*n)``, scans them (``2*cp`` links of ``n`` chains, a batched matmul with a
``[2cp, 2cp]`` triangular weight per chain), and a second all-to-all returns each link's incoming state to
its owner. Per rank that is ``2*J*Q`` values in, out and combined, whatever ``cp``; the backward runs the two
all-to-alls the other way. Chains are padded to ``cp * n`` with zero links (summary buffers, not tokens).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from ..collectives import AllToAll, require_process_group


def chain_scan(finals_CnQ: torch.Tensor, log_decay_Cn: torch.Tensor) -> torch.Tensor:
    """Exclusive scan along each chain: ``finals`` ``[2cp, n, Q]`` (links in chain order), ``log_decay``
    ``[2cp, n]`` -> the state entering each link ``[2cp, n, Q]`` (zero for the first).

    ``incoming_i = sum_{c<i} exp(u_i - u_{c+1}) * final_c`` with ``u_i = sum_{k<i} a_k`` (in float64: the
    differences of a long sum lose nothing there)."""
    links = finals_CnQ.shape[0]
    upto = F.pad(log_decay_Cn.double().cumsum(0), (0, 0, 1, 0))  # [2cp+1, n]: sum over links < i
    log_w = upto[:-1, None] - upto[None, 1:]  # [2cp (i), 2cp (c), n]: sum over c < k < i
    before = torch.ones(links, links, dtype=torch.bool, device=log_w.device).tril(-1)  # c < i
    w = log_w.masked_fill(~before[:, :, None], -math.inf).exp().to(finals_CnQ.dtype)
    return torch.einsum("icn,cnq->inq", w, finals_CnQ)


def _exchange(send: torch.Tensor, group: object | None) -> torch.Tensor:
    """Differentiable equal-split all-to-all along dim 0 (the identity on a single rank)."""
    if group is None:
        return send
    return AllToAll.apply(send.contiguous(), require_process_group(group, "all-to-all"))


def pass_states(final_S2HQ: torch.Tensor, log_decay_S2H: torch.Tensor, group: object | None, cp: int) -> torch.Tensor:
    """The state entering each of this rank's segments, from every rank's segment summaries.

    Args:
        final_S2HQ: ``[S, 2, H, Q]`` final state of this rank's head (0) and tail (1) segments, run from zero.
        log_decay_S2H: ``[S, 2, H]`` their total log decays (same dtype as ``final``).
        group: the CP group (None: one rank).
        cp: its size.
    Returns:
        ``[S, 2, H, Q]`` incoming states (zero for chunk 0 of a sequence). Two all-to-alls forward, two backward.
    """
    num_seqs, _, heads, width = final_S2HQ.shape
    chains = num_seqs * heads
    per_rank = -(-chains // cp)
    links = torch.cat([final_S2HQ, log_decay_S2H[..., None]], dim=-1)  # [S, 2, H, Q+1]: a decay rides with its state
    links = links.transpose(0, 1).reshape(2, chains, width + 1)  # chain j = s*H + h
    links = F.pad(links, (0, 0, 0, cp * per_rank - chains))  # [2, cp*n, Q+1]
    send = links.view(2, cp, per_rank, width + 1).transpose(0, 1)  # [cp, 2, n, Q+1]: row q, q's chains
    got = _exchange(send, group)  # row q: rank q's links of this rank's chains
    chain = torch.cat([got[:, 0], got[:, 1].flip(0)])  # [2cp, n, Q+1] in chain order
    incoming = chain_scan(chain[..., :width], chain[..., width])  # [2cp, n, Q]
    back = torch.stack([incoming[:cp], incoming[cp:].flip(0)], dim=1)  # [cp, 2, n, Q]: row q, q's two links
    mine = _exchange(back, group)  # row q: q's chains, this rank's links
    mine = mine.transpose(0, 1).reshape(2, cp * per_rank, width)[:, :chains]
    return mine.reshape(2, num_seqs, heads, width).transpose(0, 1)
