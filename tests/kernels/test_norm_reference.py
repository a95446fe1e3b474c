"""rmsnorm_gated_ref vs a straightforward loop over channel groups."""

from __future__ import annotations

import pytest
import torch

from mamba_cp.kernels.norm_reference import rmsnorm_gated_ref

F64 = torch.float64


def per_group_formula(
    x: torch.Tensor,
    z: torch.Tensor | None,
    weight: torch.Tensor,
    eps: float,
    group_size: int | None,
    norm_before_gate: bool,
) -> torch.Tensor:
    dim = x.shape[-1]
    gs = dim if group_size is None else group_size
    h = x * z * torch.sigmoid(z) if (z is not None and not norm_before_gate) else x
    parts = []
    for start in range(0, dim, gs):
        hg = h[..., start : start + gs]
        parts.append(hg / torch.sqrt((hg * hg).mean(dim=-1, keepdim=True) + eps) * weight[start : start + gs])
    out = torch.cat(parts, dim=-1)
    if z is not None and norm_before_gate:
        out = out * z * torch.sigmoid(z)
    return out


@pytest.mark.parametrize("norm_before_gate", [False, True], ids=["gate_then_norm", "norm_then_gate"])
@pytest.mark.parametrize("group_size", [None, 12, 4, 1], ids=["group_none", "group_D", "group_4", "group_1"])
@pytest.mark.parametrize("with_z", [True, False], ids=["z", "no_z"])
def test_matches_per_group_formula(with_z: bool, group_size: int | None, norm_before_gate: bool) -> None:
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(2, 5, 12, generator=gen, dtype=F64, requires_grad=True)
    z = torch.randn(2, 5, 12, generator=gen, dtype=F64, requires_grad=True) if with_z else None
    weight = torch.randn(12, generator=gen, dtype=F64, requires_grad=True)
    got = rmsnorm_gated_ref(x, z, weight, eps=1e-5, group_size=group_size, norm_before_gate=norm_before_gate)
    want = per_group_formula(x, z, weight, 1e-5, group_size, norm_before_gate)
    assert got.dtype == F64
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)

    leaves = [t for t in (x, z, weight) if t is not None]
    w = torch.randn(got.shape, generator=gen, dtype=F64)
    for a, b in zip(
        torch.autograd.grad((got * w).sum(), leaves), torch.autograd.grad((want * w).sum(), leaves), strict=True
    ):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("group_size", [5, 0, -4, 24], ids=["not_divisor", "zero", "negative", "larger_than_D"])
def test_bad_group_size(group_size: int) -> None:
    x = torch.randn(3, 12)
    with pytest.raises(ValueError, match="group_size"):
        rmsnorm_gated_ref(x, None, torch.ones(12), group_size=group_size)


def test_bf16_returns_input_dtype() -> None:
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(4, 16, generator=gen).bfloat16()
    z = torch.randn(4, 16, generator=gen).bfloat16()
    weight = torch.randn(16, generator=gen).bfloat16()
    out = rmsnorm_gated_ref(x, z, weight, group_size=8)
    assert out.dtype == torch.bfloat16
    want = per_group_formula(x.double(), z.double(), weight.double(), 1e-5, 8, False)
    torch.testing.assert_close(out.double(), want, rtol=2e-2, atol=2e-2)
