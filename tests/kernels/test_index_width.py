"""The index-width splitters against the unsplit call, in float64 through the reference kernels.

A cut call must give the unsplit call's outputs, final states and every gradient (to ~1e-12 relative here);
planted bugs (a dropped or unmasked carried state, raw ``seq_idx`` in a later piece, the wrong B/C group,
a missing conv halo) must make the same comparison fail. Limits are lowered to a few hundred elements so
that tiny tensors are cut; big shapes are planned on meta tensors.
"""

from __future__ import annotations

import functools
import importlib.util
import pathlib

import pytest
import torch

from mamba_cp.kernels import index_width as iw
from mamba_cp.kernels.conv_reference import causal_conv1d_ref
from mamba_cp.kernels.norm_reference import rmsnorm_gated_ref
from mamba_cp.kernels.ssd_reference import ssd_chunk_scan_ref

F64 = torch.float64
EXACT = 1e-12  # float64 split vs unsplit: rounding is ~1e-15
WRONG = 1e-6  # a planted bug is off by far more

BATCH, LEN, HEADS, HEADDIM, GROUPS, DSTATE, CHUNK = 2, 44, 6, 4, 2, 5, 8
PIECES = ((0, 16), (16, 24), (24, 44))
# Row 0: sequences start at 10 (the one from 10 crosses the piece boundary 16), 24 (exactly at a boundary), 30.
# Row 1 starts at id 2 (mamba_ssm attaches an initial state to id 0 only) and has a start exactly at 16.
SEQ_STARTS = ((10, 24, 30), (16, 35))
SEQ_FIRST_ID = (0, 2)

SPLITS = {
    "in_group_heads": iw.SsdSplit(((0, 2),), ((0, 2), (2, 3), (3, 4), (4, 6)), ((0, LEN),)),
    "whole_groups": iw.SsdSplit(((0, 2),), ((0, 3), (3, 6)), ((0, LEN),)),
    "pieces": iw.SsdSplit(((0, 2),), ((0, 6),), PIECES),
    "batch": iw.SsdSplit(((0, 1), (1, 2)), ((0, 6),), ((0, LEN),)),
    "all_axes": iw.SsdSplit(((0, 1), (1, 2)), ((0, 1), (1, 3), (3, 6)), PIECES),
}


def _rel(got: torch.Tensor, want: torch.Tensor) -> float:
    return float((got - want).abs().max() / want.abs().max().clamp_min(1e-300))


def _seq_idx() -> torch.Tensor:
    ids = torch.tensor(SEQ_FIRST_ID, dtype=torch.int32)[:, None].repeat(1, LEN)
    for row, starts in enumerate(SEQ_STARTS):
        for s in starts:
            ids[row, s:] += 1
    return ids


def _mamba_like(kernel):
    """``kernel`` with mamba_ssm's rule for an initial state under ``seq_idx``: it belongs to id 0 (for
    non-decreasing ids: used only in rows whose first id is 0)."""

    def run(x, dt, A, B, C, chunk_size, *, initial_states=None, seq_idx=None, **kw):
        if initial_states is not None and seq_idx is not None:
            initial_states = initial_states * (seq_idx[:, 0] == 0).to(initial_states.dtype)[:, None, None, None]
        return kernel(x, dt, A, B, C, chunk_size, initial_states=initial_states, seq_idx=seq_idx, **kw)

    return run


FEATURES = {
    # z, D [H], dt_bias + softplus, initial states, final states, packed sequences, x/B/C as views of one xBC
    "packed_gated": dict(z=True, D="h", dt_bias=True, softplus=True, init=True, final=True, seq=True, strided=True),
    # D [H, P], a dt clamp, nothing else
    "plain": dict(D="hp", dt_limit=(0.05, 0.9)),
    # mamba_ssm's initial-state rule: the pieces' seq_idx must be renumbered for it
    "mamba_rule": dict(init=True, final=True, seq=True, dt_bias=True, softplus=True, mamba=True),
}


