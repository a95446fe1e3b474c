"""in_proj fused with hidden-parallel's two all-to-alls, so that the projection of ``z`` hides the transfers.

Shape legend: ``T = B * L_local`` this rank's tokens, ``D`` hidden_size, ``H`` heads, ``P`` head_dim,
``G`` groups, ``N`` d_state, ``cp`` ranks; ``W_local = H*P/cp + 2*G_local*N + H/cp`` is what one rank
receives per token (its ``x`` heads, its ``B`` and ``C`` group(s), its ``dt`` heads).

The unfused path computes the whole in_proj output ``[T, H*P + conv_dim + H]``, packs ``x | B | C | dt``
into the all-to-all's destination-major send buffer (a copy), and the GPU idles while each all-to-all runs.
The gate ``z = h @ W_z^T`` never travels and nobody needs it until the norm, so its GEMMs fill those gaps:

* :class:`ProjectScatter` (forward): ``cp`` GEMMs write ``h @ W_j^T`` (``W_j``: the in_proj rows whose
  outputs rank ``j`` needs) straight into slot ``j`` of the send buffer; while ``x|B|C|dt`` travel, the
  first ``T_a`` rows of ``z`` are projected.
* :class:`GatherGate` (forward): while ``y`` travels back, the other rows of ``z`` are projected (in place
  into the same ``z`` buffer).
* backward, in reverse: while ``dy`` travels to the heads, :class:`GatherGate` computes ``dW_z = dz^T h``
  (and ``db_z``); while the ``x|B|C|dt`` gradients travel home, :class:`ProjectScatter` computes
  ``dh = dz @ W_z``; the received gradients then finish ``dh`` and ``dW``.

The two Functions split the work of ``z`` between them (``ProjectScatter`` computes ``dh`` for all of ``z``,
``GatherGate`` ``dW_z`` for all of it), so each returns part of the true gradient and their sum, formed by
autograd, is exact: the same products as ``nn.Linear``, accumulated in a different order (differences at
rounding level). The traffic is that of :func:`mamba_cp.transport.seq_to_heads` / ``heads_to_seq``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist

from .collectives import start_all_to_all
from .double_backward import refuse_double_backward
from .groups import GroupRef
from .layout import TokenPlan


@dataclass(frozen=True)
class ProjectionLayout:
    """Which in_proj rows each rank receives, destination-major (built once per mixer and device)."""

    z_width: int
    """``H*P``: rows ``[0, z_width)`` of in_proj are ``z``, which stays home."""
    width_local: int
    """``W_local``: rows per destination rank."""
    send_rows: torch.Tensor
    """``[cp * W_local]`` int64 in_proj row of each send column: rank ``j``'s ``x`` heads, its ``B`` group(s),
    its ``C`` group(s), its ``dt`` heads, for ``j = 0 .. cp-1``."""
    covers_once: bool
    """True when every non-``z`` row is sent exactly once (``G >= cp``); with ``G < cp`` B/C rows repeat and
    their weight gradients are summed."""


def projection_layout(
    num_heads: int, head_dim: int, n_groups: int, d_state: int, cp_size: int, device: torch.device
) -> ProjectionLayout:
    """The :class:`ProjectionLayout` of an in_proj ``z | x | B | C | dt`` split over ``cp_size`` ranks."""
    d_inner, gn = num_heads * head_dim, n_groups * d_state
    heads_local = num_heads // cp_size
    repeat = max(1, cp_size // n_groups)
    bc_local = max(1, n_groups // cp_size) * d_state
    x0, b0, c0, dt0 = d_inner, 2 * d_inner, 2 * d_inner + gn, 2 * d_inner + 2 * gn
    rows = []
    for j in range(cp_size):
        bc = (j // repeat) * bc_local
        rows += [
            torch.arange(x0 + j * heads_local * head_dim, x0 + (j + 1) * heads_local * head_dim),
            torch.arange(b0 + bc, b0 + bc + bc_local),
            torch.arange(c0 + bc, c0 + bc + bc_local),
            torch.arange(dt0 + j * heads_local, dt0 + (j + 1) * heads_local),
        ]
    send_rows = torch.cat(rows).to(device=device, dtype=torch.int64)
    width_local = send_rows.numel() // cp_size
    return ProjectionLayout(d_inner, width_local, send_rows, covers_once=repeat == 1)


def _project_z_rows(h_TD, weight, bias, layout: ProjectionLayout, z_TW: torch.Tensor, rows: slice) -> None:
    """``z[rows] = h[rows] @ W_z^T (+ b_z)``, written in place (row slices are contiguous)."""
    w_z = weight[: layout.z_width].t()
    if bias is None:
        torch.mm(h_TD[rows], w_z, out=z_TW[rows])
    else:
        torch.addmm(bias[: layout.z_width], h_TD[rows], w_z, out=z_TW[rows])


class ProjectScatter(torch.autograd.Function):
    """``h`` ``[T, D]`` -> the ``z`` buffer ``[T, H*P]`` with rows ``[0, T_a)`` projected (:class:`GatherGate`
    fills the rest) and ``x|B|C|dt`` of this rank's heads over whole sequences in true order ``[B*L, W_local]``.

    Backward: ``dh`` (from ``dz`` for every row, and from the returned ``x|B|C|dt`` gradients) and the
    weight/bias gradient of the sent rows; the ``z`` rows' weight gradient is :class:`GatherGate`'s.
    """

    @staticmethod
    def forward(ctx, h_TD, weight, bias, layout: ProjectionLayout, plan: TokenPlan, group, rows_a: int):
        cp, tokens = plan.cp_size, h_TD.shape[0]
        w_send = weight.index_select(0, layout.send_rows).view(cp, layout.width_local, -1)
        b_send = None if bias is None else bias.index_select(0, layout.send_rows).view(cp, -1)
        send = h_TD.new_empty(cp, tokens, layout.width_local)
        for j in range(cp):  # each GEMM writes its destination's slot: no pack copy
            if b_send is None:
                torch.mm(h_TD, w_send[j].t(), out=send[j])
            else:
                torch.addmm(b_send[j], h_TD, w_send[j].t(), out=send[j])
        pending = start_all_to_all(send, group, "forward")
        z = h_TD.new_empty(tokens, layout.z_width)
        _project_z_rows(h_TD, weight, bias, layout, z, slice(0, rows_a))  # while x|B|C|dt travel
        recv = pending.wait()
        out = recv.view(cp * tokens, layout.width_local)
        if plan.to_sequence is not None:  # rank-major -> true order (head-tail undo, packed interleave)
            out = out.index_select(0, plan.to_sequence)
        ctx.save_for_backward(h_TD, weight)
        ctx.layout, ctx.plan, ctx.group, ctx.has_bias = layout, plan, GroupRef(group), bias is not None
        return z, out

    @staticmethod
    def backward(ctx, dz, dout):
        refuse_double_backward("hidden-parallel's fused in_proj (ProjectScatter)")
        h_TD, weight = ctx.saved_tensors
        layout, plan = ctx.layout, ctx.plan
        cp, tokens, wl = plan.cp_size, h_TD.shape[0], layout.width_local
        need_h, need_w, need_b = ctx.needs_input_grad[:3]
        dsend = dout.reshape(cp * tokens, wl)
        if plan.to_ranks is not None:
            dsend = dsend.index_select(0, plan.to_ranks)
        dsend = dsend.view(cp, tokens, wl)
        pending = start_all_to_all(dsend, ctx.group(), "backward")
        # While the x|B|C|dt gradients travel home: dh of z (all rows; GatherGate passed dz through).
        dh = torch.mm(dz, weight[: layout.z_width]) if need_h else None
        # The z rows' weight/bias gradients are GatherGate's: zeros here.
        dweight = weight.new_zeros(weight.shape) if need_w else None
        dbias = weight.new_zeros(weight.shape[0]) if need_b and ctx.has_bias else None
        drecv = pending.wait()
        # Gathered again rather than saved from the forward: one weight-sized copy per layer's backward instead
        # of holding it for every layer between forward and backward.
        w_send = weight.index_select(0, layout.send_rows).view(cp, wl, -1)
        if need_h:
            for j in range(cp):
                dh.addmm_(drecv[j], w_send[j])
        if need_w:
            dw_send = weight.new_empty(cp, wl, weight.shape[1])
            for j in range(cp):
                torch.mm(drecv[j].t(), h_TD, out=dw_send[j])
            _place(dweight, layout, dw_send.view(cp * wl, -1))
        if dbias is not None:
            _place(dbias, layout, drecv.sum(1).view(cp * wl))
        return dh, dweight, dbias, None, None, None, None


class GatherGate(torch.autograd.Function):
    """``y`` of this rank's heads over whole sequences ``[B*L, w]`` -> this rank's tokens ``[T, cp*w]``, while
    rows ``[T_a, T)`` of the ``z`` buffer are projected in place (the buffer is returned, complete).

    Backward: the ``dy`` all-to-all runs while ``dW_z = dz^T h`` and ``db_z`` (all rows of ``z``) are
    computed; ``dz`` passes through unchanged to :class:`ProjectScatter`, which computes ``dh`` for it.
    """

    @staticmethod
    def forward(ctx, y_heads, z_TW, h_TD, weight, bias, layout: ProjectionLayout, plan: TokenPlan, group, rows_a):
        cp, tokens, width = plan.cp_size, h_TD.shape[0], y_heads.shape[-1]
        send = y_heads.reshape(cp * tokens, width)
        if plan.to_ranks is not None:  # true order -> rank-major (head-tail redo, packed interleave)
            send = send.index_select(0, plan.to_ranks)
        pending = start_all_to_all(send.view(cp, tokens, width), group, "forward")
        _project_z_rows(h_TD, weight, bias, layout, z_TW, slice(rows_a, tokens))  # while y travels
        recv = pending.wait()
        ctx.mark_dirty(z_TW)
        ctx.save_for_backward(h_TD, weight)
        ctx.layout, ctx.plan, ctx.group, ctx.has_bias = layout, plan, GroupRef(group), bias is not None
        return recv.transpose(0, 1).reshape(tokens, cp * width), z_TW

    @staticmethod
    def backward(ctx, dy, dz):
        refuse_double_backward("hidden-parallel's fused in_proj (GatherGate)")
        h_TD, weight = ctx.saved_tensors
        layout, plan = ctx.layout, ctx.plan
        cp, tokens = plan.cp_size, h_TD.shape[0]
        width = dy.shape[-1] // cp
        dsend = dy.reshape(tokens, cp, width).transpose(0, 1).contiguous()
        pending = start_all_to_all(dsend, ctx.group(), "backward")
        # While dy travels to the heads: the weight and bias gradients of z.
        dweight = dbias = None
        if ctx.needs_input_grad[3]:
            dweight = weight.new_zeros(weight.shape)
            torch.mm(dz.t(), h_TD, out=dweight[: layout.z_width])
        if ctx.has_bias and ctx.needs_input_grad[4]:
            dbias = weight.new_zeros(weight.shape[0])
            dbias[: layout.z_width] = dz.sum(0)
        drecv = pending.wait()
        dy_heads = drecv.view(cp * tokens, width)
        if plan.to_sequence is not None:
            dy_heads = dy_heads.index_select(0, plan.to_sequence)
        return dy_heads.view(plan.batch, plan.global_len, width), dz, None, dweight, dbias, None, None, None, None


def _place(full: torch.Tensor, layout: ProjectionLayout, sent: torch.Tensor) -> None:
    """Write (or, for repeated B/C rows, add) the send rows' gradients into the full parameter's gradient."""
    if layout.covers_once:
        full.index_copy_(0, layout.send_rows, sent)
    else:
        full.index_add_(0, layout.send_rows, sent)


def project_scatter(
    h_TD: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    layout: ProjectionLayout,
    plan: TokenPlan,
    group: dist.ProcessGroup,
) -> tuple[torch.Tensor, torch.Tensor]:
    """in_proj of this rank's tokens ``h`` ``[T, D]`` with the seq->heads all-to-all fused in.

    Returns the ``z`` buffer ``[T, H*P]`` (rows ``[0, T // 2)`` projected; pass it to :func:`gather_gate`)
    and ``x|B|C|dt`` ``[B, L, W_local]`` (this rank's heads, whole sequences in true order).
    """
    z, out = ProjectScatter.apply(h_TD, weight, bias, layout, plan, group, h_TD.shape[0] // 2)
    return z, out.view(plan.batch, plan.global_len, layout.width_local)


def gather_gate(
    y_heads: torch.Tensor,
    z_TW: torch.Tensor,
    h_TD: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    layout: ProjectionLayout,
    plan: TokenPlan,
    group: dist.ProcessGroup,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``y`` ``[B, L, w]`` (this rank's heads, true order) back to this rank's tokens ``[B, L_local, cp*w]``,
    completing the ``z`` buffer from :func:`project_scatter` while it travels; returns ``(y, z)``, ``z``
    ``[B, L_local, H*P]``. The same ``h``, ``weight``, ``bias`` and ``layout`` as that call."""
    y, z = GatherGate.apply(y_heads, z_TW, h_TD, weight, bias, layout, plan, group, h_TD.shape[0] // 2)
    return y.view(plan.batch, plan.local_len, -1), z.view(plan.batch, plan.local_len, -1)
