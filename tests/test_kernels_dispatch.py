"""The kernel dispatch: references on CPU and under the env override; the CUDA kernels against the references.

The CUDA tests run only where CUDA is available (the benchmark's device calls run this file there). The
Triton conv is also checked on the CPU through Triton's interpreter when Triton is importable.
"""

from __future__ import annotations

import functools
import os
import subprocess
import sys
import textwrap

import pytest
import torch

from mamba_cp import kernels
from mamba_cp.kernels import cuda, index_width
from mamba_cp.kernels.conv_reference import causal_conv1d_ref
from mamba_cp.kernels.norm_reference import rmsnorm_gated_ref
from mamba_cp.kernels.ssd_reference import ssd_chunk_scan_ref

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach().double(), b.detach().double()
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


def _seq_idx(batch: int, length: int, cuts: list[int], device) -> torch.Tensor:
    ids = torch.zeros(batch, length, dtype=torch.int32)
    for c in cuts:
        ids[:, c:] += 1
    return ids.to(device)


# ------------------------------------------------------------------------------------------------ dispatch


def test_cpu_gets_the_references():
    assert kernels.selected("cpu") == {
        "causal_conv1d": "reference",
        "ssd_chunk_scan": "reference",
        "rmsnorm_gated": "reference",
    }


def test_cpu_calls_match_the_references():
    torch.manual_seed(0)
    x = torch.randn(2, 24, 12, dtype=torch.float64)
    w, b = torch.randn(12, 4, dtype=torch.float64), torch.randn(12, dtype=torch.float64)
    seq = _seq_idx(2, 24, [7, 15], "cpu")
    assert torch.equal(kernels.causal_conv1d(x, w, b, seq_idx=seq), causal_conv1d_ref(x, w, b, seq_idx=seq))
    xs, dt = torch.randn(1, 24, 4, 3, dtype=torch.float64), torch.randn(1, 24, 4, dtype=torch.float64)
    A = -torch.rand(4, dtype=torch.float64)
    B, C = torch.randn(1, 24, 2, 5, dtype=torch.float64), torch.randn(1, 24, 2, 5, dtype=torch.float64)
    got = kernels.ssd_chunk_scan(xs, dt, A, B, C, 8, dt_softplus=True)
    assert torch.equal(got, ssd_chunk_scan_ref(xs, dt, A, B, C, 8, dt_softplus=True))
    y, z, nw = torch.randn(3, 16), torch.randn(3, 16), torch.rand(16)
    assert torch.equal(kernels.rmsnorm_gated(y, z, nw, group_size=8), rmsnorm_gated_ref(y, z, nw, group_size=8))


def test_env_override(monkeypatch):
    monkeypatch.setenv(kernels.KERNELS_ENV, "reference")
    assert set(kernels.selected("cpu").values()) == {"reference"}
    if torch.cuda.is_available():
        assert set(kernels.selected("cuda").values()) == {"reference"}
    monkeypatch.setenv(kernels.KERNELS_ENV, "fastest")
    with pytest.raises(ValueError, match="MAMBA_CP_KERNELS"):
        kernels.selected("cpu")
    monkeypatch.setenv(kernels.KERNELS_ENV, "auto")
    assert set(kernels.selected("cpu").values()) == {"reference"}


def test_int32_guard_copies_only_huge_strided_views():
    # A column view of a wide [rows, 40000] projection spans past 2**31 elements; meta tensors cost nothing.
    wide = torch.empty(70_000, 40_000, device="meta", dtype=torch.bfloat16)
    view = wide[:, :128]
    assert cuda.span(view) > 2**31
    safe = cuda.int32_safe(view)
    assert safe.is_contiguous() and safe.shape == view.shape
    small = torch.empty(100, 400)[:, :8]
    assert cuda.int32_safe(small) is small
    assert cuda.int32_safe(None) is None


# ------------------------------------------------------------------------------------------------ CUDA kernels


@needs_cuda
def test_cuda_dispatch_picks_fast_kernels_and_keeps_float64_on_references():
    chosen = kernels.selected("cuda", torch.bfloat16)
    assert chosen["causal_conv1d"] in ("causal_conv1d", "triton")
    assert kernels.selected("cuda", torch.float64)["ssd_chunk_scan"] == "reference"
    if cuda.mamba_ssd() is not None:
        assert chosen["ssd_chunk_scan"] == "mamba_ssm"