def _inputs(f: dict, seed: int = 0) -> tuple[dict, dict]:
    """(leaves, kernel kwargs) for one feature set."""
    g = torch.Generator().manual_seed(seed)

    def rnd(*shape, scale=1.0):
        return (torch.randn(*shape, generator=g, dtype=F64) * scale).requires_grad_(True)

    hp, gn = HEADS * HEADDIM, GROUPS * DSTATE
    leaves = {"dt": rnd(BATCH, LEN, HEADS, scale=0.5), "A": (-torch.rand(HEADS, generator=g, dtype=F64) - 0.2)}
    leaves["A"].requires_grad_(True)
    if f.get("strided"):
        leaves["xbc"] = rnd(BATCH, LEN, hp + 2 * gn + 3)
    else:
        leaves.update(x=rnd(BATCH, LEN, HEADS, HEADDIM), B=rnd(BATCH, LEN, GROUPS, DSTATE))
        leaves["C"] = rnd(BATCH, LEN, GROUPS, DSTATE)
    if f.get("z"):
        leaves["z"] = rnd(BATCH, LEN, HEADS, HEADDIM)
    if f.get("D"):
        leaves["D"] = rnd(HEADS) if f["D"] == "h" else rnd(HEADS, HEADDIM)
    if f.get("dt_bias"):
        leaves["dt_bias"] = rnd(HEADS, scale=0.3)
    if f.get("init"):
        leaves["initial_states"] = rnd(BATCH, HEADS, HEADDIM, DSTATE)
    kw = {"dt_softplus": bool(f.get("softplus")), "return_final_states": bool(f.get("final"))}
    if "dt_limit" in f:
        kw["dt_limit"] = f["dt_limit"]
    if f.get("seq"):
        kw["seq_idx"] = _seq_idx()
    return leaves, kw


def _args(leaves: dict) -> dict:
    """Kernel tensor arguments from the leaves (x, B, C as column views of ``xbc`` when it is there)."""
    a = {k: v for k, v in leaves.items() if k != "xbc"}
    if "xbc" in leaves:
        hp, gn = HEADS * HEADDIM, GROUPS * DSTATE
        xbc = leaves["xbc"]
        a["x"] = xbc[..., :hp].unflatten(-1, (HEADS, HEADDIM))
        a["B"] = xbc[..., hp : hp + gn].unflatten(-1, (GROUPS, DSTATE))
        a["C"] = xbc[..., hp + gn : hp + 2 * gn].unflatten(-1, (GROUPS, DSTATE))
    return a


def _ssd_results(call, leaves: dict, kw: dict) -> dict:
    """Outputs, final states and the gradient of every leaf under one fixed random loss."""
    a = _args(leaves)
    out = call(a.pop("x"), a.pop("dt"), a.pop("A"), a.pop("B"), a.pop("C"), CHUNK, **a, **kw)
    y, final = out if kw["return_final_states"] else (out, None)
    g = torch.Generator().manual_seed(1)
    loss = (y * torch.randn(y.shape, generator=g, dtype=F64)).sum()
    if final is not None:
        loss = loss + (final * torch.randn(final.shape, generator=g, dtype=F64)).sum()
    names = list(leaves)
    grads = torch.autograd.grad(loss, [leaves[n] for n in names])
    res = {"y": y.detach(), **{f"d{n}": gr for n, gr in zip(names, grads, strict=True)}}
    if final is not None:
        res["final"] = final.detach()
    return res


def _worst(got: dict, want: dict) -> tuple[float, str]:
    assert got.keys() == want.keys()
    return max((_rel(got[k], want[k]), k) for k in want)


def _compare_ssd(kernel, split, feature: str, seed: int = 0) -> tuple[float, str]:
    f = FEATURES[feature]
    kernel = _mamba_like(kernel) if f.get("mamba") else kernel
    leaves, kw = _inputs(f, seed)
    want = _ssd_results(kernel, leaves, kw)

    def cut(*args, **kwargs):
        return iw.ssd_chunk_scan_split(kernel, *args, split=split, **kwargs)

    return _worst(_ssd_results(cut, leaves, kw), want)


