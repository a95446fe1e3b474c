"""Final states of a prompt for generation: the pieces the strategies' ``scan_with_states`` share.

Shape legend: ``B`` batch rows, ``L`` tokens per row (whole sequences, true order), ``T`` tokens of a packed
row (``B = 1``), ``S`` sequences (``B`` for BSHD, the packed sequences otherwise), ``H`` heads, ``P`` head_dim,
``G`` groups, ``N`` d_state, ``C`` conv channels (``H*P + 2*G*N``), ``K`` conv width.

What generation needs from a Mamba2 layer after a prompt (:class:`~mamba_cp.strategies.base.FinalStates`): the
SSD state after each sequence's last token and the last ``K`` pre-conv inputs of each sequence. For rows of
whole sequences (no CP, or hidden-parallel's head shard) the SSD kernel returns the final state of a BSHD row
itself (``return_final_states``); a packed row holds several sequences, whose end states are computed here from
zero, ``sum_t exp(log decay after t) * dt_t * outer(x_t, B_t)`` per sequence (the summaries of state passing,
:func:`~mamba_cp.kernels.segment_scan.segment_states`, over the sequences' token ranges).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .. import kernels
from ..kernels.segment_scan import SegmentWork, build_segment_work, segment_states
from ..kernels.ssd_reference import process_dt
from ..layout import TokenPlan
from ..plan_cache import PlanCache
from ..ssm_block import SSMShape, conv_split, decay_rates, token_cumsum
from .base import FinalStates


@dataclass(frozen=True, slots=True)
class SequenceRanges:
    """The sequences of a packed row in true order, as token ranges on the tokens' device (built once per batch)."""

    first: torch.Tensor
    """``[S]`` int64 first token of each sequence."""
    stop: torch.Tensor
    """``[S]`` int64 one past its last token."""
    token_seq: torch.Tensor
    """``[T]`` int64 sequence of each token."""
    work: SegmentWork
    """The sequences as segments, for :func:`~mamba_cp.kernels.segment_scan.segment_states`."""
    plan: TokenPlan
    """The batch plan these ranges were built for (held, so that its id, the cache key, stays unique)."""


def sequence_ranges(plans: PlanCache, plan: TokenPlan, device: torch.device) -> SequenceRanges:
    """The :class:`SequenceRanges` of a packed batch's :class:`~mamba_cp.layout.TokenPlan`, from the batch's plan
    cache: built once per batch (one host read of the plan's ``cu_seqlens``, for the work table), then the same
    object for every layer. Only prefill asks for it; training never does."""

    def build() -> SequenceRanges:
        bounds = plan.cu_seqlens.tolist()
        starts, stops = bounds[:-1], bounds[1:]
        lengths = torch.tensor(stops) - torch.tensor(starts)
        return SequenceRanges(
            first=torch.tensor(starts, dtype=torch.int64, device=device),
            stop=torch.tensor(stops, dtype=torch.int64, device=device),
            token_seq=torch.arange(len(starts)).repeat_interleave(lengths).to(device),
            work=build_segment_work(starts, stops, bounds[-1], device),
            plan=plan,
        )

    return plans.get("sequence-ranges", (id(plan), str(device)), None, build)


def range_tails(
    x_RLC: torch.Tensor, width: int, first: torch.Tensor | None = None, stop: torch.Tensor | None = None
) -> torch.Tensor:
    """The last ``width`` tokens of each range, zeros before its start: ``[R, width, C]``.

    Without ``first``/``stop`` the ranges are the rows of ``x_RLC`` ``[R, L, C]``; with them (``[R]`` int64) they
    are the token ranges ``[first, stop)`` of a packed ``[1, T, C]`` (device index ops, no host read).
    """
    if first is None:
        length = x_RLC.shape[1]
        return x_RLC[:, length - width :] if length >= width else F.pad(x_RLC, (0, 0, width - length, 0))
    pos = stop[:, None] - width + torch.arange(width, device=stop.device)  # [R, width]
    picked = x_RLC[0].index_select(0, pos.clamp(min=0).reshape(-1)).view(*pos.shape, x_RLC.shape[-1])
    inside = (pos >= first[:, None])[..., None]
    return torch.where(inside, picked, torch.zeros((), dtype=picked.dtype, device=picked.device))


