"""State-passing context parallelism for a Mamba2 mixer: every rank keeps its own tokens.

Shape legend: ``B`` batch, ``L_local`` tokens per row on this rank (``T_local`` packed, with ``B = 1``),
``S`` sequences (``B`` for BSHD), ``H`` heads, ``P`` head_dim, ``G`` groups, ``m = H / G`` heads per group,
``N`` d_state, ``C`` conv_dim (``H*P + 2*G*N``), ``Q`` block size (the SSD chunk size), ``cp`` ranks.

Each rank holds two *segments* of every sequence (its head-tail chunks ``r`` and ``2*cp-1-r``; see
:mod:`mamba_cp.segments`). Per layer:

1. **conv1d**: each segment needs the ``K-1`` pre-conv tokens before it. Every rank all-gathers the last
   ``K-1`` tokens of each of its segments (``2*S*(K-1)*C`` values) and picks its halos. BSHD and stream rows:
   the conv runs on the segment rows with the halos as its ``history`` (our Triton conv and the reference read
   it in one pass; for the ``causal_conv1d`` package the kernels module composes it from windows, as below).
   Packs cut per document: the conv runs on the segments from zero history (``seq_idx`` = segment
   id), and only the first ``K-1`` outputs of each segment, the ones that see the halo, are recomputed from
   small ``[halo | segment head]`` windows and written over. Halos before a sequence start are zeros.
2. **Summaries**: each segment's final state from a zero state, ``sum_t exp(log decay after t) * dt_t *
   outer(x_t, B_t)`` per head (:func:`~mamba_cp.kernels.segment_scan.segment_states`: a fused Triton kernel
   on GPUs, float32 accumulation; its readable reference elsewhere), and its total log decay ``sum(dt*A)``.
3. **State passing**: per sequence and head, the state entering chunk ``c`` is
   ``sum_{c'<c} exp(sum_{c'<k<c} log_decay_k) * final_{c'}``. The ``S*H`` chains are dealt out over the ranks:
   one all-to-all brings every link of a rank's share of chains to it, it scans them, a second all-to-all returns
   the incoming states (float32, float64 for float64 input; :mod:`~mamba_cp.strategies.state_chain`). Per rank
   this is ``2*S*H*P*N`` values whatever ``cp``.
4. **SSD with the incoming state**: BSHD runs the kernel once on the segment rows with
   ``initial_states`` = the incoming states, which yields the exact output directly. THD runs the kernel
   with ``seq_idx`` = segment id (it takes an initial state for the first sequence only) and adds
   ``C_t . (exp(cumsum(dt*A) through t) * h_in)`` per head
   (:func:`~mamba_cp.kernels.segment_scan.state_correction`, fused likewise).

Everything is differentiable: torch ops, the kernels (the SSD kernel returns the gradient of its
``initial_states``; the fused kernels have hand-written backward passes), an autograd all-gather (backward:
reduce-scatter) and autograd all-to-alls (backward: the reverse all-to-all), so the backward pass is exact and
sends gradients of halos and summaries back to their owners. No per-token
activation crosses ranks except the halos; ``num_heads % cp`` is unconstrained.

The strategy owns no parameters: the mixer hands it ``conv1d``, ``dt_bias``, ``A_log`` and ``D`` on every
call (:class:`~mamba_cp.strategies.base.SSMParams`, whole, not sliced), so each rank's gradient is that of its
own tokens; their sum over the CP group is the true gradient.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from .. import kernels
from ..collectives import all_gather
from ..consistency import check_ranks_agree
from ..groups import CPGroup
from ..kernels.segment_scan import segment_states, state_correction
from ..kernels.ssd_reference import process_dt
from ..plan_cache import PlanCache
from ..segments import SegmentPlan, chain_rank, segment_plan
from ..ssm_block import decay_rates, token_cumsum
from ..validation import ConfigError, batch_dims, describe_fingerprint
from .base import FinalStates, SSMConfig, SSMParams, project
from .final_states import range_tails
from .state_chain import pass_states


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    # States and decays stay float32 or wider; float64 stays float64 (exact tests).
    return torch.float64 if dtype == torch.float64 else torch.float32


class StatePassing:
    """State-passing CP for one Mamba2 mixer: tokens stay home, segments pass their states.

    Args:
        group: the CP group.
        config: the mixer's :class:`~mamba_cp.strategies.base.SSMConfig`.
        plans: the per-batch plan cache shared by every layer of the model.
        debug: check on every call, with one small collective, that all ranks agree on the batch.
        note: why this strategy was chosen (shown in the repr).

    Collectives per layer: forward an all-gather (conv halos and the batch fingerprint; the fingerprint alone for
    ``conv_kernel == 1``) and two all-to-alls (segment states out and back), backward a reduce-scatter and two
    all-to-alls. Any head count works.
    """

    name = "state_passing"

    def __init__(
        self, group: CPGroup, config: SSMConfig, plans: PlanCache, *, debug: bool = False, note: str = ""
    ) -> None:
        self.group = group
        self.note = note
        self.config = config
        self.shape = config.shape
        self.plans = plans
        self.debug = debug

    # ------------------------------------------------------------------ per-batch plan

    def plan_for(self, hidden_states: torch.Tensor, cu_seqlens: torch.Tensor | None) -> SegmentPlan:
        """The batch's segment plan for sequence-sharded ``[B, L_local, W]`` / ``[T_local, W]`` (validated,
        cached)."""
        batch, local_len = batch_dims(hidden_states, cu_seqlens)
        c = self.config
        plan = segment_plan(
            self.plans,
            self.group.size,
            self.group.rank,
            batch,
            local_len,
            cu_seqlens,
            halo=c.conv_kernel - 1,
            block_size=c.chunk_size,
            device=hidden_states.device,
        )
        if self.debug and not torch.compiler.is_compiling():
            check_ranks_agree(self.group, hidden_states, cu_seqlens)
        return plan

    # ------------------------------------------------------------------ the layer

    def scan(
        self, h_BLD: torch.Tensor, in_proj: nn.Module, params: SSMParams, plan: SegmentPlan
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``h`` ``[B, L_local, D]`` -> ``y`` ``[B, L_local, H*P]`` (with the D skip, before gating) and ``z``."""
        z, xBC, dt = project(h_BLD, in_proj, self.shape)
        return self.conv_ssd(xBC, dt, params, plan), z

    def conv_ssd(
        self, xBC_BLC: torch.Tensor, dt_BLH: torch.Tensor, params: SSMParams, plan: SegmentPlan
    ) -> torch.Tensor:
        """conv1d + SSD of this rank's tokens: ``xBC`` ``[B, L_local, C]``, ``dt`` ``[B, L_local, H]`` ->
        ``y`` ``[B, L_local, H*P]`` (with the ``D`` skip; before gating and norm)."""
        return self._conv_ssd(xBC_BLC, dt_BLH, params, plan, with_states=False)[0]

    def _conv_ssd(
        self, xBC_BLC: torch.Tensor, dt_BLH: torch.Tensor, params: SSMParams, plan: SegmentPlan, *, with_states: bool
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """:meth:`conv_ssd`'s ``y``, and with ``with_states`` the true state at the end of this rank's tail segment
        of every sequence ``[S, H, P, N]`` (prefill's final states; ``None`` otherwise)."""
        shape = self.shape
        b, local_len, _ = xBC_BLC.shape
        xBC = self.conv(xBC_BLC, params, plan)
        gn = shape.n_groups * shape.d_state
        x, B, C = torch.split(xBC, [shape.d_inner, gn, gn], dim=-1)
        cdtype = _compute_dtype(x.dtype)
        A_H = decay_rates(params.A_log_H)
        dt_BLH_p = process_dt(dt_BLH, params.dt_bias_H, True, params.config.dt_limit, dtype=cdtype)
        dA_BLH = dt_BLH_p * A_H.to(cdtype)  # log decay of each token
        ssd = self._ssd_rows if plan.packed is None else self._ssd_packed
        y, tail_end = ssd(x, A_H, B, C, dt_BLH_p, dA_BLH, params, plan, with_states)
        return y.reshape(b, local_len, shape.d_inner), tail_end

    def _kernel(self, x, dt_p, A, B, C, params: SSMParams, **kw):
        """The SSD kernel (from zero unless ``initial_states``); ``x`` ``[R, t, H*P]``, ``B``/``C`` ``[R, t, G*N]``,
        ``dt_p`` ``[R, t, H]`` the processed time steps (bias, softplus and clamp applied once, for the summaries
        and the kernel alike)."""
        s, config = self.shape, params.config
        return kernels.ssd_chunk_scan(
            x.unflatten(-1, (s.num_heads, s.head_dim)),
            dt_p,
            A,
            B.unflatten(-1, (s.n_groups, s.d_state)),
            C.unflatten(-1, (s.n_groups, s.d_state)),
            config.chunk_size,
            D=params.D_H,
            **kw,
        )

    def _ssd_rows(
        self, x, A_H, B, C, dt_p, dA, params: SSMParams, plan: SegmentPlan, with_states: bool
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """BSHD: segments are the rows ``[2B, c]`` of ``[B, 2, c]``. Summaries by the fused kernel, then one SSD
        call from the incoming states. Returns ``y`` ``[2B, c, H, P]`` and, ``with_states``, the state at the end
        of each row's tail segment ``[B, H, P, N]`` (the kernel's final state, run from its incoming state)."""
        s = self.shape
        rows, c = 2 * plan.batch, plan.seg_len
        cdtype = dA.dtype

        def seg(t: torch.Tensor) -> torch.Tensor:
            return t.reshape(rows, c, t.shape[-1])

        cum_RcH = token_cumsum(seg(dA).double(), dim=1)  # log decay from the segment start through each token
        log_decay_RH = cum_RcH[:, -1]
        weight_RcH = (log_decay_RH[:, None] - cum_RcH).to(cdtype).exp() * seg(dt_p)  # exp(decay after t) * dt_t
        st, seq_idx = plan.stream, None
        if st is not None:  # a pack as one row: a segment's end state sees only its last document
            weight_RcH = torch.where(st.last_doc[..., None], weight_RcH, 0.0)
            seq_idx = st.seq_idx
        final = segment_states(
            x.reshape(rows * c, s.num_heads, s.head_dim),
            B.reshape(rows * c, s.n_groups, s.d_state),
            weight_RcH.view(rows * c, s.num_heads),
            plan.work,
        )  # [2B, H, P, N]
        h_in = self.incoming_states(
            final.view(plan.batch, 2, *final.shape[1:]), log_decay_RH.to(cdtype).view(plan.batch, 2, -1), plan
        ).reshape(final.shape)
        if st is not None:  # a segment that starts a document takes no state (the kernel feeds its document 0)
            h_in = torch.where(st.keep_incoming[:, None, None, None], h_in, 0.0)
        args = (seg(x), seg(dt_p), A_H, seg(B), seg(C), params)
        if not with_states:
            return self._kernel(*args, initial_states=h_in, seq_idx=seq_idx), None
        y, end = self._kernel(*args, initial_states=h_in, return_final_states=True)
        return y, end.view(plan.batch, 2, *end.shape[1:])[:, 1].to(cdtype)

    def _ssd_packed(
        self, x, A_H, B, C, dt_p, dA, params: SSMParams, plan: SegmentPlan, with_states: bool
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """THD: one SSD call with ``seq_idx`` = segment id, then the summaries and the correction by the fused
        kernels over the segments' token ranges. Returns ``y`` ``[1, T_local, H, P]`` and, ``with_states``, the
        state at the end of each sequence's tail segment ``[S, H, P, N]``: ``exp(its log decay) * h_in + its
        final state from zero``."""
        s, pk = self.shape, plan.packed
        assert pk is not None
        t_local, cdtype = plan.local_len, dA.dtype
        heads, groups = (t_local, s.num_heads, s.head_dim), (t_local, s.n_groups, s.d_state)
        y0 = self._kernel(x, dt_p, A_H, B, C, params, seq_idx=pk.seg_idx)  # [1, T, H, P]

        # Log decays in float64: cumsum over the whole local stream, differences per segment.
        cum = F.pad(token_cumsum(dA[0].double(), dim=0), (0, 0, 1, 0))  # [T+1, H]: cum[t] = sum over tokens < t
        start_SH = cum.index_select(0, pk.seg_first)
        log_decay_SH = cum.index_select(0, pk.seg_stop) - start_SH  # [2S, H] whole segment
        through_TH = cum[1:] - start_SH.index_select(0, pk.token_seg)  # segment start through t
        after_TH = log_decay_SH.index_select(0, pk.token_seg) - through_TH  # after t to segment end

        weight_TH = after_TH.to(cdtype).exp() * dt_p[0]
        final = segment_states(x[0].view(heads), B[0].view(groups), weight_TH, plan.work)  # [2S, H, P, N]
        final_S2 = final.view(plan.num_seqs, 2, *final.shape[1:])
        decay_S2 = log_decay_SH.to(cdtype).view(plan.num_seqs, 2, -1)
        h_in = self.incoming_states(final_S2, decay_S2, plan)
        y = state_correction(
            y0[0], C[0].view(groups), h_in.reshape(final.shape), through_TH.to(cdtype).exp(), plan.work
        )
        if not with_states:
            return y[None], None
        return y[None], decay_S2[:, 1].exp()[..., None, None] * h_in[:, 1] + final_S2[:, 1]

    # ------------------------------------------------------------------ the two exchanges

    def conv(self, xBC_BLC: torch.Tensor, params: SSMParams, plan: SegmentPlan) -> torch.Tensor:
        """Causal conv1d (SiLU) of this rank's tokens with halos from the tokens before each segment:
        ``[B, L_local, C]`` -> ``[B, L_local, C]``. One all-gather (none for ``conv_kernel == 1``).

        BSHD and stream rows: one conv over the segments ``[2B, c, C]`` (no copy of ``xBC``) with the halos as its
        ``history``. Packs cut per document: the conv runs on the segments from zero history; the first
        ``min(halo, c)`` outputs of each segment are then recomputed from ``[halo | first halo tokens]`` windows
        ``[2*S, 2*halo, C]`` and written over (per position the same arithmetic as one conv over
        ``[halo | segment]``)."""
        weight_CK, bias_C = params.conv_weight_CK, params.conv_bias_C
        halo, width = plan.halo, xBC_BLC.shape[-1]
        if halo == 0:  # no halos to exchange: the batch check gets a small all-gather of its own
            self._check_same_batch(all_gather(plan.fingerprint, self.group.group), plan)
            return kernels.causal_conv1d(xBC_BLC, weight_CK, bias_C, activation="silu")
        if plan.packed is None:
            rows, c = 2 * plan.batch, plan.seg_len
            seg = xBC_BLC.reshape(rows, c, width)  # a view: rows [B, 2, c] as [2B, c]
            tails = seg[:, c - halo :] if c >= halo else F.pad(seg, (0, 0, halo - c, 0))  # [2B, halo, C]
            halos = self.exchange_halos(tails.reshape(rows * halo, width), plan).view(rows, halo, width)
            st = plan.stream  # a pack as one row: the conv stops at document starts inside the segments too
            seq_idx, halo_idx = (None, None) if st is None else (st.seq_idx, st.halo_seq_idx)
            out = kernels.causal_conv1d(
                seg, weight_CK, bias_C, seq_idx=seq_idx, activation="silu", history=halos, history_seq_idx=halo_idx
            )  # [2B, c, C]
            return out.reshape(xBC_BLC.shape)  # a view for the kernels (contiguous output)
        pk = plan.packed
        x_TC = xBC_BLC[0]
        slots = plan.num_segments * halo
        tails = x_TC.new_zeros(slots, width).index_copy_(0, pk.tail_slots, x_TC.index_select(0, pk.tail_tokens))
        halos = self.exchange_halos(tails, plan)
        out = kernels.causal_conv1d(xBC_BLC, weight_CK, bias_C, seq_idx=pk.seg_idx, activation="silu")
        heads = x_TC.index_select(0, pk.head_src)
        window = torch.cat([halos.view(-1, halo, width), heads.view(-1, halo, width)], dim=1)  # [2S, 2 halo, C]
        fixed = kernels.causal_conv1d(window, weight_CK, bias_C, activation="silu")[:, halo:]  # [2S, halo, C]
        out[0].index_copy_(0, pk.head_tokens, fixed.reshape(slots, width).index_select(0, pk.head_slots))
        return out

    def exchange_halos(self, tails: torch.Tensor, plan: SegmentPlan) -> torch.Tensor:
        """Every rank's segment tails ``[2*S*halo, C]`` -> this rank's halos ``[2*S*halo, C]`` (zeros before
        a sequence start). One all-gather; its backward sends the halo gradients back to their owners.

        The batch fingerprint rides along, its int64 bits viewed as a few values of the tails' dtype (moved
        bit for bit): ranks that pass batches of other lengths would otherwise exchange buffers of the same
        shape and all finish wrong. This is the layer's first exchange, so such ranks stop before the others."""
        n = tails.numel()
        flat = torch.cat([tails.reshape(-1), plan.fingerprint.view(tails.dtype)])
        gathered = all_gather(flat, self.group.group)
        self._check_same_batch(gathered[:, n:], plan)
        picked = gathered[:, :n].reshape(-1, tails.shape[-1]).index_select(0, plan.halo_rows)
        return tails.new_zeros(tails.shape).index_copy_(0, plan.halo_slots, picked)

    def incoming_states(
        self, final_S2HPN: torch.Tensor, log_decay_S2H: torch.Tensor, plan: SegmentPlan
    ) -> torch.Tensor:
        """The state entering each of this rank's segments, from every segment's summary.

        Args:
            final_S2HPN: ``[S, 2, H, P, N]`` final state of each local segment run from zero.
            log_decay_S2H: ``[S, 2, H]`` its total log decay ``sum(dt*A)``.
        Returns:
            ``[S, 2, H, P, N]`` incoming states (zero for the first chunk of a sequence). Two all-to-alls, the
            chains dealt out over the ranks (:func:`~mamba_cp.strategies.state_chain.pass_states`).
        """
        barrier = None if plan.stream is None else plan.stream.barrier[None]
        incoming = pass_states(final_S2HPN.flatten(3), log_decay_S2H, self.group.group, plan.cp_size, barrier)
        return incoming.view(final_S2HPN.shape)

    def _check_same_batch(self, fingerprints: torch.Tensor, plan: SegmentPlan) -> None:
        """``ConfigError`` on every rank (they all hold the same gathered rows) unless every rank's batch
        fingerprint (``[cp, F']``: each row an int64 ``[F]`` viewed as values of another dtype) equals this
        rank's. Read on the host once per batch (the cache remembers the plan it checked), never again by later
        layers; compiled runs check once per batch in ``prepare_batch`` instead."""
        if torch.compiler.is_compiling():
            return

        def check() -> SegmentPlan:
            rows = fingerprints.detach().contiguous().view(torch.int64).cpu().tolist()
            if any(row != rows[0] for row in rows):
                seen = ", ".join(f"rank {r}: {describe_fingerprint(row)}" for r, row in enumerate(rows))
                raise ConfigError(
                    f"state passing: the CP ranks passed different batches ({seen}); every rank must pass its "
                    "head-tail shard of the same batch (same local length and cu_seqlens)"
                )
            return plan

        self.plans.get("peer-check", (id(plan),), None, check)  # the entry holds the plan: its id stays unique

    # ------------------------------------------------------------------ prefill: the layer and its final states

    def scan_with_states(
        self, h_BLD: torch.Tensor, in_proj: nn.Module, params: SSMParams, plan: SegmentPlan
    ) -> tuple[torch.Tensor, torch.Tensor, FinalStates]:
        """:meth:`scan`, plus every sequence's :class:`FinalStates` on every rank (one more all-gather)."""
        z, xBC, dt = project(h_BLD, in_proj, self.shape)
        y, states = self.conv_ssd_with_states(xBC, dt, params, plan)
        return y, z, states

    def conv_ssd_with_states(
        self, xBC_BLC: torch.Tensor, dt_BLH: torch.Tensor, params: SSMParams, plan: SegmentPlan
    ) -> tuple[torch.Tensor, FinalStates]:
        """:meth:`conv_ssd` (the same exchanges and kernels), plus the :class:`FinalStates` of every sequence.

        A sequence ends in its chunk ``2*cp - 1``: rank 0's tail segment. Every rank computes the true state at
        the end of its own tail segments (:meth:`_conv_ssd`), and takes the last ``K`` pre-conv tokens of each of
        its segments; one all-gather of both hands every rank rank 0's states and the tokens of the chunks a
        sequence's last ``K`` tokens lie in (several when chunks are shorter than ``K``).
        """
        if plan.stream is not None:  # every rank, before any collective
            raise ConfigError(
                "state passing's final states (prefill) need packs cut per sequence: parallelize the model with "
                "packed_layout='sequences' for prefill (packed_layout='stream' is for training)"
            )
        tails = self._segment_tails(xBC_BLC, params.conv_weight_CK.shape[-1], plan)  # [2S, K, C] pre-conv
        y, tail_end = self._conv_ssd(xBC_BLC, dt_BLH, params, plan, with_states=True)
        return y, self._gather_final_states(tail_end, tails, plan)

    def _segment_tails(self, xBC_BLC: torch.Tensor, width: int, plan: SegmentPlan) -> torch.Tensor:
        """The last ``width`` pre-conv tokens of each of this rank's segments, zeros before a segment's start
        when it is shorter: ``[2S, width, C]`` (device index ops, no host read)."""
        if plan.packed is None:
            return range_tails(xBC_BLC.reshape(2 * plan.batch, plan.seg_len, xBC_BLC.shape[-1]), width)
        return range_tails(xBC_BLC, width, plan.packed.seg_first, plan.packed.seg_stop)

    def _gather_final_states(self, tail_end: torch.Tensor, tails: torch.Tensor, plan: SegmentPlan) -> FinalStates:
        """Every rank's tail-segment end states ``[S, H, P, N]`` and segment tails ``[2S, K, C]`` -> the
        :class:`FinalStates` of every sequence: rank 0's states, and the last ``K`` tokens of each sequence picked
        from the chunks they lie in. One all-gather (the tokens travel in the states' dtype, which holds them
        exactly)."""
        cp, num_seqs = plan.cp_size, plan.num_seqs
        width, channels = tails.shape[1], tails.shape[2]
        flat = torch.cat([tail_end.reshape(-1), tails.to(tail_end.dtype).reshape(-1)])
        rows = all_gather(flat, self.group.group)  # [cp, n]
        n_end = tail_end.numel()
        ssm = rows[0, :n_end].view(tail_end.shape)  # rank 0's tail is every sequence's last chunk
        gathered = rows[:, n_end:].reshape(-1, channels)  # [cp * S * 2 * K, C]
        device = rows.device
        if plan.packed is None:
            seg_len = torch.full((num_seqs,), plan.seg_len, dtype=torch.int64, device=device)
        else:
            seg_len = (plan.packed.seg_stop - plan.packed.seg_first).view(num_seqs, 2)[:, 0]
        # Token j of a sequence's last K sits at pos = len - K + j, in chunk pos // c, slot pos - chunk*c - c + K
        # of that chunk's tail buffer (which holds its last K tokens).
        pos = (2 * cp * seg_len)[:, None] - width + torch.arange(width, device=device)  # [S, K]
        inside = pos >= 0
        pos = pos.clamp(min=0)
        chunk = torch.div(pos, seg_len[:, None], rounding_mode="floor")
        src_rank, src_half = chain_rank(chunk, cp)
        slot = pos - (chunk + 1) * seg_len[:, None] + width
        seq = torch.arange(num_seqs, device=device)[:, None]
        index = torch.where(inside, ((src_rank * num_seqs + seq) * 2 + src_half) * width + slot, 0)
        last = gathered.index_select(0, index.reshape(-1)).view(num_seqs, width, channels)
        last = torch.where(inside[..., None], last, torch.zeros((), dtype=last.dtype, device=device))
        return FinalStates(ssm=ssm, conv=last.transpose(1, 2).to(tails.dtype))

    def __repr__(self) -> str:
        s, g = self.shape, self.group
        return (
            f"StatePassing(cp_size={g.size}, cp_rank={g.rank}, heads={s.num_heads}, groups={s.n_groups}, "
            f"segments_per_sequence=2, halo={self.config.conv_kernel - 1}{', ' + self.note if self.note else ''})"
        )
