"""in_proj with the gate ``z`` in a tensor of its own, so that it is freed when the norm's backward is done with it.

Shape legend: ``T = B * L`` tokens, ``D`` hidden_size, ``Z = H*P`` the gate's width, ``R = C + H`` the rest
(``xBC | dt``).

``in_proj(h)`` is one ``[T, Z + R]`` tensor, and ``z``, ``xBC`` and ``dt`` are views of it. The norm saves ``z`` for
its backward and the conv saves ``xBC``, so the whole buffer lives until the conv's backward: its ``z`` columns
outlive the norm's backward, their last reader, and sit beside ``dz`` through the SSD's backward, where a mixer's
step peaks. :func:`project_apart` makes the same products in two GEMMs that write two buffers, ``z`` ``[T, Z]`` and
``xBC | dt`` ``[T, R]``, so ``z`` goes when the norm's backward ends: ``T * Z`` activation values less at the peak
(1 GiB for a NemotronH-8B-like mixer at 64K local tokens in bfloat16: what state passing's peak had over
hidden-parallel's, whose fused projection already keeps ``z`` apart; ``docs/design.md`` §2).

Backward: ``dh = d(xBC|dt) @ W_R + dz @ W_Z`` accumulated into one buffer, ``dW`` written block by block into one
``[Z + R, D]`` buffer (no zero-filled full-size gradients per slice, as autograd through two weight slices would
make), ``db`` likewise; under ``create_graph=True`` it is built from differentiable ops instead, so second
derivatives are exact as through ``nn.Linear``. Only a plain ``nn.Linear`` that nothing hooks takes this path
(:func:`plain_linear`); anything else (adapters, hooks, autocast) is called as it is.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

__all__ = ["ProjectApart", "plain_linear", "project_apart"]


def plain_linear(h: torch.Tensor, in_proj: nn.Module) -> bool:
    """Whether ``in_proj`` may be bypassed and its weight read directly: a plain ``nn.Linear`` without forward hooks
    (its own or global), of ``h``'s dtype, outside autocast."""
    return (
        type(in_proj) is nn.Linear
        and not (in_proj._forward_hooks or in_proj._forward_pre_hooks)
        and not (nn.modules.module._global_forward_hooks or nn.modules.module._global_forward_pre_hooks)
        and h.dtype == in_proj.weight.dtype
        and not torch.is_autocast_enabled(h.device.type)
    )


class ProjectApart(torch.autograd.Function):
    """``h`` ``[T, D]`` -> ``z = h @ W[:Z]^T (+ b[:Z])`` ``[T, Z]`` and ``rest = h @ W[Z:]^T (+ b[Z:])`` ``[T, R]``, two
    buffers. Saves ``h`` and ``W`` (what ``nn.Linear`` saves)."""

    @staticmethod
    def forward(ctx, h_TD, weight, bias, z_width: int):
        b_z, b_r = (None, None) if bias is None else (bias[:z_width], bias[z_width:])
        z = F.linear(h_TD, weight[:z_width], b_z)
        rest = F.linear(h_TD, weight[z_width:], b_r)
        ctx.save_for_backward(h_TD, weight)
        ctx.z_width = z_width
        return z, rest

    @staticmethod
    def backward(ctx, dz, drest):
        h, weight = ctx.saved_tensors
        zw = ctx.z_width
        # An output that took no part in the loss has no gradient: it adds nothing.
        dz = h.new_zeros(h.shape[0], zw) if dz is None else dz
        drest = h.new_zeros(h.shape[0], weight.shape[0] - zw) if drest is None else drest
        need_h, need_w, need_b = ctx.needs_input_grad[:3]
        dh = dW = db = None
        if need_h:
            dh = torch.mm(drest, weight[zw:])
            dh.addmm_(dz, weight[:zw])
        # Under create_graph=True the backward is itself differentiated: differentiable ops only (no out= writes).
        if need_w and torch.is_grad_enabled():
            dW = torch.cat([dz.t() @ h, drest.t() @ h])
        elif need_w:
            dW = torch.empty_like(weight)
            torch.mm(dz.t(), h, out=dW[:zw])
            torch.mm(drest.t(), h, out=dW[zw:])
        if need_b:
            db = torch.cat([dz.sum(0), drest.sum(0)])
        return dh, dW, db, None


def project_apart(
    h_BLD: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, z_width: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """``h`` ``[B, L, D]`` -> ``z`` ``[B, L, Z]`` and ``rest`` ``[B, L, R]``: ``nn.functional.linear(h, weight, bias)``
    split at column ``z_width``, in two buffers (:class:`ProjectApart`)."""
    b, length, d = h_BLD.shape
    z, rest = ProjectApart.apply(h_BLD.reshape(b * length, d), weight, bias, z_width)
    return z.view(b, length, -1), rest.view(b, length, -1)
