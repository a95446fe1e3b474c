"""Pure-PyTorch chunked reference of the Mamba2 SSD (state space duality) scan.

The recurrence, per batch ``b`` and head ``h`` with state ``s`` of shape ``[P, N]``::

    s_t = exp(dt_t * A_h) * s_{t-1} + dt_t * outer(x_t, B_t)
    y_t = s_t @ C_t + D_h * x_t            (then y_t *= silu(z_t) when z is given)

with ``s_{-1} = initial_states`` (or zero). When ``seq_idx`` is given the state is reset to zero at every
token ``t`` with ``seq_idx[t] != seq_idx[t - 1]``, so ``initial_states`` only feeds the first packed
sequence.

* :func:`ssd_chunk_scan_ref` is the chunked algorithm (quadratic attention-like form inside a chunk,
  linear state passing between chunks). It is vectorised (no loops over tokens, chunks or sequences),
  does no host synchronisation and is differentiable by autograd.
* ``ssd_sequential_ref`` in :mod:`mamba_cp.kernels.ssd_naive` is the token-by-token recurrence, the
  readable ground truth for tests.

Head ``h`` reads group ``h // (H // G)`` of ``B`` and ``C``.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["process_dt", "ssd_chunk_scan_ref"]

_NO_LIMIT = (0.0, math.inf)


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    # Half and float32 inputs are computed in float32; float64 stays float64 for fp64-exact tests.
    return torch.float64 if dtype == torch.float64 else torch.float32


def process_dt(
    dt: Tensor,
    dt_bias: Tensor | None = None,
    dt_softplus: bool = False,
    dt_limit: tuple[float, float] = _NO_LIMIT,
    dtype: torch.dtype | None = None,
) -> Tensor:
    """Apply the Mamba2 time-step transform: bias, optional softplus, optional clamp.

    Args:
        dt: ``[B, L, H]`` raw time steps.
        dt_bias: ``[H]`` or None, added before the softplus.
        dt_softplus: apply ``softplus`` after the bias.
        dt_limit: ``(min, max)``; the clamp is only applied when it differs from ``(0, inf)``.
        dtype: dtype to compute in (default: ``dt.dtype``).

    Returns:
        ``[B, L, H]`` processed time steps in ``dtype``.
    """
    dt = dt.to(dtype or dt.dtype)
    if dt_bias is not None:
        dt = dt + dt_bias.to(dt.dtype)
    if dt_softplus:
        dt = F.softplus(dt)
    if tuple(dt_limit) != _NO_LIMIT:
        dt = dt.clamp(min=dt_limit[0], max=dt_limit[1])
    return dt


def _check_shapes(
    x: Tensor,
    dt: Tensor,
    A: Tensor,
    B: Tensor,
    C: Tensor,
    D: Tensor | None,
    z: Tensor | None,
    dt_bias: Tensor | None,
    initial_states: Tensor | None,
    seq_idx: Tensor | None,
) -> None:
    if x.dim() != 4:
        raise ValueError(f"x must be [B, L, H, P], got shape {tuple(x.shape)}")
    batch, seqlen, nheads, headdim = x.shape
    if dt.shape != (batch, seqlen, nheads):
        raise ValueError(f"dt must be [B, L, H]={(batch, seqlen, nheads)}, got {tuple(dt.shape)}")
    if A.shape != (nheads,):
        raise ValueError(f"A must be [H]={(nheads,)}, got {tuple(A.shape)}")
    if B.dim() != 4 or B.shape[:2] != (batch, seqlen) or B.shape != C.shape:
        raise ValueError(f"B and C must both be [B, L, G, N], got {tuple(B.shape)} and {tuple(C.shape)}")
    ngroups, dstate = B.shape[2], B.shape[3]
    if nheads % ngroups != 0:
        raise ValueError(f"H={nheads} must be a multiple of G={ngroups}")
    if D is not None and D.shape not in ((nheads,), (nheads, headdim)):
        raise ValueError(f"D must be [H] or [H, P], got {tuple(D.shape)}")
    if z is not None and z.shape != x.shape:
        raise ValueError(f"z must have x's shape {tuple(x.shape)}, got {tuple(z.shape)}")
    if dt_bias is not None and dt_bias.shape != (nheads,):
        raise ValueError(f"dt_bias must be [H]={(nheads,)}, got {tuple(dt_bias.shape)}")
    if initial_states is not None and initial_states.shape != (batch, nheads, headdim, dstate):
        raise ValueError(
            f"initial_states must be [B, H, P, N]={(batch, nheads, headdim, dstate)}, got {tuple(initial_states.shape)}"
        )
    if seq_idx is not None and seq_idx.shape != (batch, seqlen):
        raise ValueError(f"seq_idx must be [B, L]={(batch, seqlen)}, got {tuple(seq_idx.shape)}")


def _heads_from_groups(t: Tensor, nheads: int) -> Tensor:
    """``[..., G, N]`` -> ``[..., H, N]`` with head ``h`` reading group ``h // (H // G)``."""
    return t.repeat_interleave(nheads // t.shape[-2], dim=-2)


def _skip_and_gate(y: Tensor, x: Tensor, D: Tensor | None, z: Tensor | None) -> Tensor:
    """Add the ``D`` skip connection and apply the ``silu(z)`` gate; all ``[B, L, H, P]``."""
    if D is not None:
        d = D.to(y.dtype)
        y = y + x * (d if d.dim() == 2 else d[:, None])
    if z is not None:
        y = y * F.silu(z.to(y.dtype))
    return y


def ssd_chunk_scan_ref(
    x: Tensor,
    dt: Tensor,
    A: Tensor,
    B: Tensor,
    C: Tensor,
    chunk_size: int,
    D: Tensor | None = None,
    z: Tensor | None = None,
    dt_bias: Tensor | None = None,
    initial_states: Tensor | None = None,
    seq_idx: Tensor | None = None,
    dt_softplus: bool = False,
    dt_limit: tuple[float, float] = _NO_LIMIT,
    return_final_states: bool = False,
) -> Tensor | tuple[Tensor, Tensor]:
    """Chunked SSD scan (Mamba2), vectorised and differentiable; mirrors ``mamba_chunk_scan_combined``.

    Args:
        x: ``[B, L, H, P]`` inputs.
        dt: ``[B, L, H]`` raw time steps (see :func:`process_dt`).
        A: ``[H]`` (negative) decay rates.
        B: ``[B, L, G, N]`` input projections, ``H % G == 0``.
        C: ``[B, L, G, N]`` output projections.
        chunk_size: tokens per chunk ``Q``; ``L`` need not be a multiple of it.
        D: ``[H]`` or ``[H, P]`` skip weights, or None.
        z: ``[B, L, H, P]`` gate (output is multiplied by ``silu(z)``), or None.
        dt_bias: ``[H]`` or None.
        initial_states: ``[B, H, P, N]`` state before token 0 (first packed sequence only), or None.
        seq_idx: ``[B, L]`` integer ids of packed sequences, or None. The state resets wherever the id
            changes between consecutive tokens.
        dt_softplus: apply softplus to ``dt + dt_bias``.
        dt_limit: clamp range for the processed ``dt`` (ignored when ``(0, inf)``).
        return_final_states: also return the state after the last token.

    Returns:
        ``y`` ``[B, L, H, P]`` in ``x.dtype``; with ``return_final_states`` the tuple
        ``(y, final_states)`` where ``final_states`` is ``[B, H, P, N]`` in the compute dtype
        (float64 for float64 inputs, else float32).
    """
    _check_shapes(x, dt, A, B, C, D, z, dt_bias, initial_states, seq_idx)
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    batch, seqlen, nheads, headdim = x.shape
    if seqlen == 0:
        raise ValueError("ssd_chunk_scan_ref needs L >= 1")
    dstate = B.shape[-1]
    cdtype = _compute_dtype(x.dtype)
    device = x.device

    dt_p = process_dt(dt, dt_bias, dt_softplus, dt_limit, dtype=cdtype)
    xc = x.to(cdtype)
    Bh = _heads_from_groups(B.to(cdtype), nheads)  # [B, L, H, N]
    Ch = _heads_from_groups(C.to(cdtype), nheads)

    if seq_idx is None:
        seg = torch.zeros(batch, seqlen, dtype=torch.long, device=device)
    else:
        # Segment ids that increase by one at every change of seq_idx: they encode exactly the resets
        # of the recurrence and are monotone, so "same segment" == "no reset in between".
        change = (seq_idx[:, 1:] != seq_idx[:, :-1]).long()
        seg = F.pad(torch.cumsum(change, dim=1), (1, 0))

    # Pad to whole chunks after dt processing: dt = 0 means decay exp(0) = 1 and zero input, so the padded
    # tokens leave the state untouched; they continue the last segment so the final state is the true one.
    nchunks = -(-seqlen // chunk_size)
    pad = nchunks * chunk_size - seqlen
    if pad:
        xc = F.pad(xc, (0, 0, 0, 0, 0, pad))
        Bh = F.pad(Bh, (0, 0, 0, 0, 0, pad))
        Ch = F.pad(Ch, (0, 0, 0, 0, 0, pad))
        dt_p = F.pad(dt_p, (0, 0, 0, pad))
        seg = torch.cat([seg, seg[:, -1:].expand(batch, pad)], dim=1)

    q = chunk_size
    xq = xc.reshape(batch, nchunks, q, nheads, headdim)  # [B, c, Q, H, P]
    Bq = Bh.reshape(batch, nchunks, q, nheads, dstate)  # [B, c, Q, H, N]
    Cq = Ch.reshape(batch, nchunks, q, nheads, dstate)
    dtq = dt_p.reshape(batch, nchunks, q, nheads).permute(0, 3, 1, 2)  # [B, H, c, Q]
    segq = seg.reshape(batch, nchunks, q)  # [B, c, Q]

    dA = dtq * A.to(cdtype)[None, :, None, None]  # [B, H, c, Q]
    dA_cs = torch.cumsum(dA, dim=-1)  # log-decay from chunk start through token i (inclusive)

    # 1) Intra-chunk (diagonal blocks): y_i += sum_{j<=i, same seg} (C_i.B_j) exp(cs_i - cs_j) dt_j x_j.
    #    Masked entries are set to -inf before exp so both forward and backward see exact zeros.
    causal = torch.ones(q, q, dtype=torch.bool, device=device).tril()
    same_seg = segq[:, :, :, None] == segq[:, :, None, :]  # [B, c, Q, Q]
    valid = (causal & same_seg)[:, None]  # [B, 1, c, Q, Q]
    log_decay = dA_cs[..., :, None] - dA_cs[..., None, :]  # [B, H, c, Q, Q]
    decay = torch.exp(log_decay.masked_fill(~valid, -math.inf))
    scores = torch.einsum("bcihn,bcjhn->bhcij", Cq, Bq) * decay
    y_diag = torch.einsum("bhcij,bhcj,bcjhp->bcihp", scores, dtq, xq)

    # 2) State of each chunk started from zero, keeping only tokens of the chunk's last segment.
    seg_last = segq[:, :, -1]  # [B, c] segment id at each chunk end
    in_last_seg = (segq == seg_last[:, :, None])[:, None]  # [B, 1, c, Q]
    decay_to_end = torch.exp((dA_cs[..., -1:] - dA_cs).masked_fill(~in_last_seg, -math.inf))
    chunk_states = torch.einsum("bhcj,bhcj,bcjhp,bcjhn->bchpn", decay_to_end, dtq, xq, Bq)

    # 3) Inter-chunk state passing as one masked [c+1, c+1] decay matrix. Index 0 is the virtual chunk
    #    "before token 0" (its state is initial_states, its segment the first token's); index k >= 1 is
    #    chunk k-1. Total state at index k: sum_{k'<=k, same end segment} exp(sum of chunk log-decays in
    #    (k', k]) * state_{k'}. Cumsums are taken over finite values only; masking happens before exp.
    if initial_states is None:
        init = chunk_states.new_zeros(batch, 1, nheads, headdim, dstate)
    else:
        init = initial_states.to(cdtype)[:, None]
    states = torch.cat([init, chunk_states], dim=1)  # [B, c+1, H, P, N]
    chunk_log_decay = F.pad(dA_cs[..., -1], (1, 0))  # [B, H, c+1], 0 for the virtual chunk
    cum = torch.cumsum(chunk_log_decay, dim=-1)
    end_seg = torch.cat([seg[:, :1], seg_last], dim=1)  # [B, c+1]
    pair_ok = torch.ones(nchunks + 1, nchunks + 1, dtype=torch.bool, device=device).tril()
    pair_ok = (pair_ok & (end_seg[:, :, None] == end_seg[:, None, :]))[:, None]  # [B, 1, c+1, c+1]
    pass_decay = torch.exp((cum[..., :, None] - cum[..., None, :]).masked_fill(~pair_ok, -math.inf))
    total_states = torch.einsum("bhkm,bmhpn->bkhpn", pass_decay, states)  # [B, c+1, H, P, N]
    incoming = total_states[:, :-1]  # state entering each chunk
    final_states = total_states[:, -1]

    # 4) Contribution of the incoming state, for tokens still in the segment it belongs to.
    carries = (segq == end_seg[:, :-1, None])[:, None]  # [B, 1, c, Q]
    decay_from_start = torch.exp(dA_cs.masked_fill(~carries, -math.inf))  # [B, H, c, Q]
    y_off = torch.einsum("bcihn,bchpn,bhci->bcihp", Cq, incoming, decay_from_start)

    y = (y_diag + y_off).reshape(batch, nchunks * q, nheads, headdim)[:, :seqlen]
    y = _skip_and_gate(y, x.to(cdtype), D, z).to(x.dtype)
    if return_final_states:
        return y, final_states
    return y
