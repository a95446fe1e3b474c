"""The spec's transport and ``pre_conv_ssm`` / ``post_conv_ssm`` in real gloo processes (float64)."""

import pytest
import torch
import torch.distributed as dist
import torch.nn as nn

import mamba_cp
from mamba_cp import MambaContextParallel, shard
from mamba_cp.testing import run_on_ranks


def _cu(seqlens):
    return torch.tensor([0, *torch.tensor(seqlens).cumsum(0).tolist()], dtype=torch.int32)


def _spec_transport_worker(rank, world):
    gen = torch.Generator().manual_seed(0)
    batch, l_local, width = 2, 3, 4 * world
    full = torch.randn(batch, l_local * world, width, generator=gen, dtype=torch.float64)
    local = full[:, rank * l_local : (rank + 1) * l_local].clone().requires_grad_(True)
    hp = mamba_cp._all_to_all_cp2hp(local, dist.group.WORLD, batch)
    w_local = width // world
    assert torch.equal(hp, full[:, :, rank * w_local : (rank + 1) * w_local])
    back = mamba_cp._all_to_all_hp2cp(hp, dist.group.WORLD, batch)
    assert torch.equal(back, local)
    # the backward of cp2hp is hp2cp of the gradient (an all-to-all is its own adjoint)
    g = torch.randn(hp.shape, generator=torch.Generator().manual_seed(rank), dtype=torch.float64)
    (grad,) = torch.autograd.grad(hp, local, g)
    assert torch.equal(grad, mamba_cp._all_to_all_hp2cp(g, dist.group.WORLD, batch))
    # THD 2-D inputs [T, W]
    assert torch.equal(mamba_cp._all_to_all_cp2hp(local[0], dist.group.WORLD, 1), hp[0])
    return True


@pytest.mark.parametrize("cp", [2, 4])
def test_spec_all_to_all_cp2hp_hp2cp(cp):
    assert all(run_on_ranks(_spec_transport_worker, cp))


