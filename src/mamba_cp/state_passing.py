"""State-passing context parallelism for a Mamba2 mixer: every rank keeps its own tokens.

Shape legend: ``B`` batch, ``L_local`` tokens per row on this rank (``T_local`` packed, with ``B = 1``),
``S`` sequences (``B`` for BSHD), ``H`` heads, ``P`` head_dim, ``G`` groups, ``m = H / G`` heads per group,
``N`` d_state, ``C`` conv_dim (``H*P + 2*G*N``), ``Q`` block size (the SSD chunk size), ``cp`` ranks.

Each rank holds two *segments* of every sequence (its head-tail chunks ``r`` and ``2*cp-1-r``; see
:mod:`mamba_cp.segments`). Per layer:

1. **conv1d**: each segment needs the ``K-1`` pre-conv tokens before it. Every rank all-gathers the last
   ``K-1`` tokens of each of its segments (``2*S*(K-1)*C`` values), picks its halos, and convolves
   ``[halo | segment]`` locally. Halos before a sequence start are zeros.
2. **SSD from zero**: the kernel runs on every segment from a zero state (BSHD: segments are batch rows;
   THD: ``seq_idx`` = segment id), giving ``y0``, each segment's final state ``[H, P, N]`` and its total
   log decay ``sum(dt*A)`` per head.
3. **State passing**: one all-gather of those summaries (float32, float64 for float64 input), then, per
   sequence, the state entering chunk ``c`` is ``sum_{c'<c} exp(sum_{c'<k<c} log_decay_k) * final_{c'}``.
4. **Correction**: ``y_t += C_t . (exp(cumsum(dt*A) through t) * h_in)`` per head, for every token of the
   segment (a segment lies inside one sequence).

Everything is differentiable torch ops plus an autograd all-gather (backward: reduce-scatter), so the
backward pass is exact and sends gradients of halos and summaries back to their owners. No per-token
activation crosses ranks except the halos; ``num_heads % cp`` is unconstrained.

The object owns no parameters: it reads the mixer's ``conv1d``, ``dt_bias``, ``A_log`` and ``D`` on every
call (whole, not sliced), so each rank's gradient is that of its own tokens; their sum over the CP group is
the true gradient.
"""

from __future__ import annotations

import math
import weakref

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

from . import kernels
from .groups import resolve_cp_group
from .kernels.ssd_reference import process_dt
from .layout import TokenPlanCache
from .segments import SegmentPlan, SegmentPlanCache
from .validation import batch_dims, check_divisible

_all_gather_single = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
_reduce_scatter_single = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor


class AllGather(torch.autograd.Function):
    """Autograd-aware all-gather of a flat tensor: ``[n]`` -> ``[cp, n]`` (row ``r`` from rank ``r``).

    Every rank may use every row, so the gradient of rank ``r``'s input is the sum over ranks of their
    gradients of row ``r``: a reduce-scatter.
    """

    @staticmethod
    def forward(ctx, input_: torch.Tensor, group: dist.ProcessGroup, size: int) -> torch.Tensor:
        ctx.group = group
        output = input_.new_empty(size * input_.numel())
        _all_gather_single(output, input_.contiguous(), group=group)
        return output.view(size, input_.numel())

    @staticmethod
    def backward(ctx, grad_output: torch.Tensor):
        grad_input = grad_output.new_empty(grad_output.shape[1])
        _reduce_scatter_single(grad_input, grad_output.contiguous().view(-1), group=ctx.group)
        return grad_input, None, None


def all_gather(input_: torch.Tensor, group: dist.ProcessGroup | None, size: int) -> torch.Tensor:
    """``input_`` (any shape, flattened) from every rank: ``[cp, input_.numel()]``; differentiable.

    ``group=None`` (a single rank) returns ``input_`` as one row.
    """
    flat = input_.reshape(-1)
    if group is None:
        return flat[None]
    return AllGather.apply(flat, group, size)


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    # States and decays stay float32 or wider; float64 stays float64 (exact tests).
    return torch.float64 if dtype == torch.float64 else torch.float32


