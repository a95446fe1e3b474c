"""``mamba_cp.hidden_parallel`` as a drop-in for NeMo AutoModel's ``mamba_cp`` module, as code and tests see it.

Pinned here: every spec name importable; the functions find each other in the module at call time (so
``unittest.mock.patch`` on ``mamba_cp.hidden_parallel.X`` reaches the callers); construction and slicing with a
stand-in group that has only ``size()`` and ``rank()``; a clear ``TypeError`` when such a stand-in is asked to
run a collective; optional tensor arguments of the parameter getters; ``batch_size`` ignored; configuration
errors caught as ``AssertionError`` and ``ValueError`` with NeMo's message patterns; the cp=1 identity; and, in
two real gloo processes, that ``pre_conv_ssm`` returns what NeMo's five collectives return (this rank's
``z | x | B | C | dt`` over whole sequences in true order, built here by hand from the global batch) through
one collective, and that ``post_conv_ssm`` undoes it, values and gradients.

Shape legend: ``B`` batch, ``L`` global tokens, ``L_local = L / cp``, ``H`` heads, ``P`` head_dim, ``G`` groups,
``N`` d_state; the in_proj width is ``2*H*P + 2*G*N + H``.
"""

from __future__ import annotations

from types import SimpleNamespace
from unittest import mock

import pytest
import torch
import torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh

from mamba_cp import hidden_parallel as hp
from mamba_cp.testing import run_on_ranks
from mamba_cp.validation import ConfigError

SPEC_NAMES = [
    "MambaContextParallel",
    "_AllToAll",
    "_all_to_all",
    "_all_to_all_cp2hp",
    "_all_to_all_hp2cp",
    "_deinterleave_packed_seqs",
    "_reinterleave_packed_seqs",
    "_reorder_chunks",
    "_undo_attention_load_balancing",
    "_redo_attention_load_balancing",
]
SPEC_MEMBERS = [
    "cp_group",
    "cp_rank",
    "cp_size",
    "num_heads",
    "head_dim",
    "n_groups",
    "d_state",
    "d_inner",
    "d_inner_local",
    "num_heads_local",
    "n_groups_local",
    "group_repeat_count",
    "_mixer",
    "get_conv1d_weight",
    "get_conv1d_bias",
    "get_dt_bias",
    "get_A_log",
    "get_D",
    "pre_conv_ssm",
    "post_conv_ssm",
    "_repeat_group_state",
    "_slice_conv_param",
    "_slice_vector_param",
]


class StandInGroup:
    """A CP group that knows its size and this rank and nothing else (what NeMo's unit tests construct with)."""

    def __init__(self, size: int, rank: int = 0) -> None:
        self._size, self._rank = size, rank

    def size(self) -> int:
        return self._size

    def rank(self) -> int:
        return self._rank


def make_owner(heads: int, head_dim: int, groups: int, state: int, kernel: int = 4, bias: bool = True):
    """An object holding conv1d / dt_bias / A_log / D with distinct values, so every slice is recognisable."""
    conv_dim = heads * head_dim + 2 * groups * state
    weight = torch.arange(conv_dim * kernel, dtype=torch.float32).reshape(conv_dim, 1, kernel)
    conv = SimpleNamespace(weight=weight, bias=torch.arange(conv_dim, dtype=torch.float32) - 1000 if bias else None)
    return SimpleNamespace(
        conv1d=conv,
        dt_bias=torch.arange(heads, dtype=torch.float32),
        A_log=torch.arange(heads, dtype=torch.float32) + 50,
        D=torch.arange(heads, dtype=torch.float32) + 90,
    )


def make_cpx(heads, head_dim, groups, state, group, **owner_kwargs) -> hp.MambaContextParallel:
    owner = make_owner(heads, head_dim, groups, state, **owner_kwargs)
    return hp.MambaContextParallel(
        cp_group=group, num_heads=heads, head_dim=head_dim, n_groups=groups, d_state=state, mixer=owner
    )