@needs_cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize(
    "width,packed,strided,history",
    [(4, True, True, False), (4, False, False, False), (3, True, False, False), (2, False, True, False),
     (4, True, True, True), (3, False, False, True)],
    ids=str,
)  # fmt: skip
def test_triton_conv_matches_reference(dtype, width, packed, strided, history):
    fn = cuda.triton_conv()
    if fn is None:
        pytest.skip("Triton is not importable")
    torch.manual_seed(0)
    batch, length, channels = 2, 1100, 200
    base = torch.randn(batch, length, channels + (56 if strided else 0), device="cuda", dtype=dtype)
    x = base[..., 16 : 16 + channels] if strided else base
    x = x.detach().requires_grad_(True)
    w = torch.randn(channels, width, device="cuda", dtype=dtype, requires_grad=True)
    b = torch.randn(channels, device="cuda", dtype=dtype, requires_grad=True)
    seq = _seq_idx(batch, length, [3, 500, 501, 1023], "cuda") if packed else None
    h = torch.randn(batch, width - 1, channels, device="cuda", dtype=dtype, requires_grad=True) if history else None
    hseq = torch.tensor([[-1] * (width - 1), [-1] + [0] * (width - 2)], device="cuda") if history and packed else None
    leaves = (x, w, b, h) if history else (x, w, b)
    out = fn(x, w, b, seq_idx=seq, activation="silu", history=h, history_seq_idx=hseq)
    h64 = h.double() if history else None
    ref = causal_conv1d_ref(
        x.double(), w.double(), b.double(), seq_idx=seq, activation="silu", history=h64, history_seq_idx=hseq
    )
    g = torch.randn_like(out)
    grads = torch.autograd.grad(out, leaves, g)
    ref_grads = torch.autograd.grad(ref, leaves, g.double(), allow_unused=True)
    tol = 1e-5 if dtype == torch.float32 else 1e-2
    assert _rel(out, ref) < tol
    for name, got, want in zip(("x", "weight", "bias", "history"), grads, ref_grads, strict=False):
        assert _rel(got, want) < tol, name


@needs_cuda
@pytest.mark.parametrize("packed", [False, True], ids=["bshd", "thd"])
def test_mamba_ssd_adapter_matches_reference(packed):
    if cuda.mamba_ssd() is None:
        pytest.skip("mamba_ssm's Triton SSD is not importable")
    torch.manual_seed(0)
    b, length, h, p, g, n, chunk = 1, 600, 4, 64, 2, 64, 64
    dev = "cuda"
    wide = torch.randn(b, length, h * p + 2 * g * n + h + 40, device=dev)  # dt is a column view, as in a mixer
    x = wide[..., : h * p].reshape(b, length, h, p).detach().requires_grad_(True)
    dt = wide[..., -h - 40 : -40].detach().requires_grad_(True)
    B = torch.randn(b, length, g, n, device=dev, requires_grad=True)
    C = torch.randn(b, length, g, n, device=dev, requires_grad=True)
    A = -torch.rand(h, device=dev) - 0.5
    D, dt_bias = torch.rand(h, device=dev), torch.rand(h, device=dev) - 2
    seq = _seq_idx(b, length, [100, 101, 350], dev) if packed else None
    kw = dict(D=D, dt_bias=dt_bias, seq_idx=seq, dt_softplus=True)
    out = kernels.ssd_chunk_scan(x, dt, A, B, C, chunk, **kw)
    ref = ssd_chunk_scan_ref(x.double(), dt.double(), A.double(), B.double(), C.double(), chunk, **kw)
    gy = torch.randn_like(out)
    grads = torch.autograd.grad(out, (x, dt, B, C), gy)
    ref_grads = torch.autograd.grad(ref, (x, dt, B, C), gy.double())
    assert _rel(out, ref) < 3e-3  # Triton's float32 dots run as tf32
    for name, got, want in zip(["x", "dt", "B", "C"], grads, ref_grads, strict=True):
        assert _rel(got, want) < 3e-3, name