class StatePassingContextParallel:
    """State-passing CP for one Mamba2 mixer: tokens stay home, segments pass their states.

    Args:
        cp_group: the context-parallel ``ProcessGroup``, a 1-D ``DeviceMesh`` or a ``CPGroup``.
        mixer: the :class:`~mamba_cp.mixer.Mamba2Mixer` whose ``conv1d``, ``dt_bias``, ``A_log``, ``D``,
            ``chunk_size`` and ``time_step_limit`` it uses.
        plan_cache: shared per-batch :class:`~mamba_cp.segments.SegmentPlanCache` (``parallelize``
            passes one for all layers).

    Collectives per layer: forward two all-gathers (conv halos, then state summaries), backward two
    reduce-scatters; the halo exchange is skipped for ``conv_kernel == 1``.
    """

    def __init__(self, cp_group, mixer: nn.Module, plan_cache: SegmentPlanCache | None = None) -> None:
        group = resolve_cp_group(cp_group)
        self.cp_group = group.group
        self.cp_size = group.size
        self.cp_rank = group.rank
        self._mixer = mixer
        self.plans = plan_cache if plan_cache is not None else SegmentPlanCache()
        self.shape = mixer.shape
        check_divisible(self.shape.num_heads, self.shape.n_groups, "num_heads", "n_groups")

    # ------------------------------------------------------------------ per-batch plan

    def plan_for(self, local: torch.Tensor, cu_seqlens: torch.Tensor | None) -> SegmentPlan:
        """The batch's segment plan for sequence-sharded ``local`` ``[B, L_local, W]`` / ``[T_local, W]``."""
        batch, local_len = batch_dims(local, cu_seqlens)
        mixer = self._mixer
        return self.plans.get(
            self.cp_size,
            self.cp_rank,
            batch,
            local_len,
            cu_seqlens,
            halo=mixer.conv_kernel_size - 1,
            block_size=mixer.chunk_size,
            device=local.device,
        )

    # ------------------------------------------------------------------ the mixer's hot path

    def conv_ssd(self, xBC_BLC: torch.Tensor, dt_BLH: torch.Tensor, plan: SegmentPlan) -> torch.Tensor:
        """The mixer's conv1d + SSD under CP: ``xBC`` ``[B, L_local, C]``, ``dt`` ``[B, L_local, H]`` ->
        ``y`` ``[B, L_local, H*P]`` (with the ``D`` skip; before gating and norm)."""
        mixer, shape = self._mixer, self.shape
        b, local_len, _ = xBC_BLC.shape
        if (b, local_len) != (plan.batch, plan.local_len):
            raise ValueError(f"xBC is {tuple(xBC_BLC.shape)} but the plan is for [{plan.batch}, {plan.local_len}]")
        xBC = self.conv(xBC_BLC, plan)
        gn = shape.n_groups * shape.d_state
        x, B, C = torch.split(xBC, [shape.d_inner, gn, gn], dim=-1)
        cdtype = _compute_dtype(x.dtype)
        A_log = mixer.A_log.float() if mixer.A_log.dtype in (torch.float16, torch.bfloat16) else mixer.A_log
        A_H = -torch.exp(A_log)
        dt_BLH_p = process_dt(dt_BLH, mixer.dt_bias, True, mixer.time_step_limit, dtype=cdtype)
        dA_BLH = dt_BLH_p * A_H.to(cdtype)  # log decay of each token
        ssd = self._ssd_rows if plan.packed is None else self._ssd_packed
        y = ssd(x, dt_BLH, A_H, B, C, dt_BLH_p, dA_BLH, plan)
        return y.reshape(b, local_len, shape.d_inner)

    def _kernel(self, x, dt, A, B, C, **kw) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """The SSD kernel from a zero state; ``x`` ``[R, t, H*P]``, ``B``/``C`` ``[R, t, G*N]``."""
        s, m = self.shape, self._mixer
        return kernels.ssd_chunk_scan(
            x.unflatten(-1, (s.num_heads, s.head_dim)),
            dt,
            A,
            B.unflatten(-1, (s.n_groups, s.d_state)),
            C.unflatten(-1, (s.n_groups, s.d_state)),
            m.chunk_size,
            D=m.D,
            dt_bias=m.dt_bias,
            dt_softplus=True,
            dt_limit=m.time_step_limit,
            **kw,
        )

    def _ssd_rows(self, x, dt, A_H, B, C, dt_p, dA, plan: SegmentPlan) -> torch.Tensor:
        """BSHD: segments are the rows ``[2B, c]`` of ``[B, 2, c]``; returns ``y`` ``[2B, c, H, P]``."""
        s = self.shape
        rows, c = 2 * plan.batch, plan.seg_len
        cdtype = dA.dtype

        def seg(t: torch.Tensor) -> torch.Tensor:
            return t.reshape(rows, c, t.shape[-1])

        y0, final_RHPN = self._kernel(seg(x), seg(dt), A_H, seg(B), seg(C), return_final_states=True)
        cum_RcH = seg(dA).double().cumsum(1)  # log decay from the segment start through each token
        log_decay_RH = cum_RcH[:, -1].to(cdtype)
        h_in = self.incoming_states(
            final_RHPN.view(plan.batch, 2, *final_RHPN.shape[1:]), log_decay_RH.view(plan.batch, 2, -1), plan
        )
        m = s.num_heads // s.n_groups
        corr = torch.einsum(
            "rtgn,rgmpn->rtgmp",
            seg(C).to(cdtype).view(rows, c, s.n_groups, s.d_state),
            h_in.reshape(rows, s.n_groups, m, s.head_dim, s.d_state),
        )
        corr = corr * cum_RcH.to(cdtype).exp().view(rows, c, s.n_groups, m, 1)
        return (y0.to(cdtype) + corr.reshape(y0.shape)).to(y0.dtype)

    def _ssd_packed(self, x, dt, A_H, B, C, dt_p, dA, plan: SegmentPlan) -> torch.Tensor:
        """THD: one kernel call with ``seq_idx`` = segment id; per-segment reductions in blocks of ``Q``
        tokens (every segment padded to whole blocks). Returns ``y`` ``[1, T_local, H, P]``."""
        s, pk = self.shape, plan.packed
        assert pk is not None
        t_local, q, nb, nseg = plan.local_len, plan.block_size, pk.num_blocks, plan.num_segments
        g, m, p, n = s.n_groups, s.num_heads // s.n_groups, s.head_dim, s.d_state
        cdtype = dA.dtype
        y0 = self._kernel(x, dt, A_H, B, C, seq_idx=pk.seg_idx)  # [1, T, H, P]

        # Log decays in float64: cumsum over the whole local stream, differences per segment.
        cum = F.pad(dA[0].double().cumsum(0), (0, 0, 1, 0))  # [T+1, H]: cum[t] = sum over tokens < t
        start_SH = cum.index_select(0, pk.seg_first)
        log_decay_SH = cum.index_select(0, pk.seg_stop) - start_SH  # [2S, H] whole segment
        through_TH = cum[1:] - start_SH.index_select(0, pk.token_seg)  # segment start through t
        after_TH = log_decay_SH.index_select(0, pk.token_seg) - through_TH  # after t to segment end

        def blocks(t_TW: torch.Tensor) -> torch.Tensor:
            # Every token to its slot in the padded block layout [nb * Q, W] (pads stay zero).
            flat = t_TW.new_zeros(nb * q, t_TW.shape[-1]).index_copy_(0, pk.block_of_token, t_TW)
            return flat.view(nb, q, t_TW.shape[-1])

        # Final state of every segment: sum_t exp(after_t) * dt_t * x_t (outer) B_t, per block then segment.
        weight_TH = after_TH.to(cdtype).exp() * dt_p[0]
        wx = blocks((weight_TH[:, :, None] * x[0].to(cdtype).view(t_local, s.num_heads, p)).flatten(1))
        final_blocks = torch.einsum(
            "kqgmp,kqgn->kgmpn", wx.view(nb, q, g, m, p), blocks(B[0].to(cdtype)).view(nb, q, g, n)
        )
        final = final_blocks.new_zeros(nseg, g, m, p, n).index_add_(0, pk.block_seg, final_blocks)

        h_in = self.incoming_states(
            final.view(plan.num_seqs, 2, s.num_heads, p, n), log_decay_SH.to(cdtype).view(plan.num_seqs, 2, -1), plan
        )
        h_blocks = h_in.reshape(nseg, g, m, p, n).index_select(0, pk.block_seg)
        corr_blocks = torch.einsum("kqgn,kgmpn->kqgmp", blocks(C[0].to(cdtype)).view(nb, q, g, n), h_blocks)
        corr_THP = corr_blocks.reshape(nb * q, s.num_heads, p).index_select(0, pk.block_of_token)
        corr_THP = corr_THP * through_TH.to(cdtype).exp()[:, :, None]
        return (y0[0].to(cdtype) + corr_THP).to(y0.dtype)[None]

    # ------------------------------------------------------------------ the two exchanges

    def conv(self, xBC_BLC: torch.Tensor, plan: SegmentPlan) -> torch.Tensor:
        """Causal conv1d (SiLU) of this rank's tokens with halos from the tokens before each segment:
        ``[B, L_local, C]`` -> ``[B, L_local, C]``. One all-gather (none for ``conv_kernel == 1``)."""
        mixer = self._mixer
        weight_CK, bias_C = mixer.conv1d.weight.squeeze(1), mixer.conv1d.bias
        halo, width = plan.halo, xBC_BLC.shape[-1]
        if halo == 0:
            return kernels.causal_conv1d(xBC_BLC, weight_CK, bias_C, activation="silu")
        if plan.packed is None:
            rows, c = 2 * plan.batch, plan.seg_len
            seg = xBC_BLC.reshape(rows, c, width)
            tails = seg[:, c - halo :] if c >= halo else F.pad(seg, (0, 0, halo - c, 0))  # [2B, halo, C]
            halos = self.exchange_halos(tails.reshape(rows * halo, width), plan).view(rows, halo, width)
            out = kernels.causal_conv1d(torch.cat([halos, seg], dim=1), weight_CK, bias_C, activation="silu")
            return out[:, halo:].reshape(xBC_BLC.shape)
        pk = plan.packed
        x_TC = xBC_BLC[0]
        slots = plan.num_segments * halo
        tails = x_TC.new_zeros(slots, width).index_copy_(0, pk.tail_slots, x_TC.index_select(0, pk.tail_tokens))
        halos = self.exchange_halos(tails, plan)
        # Conv stream [halo_0, seg_0, halo_1, seg_1, ...]: a window never reaches past its own halo.
        stream = x_TC.new_zeros(plan.local_len + slots, width)
        stream = stream.index_copy_(0, pk.ext_tokens, x_TC).index_copy_(0, pk.ext_halo, halos)
        out = kernels.causal_conv1d(stream[None], weight_CK, bias_C, activation="silu")
        return out[0].index_select(0, pk.ext_tokens)[None]

    def exchange_halos(self, tails: torch.Tensor, plan: SegmentPlan) -> torch.Tensor:
        """Every rank's segment tails ``[2*S*halo, C]`` -> this rank's halos ``[2*S*halo, C]`` (zeros before
        a sequence start). One all-gather; its backward sends the halo gradients back to their owners."""
        gathered = all_gather(tails, self.cp_group, self.cp_size).view(-1, tails.shape[-1])
        picked = gathered.index_select(0, plan.halo_rows)
        return tails.new_zeros(tails.shape).index_copy_(0, plan.halo_slots, picked)

    def incoming_states(
        self, final_S2HPN: torch.Tensor, log_decay_S2H: torch.Tensor, plan: SegmentPlan
    ) -> torch.Tensor:
        """The state entering each of this rank's segments, from every segment's summary.

        Args:
            final_S2HPN: ``[S, 2, H, P, N]`` final state of each local segment run from zero.
            log_decay_S2H: ``[S, 2, H]`` its total log decay ``sum(dt*A)``.
        Returns:
            ``[S, 2, H, P, N]`` incoming states (zero for the first chunk of a sequence). One all-gather.
        """
        cp, num_seqs = plan.cp_size, plan.num_seqs
        n_final = final_S2HPN.numel()
        gathered = all_gather(torch.cat([final_S2HPN.reshape(-1), log_decay_S2H.reshape(-1)]), self.cp_group, cp)
        finals = gathered[:, :n_final].view(cp, *final_S2HPN.shape)
        decays = gathered[:, n_final:].view(cp, *log_decay_S2H.shape)
        # Chain order of chunks: c < cp is rank c's head segment, c >= cp is rank (2cp-1-c)'s tail segment.
        finals_c = torch.cat([finals[:, :, 0], finals[:, :, 1].flip(0)])  # [2cp, S, H, P, N]
        decays_c = torch.cat([decays[:, :, 0], decays[:, :, 1].flip(0)])  # [2cp, S, H]
        upto = F.pad(decays_c.double().cumsum(0), (0, 0, 0, 0, 1, 0))  # [2cp+1, S, H]: sum over chunks < c
        # exp(sum of log decays of chunks strictly between c and this rank's chunk i), for c before i only.
        log_w = upto.index_select(0, plan.chain_pos)[:, None] - upto[None, 1:]  # [2, 2cp, S, H]
        w = log_w.masked_fill(~plan.chain_before[:, :, None, None], -math.inf).exp().to(final_S2HPN.dtype)
        assert w.shape == (2, 2 * cp, num_seqs, final_S2HPN.shape[2])
        return torch.einsum("ickh,ckhpn->kihpn", w, finals_c)

    def __repr__(self) -> str:
        s = self.shape
        return (
            f"StatePassingContextParallel(cp_size={self.cp_size}, cp_rank={self.cp_rank}, heads={s.num_heads}, "
            f"groups={s.n_groups}, segments_per_sequence=2, halo={self._mixer.conv_kernel_size - 1})"
        )


# --------------------------------------------------------------------------------------------------
# Construction from parallelize
# --------------------------------------------------------------------------------------------------

_shared_caches: weakref.WeakKeyDictionary[TokenPlanCache, SegmentPlanCache] = weakref.WeakKeyDictionary()
"""One segment-plan cache per ``parallelize`` call: keyed by (and living as long as) the call's shared
token-plan cache, so every mixer it touches builds a batch's segment plan once."""


def state_passing_factory(group, mixer: nn.Module, plans: TokenPlanCache) -> StatePassingContextParallel:
    """``parallelize``'s factory: a :class:`StatePassingContextParallel` sharing a plan cache with every
    mixer parallelized in the same call."""
    cache = _shared_caches.get(plans)
    if cache is None:
        cache = _shared_caches[plans] = SegmentPlanCache()
    return StatePassingContextParallel(group, mixer, cache)
