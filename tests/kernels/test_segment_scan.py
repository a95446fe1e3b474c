"""Segment summaries and the state correction (:mod:`mamba_cp.kernels.segment_scan`): the work table, the
readable references against a naive per-segment loop (float64), the Triton kernels under Triton's CPU
interpreter against the references (with planted backward bugs that the comparison must catch) and, where
CUDA is available, on the GPU; and the benchmark's CPU behaviour.

The interpreter tests share one subprocess (``TRITON_INTERPRET=1`` must be set before Triton imports), about
15 s of CPU time. bf16 runs there too: the kernels cast dot operands to float32 under the interpreter, whose
bf16 dot is wrong (see :mod:`mamba_cp.kernels.segment_scan_triton`).

Float64 bound: ``max|got - want| <= 1e-10 * max|want| + 1e-14`` (as in ``test_ssd_reference.py``).
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from mamba_cp.kernels import segment_scan as ss

F64 = torch.float64

# Packed-like segments on 150 tokens: a 1-token segment, a 39-token one, a gap, an empty one, another 1-token
# one, a 64-token one, a gap, then a 37-token one running to the end.
PACKED = ([0, 1, 45, 45, 46, 113], [1, 40, 45, 46, 110, 150], 150)
BSHD = (*ss.row_segments(4, 24), 96)  # [2B, c] = [4, 24] flattened


def assert_close_f64(got: torch.Tensor, want: torch.Tensor, what: str) -> None:
    assert got.shape == want.shape, f"{what}: shape {tuple(got.shape)} != {tuple(want.shape)}"
    err = (got - want).abs().max().item()
    bound = 1e-10 * want.abs().max().item() + 1e-14
    assert err <= bound, f"{what}: max abs err {err:.3e} > bound {bound:.3e}"


# ------------------------------------------------------------------------------------------------ work table


@pytest.mark.parametrize("layout", [PACKED, BSHD], ids=["packed", "bshd"])
@pytest.mark.parametrize("piece,tile", [(16, 16), (7, 40), (10_000, 64)], ids=str)
def test_work_table_covers_every_token_once(layout, piece, tile):
    starts, stops, total = layout
    work = ss.build_segment_work(starts, stops, total, piece_tokens=piece, tile_tokens=tile)
    assert work.tile_tokens >= max(16, tile) and work.tile_tokens & (work.tile_tokens - 1) == 0
    pieces, tiles = work.pieces.long(), work.tiles.long()
    # Pieces: in order, each segment cut exactly (empty segments have one empty piece), near-equal lengths.
    for s, (a, b) in enumerate(zip(starts, stops, strict=True)):
        mine = pieces[pieces[:, 0] == s]
        assert mine[0, 1] == a and mine[-1, 2] == b and torch.equal(mine[1:, 1], mine[:-1, 2])
        lengths = mine[:, 2] - mine[:, 1]
        assert int(lengths.max()) <= piece and int(lengths.max() - lengths.min()) <= 1
        slots = work.piece_slot[pieces[:, 0] == s].long()
        if len(mine) == 1:
            assert slots.tolist() == [-1]
        else:
            j = work.multi_segments.tolist().index(s)
            assert slots.tolist() == list(range(work.multi_bounds[j], work.multi_bounds[j + 1]))
    assert work.num_partials == int((work.piece_slot >= 0).sum())
    assert torch.equal(pieces[:, 0], pieces[:, 0].sort().values)
    # Tiles: [0, T) in order, none empty or longer than a tile, each inside its segment or a gap.
    assert tiles[0, 1] == 0 and tiles[-1, 2] == total and torch.equal(tiles[1:, 1], tiles[:-1, 2])
    assert bool(((tiles[:, 2] - tiles[:, 1]) >= 1).all() and ((tiles[:, 2] - tiles[:, 1]) <= work.tile_tokens).all())
    owner = torch.full((total,), -1)
    for s, (a, b) in enumerate(zip(starts, stops, strict=True)):
        owner[a:b] = s
    for seg, a, b in tiles.tolist():
        assert (owner[a:b] == seg).all()
    assert torch.equal(work.membership(F64).sum(0), (owner >= 0).to(F64))


def test_work_table_edge_cases_and_errors():
    work = ss.build_segment_work([], [], 5)  # no segment: one gap tile, no pieces
    assert work.num_pieces == 0 and work.tiles.tolist() == [[-1, 0, 5]]
    long = ss.build_segment_work([0], [1_000_000], 1_000_000)  # a 1M-token segment: 123 pieces of <= 8192
    assert long.num_pieces == 123 and long.num_partials == 123
    assert int((long.pieces[:, 2] - long.pieces[:, 1]).max()) <= 8192
    many = ss.build_segment_work(list(range(100_000)), list(range(1, 100_001)), 100_000)  # 100K 1-token segments
    assert many.num_pieces == 100_000 and many.num_tiles == 100_000 and many.num_partials == 0
    with pytest.raises(ValueError, match="without overlap"):
        ss.build_segment_work([0, 5], [6, 8], 10)
    with pytest.raises(ValueError, match="without overlap"):
        ss.build_segment_work([5, 0], [8, 3], 10)
    with pytest.raises(ValueError, match="not inside"):
        ss.build_segment_work([0], [11], 10)
    with pytest.raises(ValueError, match="not inside"):
        ss.build_segment_work([4], [3], 10)
    with pytest.raises(ValueError, match="ints"):
        ss.build_segment_work([0.5], [3], 10)
    with pytest.raises(ValueError, match="differ in length"):
        ss.build_segment_work([0, 1], [3], 10)


# ------------------------------------------------------------------------------------------------ references


def _inputs(total: int, h: int, p: int, g: int, n: int, num_segs: int, dtype=F64, seed: int = 0) -> dict:
    gen = torch.Generator().manual_seed(seed)
    conv = torch.randn(total, h * p + 2 * g * n + 3, generator=gen, dtype=dtype)  # x | B | C column views
    leaf = conv.requires_grad_(True)
    return {
        "conv": leaf,
        "x": leaf[:, : h * p].unflatten(1, (h, p)),
        "B": leaf[:, h * p : h * p + g * n].unflatten(1, (g, n)),
        "C": leaf[:, h * p + g * n : h * p + 2 * g * n].unflatten(1, (g, n)),
        "w": torch.rand(total, h, generator=gen, dtype=dtype).requires_grad_(True),
        "y0": torch.randn(total, h, p, generator=gen, dtype=dtype).requires_grad_(True),
        "h_in": torch.randn(num_segs, h, p, n, generator=gen, dtype=dtype).requires_grad_(True),
    }


def _naive_states(x, B, w, starts, stops):
    """One segment at a time: ``sum_t w[t, h] * outer(x[t, h], B[t, g(h)])``."""
    m = x.shape[1] // B.shape[1]
    out = []
    for a, b in zip(starts, stops, strict=True):
        Bh = B[a:b].repeat_interleave(m, dim=1)  # [len, H, N]
        out.append(torch.einsum("th,thp,thn->hpn", w[a:b], x[a:b], Bh))
    return torch.stack(out)


def _naive_correction(y0, C, h_in, scale, starts, stops):
    m = y0.shape[1] // C.shape[1]
    pieces, prev = [], 0
    for s, (a, b) in enumerate(zip(starts, stops, strict=True)):
        pieces.append(y0[prev:a])  # gap before the segment: unchanged
        Ch = C[a:b].repeat_interleave(m, dim=1)
        pieces.append(y0[a:b] + scale[a:b, :, None] * torch.einsum("thn,hpn->thp", Ch, h_in[s]))
        prev = b
    pieces.append(y0[prev:])
    return torch.cat(pieces)


@pytest.mark.parametrize("layout", [PACKED, BSHD], ids=["packed", "bshd"])
def test_references_match_a_naive_loop(layout):
    starts, stops, total = layout
    work = ss.build_segment_work(starts, stops, total, piece_tokens=16)
    t = _inputs(total, h=6, p=3, g=2, n=5, num_segs=len(starts))
    scale = t["w"]
    final = ss.segment_states(t["x"], t["B"], t["w"], work)
    assert ss.implementation(t["x"], t["B"], weight=t["w"]) == "reference"
    assert_close_f64(final, _naive_states(t["x"], t["B"], t["w"], starts, stops), "final")
    y = ss.state_correction(t["y0"], t["C"], t["h_in"], scale, work)
    assert_close_f64(y, _naive_correction(t["y0"], t["C"], t["h_in"], scale, starts, stops), "y")
    # Gradients of both ops together, through autograd of the reference and of the loop.
    gen = torch.Generator().manual_seed(1)
    gf, gy = torch.randn(final.shape, generator=gen, dtype=F64), torch.randn(y.shape, generator=gen, dtype=F64)
    leaves = (t["conv"], t["w"], t["y0"], t["h_in"])
    got = torch.autograd.grad((final * gf).sum() + (y * gy).sum(), leaves)
    loop = (_naive_states(t["x"], t["B"], t["w"], starts, stops) * gf).sum()
    loop = loop + (_naive_correction(t["y0"], t["C"], t["h_in"], scale, starts, stops) * gy).sum()
    want = torch.autograd.grad(loop, leaves)
    for name, a, b in zip(("x|B|C", "w and scale", "y0", "h_in"), got, want, strict=True):
        assert_close_f64(a, b, name)


def test_reference_inplace_correction_and_checks():
    starts, stops, total = PACKED
    work = ss.build_segment_work(starts, stops, total)
    t = _inputs(total, h=4, p=2, g=2, n=3, num_segs=len(starts))
    y_out = ss.state_correction(t["y0"], t["C"], t["h_in"], t["w"], work)
    y0 = t["y0"] * 1.0  # a non-leaf buffer that nothing saved
    y_in = ss.state_correction(y0, t["C"], t["h_in"], t["w"], work, inplace=True)
    assert y_in is y0
    assert_close_f64(y_in, y_out, "in place")
    g_in = torch.autograd.grad(y_in.sum(), (t["y0"], t["h_in"]))
    g_out = torch.autograd.grad(y_out.sum(), (t["y0"], t["h_in"]))
    for a, b in zip(g_in, g_out, strict=True):
        assert_close_f64(a, b, "in-place gradient")
    with pytest.raises(ValueError, match="token counts"):
        ss.segment_states(t["x"][:-1], t["B"][:-1], t["w"][:-1], work)
    with pytest.raises(ValueError, match="h_in must be"):
        ss.state_correction(t["y0"], t["C"], t["h_in"][:-1], t["w"], work)
    with pytest.raises(ValueError, match="impl must be"):
        ss.segment_states(t["x"], t["B"], t["w"], work, impl="fastest")


def test_reference_path_has_no_host_sync():
    from mamba_cp.testing.dispatch import OpRecorder

    starts, stops, total = PACKED
    work = ss.build_segment_work(starts, stops, total, piece_tokens=16)
    t = _inputs(total, h=4, p=2, g=2, n=3, num_segs=len(starts))
    with OpRecorder() as recorder:
        final = ss.segment_states(t["x"], t["B"], t["w"], work)
        y = ss.state_correction(t["y0"], t["C"], t["h_in"], t["w"], work)
        torch.autograd.grad(final.sum() + y.sum(), (t["conv"], t["w"], t["y0"], t["h_in"]))
    assert recorder.host_syncs == 0, recorder.sync_report()


def test_cpu_and_float64_get_the_reference(monkeypatch):
    x = torch.zeros(4, 2, 3)
    assert ss.implementation(x, x, weight=torch.zeros(4, 2)) == "reference"
    if torch.cuda.is_available():
        xc = x.cuda()
        assert ss.implementation(xc.double(), xc.double(), weight=torch.zeros(4, 2, device="cuda").double()) == (
            "reference"
        )
        if ss._triton_backend() is not None:
            assert ss.implementation(xc.bfloat16(), xc.bfloat16(), weight=torch.zeros(4, 2, device="cuda")) == "triton"
        monkeypatch.setenv("MAMBA_CP_KERNELS", "reference")
        assert ss.implementation(xc.bfloat16(), xc.bfloat16(), weight=torch.zeros(4, 2, device="cuda")) == "reference"


# ------------------------------------------------------------------------------------------------ interpreter

# Runs in a subprocess with TRITON_INTERPRET=1 (the variable must be set before Triton is imported). Prints one
# JSON object: relative errors (max |got - want| / max |want|) of every output and gradient per case, and of
# the same comparisons with a planted backward bug. The interpreter runs ~100 programs a second, so every
# kernel call counts: the in-place runs differentiate y0 only, the plants reuse one forward graph.
_INTERPRETER_SCRIPT = r"""
import dataclasses, json, sys
import torch
from mamba_cp.kernels import segment_scan as ss, segment_scan_triton as sst
from mamba_cp.testing.dispatch import OpRecorder