def _expected_local(full, rank, world, heads, head_dim, groups, state):
    """This rank's z | x | B | C | dt columns of the global in_proj output, sequence untouched."""
    d_inner, gn = heads * head_dim, groups * state
    z, x, B, C, dt = torch.split(full, [d_inner, d_inner, gn, gn, heads], dim=-1)
    h_local = heads // world
    hs = slice(rank * h_local * head_dim, (rank + 1) * h_local * head_dim)
    g_local = max(groups // world, 1)
    g0 = (rank * groups // world) if groups >= world else rank // (world // groups)
    gs = slice(g0 * state, (g0 + g_local) * state)
    return torch.cat(
        [z[..., hs], x[..., hs], B[..., gs], C[..., gs], dt[..., rank * h_local : (rank + 1) * h_local]], -1
    )


def _pre_post_worker(rank, world, layout, heads, groups):
    head_dim, state = 3, 2
    width = 2 * heads * head_dim + 2 * groups * state + heads
    gen = torch.Generator().manual_seed(1)
    if layout == "bshd":
        full, cu, seq_dim = torch.randn(2, 4 * world, width, generator=gen, dtype=torch.float64), None, 1
    else:
        cu = _cu([2 * world, 6 * world, 4 * world])
        full, seq_dim = torch.randn(int(cu[-1]), width, generator=gen, dtype=torch.float64), 0
    cpx = MambaContextParallel(dist.group.WORLD, heads, head_dim, groups, state, nn.Module())
    local = shard(full, world, rank, seq_dim, cu)
    out = cpx.pre_conv_ssm(local, cu_seqlens=cu)
    expected = _expected_local(full, rank, world, heads, head_dim, groups, state)
    assert torch.equal(out, expected), "pre_conv_ssm must return this rank's heads in true order"

    # The same result through the spec's stand-alone pieces, composed as NeMo's module composes them.
    d_inner, gn = heads * head_dim, groups * state
    pieces = list(torch.split(local, [d_inner, d_inner, gn, gn, heads], dim=-1))
    if cpx.group_repeat_count > 1:
        pieces[2], pieces[3] = cpx._repeat_group_state(pieces[2]), cpx._repeat_group_state(pieces[3])
    batch = 1 if cu is not None else full.shape[0]
    moved = torch.cat([mamba_cp._all_to_all_cp2hp(p, dist.group.WORLD, batch) for p in pieces], dim=-1)
    if cu is not None:
        moved = mamba_cp._deinterleave_packed_seqs(moved, cu // world, world)
    assert torch.equal(mamba_cp._undo_attention_load_balancing(moved, world, cu), expected)

    # post_conv_ssm: this rank's head slice of a global y, in true order -> this rank's tokens, all heads.
    y_full = torch.randn(*full.shape[:-1], heads * head_dim, generator=gen, dtype=torch.float64)
    h_local = heads // world
    y_mine = y_full[..., rank * h_local * head_dim : (rank + 1) * h_local * head_dim]
    assert torch.equal(cpx.post_conv_ssm(y_mine, cu_seqlens=cu), shard(y_full, world, rank, seq_dim, cu))
    return True


@pytest.mark.parametrize(
    "cp,heads,groups",
    [(2, 4, 2), (2, 4, 1), (4, 8, 2), (4, 4, 4), (2, 8, 8)],
    ids=["G==cp", "G<cp", "G<cp-4", "G==cp-4", "G>cp"],
)
@pytest.mark.parametrize("layout", ["bshd", "thd"])
def test_pre_and_post_conv_ssm(cp, heads, groups, layout):
    assert all(run_on_ranks(_pre_post_worker, cp, layout, heads, groups))


def _cp1_worker(rank, world):
    cpx = MambaContextParallel(dist.group.WORLD, 4, 2, 2, 2, nn.Module())
    x = torch.randn(1, 8, 2 * 8 + 8 + 4)
    assert cpx.pre_conv_ssm(x) is x and cpx.post_conv_ssm(x) is x
    assert (cpx.num_heads_local, cpx.n_groups_local, cpx.group_repeat_count) == (4, 2, 1)
    return True


def test_cp1_is_identity():
    assert run_on_ranks(_cp1_worker, 1) == [True]


def _attributes_worker(rank, world):
    class Conv(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv1d = nn.Conv1d(8 * 2 + 2 * 2 * 3, 8 * 2 + 2 * 2 * 3, 4, groups=8 * 2 + 2 * 2 * 3)
            self.dt_bias = nn.Parameter(torch.arange(8.0))
            self.A_log = nn.Parameter(torch.arange(8.0) + 10)
            self.D = nn.Parameter(torch.arange(8.0) + 20)

    mixer = Conv()
    cpx = MambaContextParallel(dist.group.WORLD, 8, 2, 2, 3, mixer)
    assert (cpx.cp_rank, cpx.cp_size, cpx.d_inner) == (rank, world, 16)
    assert (cpx.num_heads_local, cpx.d_inner_local) == (8 // world, 16 // world)
    assert cpx.get_dt_bias().tolist() == list(range(rank * 8 // world, (rank + 1) * 8 // world))
    assert torch.equal(cpx.get_A_log(), mixer.A_log[rank * 8 // world : (rank + 1) * 8 // world])
    assert torch.equal(cpx.get_D(), mixer.D[rank * 8 // world : (rank + 1) * 8 // world])
    weight = cpx.get_conv1d_weight()
    assert weight.shape == (16 // world + 2 * cpx.n_groups_local * 3, 4)
    # gradients of the slices land in the full parameters, only in this rank's slice
    (cpx.get_conv1d_weight().sum() + cpx.get_conv1d_bias().sum() + cpx.get_dt_bias().sum()).backward()
    assert int(mixer.conv1d.weight.grad.sum()) == weight.numel()
    assert mixer.dt_bias.grad.sum() == 8 // world
    return (cpx.n_groups_local, cpx.group_repeat_count)


@pytest.mark.parametrize("cp,expected", [(2, (1, 1)), (4, (1, 2))])
def test_spec_attributes_and_slices(cp, expected):
    assert set(run_on_ranks(_attributes_worker, cp)) == {expected}
