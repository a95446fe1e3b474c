"""Double backward (``create_graph=True``): where it is exact, and a clear error where it cannot be.

Every path made of torch ops and the library's autograd collectives (whose backward passes are differentiable
collectives again) gives exact second-order gradients: the unfused hidden-parallel path and state passing on the
reference kernels (CPU, float64). Hand-written backward passes that are not differentiable again (the fused
in_proj of hidden-parallel, the Triton kernels, mamba_ssm's and causal_conv1d's) call
:func:`refuse_double_backward`, which raises instead of returning second-order gradients that would silently
miss their terms.
"""

from __future__ import annotations

import torch


def refuse_double_backward(what: str) -> None:
    """Raise when a backward pass that cannot be differentiated again runs with grad mode on (``create_graph``)."""
    if torch.is_grad_enabled():
        raise RuntimeError(
            f"mamba_cp: double backward (create_graph=True) reached {what}, whose backward pass is not differentiable "
            "again, so second-order gradients would be wrong. Paths that support it: hidden-parallel with "
            "parallelize(..., fuse_projection=False) and state passing, on the reference kernels "
            "(MAMBA_CP_KERNELS=reference, or CPU / float64 tensors)"
        )


class _FirstOrderOnly(torch.autograd.Function):
    """Identity (a copy, so the caller's tensor is untouched) whose backward refuses ``create_graph``: placed on an
    input of a third-party kernel whose backward is not differentiable again."""

    @staticmethod
    def forward(ctx, t: torch.Tensor, what: str) -> torch.Tensor:
        ctx.what = what
        return t.clone()

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        refuse_double_backward(ctx.what)
        return grad, None


def first_order_only(t: torch.Tensor, what: str) -> torch.Tensor:
    """``t`` (copied, ``[...]``; use it on a small input such as ``dt``) guarded so that a double backward through
    the kernel it feeds raises (see :func:`refuse_double_backward`); ``t`` itself when it needs no gradient."""
    if not (torch.is_grad_enabled() and t.requires_grad):
        return t
    return _FirstOrderOnly.apply(t, what)