# ------------------------------------------------------------------------------------------------ SSD


@pytest.mark.parametrize("feature", list(FEATURES))
@pytest.mark.parametrize("split", list(SPLITS))
def test_ssd_split_matches_unsplit(split, feature):
    err, what = _compare_ssd(ssd_chunk_scan_ref, SPLITS[split], feature)
    assert err < EXACT, (split, feature, what, err)


@pytest.mark.parametrize("feature", ["packed_gated", "plain"])
def test_ssd_planned_split_matches_and_every_call_fits(feature):
    limit = 700
    calls = []

    def recording(x, dt, A, B, C, chunk_size, **kw):
        calls.append((x.shape, B.shape, [iw.span(t) for t in (x, dt, B, C, kw.get("z")) if t is not None]))
        return ssd_chunk_scan_ref(x, dt, A, B, C, chunk_size, **kw)

    leaves, kw = _inputs(FEATURES[feature])
    want = _ssd_results(ssd_chunk_scan_ref, leaves, kw)

    def cut(*args, **kwargs):
        return iw.ssd_chunk_scan_split(recording, *args, limit=limit, **kwargs)

    err, what = _worst(_ssd_results(cut, leaves, kw), want)
    assert err < EXACT, (what, err)
    assert len(calls) > 1
    for (b, length, h, p), (_, _, g, n), spans in calls:
        assert max(iw.ssd_call_elements(b, length, h, p, g, n, CHUNK).values()) <= limit
        assert max(spans) <= limit


def test_ssd_call_that_fits_is_passed_through():
    seen = []

    def recording(*args, **kw):
        seen.append((args, kw))
        return "out"

    leaves, kw = _inputs(FEATURES["packed_gated"])
    a = _args(leaves)
    got = iw.ssd_chunk_scan_split(recording, a["x"], a["dt"], a["A"], a["B"], a["C"], CHUNK, z=a["z"], **kw)
    assert got == "out" and len(seen) == 1
    args, passed = seen[0]
    assert all(p is q for p, q in zip(args, (a["x"], a["dt"], a["A"], a["B"], a["C"]), strict=False))
    assert passed["z"] is a["z"] and passed["seq_idx"] is kw["seq_idx"]


def _carry_dropped(state, seq_idx, rows, l0):
    return None


def _carry_unmasked(state, seq_idx, rows, l0):
    return state


def _carry_mask_off_by_one(state, seq_idx, rows, l0):
    keep = seq_idx[rows, l0 + 1] == seq_idx[rows, l0]
    return state * keep.to(state.dtype)[:, None, None, None]


def _seq_raw(seq_idx, rows, l0, l1):
    return None if seq_idx is None else seq_idx[rows, l0:l1]


PLANTED = {
    # (patched helper, replacement, split, feature)
    "dropped_carried_state": ("_carried_state", _carry_dropped, "pieces", "packed_gated"),
    "carried_state_unmasked": ("_carried_state", _carry_unmasked, "pieces", "packed_gated"),
    "mask_off_by_one": ("_carried_state", _carry_mask_off_by_one, "pieces", "packed_gated"),
    "seq_idx_not_renumbered": ("_piece_seq_idx", _seq_raw, "pieces", "mamba_rule"),
    "wrong_group": ("_groups_of", lambda h0, h1, per: (0, 1), "in_group_heads", "plain"),
}


@pytest.mark.parametrize("bug", list(PLANTED))
def test_ssd_planted_bug_is_caught(bug, monkeypatch):
    name, replacement, split, feature = PLANTED[bug]
    monkeypatch.setattr(iw, name, replacement)
    err, _ = _compare_ssd(ssd_chunk_scan_ref, SPLITS[split], feature)
    assert err > WRONG, (bug, err)


