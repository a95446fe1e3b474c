"""``gate_projection``: in_proj as two buffers (``z`` and ``xBC | dt``), exact against ``nn.Linear``; who takes it."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from mamba_cp.gate_projection import ProjectApart, plain_linear, project_apart


@pytest.mark.parametrize("bias", [True, False])
def test_gradcheck(bias: bool) -> None:
    g = torch.Generator().manual_seed(0)
    h = torch.randn(6, 5, generator=g, dtype=torch.float64, requires_grad=True)
    w = torch.randn(9, 5, generator=g, dtype=torch.float64, requires_grad=True)
    b = torch.randn(9, generator=g, dtype=torch.float64, requires_grad=True) if bias else None
    inputs = (h, w, b, 4) if bias else (h, w, None, 4)
    assert torch.autograd.gradcheck(ProjectApart.apply, inputs)


@pytest.mark.parametrize("used", ["both", "z", "rest"])
def test_values_and_gradients_equal_one_linear(used: str) -> None:
    """The same outputs and gradients as ``nn.functional.linear`` split at the gate (float64, rounding level), also
    when one output takes no part in the loss; ``z`` owns its storage."""
    g = torch.Generator().manual_seed(1)
    h = torch.randn(2, 7, 6, generator=g, dtype=torch.float64, requires_grad=True)
    w = torch.randn(11, 6, generator=g, dtype=torch.float64, requires_grad=True)
    b = torch.randn(11, generator=g, dtype=torch.float64, requires_grad=True)
    z, rest = project_apart(h, w, b, 4)
    z_ref, rest_ref = torch.split(F.linear(h, w, b), [4, 7], dim=-1)
    torch.testing.assert_close(z, z_ref, rtol=1e-14, atol=1e-14)
    torch.testing.assert_close(rest, rest_ref, rtol=1e-14, atol=1e-14)
    assert z.untyped_storage().data_ptr() != rest.untyped_storage().data_ptr()
    gz, gr = torch.randn_like(z), torch.randn_like(rest)

    def loss(zz, rr):
        return {"both": (zz * gz).sum() + (rr * gr).sum(), "z": (zz * gz).sum(), "rest": (rr * gr).sum()}[used]

    got = torch.autograd.grad(loss(z, rest), (h, w, b))
    want = torch.autograd.grad(loss(z_ref, rest_ref), (h, w, b))
    for a, e in zip(got, want, strict=True):
        torch.testing.assert_close(a, e, rtol=1e-13, atol=1e-13)


def test_only_a_plain_unhooked_linear_is_bypassed() -> None:
    h = torch.randn(2, 3, 4)
    lin = nn.Linear(4, 6)
    assert plain_linear(h, lin)
    assert not plain_linear(h.double(), lin)  # a dtype the module would cast or refuse
    handle = lin.register_forward_pre_hook(lambda *a: None)
    assert not plain_linear(h, lin)  # a hook must see its call
    handle.remove()

    class Adapter(nn.Linear):  # a subclass (LoRA, quantized layers) computes something else
        pass

    assert not plain_linear(h, Adapter(4, 6))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert not plain_linear(h, lin)


def test_double_backward_is_exact() -> None:
    """``create_graph=True`` through the split projection: second derivatives equal ``nn.functional.linear``'s."""
    g = torch.Generator().manual_seed(2)
    h = torch.randn(5, 4, generator=g, dtype=torch.float64, requires_grad=True)
    w = torch.randn(7, 4, generator=g, dtype=torch.float64, requires_grad=True)
    b = torch.randn(7, generator=g, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradgradcheck(lambda *a: ProjectApart.apply(*a, 3), (h, w, b))
