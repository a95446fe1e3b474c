"""Token-by-token Mamba2 SSD recurrence: slow, readable ground truth for the chunked scan.

Per batch ``b`` and head ``h`` with state ``s`` of shape ``[P, N]``::

    s_t = exp(dt_t * A_h) * s_{t-1} + dt_t * outer(x_t, B_t)
    y_t = s_t @ C_t + D_h * x_t            (then y_t *= silu(z_t) when z is given)

with ``s_{-1} = initial_states`` (or zero) and, when ``seq_idx`` is given, ``s`` reset to zero at every
token whose id differs from the previous token's.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .ssd_reference import _NO_LIMIT, _check_shapes, _compute_dtype, _skip_and_gate, process_dt

__all__ = ["ssd_sequential_ref"]


def ssd_sequential_ref(
    x: Tensor,
    dt: Tensor,
    A: Tensor,
    B: Tensor,
    C: Tensor,
    D: Tensor | None = None,
    z: Tensor | None = None,
    dt_bias: Tensor | None = None,
    initial_states: Tensor | None = None,
    seq_idx: Tensor | None = None,
    dt_softplus: bool = False,
    dt_limit: tuple[float, float] = _NO_LIMIT,
    return_final_states: bool = False,
) -> Tensor | tuple[Tensor, Tensor]:
    """Token-by-token SSD recurrence (slow, readable ground truth).

    Same arguments, semantics and return values as
    :func:`mamba_cp.kernels.ssd_reference.ssd_chunk_scan_ref` minus ``chunk_size``:
    x ``[B, L, H, P]``, dt ``[B, L, H]``, A ``[H]``, B/C ``[B, L, G, N]``, D ``[H]``/``[H, P]``,
    z ``[B, L, H, P]``, dt_bias ``[H]``, initial_states ``[B, H, P, N]``, seq_idx ``[B, L]``.

    Returns:
        ``y`` ``[B, L, H, P]`` in ``x.dtype``, plus ``final_states`` ``[B, H, P, N]`` (compute dtype)
        when ``return_final_states``.
    """
    _check_shapes(x, dt, A, B, C, D, z, dt_bias, initial_states, seq_idx)
    batch, seqlen, nheads, headdim = x.shape
    dstate = B.shape[-1]
    cdtype = _compute_dtype(x.dtype)

    dt_p = process_dt(dt, dt_bias, dt_softplus, dt_limit, dtype=cdtype)  # [B, L, H]
    xc = x.to(cdtype)
    # Spelled out (not via _heads_from_groups) so tests check the head -> group mapping independently.
    group_of_head = torch.arange(nheads, device=x.device) // (nheads // B.shape[2])
    Bh = B.to(cdtype)[:, :, group_of_head]  # [B, L, H, N]
    Ch = C.to(cdtype)[:, :, group_of_head]
    Ac = A.to(cdtype)

    no_init = initial_states is None
    state = xc.new_zeros(batch, nheads, headdim, dstate) if no_init else initial_states.to(cdtype)
    ys = []
    for t in range(seqlen):
        if seq_idx is not None and t > 0:
            keep = (seq_idx[:, t] == seq_idx[:, t - 1]).to(cdtype)  # [B]; 0 at a sequence start
            state = state * keep[:, None, None, None]
        decay = torch.exp(dt_p[:, t] * Ac)  # [B, H]
        inp = (dt_p[:, t, :, None, None] * xc[:, t, :, :, None]) * Bh[:, t, :, None, :]  # [B, H, P, N]
        state = decay[:, :, None, None] * state + inp
        ys.append(torch.einsum("bhpn,bhn->bhp", state, Ch[:, t]))
    y = torch.stack(ys, dim=1) if ys else xc.new_zeros(batch, 0, nheads, headdim)
    y = _skip_and_gate(y, xc, D, z).to(x.dtype)
    if return_final_states:
        return y, state
    return y
