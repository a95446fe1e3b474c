"""Passing segment states along every sequence's chain, with the chains split over the CP ranks.

Shape legend: ``S`` sequences, ``H`` heads, ``Q = P*N`` state values per head, ``cp`` ranks, ``J = S*H``
chains (one per sequence and head: the decay is a scalar per head, so the chains of different heads never mix),
``n = ceil(J / cp)`` chains per rank.

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

A pack in the stream layout is one chain whose links may hold document starts: such a link is a *barrier*
(a flag sent with its decay), and no state passes through it (its own final state, from its last document,
still starts the chain again).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from ..collectives import AllToAll, require_process_group


def _exclusive_sums(values_Ln: torch.Tensor, order: torch.Tensor, position_L: torch.Tensor) -> torch.Tensor:
    """``[2cp, 2cp, n]`` float64: entry ``(i, c)`` sums ``values`` over the links strictly between ``c`` and ``i``
    in chain order (meaningful where ``c`` precedes ``i``)."""
    upto = F.pad(values_Ln.index_select(0, order).double().cumsum(0), (0, 0, 1, 0))  # [2cp+1, n] sums before p
    return upto.index_select(0, position_L)[:, None] - upto.index_select(0, position_L + 1)[None]


def chain_scan(
    finals_LnQ: torch.Tensor,
    log_decay_Ln: torch.Tensor,
    position_L: torch.Tensor,
    barrier_Ln: torch.Tensor | None = None,
) -> torch.Tensor:
    """Exclusive scan along each chain, its links in any order: ``finals`` ``[2cp, n, Q]``, ``log_decay``
    ``[2cp, n]``, ``position`` ``[2cp]`` int64 the chain position of each link (a permutation of ``0..2cp-1``),
    ``barrier`` ``[2cp, n]`` 0/1 (links no state passes through; None: none) -> the state entering each link
    ``[n, 2cp, Q]`` (zero for position 0; links in the input's order).

    ``incoming_i = sum_{c before i} exp(u_i - u_{c+1}) * final_c`` with ``u_i`` the sum of the log decays of the
    links before position ``i`` (float64: the differences of a long sum lose nothing there), over the ``c`` with
    no barrier strictly between ``c`` and ``i``. One batched matmul with a ``[2cp, 2cp]`` triangular weight per
    chain, which reads the links where they lie (no reordering copy).
    """
    order = torch.argsort(position_L)  # the link at each chain position
    log_w = _exclusive_sums(log_decay_Ln, order, position_L)  # [2cp, 2cp, n]
    passes = (position_L[None, :] < position_L[:, None])[:, :, None]  # link c precedes link i
    if barrier_Ln is not None:  # counts of 0/1 flags: exact in float64
        passes = passes & (_exclusive_sums(barrier_Ln, order, position_L) == 0)
    w = log_w.masked_fill(~passes, -math.inf).exp().to(finals_LnQ.dtype)
    return torch.bmm(w.permute(2, 0, 1), finals_LnQ.transpose(0, 1))


def link_positions(cp: int, device: torch.device) -> torch.Tensor:
    """``[2cp]`` chain position of link ``2*q + half``: rank ``q``'s head (half 0) is chunk ``q``, its tail chunk
    ``2*cp - 1 - q``."""
    q = torch.arange(cp, device=device)
    return torch.stack([q, 2 * cp - 1 - q], dim=1).reshape(-1)


def _exchange(send: torch.Tensor, group: object | None) -> torch.Tensor:
    """Differentiable equal-split all-to-all along dim 0 (on a single rank: the buffer itself); contiguous."""
    if group is None:
        return send.contiguous()
    return AllToAll.apply(send.contiguous(), require_process_group(group, "all-to-all"))


def _deal(final_S2HQ: torch.Tensor, scalars_S2HE: torch.Tensor, cp: int, per_rank: int) -> torch.Tensor:
    """The send buffer ``[cp, 2, n, Q+E]``: row ``q`` holds this rank's two links of chains ``[q*n, (q+1)*n)``,
    each state with its ``E`` scalars (decay, barrier). One pass over the states when ``cp`` divides ``S`` (whole
    sequences per rank), else two and zero links for the padding."""
    num_seqs, _, heads, width = final_S2HQ.shape
    extra = scalars_S2HE.shape[-1]
    if num_seqs % cp == 0:
        view = (cp, num_seqs // cp, 2, heads)
        states, scalars = final_S2HQ.reshape(*view, width), scalars_S2HE.reshape(*view, extra)
        both = torch.cat([states.transpose(1, 2), scalars.transpose(1, 2)], dim=-1)
        return both.view(cp, 2, per_rank, width + extra)
    chains = num_seqs * heads
    links = torch.cat([final_S2HQ.transpose(0, 1), scalars_S2HE.transpose(0, 1)], dim=-1)
    links = F.pad(links.view(2, chains, width + extra), (0, 0, 0, cp * per_rank - chains))  # [2, cp*n, Q+E]
    return links.view(2, cp, per_rank, width + extra).transpose(0, 1)


def _undeal(mine: torch.Tensor, num_seqs: int, heads: int) -> torch.Tensor:
    """The inverse of :func:`_deal` for the incoming states: ``[cp, 2, n, Q]`` -> ``[S, 2, H, Q]`` (contiguous)."""
    cp, _, per_rank, width = mine.shape
    if num_seqs % cp == 0:
        return mine.view(cp, 2, num_seqs // cp, heads, width).transpose(1, 2).reshape(num_seqs, 2, heads, width)
    flat = mine.transpose(0, 1).reshape(2, cp * per_rank, width)[:, : num_seqs * heads]
    return flat.reshape(2, num_seqs, heads, width).transpose(0, 1).contiguous()


def pass_states(
    final_S2HQ: torch.Tensor,
    log_decay_S2H: torch.Tensor,
    group: object | None,
    cp: int,
    barrier_S2: torch.Tensor | None = None,
) -> torch.Tensor:
    """The state entering each of this rank's segments, from every rank's segment summaries.

    Args:
        final_S2HQ: ``[S, 2, H, Q]`` final state of this rank's head (0) and tail (1) segments, run from zero.
        log_decay_S2H: ``[S, 2, H]`` their total log decays (same dtype as ``final``).
        group: the CP group (None: one rank).
        cp: its size.
        barrier_S2: ``[S, 2]`` bool, segments no state passes through (None: none; packs in the stream layout).
    Returns:
        ``[S, 2, H, Q]`` incoming states (zero for chunk 0 of a sequence), contiguous. Two all-to-alls forward,
        two backward.
    """
    num_seqs, _, heads, width = final_S2HQ.shape
    per_rank = -(-num_seqs * heads // cp)  # chain j = s*H + h goes to rank j // n
    scalars = [log_decay_S2H[..., None]]
    if barrier_S2 is not None:
        scalars.append(barrier_S2.to(final_S2HQ.dtype)[:, :, None, None].expand(num_seqs, 2, heads, 1))
    send = _deal(final_S2HQ, torch.cat(scalars, dim=-1), cp, per_rank)
    got = _exchange(send, group).view(2 * cp, per_rank, -1)  # row q: rank q's links of my chains, link 2q + half
    finals, extra = torch.split(got, [width, len(scalars)], dim=-1)  # split: one pass backward (slices take two)
    barrier = extra[..., 1] if barrier_S2 is not None else None
    incoming = chain_scan(finals, extra[..., 0], link_positions(cp, got.device), barrier)  # [n, 2cp, Q]
    back = incoming.transpose(0, 1).view(cp, 2, per_rank, width)  # row q: the incoming states of q's two links
    return _undeal(_exchange(back, group), num_seqs, heads)  # the all-to-all returns row q: q's chains, my links