LAYOUTS = json.loads(sys.argv[1])  # name -> (starts, stops, total, piece_tokens)
H, P, G, N = 4, 20, 2, 40  # G < H; P, N not powers of two; N spans two of the reduce kernel's 32-wide tiles
HP, GN = H * P, G * N

def rel(a, b):
    a, b = a.detach().double(), b.detach().double()
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-30))

def views(conv):
    "x | B | C as strided column views of one conv output [T, H*P + 2*G*N + 3]."
    return dict(conv=conv, x=conv[:, :HP].unflatten(1, (H, P)), B=conv[:, HP : HP + GN].unflatten(1, (G, N)),
                C=conv[:, HP + GN : HP + 2 * GN].unflatten(1, (G, N)))

def inputs(total, nseg, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    conv = torch.randn(total, HP + 2 * GN + 3, generator=g).to(dtype).requires_grad_(True)
    return dict(
        **views(conv),
        w=torch.rand(total, H, generator=g).requires_grad_(True),
        scale=torch.rand(total, H, generator=g).requires_grad_(True),
        y0=torch.randn(total, H, P, generator=g).to(dtype).requires_grad_(True),
        h_in=torch.randn(nseg, H, P, N, generator=g).requires_grad_(True),
        gf=torch.randn(nseg, H, P, N, generator=g),
        gy=torch.randn(total, H, P, generator=g).to(dtype),
    )

def as_f64(t):
    "The same values in float64, as fresh leaves (for the float64 reference)."
    out = {k: v.detach().double().requires_grad_(v.requires_grad) for k, v in t.items() if k not in "xBC"}
    return {**out, **views(out["conv"])}

def forward(t, work, impl):
    final = ss.segment_states(t["x"], t["B"], t["w"], work, impl=impl)
    y = ss.state_correction(t["y0"], t["C"], t["h_in"], t["scale"], work, impl=impl)
    return final, y

def backward(t, final, y, which=("states", "correction"), retain=False):
    out = {}
    if "states" in which:
        dconv, dw = torch.autograd.grad(final, (t["conv"], t["w"]), t["gf"], retain_graph=retain)
        out.update(dx=dconv[:, :HP].unflatten(1, (H, P)), dB=dconv[:, HP : HP + GN].unflatten(1, (G, N)), dw=dw)
    if "correction" in which:
        leaves = (t["y0"], t["conv"], t["h_in"], t["scale"])
        dy0, dconv, dh, dscale = torch.autograd.grad(y, leaves, t["gy"], retain_graph=retain)
        out.update(dy0=dy0, dC=dconv[:, HP + GN : HP + 2 * GN].unflatten(1, (G, N)), dh_in=dh, dscale=dscale)
    return out

def run(t, work, impl):
    final, y = forward(t, work, impl)
    return dict(final=final, y=y, **backward(t, final, y))

def run_inplace(t, work, impl):
    "The correction written into a copy of y0 that nothing saved; only y0 is differentiated (no kernel)."
    y0 = t["y0"] * 1
    y = ss.state_correction(y0, t["C"].detach(), t["h_in"].detach(), t["scale"].detach(), work, inplace=True,
                            impl=impl)
    assert y is y0
    return dict(y=y, dy0=torch.autograd.grad(y, t["y0"], t["gy"])[0])

def bf16_round(a):
    "float32 -> bfloat16 -> float32 as Triton 3.9's interpreter casts: toward zero (the GPU rounds to nearest)."
    bits = a.float().contiguous().view(torch.int32) & -65536  # keep sign, exponent and 7 mantissa bits
    return bits.view(torch.float32)

def emulate(t, work):
    "What the kernels compute for bf16 inputs: the same roundings, float32 math elsewhere (no autograd)."
    m = H // G
    f = lambda a: a.detach().float()
    M = work.membership(torch.float32)  # [S, T]
    Bh, Ch = f(t["B"]).repeat_interleave(m, 1), f(t["C"]).repeat_interleave(m, 1)  # [T, H, N]
    w, sc, x, dy = f(t["w"]), f(t["scale"]), f(t["x"]), f(t["gy"])
    F_t = torch.einsum("st,shpn->thpn", M, bf16_round(f(t["gf"])))  # each token's segment state, rounded
    u = torch.einsum("thn,thpn->thp", Bh, F_t)
    dB = (w[..., None] * torch.einsum("thp,thpn->thn", x, F_t)).view(-1, G, m, N).sum(2)
    H_t = torch.einsum("st,shpn->thpn", M, bf16_round(f(t["h_in"])))
    v = torch.einsum("thn,thpn->thp", Ch, H_t)
    dC = (sc[..., None] * torch.einsum("thp,thpn->thn", dy, H_t)).view(-1, G, m, N).sum(2)
    return dict(
        final=torch.einsum("st,thp,thn->shpn", M, x, bf16_round(Bh * w[..., None])),
        y=bf16_round(f(t["y0"]) + sc[..., None] * v),
        dx=bf16_round(w[..., None] * u), dB=bf16_round(dB), dw=(x * u).sum(-1),
        dy0=dy, dC=bf16_round(dC), dscale=(dy * v).sum(-1),
        dh_in=torch.einsum("st,thp,thn->shpn", M, dy, bf16_round(Ch * sc[..., None])),
    )

def errors(got, want):
    return {k: rel(got[k], want[k]) for k in got}

report = {"cases": {}, "plants": {}}
for dtype_name, dtype, names in (("fp32", torch.float32, ("packed", "bshd")), ("bf16", torch.bfloat16, ("packed",))):
    for name in names:
        starts, stops, total, piece = LAYOUTS[name]
        work = ss.build_segment_work(starts, stops, total, piece_tokens=piece, tile_tokens=16)
        t = inputs(total, len(starts), dtype, seed=len(report["cases"]))
        key = f"{dtype_name}-{name}"
        if dtype == torch.float32:  # against the float64 reference of the same values
            t64 = as_f64(t)
            want = run(t64, work, "reference")
            with OpRecorder() as recorder:  # the launchers read only the work table's host ints
                final, y = forward(t, work, "triton")
                got = dict(final=final, y=y, **backward(t, final, y, retain=True))
            report["host_syncs"] = report.get("host_syncs", []) + [recorder.sync_report()]
            report["cases"][key] = errors(got, want)
            got_inplace = run_inplace(t, work, "triton")
            report["cases"][key + "-inplace"] = errors(got_inplace, run_inplace(t64, work, "reference"))
            if name == "packed":  # the planted bugs below reuse this forward graph
                plant_case = (t, work, final, y, want)
        else:
            got = run(t, work, "triton")
            report["cases"][key] = errors(got, emulate(t, work))
            report["cases"][key + "-vs-fp32-ref"] = errors(got, run(t, work, "reference"))
            report["cases"][key + "-inplace"] = errors(run_inplace(t, work, "triton"), emulate(t, work))

# Planted backward bugs (float32, packed): each replaces one entry point of the Triton module for one backward
# of the fp32-packed case's graph.
t, work, final, y, want = plant_case
orig_states_bwd, orig_corr_bwd = sst.states_backward, sst.correction_backward
last_seg_tile = [i for i, (s, a, b) in enumerate(work.tiles.tolist()) if s >= 0][-1]

def db_scale(x, B, w, d_final, work):
    dx, dB, dw = orig_states_bwd(x, B, w, d_final, work)
    return dx, dB * (1 + 1e-3), dw

def drop_last_tile(x, B, w, d_final, work):
    keep = [i for i in range(work.num_tiles) if i != last_seg_tile]
    _, a, b = work.tiles[last_seg_tile].tolist()
    dx, dB, dw = orig_states_bwd(x, B, w, d_final, dataclasses.replace(work, tiles=work.tiles[keep]))
    dx[a:b], dB[a:b], dw[a:b] = 0, 0, 0  # what a kernel that skipped the tile would leave in zeroed buffers
    return dx, dB, dw

def drop_last_piece(dy, C, h_in, scale, work, **kw):
    pieces = work.pieces.clone()
    pieces[-1, 2] = pieces[-1, 1]
    return orig_corr_bwd(dy, C, h_in, scale, dataclasses.replace(work, pieces=pieces), **kw)

def dscale_wrong_head(dy, C, h_in, scale, work, **kw):
    dC, dh, dscale = orig_corr_bwd(dy, C, h_in, scale, work, **kw)
    return dC, dh, dscale.view(-1, G, H // G).flip(-1).reshape(dscale.shape)  # each head gets its neighbour's

plants = {"dB_scale": ("states", db_scale), "drop_last_tile": ("states", drop_last_tile),
          "drop_last_piece": ("correction", drop_last_piece), "dscale_wrong_head": ("correction", dscale_wrong_head)}
for name, (which, fn) in plants.items():
    attr = "states_backward" if which == "states" else "correction_backward"
    setattr(sst, attr, fn)
    try:
        report["plants"][name] = errors(backward(t, final, y, which=(which,), retain=True), want)
    finally:
        setattr(sst, attr, orig_states_bwd if which == "states" else orig_corr_bwd)
print("REPORT " + json.dumps(report))
"""

TOL = {"fp32": 1e-5, "bf16": 1e-2}
"""Max relative error. float32: against float64 (IEEE dots). bf16: against the emulated roundings; an output
stored in bf16 may differ by one bf16 step (at most 2**-7 relative) where float32 sums in another order land on
the other side of a rounding boundary, and the float32 outputs agree to float32 rounding."""

OUTPUTS = {"final", "dx", "dB", "dw", "y", "dy0", "dC", "dh_in", "dscale"}


@pytest.fixture(scope="module")
def interpreter_report(triton_required) -> dict:
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    layouts = {"packed": [*PACKED, 24], "bshd": [*BSHD, 12]}  # piece_tokens: 2-3 pieces per long segment
    run = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(_INTERPRETER_SCRIPT), json.dumps(layouts)],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    lines = [ln for ln in run.stdout.splitlines() if ln.startswith("REPORT ")]
    assert run.returncode == 0 and lines, run.stderr[-4000:]
    return json.loads(lines[-1][len("REPORT ") :])


def test_triton_path_has_no_host_sync(interpreter_report):
    assert interpreter_report["host_syncs"] == ["no host sync"] * 2


@pytest.mark.parametrize("case", ["fp32-packed", "fp32-bshd", "bf16-packed"])
def test_triton_kernels_under_the_interpreter(interpreter_report, case):
    """Forward and every gradient of both ops (strided x/B/C views, G < H, several pieces per segment, 1-token
    and empty segments, gaps), and the in-place correction with its y0 gradient."""
    errs, inplace = interpreter_report["cases"][case], interpreter_report["cases"][case + "-inplace"]
    assert set(errs) == OUTPUTS and set(inplace) == {"y", "dy0"}
    dtype = case.split("-")[0]
    stored_half = {"dx", "dB", "y", "dC"} if dtype == "bf16" else set()
    for what, name, err in [("", k, v) for k, v in errs.items()] + [("in place ", k, v) for k, v in inplace.items()]:
        tol = TOL[dtype] if name in stored_half else TOL["fp32"]
        assert err <= tol, f"{case} {what}{name}: {err:.2e} > {tol:.0e} ({errs}, {inplace})"
    if dtype == "bf16":  # against the plain float32 reference: bf16-sized differences only
        for name, err in interpreter_report["cases"][case + "-vs-fp32-ref"].items():
            assert err <= 3e-2, f"{case} {name} vs the float32 reference: {err:.2e}"


PLANTS = {
    "dB_scale": {"dB"},
    "drop_last_tile": {"dx", "dB", "dw"},
    "drop_last_piece": {"dh_in"},
    "dscale_wrong_head": {"dscale"},
}
"""Each planted backward bug and the gradients it must be flagged in (the others must still pass)."""


@pytest.mark.parametrize("plant", sorted(PLANTS))
def test_planted_backward_bugs_are_caught(interpreter_report, plant):
    """The same comparison fails for a backward that is wrong in one place, and only where it is wrong (the
    unplanted run of the same inputs is the ``fp32-packed`` case)."""
    errs = interpreter_report["plants"][plant]
    caught = {name for name, err in errs.items() if not err <= TOL["fp32"]}  # NaN counts as caught
    assert caught == PLANTS[plant], f"{plant}: flagged {sorted(caught)}, errors {errs}"


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_cuda_kernels_match_the_reference(dtype):
    """On a GPU: the autotuned kernels at the mixer's head shape, several pieces per segment, against float64."""
    if ss._triton_backend() is None:
        pytest.skip("Triton does not import")
    lengths = [1, 700, 3, 2100, 0, 45, 1200]
    starts = [sum(lengths[:i]) + 2 * i for i in range(len(lengths))]  # two-token gaps between segments
    stops = [a + n for a, n in zip(starts, lengths, strict=True)]
    total = stops[-1] + 5
    work = ss.build_segment_work(starts, stops, total, "cuda", piece_tokens=512)
    t = {k: v.detach().cuda() for k, v in _inputs(total, 16, 64, 2, 128, len(starts), dtype=F64).items()}
    t["conv"] = t["conv"].to(dtype).requires_grad_(True)
    hp, gn = 16 * 64, 2 * 128
    x, B = t["conv"][:, :hp].unflatten(1, (16, 64)), t["conv"][:, hp : hp + gn].unflatten(1, (2, 128))
    C = t["conv"][:, hp + gn : hp + 2 * gn].unflatten(1, (2, 128))
    w = t["w"].float().requires_grad_(True)
    y0, h_in = t["y0"].to(dtype).requires_grad_(True), t["h_in"].float().requires_grad_(True)
    assert ss.implementation(x, B, weight=w) == "triton"
    got_final = ss.segment_states(x, B, w, work)
    got_y = ss.state_correction(y0, C, h_in, w, work)
    leaves = (x, B, C, w, y0, h_in)
    gf, gy = torch.randn_like(got_final), torch.randn_like(got_y)
    got = [got_final, got_y, *torch.autograd.grad((got_final * gf).sum() + (got_y * gy).sum(), leaves)]
    ref_leaves = [v.detach().double().requires_grad_(True) for v in leaves]
    ref_final = ss.segment_states(*ref_leaves[:2], ref_leaves[3], work)
    ref_y = ss.state_correction(ref_leaves[4], ref_leaves[2], ref_leaves[5], ref_leaves[3], work)
    loss = (ref_final * gf.double()).sum() + (ref_y * gy.double()).sum()
    want = [ref_final, ref_y, *torch.autograd.grad(loss, ref_leaves)]
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    for name, a, b in zip(["final", "y", "dx", "dB", "dC", "dw+dscale", "dy0", "dh_in"], got, want, strict=True):
        err = float((a.detach().double() - b.detach()).abs().max() / b.detach().abs().max())
        assert err <= tol, f"{name}: {err:.2e}"


# ------------------------------------------------------------------------------------------------ benchmark

BENCH = Path(__file__).resolve().parents[2] / "benchmarks" / "bench_segment_scan.py"


def _bench_module(monkeypatch):
    spec = importlib.util.spec_from_file_location("bench_segment_scan", BENCH)
    module = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, spec.name, module)  # its dataclass looks its module up there
    spec.loader.exec_module(module)
    return module


def test_benchmark_without_cuda_exits_cleanly(monkeypatch, capsys, tmp_path):
    bench = _bench_module(monkeypatch)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert bench.main(["--tokens", "64", "--out", str(tmp_path)]) == 0
    assert "CUDA is not available" in capsys.readouterr().out
    assert not (tmp_path / "bench_segment_scan.jsonl").exists()


def test_benchmark_layouts_match_the_segment_plan(monkeypatch):
    """The benchmark's packed layout is rank 0's head-tail segments, the same the state-passing plan builds."""
    bench = _bench_module(monkeypatch)
    layout = bench.make_layout("docs4-cp2", 64, torch.device("cpu"), seed=0)
    assert "differ" not in layout.note
    assert len(layout.starts) == 8 and layout.starts[0] == 0 and layout.stops[-1] == 64
    assert all(a == b for a, b in zip(layout.starts[1:], layout.stops[:-1], strict=True))
    assert bench.floor_bytes("states", "fwd", 10, 2, 2) < bench.floor_bytes("states", "fwd+bwd", 10, 2, 2)