@needs_cuda
@pytest.mark.parametrize("initial", [True, False], ids=["from_initial_states", "from_zero"])
def test_mamba_ssd_rows_with_documents_and_final_states(initial):
    """State passing's stream segments: rows ``[2, c]`` whose documents start anywhere (ids from 0 per row), with
    (or without) an initial state per row that belongs to the row's first document only, and each row's final
    state (its last document's, the segment summary); values and every gradient, the final states' and the
    initial states' included, against the float64 reference."""
    if cuda.mamba_ssd() is None:
        pytest.skip("mamba_ssm's Triton SSD is not importable")
    torch.manual_seed(1)
    b, length, h, p, g, n, chunk = 2, 700, 4, 64, 2, 64, 64
    dev = "cuda"
    x = torch.randn(b, length, h, p, device=dev, requires_grad=True)
    dt = (torch.rand(b, length, h, device=dev) * 0.1).requires_grad_()
    B = torch.randn(b, length, g, n, device=dev, requires_grad=True)
    C = torch.randn(b, length, g, n, device=dev, requires_grad=True)
    h0 = torch.randn(b, h, p, n, device=dev, requires_grad=True) if initial else None
    A = -torch.rand(h, device=dev) - 0.5
    seq = _seq_idx(b, length, [], dev)
    seq[0, 90:] += 1  # row 0: the first document ends inside the first SSD chunk
    seq[0, 400:] += 1
    seq[1, 64:] += 1  # row 1: a document starts on a chunk boundary
    kw = dict(D=torch.rand(h, device=dev), seq_idx=seq, return_final_states=True)
    out, final = kernels.ssd_chunk_scan(x, dt, A, B, C, chunk, initial_states=h0, **kw)
    leaves = (x, dt, B, C) + ((h0,) if initial else ())
    h0_ref = h0.double() if initial else None
    ref, ref_final = ssd_chunk_scan_ref(*(t.double() for t in (x, dt, A, B, C)), chunk, initial_states=h0_ref, **kw)
    gy, gf = torch.randn_like(out), torch.randn_like(final)
    grads = torch.autograd.grad((out, final), leaves, (gy, gf))
    ref_grads = torch.autograd.grad((ref, ref_final), leaves, (gy.double(), gf.double()))
    assert _rel(out, ref) < 3e-3  # Triton's float32 dots run as tf32
    assert _rel(final, ref_final) < 3e-3
    for name, got, want in zip(["x", "dt", "B", "C", "initial_states"], grads, ref_grads, strict=False):
        assert _rel(got, want) < 3e-3, name


@needs_cuda
@pytest.mark.parametrize("gate", [False, True], ids=["no_z", "z"])
def test_lean_ssd_matches_the_package_and_saves_less(gate):
    """``ssd_autograd.ChunkScan`` against mamba_ssm's own ``mamba_chunk_scan_combined``: the same output, final
    states and gradients (the same kernels), while without ``z`` it saves the output's bytes fewer."""
    from mamba_cp.kernels import ssd_autograd

    if ssd_autograd.load() is None or cuda.mamba_ssd() is None:
        pytest.skip("mamba_ssm's Triton SSD is not importable")
    from mamba_ssm.ops.triton.ssd_combined import mamba_chunk_scan_combined

    torch.manual_seed(2)
    b, length, h, p, g, n, chunk, dev = 2, 500, 4, 64, 2, 64, 64, "cuda"
    bf = torch.bfloat16
    x = torch.randn(b, length, h, p, device=dev, dtype=bf, requires_grad=True)
    dt = torch.randn(b, length, h, device=dev, requires_grad=True)
    B = torch.randn(b, length, g, n, device=dev, dtype=bf, requires_grad=True)
    C = torch.randn(b, length, g, n, device=dev, dtype=bf, requires_grad=True)
    z = torch.randn(b, length, h, p, device=dev, dtype=bf, requires_grad=True) if gate else None
    h0 = torch.randn(b, h, p, n, device=dev, requires_grad=True)
    A = (-torch.rand(h, device=dev) - 0.5).requires_grad_()
    D, dt_bias = torch.rand(h, device=dev, requires_grad=True), (torch.rand(h, device=dev) - 2).requires_grad_()
    seq = _seq_idx(b, length, [77, 300], dev)
    leaves = [t for t in (x, dt, A, B, C, D, z, dt_bias, h0) if t is not None]
    gy = torch.randn(b, length, h, p, device=dev, dtype=bf)
    gf = torch.randn(b, h, p, n, device=dev)

    def run(fn):
        saved = []

        def pack(t):
            saved.append(t.numel() * t.element_size())
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            y, final = fn(
                x, dt, A, B, C, chunk, D=D, z=z, dt_bias=dt_bias, initial_states=h0, seq_idx=seq,
                dt_softplus=True, return_final_states=True,
            )  # fmt: skip
        return y, final, torch.autograd.grad((y, final), leaves, (gy, gf)), sum(saved)

    y, final, grads, lean_bytes = run(ssd_autograd.chunk_scan)
    y_pkg, final_pkg, grads_pkg, pkg_bytes = run(mamba_chunk_scan_combined)
    assert _rel(y, y_pkg) < 1e-6 and _rel(final, final_pkg) < 1e-6
    for i, (got, want) in enumerate(zip(grads, grads_pkg, strict=True)):
        assert _rel(got, want) < 1e-5, i  # the same kernels; float atomics may add in another order
    out_bytes = y.numel() * y.element_size()
    assert pkg_bytes - lean_bytes >= (0 if gate else out_bytes), (pkg_bytes, lean_bytes)