def test_ssd_pieces_not_at_chunk_multiples_or_heads_across_groups_are_refused():
    leaves, kw = _inputs(FEATURES["plain"])
    a = _args(leaves)
    args = (a["x"], a["dt"], a["A"], a["B"], a["C"], CHUNK)
    bad = {
        "chunk_size": iw.SsdSplit(((0, 2),), ((0, 6),), ((0, 12), (12, LEN))),
        "one group": iw.SsdSplit(((0, 2),), ((0, 2), (2, 4), (4, 6)), ((0, LEN),)),
        "contiguous": iw.SsdSplit(((0, 2),), ((0, 6),), ((0, 16), (24, LEN))),
        "cover": iw.SsdSplit(((0, 1),), ((0, 6),), ((0, LEN),)),
    }
    for rule, split in bad.items():
        with pytest.raises(ValueError, match=rule):
            iw.ssd_chunk_scan_split(ssd_chunk_scan_ref, *args, split=split)
    with pytest.raises(ValueError, match="limit"):
        iw.ssd_chunk_scan_split(ssd_chunk_scan_ref, *args, limit=0)


def _meta_plan(batch, length, heads, groups, stride=None, headdim=64, dstate=128, chunk=128):
    m = {"device": "meta", "dtype": torch.bfloat16}
    hp, gn = heads * headdim, groups * dstate
    wide = torch.empty(batch, length, stride or hp + 2 * gn, **m)
    x = wide[..., :hp].unflatten(-1, (heads, headdim))
    B = wide[..., hp : hp + gn].unflatten(-1, (groups, dstate))
    C = wide[..., hp + gn : hp + 2 * gn].unflatten(-1, (groups, dstate))
    return iw.plan_ssd_split(x, torch.empty(batch, length, heads, **m), B, C, chunk)