def groups_of(rank: int, cp: int, groups: int) -> tuple[int, int]:
    """(first group, how many) rank ``rank`` computes with: a share of the groups, or a repeated one."""
    if groups >= cp:
        return rank * (groups // cp), groups // cp
    return rank // (cp // groups), 1


def rank_columns(t: torch.Tensor, rank: int, cp: int, heads: int, head_dim: int, groups: int, state: int):
    """Rank ``rank``'s ``z | x | B | C | dt`` columns of an in_proj output ``[..., 2*H*P + 2*G*N + H]``."""
    d, gn, h = heads * head_dim, groups * state, heads // cp
    z, x, B, C, dt = torch.split(t, [d, d, gn, gn, heads], dim=-1)
    g0, count = groups_of(rank, cp, groups)
    hs, gs = slice(rank * h * head_dim, (rank + 1) * h * head_dim), slice(g0 * state, (g0 + count) * state)
    return torch.cat([z[..., hs], x[..., hs], B[..., gs], C[..., gs], dt[..., rank * h : (rank + 1) * h]], dim=-1)


def conv_rows(t: torch.Tensor, rank: int, cp: int, heads: int, head_dim: int, groups: int, state: int):
    """Rank ``rank``'s rows of a conv1d weight / bias ``[H*P + 2*G*N, ...]``: its x channels, B group(s), C."""
    d, gn, h = heads * head_dim, groups * state, heads // cp
    x, B, C = torch.split(t, [d, gn, gn], dim=0)
    g0, count = groups_of(rank, cp, groups)
    gs = slice(g0 * state, (g0 + count) * state)
    return torch.cat([x[rank * h * head_dim : (rank + 1) * h * head_dim], B[gs], C[gs]])


def head_tail(seq: torch.Tensor, rank: int, cp: int, dim: int) -> torch.Tensor:
    """Rank ``rank``'s head-tail share of one sequence along ``dim``: chunks ``rank`` and ``2*cp-1-rank``."""
    chunks = seq.chunk(2 * cp, dim)
    return torch.cat([chunks[rank], chunks[2 * cp - 1 - rank]], dim)


def shard_by_hand(full: torch.Tensor, rank: int, cp: int, lengths: list[int] | None) -> torch.Tensor:
    """``[B, L, W]`` -> ``[B, L_local, W]``, or packed ``[T, W]`` (sequences of ``lengths``) -> ``[T_local, W]``."""
    if lengths is None:
        return head_tail(full, rank, cp, 1)
    return torch.cat([head_tail(s, rank, cp, 0) for s in full.split(lengths, 0)], 0)


def _identity(t: torch.Tensor, group) -> torch.Tensor:
    return t


# ---------------------------------------------------------------------------------------------- names and look-ups


def test_every_spec_name_is_importable():
    for name in SPEC_NAMES:
        assert hasattr(hp, name), f"mamba_cp.hidden_parallel lacks the spec name {name}"
        assert name in hp.__all__
    cpx = make_cpx(8, 2, 2, 3, StandInGroup(2, 1))
    missing = [m for m in SPEC_MEMBERS if not hasattr(cpx, m)]
    assert not missing, f"MambaContextParallel lacks {missing}"
    assert issubclass(hp._AllToAll, torch.autograd.Function)


def test_patching_all_to_all_reaches_both_transforms():
    group, cp = StandInGroup(2), 2
    x = torch.randn(3, 4, 10)  # [B, L_local, W]
    spy = mock.Mock(side_effect=_identity)
    with mock.patch("mamba_cp.hidden_parallel._all_to_all", spy):
        hidden = hp._all_to_all_cp2hp(x, group, 3)
        assert spy.call_count == 1
        sent, sent_group = spy.call_args.args
        assert sent.shape == (cp * 3 * 4, 10 // cp) and sent_group is group  # NeMo's [cp*B*L_local, W/cp]
        back = hp._all_to_all_hp2cp(hidden, group, 3)
        assert spy.call_count == 2
    # An identity "all-to-all" keeps every block home: token l of block r holds column block r of token l.
    assert hidden.shape == (3, cp * 4, 5)
    assert torch.equal(hidden[:, 4:], x[:, :, 5:]) and torch.equal(hidden[:, :4], x[:, :, :5])
    assert torch.equal(back, x)


@pytest.mark.parametrize("heads,groups,cp", [(8, 1, 2), (8, 4, 2), (8, 2, 4), (16, 8, 4)])
def test_pre_conv_ssm_makes_one_cp2hp_call_with_the_packed_width(heads, groups, cp):
    head_dim, state, batch, l_local = 2, 3, 2, 4
    width = 2 * heads * head_dim + 2 * groups * state + heads
    repeat = max(1, cp // groups)
    packed_width = 2 * heads * head_dim + 2 * groups * repeat * state + heads  # B/C repeated when G < cp
    w_local = packed_width // cp
    local = torch.randn(batch, l_local, width)
    calls = []

    def fake_cp2hp(tensor, cp_group, batch_size):
        calls.append((tensor.clone(), batch_size))
        return torch.zeros(tensor.shape[0], cp * tensor.shape[1], tensor.shape[2] // cp)

    cpx = make_cpx(heads, head_dim, groups, state, StandInGroup(cp, 1))
    with mock.patch("mamba_cp.hidden_parallel._all_to_all_cp2hp", side_effect=fake_cp2hp):
        out = cpx.pre_conv_ssm(local)
    assert len(calls) == 1, "z|x|B|C|dt must travel in one collective"
    sent, batch_size = calls[0]
    assert sent.shape == (batch, l_local, packed_width) and batch_size == batch
    # Column block r of what is sent is rank r's z|x|B|C|dt (B/C of its group), tokens untouched.
    expected = torch.cat([rank_columns(local, r, cp, heads, head_dim, groups, state) for r in range(cp)], -1)
    assert torch.equal(sent, expected)
    assert out.shape == (batch, cp * l_local, w_local)
    assert w_local == 2 * cpx.d_inner_local + 2 * cpx.n_groups_local * state + cpx.num_heads_local


@pytest.mark.parametrize("cp", [2, 4])
def test_post_conv_ssm_makes_one_hp2cp_call(cp):
    heads, head_dim, batch, length = 8, 2, 2, 8 * cp
    y = torch.randn(batch, length, heads * head_dim // cp)  # true order, this rank's heads
    calls = []

    def fake_hp2cp(tensor, cp_group, batch_size):
        calls.append(tensor.clone())
        return torch.zeros(tensor.shape[0], tensor.shape[1] // cp, tensor.shape[2] * cp)

    cpx = make_cpx(heads, head_dim, 4, 3, StandInGroup(cp, 0))
    with mock.patch("mamba_cp.hidden_parallel._all_to_all_hp2cp", side_effect=fake_hp2cp):
        out = cpx.post_conv_ssm(y)
    assert len(calls) == 1
    # What travels is y in the ranks' head-tail order: rank 0's two chunks, then rank 1's, ...
    assert torch.equal(calls[0], torch.cat([head_tail(y, r, cp, 1) for r in range(cp)], 1))
    assert out.shape == (batch, length // cp, heads * head_dim)


@pytest.mark.parametrize(
    "name",
    ["_undo_attention_load_balancing", "_redo_attention_load_balancing", "_reorder_chunks"]
    + ["_deinterleave_packed_seqs", "_reinterleave_packed_seqs"],
)
def test_layout_functions_are_looked_up_at_call_time(name):
    cp, heads, head_dim, groups, state = 2, 4, 2, 2, 3
    cu = torch.tensor([0, 8, 20], dtype=torch.int32)
    local = torch.randn(10, 2 * heads * head_dim + 2 * groups * state + heads)  # packed [T_local, W]
    cpx = make_cpx(heads, head_dim, groups, state, StandInGroup(cp))
    spy = mock.Mock(wraps=getattr(hp, name))
    with mock.patch("mamba_cp.hidden_parallel._all_to_all", _identity), mock.patch.object(hp, name, spy):
        y = cpx.pre_conv_ssm(local, cu)
        cpx.post_conv_ssm(y[:, : heads * head_dim // cp], cu)
    assert spy.call_count >= 1, f"pre/post_conv_ssm did not call the module's {name}"


# ------------------------------------------------------------------------------------- stand-in groups and slices


@pytest.mark.parametrize(
    "heads,groups,cp",
    [(8, 8, 2), (8, 2, 2), (8, 1, 2), (8, 2, 4), (16, 1, 4), (16, 8, 4), (12, 3, 3), (8, 4, 1)],
)
def test_construction_and_slices_with_a_stand_in_group(heads, groups, cp):
    head_dim, state = 2, 3
    for rank in range(cp):
        cpx = make_cpx(heads, head_dim, groups, state, StandInGroup(cp, rank))
        owner = cpx._mixer
        assert (cpx.cp_size, cpx.cp_rank, cpx.d_inner) == (cp, rank, heads * head_dim)
        assert (cpx.num_heads_local, cpx.d_inner_local) == (heads // cp, heads // cp * head_dim)
        assert (cpx.n_groups_local, cpx.group_repeat_count) == (max(1, groups // cp), max(1, cp // groups))
        h = slice(rank * heads // cp, (rank + 1) * heads // cp)
        assert torch.equal(cpx.get_dt_bias(), owner.dt_bias[h])
        assert torch.equal(cpx.get_A_log(), owner.A_log[h])
        assert torch.equal(cpx.get_D(), owner.D[h])
        dims = (rank, cp, heads, head_dim, groups, state)
        assert torch.equal(cpx.get_conv1d_weight(), conv_rows(owner.conv1d.weight, *dims).squeeze(1))
        assert torch.equal(cpx.get_conv1d_bias(), conv_rows(owner.conv1d.bias, *dims))
        # The vector slices are views of the full tensors: gradients land in them.
        assert cpx.get_dt_bias().data_ptr() == owner.dt_bias[h].data_ptr()
    if groups < cp:  # ranks sharing a group get the same B/C rows
        w = [make_cpx(heads, head_dim, groups, state, StandInGroup(cp, r)).get_conv1d_weight() for r in range(2)]
        d_local = heads // cp * head_dim
        assert torch.equal(w[0][d_local:], w[1][d_local:])


def test_group_state_repetition_with_a_stand_in():
    cpx = make_cpx(8, 2, 2, 3, StandInGroup(4, 0))  # G=2 < cp=4: each group twice
    state = torch.arange(2 * 5 * 6.0).reshape(2, 5, 6)  # [B, L, G*N]
    rep = cpx._repeat_group_state(state)
    assert rep.shape == (2, 5, 12)
    assert torch.equal(rep, torch.cat([state[..., :3], state[..., :3], state[..., 3:], state[..., 3:]], -1))
    assert torch.equal(cpx._repeat_group_state(state[0]), rep[0])  # packed [T, G*N]


@pytest.mark.parametrize("call", ["_all_to_all", "cp2hp", "hp2cp", "pre", "post"])
def test_a_collective_on_a_stand_in_group_raises_a_clear_type_error(call):
    group = StandInGroup(2, 0)
    cpx = make_cpx(4, 2, 2, 3, group)  # construction alone needs no collective
    width = 2 * 8 + 2 * 6 + 4
    run = {
        "_all_to_all": lambda: hp._all_to_all(torch.zeros(4, 3), group),
        "cp2hp": lambda: hp._all_to_all_cp2hp(torch.zeros(2, 4, 6), group, 2),
        "hp2cp": lambda: hp._all_to_all_hp2cp(torch.zeros(2, 4, 6), group, 2),
        "pre": lambda: cpx.pre_conv_ssm(torch.zeros(2, 4, width)),
        "post": lambda: cpx.post_conv_ssm(torch.zeros(2, 8, 4)),
    }[call]
    with pytest.raises(
        TypeError, match=r"needs a torch\.distributed ProcessGroup.*StandInGroup.*size\(\) and rank\(\)"
    ):
        run()


# --------------------------------------------------------------------------------------------- optional arguments


def test_parameter_getters_take_an_optional_tensor():
    heads, head_dim, groups, state, cp, rank = 8, 2, 2, 3, 2, 1
    cpx = make_cpx(heads, head_dim, groups, state, StandInGroup(cp, rank))
    h = slice(4, 8)
    for getter, attr in [(cpx.get_dt_bias, "dt_bias"), (cpx.get_A_log, "A_log"), (cpx.get_D, "D")]:
        given = getattr(cpx._mixer, attr).double() * 3 + 1  # e.g. an fp32 copy of a bf16 parameter
        assert torch.equal(getter(given), given[h]) and getter(given).data_ptr() == given[h].data_ptr()
        assert torch.equal(getter(None), getattr(cpx._mixer, attr)[h])
    d_full = torch.randn(heads, head_dim)  # D per head and channel
    assert torch.equal(cpx.get_D(d_full), d_full[h])
    dims = (rank, cp, heads, head_dim, groups, state)
    weight = torch.randn(cpx._mixer.conv1d.weight.shape)
    assert torch.equal(cpx.get_conv1d_weight(weight), conv_rows(weight, *dims).squeeze(1))
    bias = torch.randn(weight.shape[0])
    assert torch.equal(cpx.get_conv1d_bias(bias), conv_rows(bias, *dims))
    no_bias = make_cpx(heads, head_dim, groups, state, StandInGroup(cp, rank), bias=False)
    assert no_bias.get_conv1d_bias() is None
    assert torch.equal(no_bias.get_conv1d_bias(bias), conv_rows(bias, *dims))


def test_batch_size_is_ignored():
    group = StandInGroup(2)
    x = torch.randn(3, 4, 6)
    with mock.patch("mamba_cp.hidden_parallel._all_to_all", _identity):
        ref = hp._all_to_all_cp2hp(x, group)
        for bs in (None, 1, 3, 12, 10**6):
            assert torch.equal(hp._all_to_all_cp2hp(x, group, bs), ref)
            assert torch.equal(hp._all_to_all_cp2hp(x, group, batch_size=bs), ref)
            assert torch.equal(hp._all_to_all_hp2cp(ref, group, bs), x)
        # A packed [T, W] with the token count as batch_size (what NeMo's own pre_conv_ssm passes) is one row.
        assert torch.equal(hp._all_to_all_cp2hp(x[0], group, x.shape[1]), hp._all_to_all_cp2hp(x[:1], group, 1)[0])
        assert torch.equal(hp._all_to_all_hp2cp(ref[0], group, ref.shape[1]), x[0])


# ----------------------------------------------------------------------------------------------- errors and cp=1


@pytest.mark.parametrize(
    "heads,groups,cp,pattern,values",
    [
        (6, 1, 4, "num_heads.*must be divisible by cp_size", "num_heads (6)"),
        (8, 3, 4, "cp_size.*must be divisible by n_groups", "cp_size (4)"),
        (6, 3, 2, "n_groups.*must be divisible by cp_size", "n_groups (3)"),
    ],
)
def test_config_errors_are_assertion_and_value_errors(heads, groups, cp, pattern, values):
    for caught in (AssertionError, ValueError, ConfigError):
        with pytest.raises(caught, match=pattern) as info:
            make_cpx(heads, 2, groups, 3, StandInGroup(cp))
        assert values in str(info.value)
    assert issubclass(ConfigError, AssertionError) and issubclass(ConfigError, ValueError)


def test_wrong_in_proj_width_names_the_rule():
    cpx = make_cpx(4, 2, 2, 3, StandInGroup(2))
    with pytest.raises(ValueError, match=r"projected_states width \(31\) must be .*num_heads \(32\)"):
        cpx.pre_conv_ssm(torch.zeros(2, 4, 31))


@pytest.mark.parametrize("group", [StandInGroup(1), 1], ids=["stand-in", "int-1"])
def test_cp_size_1_is_the_identity(group):
    cpx = make_cpx(4, 2, 2, 3, group)
    x = torch.randn(2, 8, 2 * 8 + 2 * 6 + 4)
    y = torch.randn(2, 8, 8)
    assert cpx.pre_conv_ssm(x) is x and cpx.post_conv_ssm(y) is y
    packed = x[0]
    assert cpx.pre_conv_ssm(packed, torch.tensor([0, 8])) is packed
    assert (cpx.num_heads_local, cpx.n_groups_local, cpx.group_repeat_count) == (4, 2, 1)


# ------------------------------------------------------------------------------------------- real gloo, two ranks


def _gloo_worker(rank: int, world: int) -> int:
    checked = 0
    cases = [(layout, h, g) for layout in ("bshd", "thd") for h, g in [(4, 2), (4, 1), (8, 4)]]  # G ==, <, > cp
    for layout, heads, groups in cases:
        head_dim, state = 2, 3
        dims = (heads, head_dim, groups, state)
        width = 2 * heads * head_dim + 2 * groups * state + heads
        gen = torch.Generator().manual_seed(100 * heads + groups)  # the same global batch on every rank
        if layout == "bshd":
            lengths, cu = None, None
            full = torch.randn(2, 8 * world, width, generator=gen, dtype=torch.float64)
        else:
            lengths = [2 * world, 6 * world, 4 * world]
            cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32)
            full = torch.randn(sum(lengths), width, generator=gen, dtype=torch.float64)
        local = shard_by_hand(full, rank, world, lengths).requires_grad_(True)
        cpx = hp.MambaContextParallel(dist.group.WORLD, heads, head_dim, groups, state, make_owner(*dims))

        out = cpx.pre_conv_ssm(local, cu)
        # NeMo's five collectives give this rank's z|x|B|C|dt over every whole sequence, in true order.
        assert torch.equal(out, rank_columns(full, rank, world, *dims)), (heads, groups, layout)
        back = cpx.post_conv_ssm(out, cu)
        # Round trip: the local tokens again, each rank's columns side by side (rank r's block r).
        packed = torch.cat([rank_columns(local, r, world, *dims) for r in range(world)], -1)
        assert torch.equal(back, packed)

        # Backward: exactly the adjoint of the round trip (repeated B/C columns sum their gradients).
        g = torch.randn(back.shape, generator=torch.Generator().manual_seed(rank), dtype=torch.float64)
        (grad,) = torch.autograd.grad(back, local, g)
        ref_local = local.detach().clone().requires_grad_(True)
        ref = torch.cat([rank_columns(ref_local, r, world, *dims) for r in range(world)], -1)
        (ref_grad,) = torch.autograd.grad(ref, ref_local, g)
        assert torch.equal(grad, ref_grad)

        # post_conv_ssm of a global y's head slice: this rank's tokens of y, all heads (head-tail layout).
        y_full = torch.randn(*full.shape[:-1], heads * head_dim, generator=gen, dtype=torch.float64)
        h_cols = slice(rank * heads // world * head_dim, (rank + 1) * heads // world * head_dim)
        assert torch.equal(cpx.post_conv_ssm(y_full[..., h_cols], cu), shard_by_hand(y_full, rank, world, lengths))

        # Other ranks of the same data: a packed [1, T, W] batch, and one BSHD row given as 2-D [L_local, W].
        if cu is not None:
            assert torch.equal(cpx.pre_conv_ssm(local[None], cu), out[None])
        else:
            assert torch.equal(cpx.pre_conv_ssm(local[1]), out[1])
            assert torch.equal(cpx.post_conv_ssm(out[1]), back[1])
        checked += 1
    # A 1-D DeviceMesh works as the group too, down to the bare transport.
    mesh = init_device_mesh("cpu", (world,))
    x = torch.randn(2, 4, 6, generator=torch.Generator().manual_seed(rank), dtype=torch.float64)
    assert torch.equal(hp._all_to_all_hp2cp(hp._all_to_all_cp2hp(x, mesh, 2), mesh, 2), x)
    cpx = hp.MambaContextParallel(mesh, 4, 2, 2, 3, make_owner(4, 2, 2, 3))
    local = torch.randn(2, 8, 32, dtype=torch.float64)
    assert torch.equal(
        cpx.pre_conv_ssm(local), hp.MambaContextParallel(dist.group.WORLD, 4, 2, 2, 3, None).pre_conv_ssm(local)
    )
    return checked


def test_two_ranks_match_nemo_semantics_and_round_trip():
    # One pair of processes for every case: starting gloo costs more than the checks.
    assert run_on_ranks(_gloo_worker, 2) == [6, 6]