@needs_cuda
def test_mamba_rmsnorm_adapter_matches_reference():
    if cuda.mamba_rmsnorm() is None:
        pytest.skip("mamba_ssm's gated RMSNorm is not importable")
    torch.manual_seed(0)
    wide = torch.randn(3, 100, 512 + 256, device="cuda", dtype=torch.bfloat16)
    y = torch.randn(3, 100, 256, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    z = wide[..., 512:].detach().requires_grad_(True)  # strided, as the mixer's z
    w = torch.rand(256, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    out = kernels.rmsnorm_gated(y, z, w, group_size=64)
    ref = rmsnorm_gated_ref(y.double(), z.double(), w.double(), group_size=64)
    g = torch.randn_like(out)
    grads = torch.autograd.grad(out, (y, z, w), g)
    ref_grads = torch.autograd.grad(ref, (y, z, w), g.double())
    assert _rel(out, ref) < 1e-2
    for name, got, want in zip("yzw", grads, ref_grads, strict=True):
        assert _rel(got, want) < 2e-2, name


# ------------------------------------------------------------------------------------------------ index width
# The CUDA kernels cut by the splitters of mamba_cp.kernels.index_width at a lowered limit, against the same
# kernel uncut (float32: the cut changes only the order of a few sums).


def test_cuda_token_caps_match_the_triton_conv(triton_required):
    from mamba_cp.kernels import triton_conv

    assert cuda.TRITON_CONV_MAX_TOKENS == triton_conv.MAX_TOKENS
    assert triton_conv.MAX_TOKENS == index_width.GRID_YZ_LIMIT * triton_conv._BWD_TOKENS_PER_PROGRAM


def _grads_of(out, leaves, seed=5):
    outs = out if isinstance(out, tuple) else (out,)
    g = torch.Generator(device=outs[0].device).manual_seed(seed)
    loss = sum((o.float() * torch.randn(o.shape, generator=g, device=o.device)).sum() for o in outs)
    return [o.detach() for o in outs] + list(torch.autograd.grad(loss, leaves))


_SSD_SPLITS = {
    "pieces": index_width.SsdSplit(((0, 2),), ((0, 8),), ((0, 1024), (1024, 1536), (1536, 2000))),
    "in_group_heads": index_width.SsdSplit(((0, 2),), ((0, 3), (3, 4), (4, 8)), ((0, 2000),)),
    "all_axes": index_width.SsdSplit(((0, 1), (1, 2)), ((0, 4), (4, 8)), ((0, 1024), (1024, 2000))),
    "planned": None,
}


@needs_cuda
@pytest.mark.parametrize("split", list(_SSD_SPLITS))
def test_mamba_ssd_cut_matches_uncut(split):
    fn = cuda.mamba_ssd()
    if fn is None:
        pytest.skip("mamba_ssm's Triton SSD is not importable")
    torch.manual_seed(0)
    b, length, h, p, g, n, chunk, dev = 2, 2000, 8, 32, 2, 64, 64, "cuda"
    leaves = [torch.randn(b, length, h, p, device=dev), torch.randn(b, length, h, device=dev) * 0.5]
    leaves += [-torch.rand(h, device=dev) - 0.5, torch.randn(b, length, g, n, device=dev) * 0.3]
    leaves += [torch.randn(b, length, g, n, device=dev) * 0.3, torch.rand(h, p, device=dev)]
    leaves += [torch.randn(b, length, h, p, device=dev), torch.rand(h, device=dev) - 2]
    leaves += [torch.randn(b, h, p, n, device=dev) * 0.1]
    leaves = [t.requires_grad_(True) for t in leaves]
    x, dt, A, B, C, D, z, dt_bias, init = leaves
    seq = _seq_idx(b, length, [300, 1024, 1500], dev)  # a sequence across 1024, one starting at it
    kw = dict(D=D, z=z, dt_bias=dt_bias, initial_states=init, seq_idx=seq, dt_softplus=True, return_final_states=True)
    kernel = functools.partial(cuda.ssd_chunk_scan_cuda, fn)
    want = _grads_of(kernel(x, dt, A, B, C, chunk, **kw), leaves)
    opts = {"limit": 2**18} if _SSD_SPLITS[split] is None else {"split": _SSD_SPLITS[split]}
    got = _grads_of(index_width.ssd_chunk_scan_split(kernel, x, dt, A, B, C, chunk, **kw, **opts), leaves)
    names = ["y", "final", "x", "dt", "A", "B", "C", "D", "z", "dt_bias", "initial_states"]
    for name, a, r in zip(names, got, want, strict=True):
        assert _rel(a, r) < 2e-3, (split, name, _rel(a, r))


@needs_cuda
@pytest.mark.parametrize("impl", ["causal_conv1d", "triton"])
def test_cuda_conv_cut_matches_uncut(impl):
    fn = cuda.causal_conv1d_pkg() if impl == "causal_conv1d" else cuda.triton_conv()
    if fn is None:
        pytest.skip(f"{impl} is not importable")
    conv = functools.partial(cuda.causal_conv1d_cuda, fn) if impl == "causal_conv1d" else fn
    torch.manual_seed(0)
    base = torch.randn(2, 3000, 200, device="cuda", requires_grad=True)
    w = torch.randn(192, 4, device="cuda", requires_grad=True)
    bias = torch.randn(192, device="cuda", requires_grad=True)
    seq = _seq_idx(2, 3000, [999, 1001, 2000], "cuda")  # starts in a halo and at a piece start

    def run(**opts):
        out = index_width.causal_conv1d_split(conv, base[..., 8:200], w, bias, seq, "silu", **opts)
        return _grads_of(out, (base, w, bias))

    want = run(limit=None)
    for opts in ({"limit": 2**18}, {"split": index_width.ConvSplit(((0, 1), (1, 2)), ((0, 1000), (1000, 3000)))}):
        for name, a, r in zip(["y", "x", "weight", "bias"], run(**opts), want, strict=True):
            assert _rel(a, r) < 1e-4, (opts, name, _rel(a, r))


@needs_cuda
def test_mamba_rmsnorm_cut_matches_uncut():
    fn = cuda.mamba_rmsnorm()
    if fn is None:
        pytest.skip("mamba_ssm's gated RMSNorm is not importable")
    torch.manual_seed(0)
    y = torch.randn(3, 1000, 256, device="cuda", requires_grad=True)
    wide = torch.randn(3, 1000, 512 + 256, device="cuda", requires_grad=True)
    w = torch.rand(256, device="cuda", requires_grad=True)

    def norm(xb, zb, weight, eps, gs, nbg):
        return fn(xb, weight, None, z=zb, eps=eps, group_size=gs, norm_before_gate=nbg)

    def run(limit):
        out = index_width.rmsnorm_gated_split(norm, y, wide[..., 512:], w, 1e-5, 64, False, limit=limit)
        return _grads_of(out, (y, wide, w))

    for name, a, r in zip(["out", "y", "z", "weight"], run(2**17), run(index_width.INT32_LIMIT), strict=True):
        assert _rel(a, r) < 1e-5, (name, _rel(a, r))


# ------------------------------------------------------------------------------------------------ interpreter


def test_triton_conv_under_the_interpreter(triton_required):
    """Without a GPU: the same kernels through Triton's CPU interpreter (a test dependency on Linux)."""
    script = textwrap.dedent(
        """
        import torch
        from mamba_cp.kernels import triton_conv
        from mamba_cp.kernels.conv_reference import causal_conv1d_ref
        torch.manual_seed(0)
        # Every backward tile variant the autotuner may pick; L=600 spans three 256-token programs, with
        # sequence boundaries on both sides of a program boundary.
        variants = [(16, 64, True), (8, 128, False), (32, 64, False)]
        for length, (block_l, block_c, acc_2d) in [(40, variants[0])] + [(600, v) for v in variants]:
            triton_conv._BWD_DEFAULT.update(BLOCK_L=block_l, BLOCK_C=block_c, ACC_2D=acc_2d)
            x = torch.randn(2, length, 40)[..., 3:35].requires_grad_(True)
            w = torch.randn(32, 4, requires_grad=True); b = torch.randn(32, requires_grad=True)
            seq = torch.zeros(2, length, dtype=torch.int32)
            for cut in (9, 10, 255, 257, 300):
                seq[:, cut:] += 1 if cut < length else 0
            out = triton_conv.causal_conv1d_triton(x, w, b, seq_idx=seq)
            ref = causal_conv1d_ref(x, w, b, seq_idx=seq)
            g = torch.randn_like(ref)
            for a, r in zip(torch.autograd.grad(out, (x, w, b), g), torch.autograd.grad(ref, (x, w, b), g)):
                assert (a - r).abs().max() < 1e-4 * r.abs().max(), (length, block_l, (a - r).abs().max())
            assert (out - ref).abs().max() < 1e-5
        # A history before each row (the halos of state passing): its gradient comes from the block before
        # position 0 that the first program of a row walks; row 0's history is another sequence's (ids -1).
        for length, width, (block_l, block_c, acc_2d) in [(2, 4, variants[1]), (40, 3, variants[0]),
                                                          (600, 4, variants[2])]:
            triton_conv._BWD_DEFAULT.update(BLOCK_L=block_l, BLOCK_C=block_c, ACC_2D=acc_2d)
            x = torch.randn(2, length, 32, requires_grad=True)
            w = torch.randn(32, width, requires_grad=True); b = torch.randn(32, requires_grad=True)
            h = torch.randn(2, width - 1, 32, requires_grad=True)
            for seq, hseq in [(None, None), (torch.zeros(2, length, dtype=torch.int32),
                                             torch.tensor([[-1] * (width - 1), [-1] + [0] * (width - 2)]))]:
                if seq is not None:
                    seq[:, 1:] += 1
                out = triton_conv.causal_conv1d_triton(x, w, b, seq_idx=seq, history=h, history_seq_idx=hseq)
                ref = causal_conv1d_ref(x, w, b, seq_idx=seq, history=h, history_seq_idx=hseq)
                g = torch.randn_like(ref)
                got, want = torch.autograd.grad(out, (x, w, b, h), g), torch.autograd.grad(ref, (x, w, b, h), g)
                assert want[3].abs().max() > 0
                for name, a, r in zip("xwbh", got, want):
                    assert (a - r).abs().max() < 1e-4 * r.abs().max(), (length, width, name, (a - r).abs().max())
                assert (out - ref).abs().max() < 1e-5
        # An empty row with a history: nothing to launch but the forward's history block, a zero history gradient.
        h = torch.randn(2, 3, 32, requires_grad=True)
        out = triton_conv.causal_conv1d_triton(torch.zeros(2, 0, 32), torch.randn(32, 4), None, history=h)
        assert out.shape == (2, 0, 32) and torch.equal(torch.autograd.grad(out.sum(), h)[0], torch.zeros_like(h))
        print("ok")
        """
    )
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    run = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0 and "ok" in run.stdout, run.stderr[-3000:]


def _reference_pair():
    """mamba_ssm's private forward / backward signatures, computed by the float64 reference (for the CPU test of
    ``ssd_autograd.ChunkScan``'s plumbing: which inputs reach which function, which gradients come back)."""

    def fwd(x, dt, A, B, C, chunk_size, D=None, z=None, dt_bias=None, initial_states=None, seq_idx=None,
            dt_softplus=False, dt_limit=(0.0, float("inf"))):  # fmt: skip
        kw = dict(D=D, dt_bias=dt_bias, initial_states=initial_states, seq_idx=seq_idx, dt_softplus=dt_softplus,
                  dt_limit=dt_limit, return_final_states=True)  # fmt: skip
        out, final = ssd_chunk_scan_ref(x, dt, A, B, C, chunk_size, z=z, **kw)
        out_x = ssd_chunk_scan_ref(x, dt, A, B, C, chunk_size, **kw)[0] if z is not None else out
        return out, out_x, None, None, None, final

    def bwd(dout, x, dt, A, B, C, out, chunk_size, D=None, z=None, dt_bias=None, initial_states=None,
            dfinal_states=None, seq_idx=None, dt_softplus=False, dt_limit=(0.0, float("inf"))):  # fmt: skip
        assert out.shape == x.shape  # all the package's backward reads of ``out`` without z
        names = ("x", "dt", "A", "B", "C", "D", "z", "dt_bias", "initial_states")
        given = dict(zip(names, (x, dt, A, B, C, D, z, dt_bias, initial_states), strict=True))
        leaves = {k: v.detach().requires_grad_(True) for k, v in given.items() if v is not None}
        args = {k: leaves.get(k) for k in names}
        with torch.enable_grad():
            y, final = ssd_chunk_scan_ref(
                args["x"], args["dt"], args["A"], args["B"], args["C"], chunk_size, D=args["D"], z=args["z"],
                dt_bias=args["dt_bias"], initial_states=args["initial_states"], seq_idx=seq_idx,
                dt_softplus=dt_softplus, dt_limit=dt_limit, return_final_states=True,
            )  # fmt: skip
            cot = (dout, torch.zeros_like(final) if dfinal_states is None else dfinal_states)
            grads = dict(zip(leaves, torch.autograd.grad((y, final), list(leaves.values()), cot), strict=True))
        return tuple(grads.get(k) for k in names)

    return fwd, bwd


@pytest.mark.parametrize("gate", [False, True], ids=["no_z", "z"])
def test_lean_ssd_function_passes_every_input_and_gradient(gate, monkeypatch):
    """``ChunkScan`` with the package's two functions stood in for by the float64 reference (CPU): the output,
    final states and every gradient (initial states and the final states' cotangent included) equal the
    reference's own autograd; without ``z`` the output is not among the saved tensors."""
    from mamba_cp.kernels import ssd_autograd

    monkeypatch.setattr(ssd_autograd, "load", _reference_pair)
    g = torch.Generator().manual_seed(3)
    b, length, h, p, n, chunk = 2, 40, 4, 3, 5, 8

    def rnd(*shape, scale=1.0):
        return (torch.randn(*shape, generator=g, dtype=torch.float64) * scale).requires_grad_()

    x, dt, B, C = rnd(b, length, h, p), rnd(b, length, h, scale=0.5), rnd(b, length, 2, n), rnd(b, length, 2, n)
    A, D, dt_bias, h0 = (-torch.rand(h, dtype=torch.float64) - 0.5).requires_grad_(), rnd(h), rnd(h), rnd(b, h, p, n)
    z = rnd(b, length, h, p) if gate else None
    seq = _seq_idx(b, length, [13, 30], "cpu")
    leaves = [t for t in (x, dt, A, B, C, D, z, dt_bias, h0) if t is not None]
    kw = dict(D=D, z=z, dt_bias=dt_bias, initial_states=h0, seq_idx=seq, dt_softplus=True, return_final_states=True)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        y, final = ssd_autograd.chunk_scan(x, dt, A, B, C, chunk, **kw)
    y_ref, final_ref = ssd_chunk_scan_ref(x, dt, A, B, C, chunk, **kw)
    gy, gf = torch.randn_like(y), torch.randn_like(final)
    got = torch.autograd.grad((y, final), leaves, (gy, gf))
    want = torch.autograd.grad((y_ref, final_ref), leaves, (gy, gf))
    assert _rel(y, y_ref) < 1e-13 and _rel(final, final_ref) < 1e-13
    for i, (a, e) in enumerate(zip(got, want, strict=True)):
        assert _rel(a, e) < 1e-12, i
    assert all(t is not y for t in saved)