@pytest.mark.parametrize(
    "shape,calls",
    [
        ((1, 128 * 1024, 128, 8), 1),  # the NemotronH-8B-like mixer at 128K: untouched
        ((1, 1 << 20, 64, 4), 3),  # hidden-parallel rank at cp=2, 1M tokens
        ((1, 1 << 20, 128, 8), 5),  # the plain mixer at 1M
        ((2, 256 * 1024, 128, 8), 4),  # batch stride 2**31: cut too (an int32 stride would overflow)
        ((1, 1 << 23, 8, 1), 3),  # 8M tokens: 65536 chunks is one past CUDA's grid
    ],
    ids=str,
)
def test_ssd_plans_for_real_shapes(shape, calls):
    batch, length, heads, groups = shape
    split = _meta_plan(*shape)
    assert split.calls == calls
    for b0, b1 in split.batch:
        for h0, h1 in split.heads:
            g = iw._groups_of(h0, h1, heads // groups)
            for l0, l1 in split.pieces:
                sizes = iw.ssd_call_elements(b1 - b0, l1 - l0, h1 - h0, 64, g[1] - g[0], 128, 128)
                assert max(sizes.values()) <= iw.INT32_LIMIT
                assert (b1 - b0) * -(-(l1 - l0) // 128) <= iw.GRID_YZ_LIMIT


def test_ssd_plan_cuts_the_sequence_of_strided_views_rather_than_copying_heads():
    # x, B, C as column views of one xBC row 5120 wide: a head block of them spans the whole row.
    split = _meta_plan(1, 1 << 20, 64, 4, stride=64 * 64 + 2 * 4 * 128)
    assert len(split.heads) == 1 and len(split.pieces) == 3
    assert all(l0 % 128 == 0 for l0, _ in split.pieces)


# ------------------------------------------------------------------------------------------------ conv


def _conv_case(seed=0, strided=True):
    g = torch.Generator().manual_seed(seed)
    batch, length, channels, width = 2, 30, 6, 4
    base = torch.randn(batch, length, channels + (5 if strided else 0), generator=g, dtype=F64)
    leaf = base.requires_grad_(True)
    w = torch.randn(channels, width, generator=g, dtype=F64, requires_grad=True)
    b = torch.randn(channels, generator=g, dtype=F64, requires_grad=True)
    seq = torch.zeros(batch, length, dtype=torch.int32)
    for row, starts in enumerate(((9, 11, 20), (10, 12))):  # starts at a piece start, inside a halo, crossing
        for s in starts:
            seq[row, s:] += 1
    return leaf, (lambda: leaf[..., 2 : 2 + channels] if strided else leaf), w, b, seq


def _conv_results(call, leaf, x_of, w, b, seq, history=None):
    kw = {} if history is None else {"history": history, "history_seq_idx": None if seq is None else seq[:, :3] - 1}
    if seq is not None and history is not None:
        kw["history_seq_idx"][1, 2] = 0  # row 1's last history token continues its first sequence
    y = call(x_of(), w, b, seq_idx=seq, activation="silu", **kw)
    gy = torch.randn(y.shape, generator=torch.Generator().manual_seed(3), dtype=F64)
    leaves = (leaf, w, b) if history is None else (leaf, w, b, history)
    grads = torch.autograd.grad((y * gy).sum(), leaves)
    out = {"y": y.detach(), "dx": grads[0], "dw": grads[1], "db": grads[2]}
    return out if history is None else {**out, "dhistory": grads[3]}


CONV_SPLITS = {
    "pieces": iw.ConvSplit(((0, 1), (1, 2)), ((0, 9), (9, 12), (12, 30))),
    "batch": iw.ConvSplit(((0, 1), (1, 2)), ((0, 30),)),
    # pieces starting inside the first K-1 tokens: their windows start at token 0, so they read the history too
    "short_first": iw.ConvSplit(((0, 2),), ((0, 1), (1, 2), (2, 30))),
}


@pytest.mark.parametrize("use_history", [False, True], ids=["", "history"])
@pytest.mark.parametrize("use_seq", [True, False], ids=["seq_idx", "no_seq_idx"])
@pytest.mark.parametrize("split", [*CONV_SPLITS, "planned"])
def test_conv_split_matches_unsplit(split, use_seq, use_history):
    """Cut calls against the uncut one: values and every gradient (the history's too, which only the pieces
    that start a row read)."""
    leaf, x_of, w, b, seq = _conv_case()
    seq = seq if use_seq else None
    history = torch.randn(2, 3, 6, dtype=F64, requires_grad=True) if use_history else None
    want = _conv_results(causal_conv1d_ref, leaf, x_of, w, b, seq, history)
    calls = []

    def recording(x, *args, **kw):
        calls.append((iw.span(x), x.stride(1)))
        return causal_conv1d_ref(x, *args, **kw)

    opts = {"limit": 80} if split == "planned" else {"split": CONV_SPLITS[split]}

    def cut(*args, **kw):
        return iw.causal_conv1d_split(recording, *args, **kw, **opts)

    err, what = _worst(_conv_results(cut, leaf, x_of, w, b, seq, history), want)
    assert err < EXACT, (what, err)
    if history is not None:
        assert float(want["dhistory"].abs().sum()) > 0
    if split == "planned":
        assert len(calls) > 2 and max(sp for sp, _ in calls) <= 80
        assert all(stride == 11 for _, stride in calls)  # windows of the strided x read in place, not copied


def test_conv_planted_missing_halo_is_caught(monkeypatch):
    leaf, x_of, w, b, seq = _conv_case()
    want = _conv_results(causal_conv1d_ref, leaf, x_of, w, b, seq)
    monkeypatch.setattr(iw, "_window_start", lambda l0, halo: l0)

    def cut(*args, **kw):
        return iw.causal_conv1d_split(causal_conv1d_ref, *args, **kw, split=CONV_SPLITS["pieces"])

    assert _worst(_conv_results(cut, leaf, x_of, w, b, seq), want)[0] > WRONG


def test_conv_plans():
    # causal_conv1d's uint32 offsets and 4,194,240-token grid; our Triton conv's token cap only
    pkg = {"limit": iw.UINT32_LIMIT, "max_tokens": 65535 * 64}
    assert iw.plan_conv_split(1, 1 << 19, 5120, 4, **pkg).calls == 1
    split = iw.plan_conv_split(1, 1 << 20, 5120, 4, **pkg)
    assert split.calls == 2 and all((l1 - l0 + 3) * 5120 <= iw.UINT32_LIMIT for l0, l1 in split.pieces)
    assert iw.plan_conv_split(4, 1 << 18, 5120, 4, **pkg).batch == ((0, 2), (2, 4))
    assert iw.plan_conv_split(1, 1 << 23, 64, 4, **pkg).calls == 3  # the grid, not the offsets
    assert iw.plan_conv_split(1, 1 << 24, 5120, 4, limit=None, max_tokens=65535 * 256).calls == 2


# ------------------------------------------------------------------------------------------------ norm


@pytest.mark.parametrize("norm_before_gate", [False, True])
def test_norm_blocks_match_unblocked(norm_before_gate):
    g = torch.Generator().manual_seed(0)
    dim, limit = 12, 100
    y = torch.randn(2, 25, dim, generator=g, dtype=F64, requires_grad=True)
    wide = torch.randn(2, 25, dim + 7, generator=g, dtype=F64, requires_grad=True)
    w = torch.rand(dim, generator=g, dtype=F64, requires_grad=True)
    gy = torch.randn(2, 25, dim, generator=g, dtype=F64)
    spans = []

    def recording(x, z, *args):
        spans.append((iw.span(x), iw.span(z), x.shape[0]))
        return rmsnorm_gated_ref(x, z, *args)

    results = []
    for norm in (rmsnorm_gated_ref, lambda *a: iw.rmsnorm_gated_split(recording, *a, limit=limit)):
        out = norm(y, wide[..., 3 : 3 + dim], w, 1e-5, 4, norm_before_gate)  # z: a strided column view
        results.append([out.detach(), *torch.autograd.grad((out * gy).sum(), (y, wide, w))])
    for got, want in zip(*results, strict=True):
        assert _rel(got, want) < EXACT
    assert len(spans) > 1 and all(max(sx, sz) <= limit for sx, sz, _ in spans)
    assert spans[0][2] == iw.rmsnorm_rows_per_call(dim, [dim, dim + 7], limit)  # the strided view sets the rows


# ------------------------------------------------------------------------------------------------ GPU script


def _check_script():
    path = pathlib.Path(__file__).resolve().parents[2] / "benchmarks" / "check_index_width.py"
    spec = importlib.util.spec_from_file_location("check_index_width", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_gpu_check_script_exits_cleanly_without_cuda(capsys):
    module = _check_script()
    if torch.cuda.is_available():
        pytest.skip("a CUDA device is present: the script would run for real")
    assert module.main(["--quick"]) == 0
    assert "CUDA" in capsys.readouterr().out


@pytest.mark.parametrize("planted", [False, True], ids=["splitter", "planted_halves_initial_states"])
def test_gpu_check_rows_with_documents_and_states_case_on_the_reference(planted):
    """The GPU script's stream-rows case, run on the CPU with the reference SSD under the splitter at a lowered
    limit (the rows are cut): it passes, and a splitter that scales the initial states fails it."""
    module = _check_script()
    limit = 2**16
    split = functools.partial(iw.ssd_chunk_scan_split, ssd_chunk_scan_ref, limit=limit)

    def dropping(*args, **kw):
        kw["initial_states"] = kw["initial_states"] * 0.5  # a cut that carries half the state
        return split(*args, **kw)

    env = module.Env("cpu", True, dropping if planted else split, ssd_chunk_scan_ref, limit)
    rec = module.case_ssd(env, 512, 4, groups=2, chunk=32, batch=2, states=True, cuts=((40, 300), (256,)))
    assert rec["calls"] > 1
    assert rec["ok"] is (not planted), rec["errors"]
