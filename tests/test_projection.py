"""in_proj fused with the hidden-parallel transport: which rows go where, and the fused pair against
nn.Linear + the plain transport (float64, real gloo ranks)."""

import pytest
import torch
import torch.distributed as dist

from mamba_cp.layout import build_token_plan
from mamba_cp.projection import gather_gate, project_scatter, projection_layout
from mamba_cp.testing import run_on_ranks
from mamba_cp.transport import heads_to_seq, seq_to_heads


@pytest.mark.parametrize(("heads", "groups", "cp"), [(4, 2, 2), (8, 1, 4), (8, 8, 2), (4, 4, 4)])
def test_layout_sends_each_rank_its_heads_and_groups(heads, groups, cp):
    p, n = 2, 3
    d_inner, gn = heads * p, groups * n
    layout = projection_layout(heads, p, groups, n, cp, torch.device("cpu"))
    rows = layout.send_rows.view(cp, layout.width_local)
    hl, gl = heads // cp, max(1, groups // cp)
    assert layout.width_local == hl * p + 2 * gl * n + hl
    for j in range(cp):
        x, b, c, dt = torch.split(rows[j], [hl * p, gl * n, gl * n, hl])
        assert x.tolist() == list(range(d_inner + j * hl * p, d_inner + (j + 1) * hl * p))
        g0 = (j * groups // cp if groups >= cp else j // (cp // groups)) * n
        assert b.tolist() == list(range(2 * d_inner + g0, 2 * d_inner + g0 + gl * n))
        assert c.tolist() == list(range(2 * d_inner + gn + g0, 2 * d_inner + gn + g0 + gl * n))
        assert dt.tolist() == list(range(2 * d_inner + 2 * gn + j * hl, 2 * d_inner + 2 * gn + (j + 1) * hl))
    sent = set(layout.send_rows.tolist())
    assert sent == set(range(d_inner, 2 * d_inner + 2 * gn + heads))  # every non-z row, z rows never
    assert layout.covers_once == (groups >= cp)


def _fused_vs_plain_worker(rank, world, groups, packed, bias):
    torch.manual_seed(0)
    heads, p, n, hidden = 4, 2, 3, 5
    d_inner, gn = heads * p, groups * n
    width = 2 * d_inner + 2 * gn + heads
    lin = torch.nn.Linear(hidden, width, bias=bias, dtype=torch.float64)
    dist.broadcast(lin.weight.data, 0)
    if bias:
        dist.broadcast(lin.bias.data, 0)
    cu = torch.tensor([0, 4 * world, 12 * world]) if packed else None
    batch, local_len = (1, 12) if packed else (2, 6)
    plan = build_token_plan(world, batch, local_len, cu)
    layout = projection_layout(heads, p, groups, n, world, torch.device("cpu"))
    h = torch.randn(batch * local_len, hidden, dtype=torch.float64, requires_grad=True)
    g_heads = torch.randn(batch, world * local_len, layout.width_local, dtype=torch.float64)
    g_out = torch.randn(batch, local_len, d_inner, dtype=torch.float64)

    def run(fused: bool):
        h.grad = None
        lin.zero_grad()
        if fused:
            z, heads_in = project_scatter(h, lin.weight, lin.bias, layout, plan, dist.group.WORLD)
            # A stand-in for conv + SSD: a fixed function of the head-sharded input, the width of y.
            y_heads = torch.tanh(heads_in[..., : d_inner // world] * 1.5)
            y, z = gather_gate(y_heads, z, h, lin.weight, lin.bias, layout, plan, dist.group.WORLD)
        else:
            full = lin(h).view(batch, local_len, width)
            z, x, B, C, dt = torch.split(full, [d_inner, d_inner, gn, gn, heads], dim=-1)
            rep = max(1, world // groups)

            def per_rank(t, grouped=False):
                if grouped and rep > 1:
                    t = t.unflatten(-1, (groups, 1, n)).expand(batch, local_len, groups, rep, n).flatten(-3)
                return t.reshape(batch, local_len, world, -1)

            heads_in = seq_to_heads(
                [per_rank(x), per_rank(B, True), per_rank(C, True), per_rank(dt)], plan, dist.group.WORLD
            )
            y_heads = torch.tanh(heads_in[..., : d_inner // world] * 1.5)
            y = heads_to_seq(y_heads, plan, dist.group.WORLD)
        loss = (y * g_out).sum() + (z.reshape(batch, local_len, d_inner) * z.reshape(batch, local_len, -1)).sum()
        loss = loss + (heads_in * g_heads).sum()
        loss.backward()
        grads = [h.grad.clone(), lin.weight.grad.clone()] + ([lin.bias.grad.clone()] if bias else [])
        return [y.detach().clone(), z.detach().reshape(batch, local_len, -1).clone(), heads_in.detach().clone()], grads

    outs_f, grads_f = run(True)
    outs_p, grads_p = run(False)
    return max(
        ((a - b).abs().max() / b.abs().max()).item() for a, b in zip(outs_f + grads_f, outs_p + grads_p, strict=True)
    )


@pytest.mark.parametrize(
    ("world", "groups", "packed", "bias"), [(2, 2, False, False), (4, 1, False, True), (2, 4, True, True)]
)
def test_fused_projection_equals_linear_plus_transport(world, groups, packed, bias):
    for worst in run_on_ranks(_fused_vs_plain_worker, world, groups, packed, bias):
        assert worst < 1e-13


def _frozen_worker(rank, world, frozen):
    """With the weight frozen (or the input needing no gradient) the other gradients are unchanged and the
    frozen ones are None: the backward's skipped branches skip nothing they should compute."""
    torch.manual_seed(0)
    heads, p, groups, n, hidden = 4, 2, 2, 3, 5
    width = 2 * heads * p + 2 * groups * n + heads
    lin = torch.nn.Linear(hidden, width, dtype=torch.float64)
    dist.broadcast(lin.weight.data, 0)
    dist.broadcast(lin.bias.data, 0)
    plan = build_token_plan(world, 2, 4)
    layout = projection_layout(heads, p, groups, n, world, torch.device("cpu"))
    h = torch.randn(8, hidden, dtype=torch.float64)

    def grads(frozen_now: str | None):
        tensors = (h, lin.weight, lin.bias)
        for t in tensors:
            t.grad = None
        h.requires_grad_(frozen_now != "input")
        lin.weight.requires_grad_(frozen_now != "weight")
        lin.bias.requires_grad_(frozen_now != "weight")
        z, heads_in = project_scatter(h, lin.weight, lin.bias, layout, plan, dist.group.WORLD)
        y, z = gather_gate(heads_in[..., :4].sin(), z, h, lin.weight, lin.bias, layout, plan, dist.group.WORLD)
        (y.sin().sum() + z.cos().sum()).backward()
        return [t.grad for t in tensors]

    full = grads(None)
    partial = grads(frozen)
    return [None if g is None else (g - f).abs().max().item() for g, f in zip(partial, full, strict=True)]


@pytest.mark.parametrize("frozen", ["weight", "input"])
def test_fused_projection_with_frozen_weight_or_input(frozen):
    for diffs in run_on_ranks(_frozen_worker, 2, frozen):
        if frozen == "weight":
            assert diffs[0] == 0.0 and diffs[1:] == [None, None]
        else:
            assert diffs[0] is None and diffs[1:] == [0.0, 0.0]