def last_tokens(xBC_BLC: torch.Tensor, width: int, ranges: SequenceRanges | None) -> torch.Tensor:
    """The last ``width`` pre-conv tokens of every sequence, zeros before its start: ``[S, C, width]``.

    ``xBC_BLC`` ``[B, L, C]`` (rows of whole sequences: ``S = B``) or, with ``ranges``, a packed ``[1, T, C]``.
    """
    bounds = () if ranges is None else (ranges.first, ranges.stop)
    return range_tails(xBC_BLC, width, *bounds).transpose(1, 2).contiguous()


def sequence_end_states(
    x_THP: torch.Tensor, B_TGN: torch.Tensor, dt_TH: torch.Tensor, dA_TH: torch.Tensor, ranges: SequenceRanges
) -> torch.Tensor:
    """Each packed sequence's state after its last token, from a zero state at its start: ``[S, H, P, N]``.

    ``dt_TH`` is the processed time step (softplus, clamp) and ``dA_TH = dt * A`` each token's log decay, both in
    the compute dtype; ``x_THP`` and ``B_TGN`` the conv output. Log decays are summed in float64.
    """
    cum = F.pad(token_cumsum(dA_TH.double(), dim=0), (0, 0, 1, 0))  # [T+1, H]: sum over tokens < t
    after = cum.index_select(0, ranges.stop).index_select(0, ranges.token_seq) - cum[1:]  # log decay after t
    weight = after.to(dt_TH.dtype).exp() * dt_TH
    return segment_states(x_THP, B_TGN, weight, ranges.work)


def conv_ssd_with_states(
    xBC_BLC: torch.Tensor,
    dt_BLH: torch.Tensor,
    *,
    shape: SSMShape,
    conv_weight_CK: torch.Tensor,
    conv_bias_C: torch.Tensor | None,
    dt_bias_H: torch.Tensor,
    A_log_H: torch.Tensor,
    D_H: torch.Tensor,
    chunk_size: int,
    dt_limit: tuple[float, float],
    seq_idx_BL: torch.Tensor | None,
    ranges: SequenceRanges | None,
) -> tuple[torch.Tensor, FinalStates]:
    """:func:`mamba_cp.ssm_block.conv_ssd` over rows of whole sequences, plus their :class:`FinalStates`.

    ``xBC_BLC`` ``[B, L, C]``, ``dt_BLH`` ``[B, L, H]`` -> ``y`` ``[B, L, H*P]`` and the states of the ``S``
    sequences (``B`` rows, or the packed sequences of ``ranges`` with ``seq_idx_BL``).
    """
    b, length, _ = xBC_BLC.shape
    conv_state = last_tokens(xBC_BLC, conv_weight_CK.shape[-1], ranges)
    x, B, C = conv_split(xBC_BLC, conv_weight_CK, conv_bias_C, seq_idx_BL, shape)
    A_H = decay_rates(A_log_H)
    scan = dict(D=D_H, dt_bias=dt_bias_H, dt_softplus=True, dt_limit=dt_limit)
    if ranges is None:  # rows of whole sequences: the kernel returns their final states
        y, final = kernels.ssd_chunk_scan(x, dt_BLH, A_H, B, C, chunk_size, return_final_states=True, **scan)
    else:
        y = kernels.ssd_chunk_scan(x, dt_BLH, A_H, B, C, chunk_size, seq_idx=seq_idx_BL, **scan)
        cdtype = torch.float64 if x.dtype == torch.float64 else torch.float32
        dt_p = process_dt(dt_BLH[0], dt_bias_H, True, dt_limit, dtype=cdtype)
        final = sequence_end_states(x[0], B[0], dt_p, dt_p * A_H.to(cdtype), ranges)
    return y.reshape(b, length, shape.d_inner), FinalStates(ssm=final, conv=conv_state)
