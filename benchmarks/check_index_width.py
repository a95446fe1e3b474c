"""GPU check of the index-width splitters (:mod:`mamba_cp.kernels.index_width`) on one GPU (an H200).

Each case runs the kernel call past its index width through the splitter and compares it with an oracle made
of calls that fit; it writes one JSON line per case to ``--out``/index_width.jsonl as it goes (and prints it).
A case that fails records its error and the next case runs.

* ``ssd_1m_64h``, ``ssd_2m_32h``: ``kernels.ssd_chunk_scan`` bf16 forward + backward at 1M tokens x 64 heads
  and 2M x 32 heads (P 64, N 128, G 8, chunk 128), against the same call split by B/C group by hand (every
  output and gradient) and, on 2 heads x the first 64K tokens, against the fp32 reference (the output).
* ``ssd_rows_docs_states_2x512k_64h``: state passing's stream rows, ``[2, 512K, 64, 64]`` (each row 2**31
  elements) with documents starting inside the rows (``seq_idx`` from 0 per row), an initial state per row and the
  final states returned with a cotangent; every output, final state and gradient (the initial states' included)
  against the per-group calls.
* ``ssd_time_128k_128h``: 128K x 128 heads, where nothing is cut: median fwd+bwd of ``kernels.ssd_chunk_scan``
  (through the splitter) and of the bare mamba_ssm call (CUDA events, warm-ups first), plus a forced 2-piece cut.
* ``conv_<impl>_<shape>``: the causal conv past 2**31 elements (``[1, 1M, 5120]``, ``[1, 512K, 10240]`` with
  ``seq_idx``), for our Triton conv and, when installed, the ``causal_conv1d`` package, against 128K-token
  windows; ``conv_pkg_uncut_probe``, near the end: the package uncut at 3.4e9 elements (between 2**31 and
  2**32, where its uint32 offsets should still hold), which may poison the CUDA context if that reading is wrong.
* ``norm_512k_8192``: the gated RMSNorm past 2**31 elements with a strided ``z``, against 64K-row blocks.
* ``ssd_batch_stride_probe`` last: mamba_ssm uncut (forward) on ``[4, 128K, 128, 64]``, rows of 2**30 and 2**32
  elements in all, each row against its own call: says whether batch offsets overflow when the batch stride
  is below 2**31 (the reading of the source the splitter acts on).

``--quick`` runs small sizes with lowered limits (the cuts still happen); ``--budget-s`` stops starting cases
after that many seconds. Without CUDA it prints a message and exits 0.

    python benchmarks/check_index_width.py --out "$OUT"            # about 5 minutes on an H200
"""

from __future__ import annotations

import argparse
import functools
import json
import math
import os
import platform
import statistics
import time
import traceback
from collections.abc import Callable

import torch

QUICK_LIMIT = 2**22
"""Element limit of the splitters in ``--quick`` mode (small tensors are cut)."""


class Env:
    """The calls under test and their uncut counterparts, for one device.

    ``ssd``: the SSD under test (``kernels.ssd_chunk_scan``, or the splitter at :data:`QUICK_LIMIT`);
    ``ssd_raw``: one uncut kernel call; ``convs``: impl -> (uncut call, the splitter's limits); ``norm``: the
    norm under test, ``norm_raw`` one uncut call.
    """

    def __init__(self, device: str, quick: bool, ssd: Callable, ssd_raw: Callable, ssd_limit: int):
        self.device, self.quick, self.ssd, self.ssd_raw, self.ssd_limit = device, quick, ssd, ssd_raw, ssd_limit
        self.convs: dict[str, tuple[Callable, dict]] = {}
        self.norm: Callable | None = None
        self.norm_raw: Callable | None = None


class Err:
    """Relative Frobenius error and max abs error of ``got`` against ``want``, accumulated over blocks of
    ``block`` entries along ``dim`` (on the device; read once by :meth:`result`)."""

    def __init__(self):
        self.sums: list[torch.Tensor] = []

    def add(self, got: torch.Tensor, want: torch.Tensor, dim: int | None = None, block: int = 8192) -> Err:
        if got.shape != want.shape:
            raise ValueError(f"shape {tuple(got.shape)} != {tuple(want.shape)}")
        dim = (1 if got.dim() > 1 else 0) if dim is None else dim
        for s in range(0, got.shape[dim], block):
            a, b = (
                got.narrow(dim, s, min(block, got.shape[dim] - s)),
                want.narrow(dim, s, min(block, got.shape[dim] - s)),
            )
            d = a.double() - b.double()
            self.sums.append(torch.stack([d.pow(2).sum(), b.double().pow(2).sum(), d.abs().max()]))
        return self

    def result(self) -> dict:
        if not self.sums:
            return {"rel": 0.0, "max_abs": 0.0}
        s = torch.stack(self.sums)
        diff, ref, max_abs = float(s[:, 0].sum()), float(s[:, 1].sum()), float(s[:, 2].max())
        return {"rel": math.sqrt(diff / ref) if ref else math.sqrt(diff), "max_abs": max_abs}


LOOSE = ("weight", "bias")
"""Parameter gradients summed over tokens and returned in bf16: a cut adds one bf16 rounding per call."""


def _errors(errs: dict, tol: float, loose_tol: float = 3e-2) -> dict:
    out = {k: e.result() for k, e in errs.items()}
    ok = all(v["rel"] <= (loose_tol if k in LOOSE else tol) for k, v in out.items())
    return {"errors": out, "tol": tol, "tol_bf16_parameter_grads": loose_tol, "ok": ok}


def _leaf(t: torch.Tensor) -> torch.Tensor:
    return t.detach().requires_grad_(True)


def _timer(device: str):
    """Start a timing; the returned function gives milliseconds since (device events on CUDA)."""
    if device.startswith("cuda"):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()

        def stop():
            end.record()
            end.synchronize()
            return start.elapsed_time(end)

        return stop
    t0 = time.perf_counter()
    return lambda: (time.perf_counter() - t0) * 1e3


def _seq_idx(length: int, cuts, device: str) -> torch.Tensor:
    ids = torch.zeros(1, length, dtype=torch.int32, device=device)
    for c in cuts:
        ids[:, c:] += 1
    return ids


# ------------------------------------------------------------------------------------------------ SSD


def _ssd_inputs(env: Env, length: int, heads: int, groups: int, headdim: int = 64, dstate: int = 128, batch: int = 1):
    dev, bf = env.device, torch.bfloat16
    g = torch.Generator(device=dev).manual_seed(0)

    def rnd(*shape, scale=1.0, dtype=bf):
        return _leaf((torch.randn(*shape, generator=g, device=dev) * scale).to(dtype))

    x, dt = rnd(batch, length, heads, headdim), rnd(batch, length, heads, scale=0.5)
    A = _leaf(-torch.rand(heads, generator=g, device=dev) - 0.5)
    B, C = rnd(batch, length, groups, dstate, scale=0.3), rnd(batch, length, groups, dstate, scale=0.3)
    D, dt_bias = (
        _leaf(torch.rand(heads, generator=g, device=dev)),
        _leaf(torch.rand(heads, generator=g, device=dev) - 2),
    )
    gy = (torch.randn(batch, length, heads, headdim, generator=g, device=dev)).to(bf)
    return [x, dt, A, B, C, D, dt_bias], gy


def case_ssd(
    env: Env,
    length: int,
    heads: int,
    groups: int = 8,
    chunk: int = 128,
    batch: int = 1,
    cuts: tuple[tuple[int, ...], ...] = (),
    states: bool = False,
) -> dict:
    """The SSD past its width through the splitter against one uncut call per B/C group. ``cuts``: per batch row,
    the positions where a document starts (``seq_idx`` from 0 in every row, as state passing's stream segments);
    ``states``: an initial state per row (it feeds the row's first document) and the final states returned, with
    a cotangent (state passing's summaries), their gradients checked too."""
    from mamba_cp.kernels import index_width
    from mamba_cp.kernels.ssd_reference import ssd_chunk_scan_ref

    leaves, gy = _ssd_inputs(env, length, heads, groups, batch=batch)
    x, dt, A, B, C, D, dt_bias = leaves
    dev = env.device
    seq = None
    if cuts:
        seq = torch.cat([_seq_idx(length, row, dev) for row in cuts])
    h0 = gf = None
    if states:
        g = torch.Generator(device=dev).manual_seed(1)
        h0 = _leaf(torch.randn(batch, heads, 64, 128, generator=g, device=dev) * 0.1)
        gf = torch.randn(batch, heads, 64, 128, generator=g, device=dev)
        leaves = leaves + [h0]
    kw = dict(dt_softplus=True, seq_idx=seq, return_final_states=states)
    split = index_width.plan_ssd_split(x, dt, B, C, chunk, limit=env.ssd_limit)
    rec = {"shape": [batch, length, heads, 64], "groups": groups, "dtype": "bf16", "calls": split.calls}
    rec |= {"batch_blocks": len(split.batch), "head_blocks": len(split.heads), "pieces": len(split.pieces)}
    rec |= {"documents_per_row": [len(r) + 1 for r in cuts] or None, "states": states}
    stop = _timer(env.device)
    out = env.ssd(x, dt, A, B, C, chunk, D=D, dt_bias=dt_bias, initial_states=h0, **kw)
    y, final = out if states else (out, None)
    grads = torch.autograd.grad((y, final) if states else y, leaves, (gy, gf) if states else gy)
    rec["first_fwd_bwd_ms"] = stop()  # includes Triton's compilation and autotuning on a cold process
    rec["peak_gib"] = torch.cuda.max_memory_allocated() / 2**30 if env.device.startswith("cuda") else None
    y = y.detach()

    # Oracle: one uncut call per B/C group, on contiguous copies of its heads.
    names = ["y", "x", "dt", "A", "B", "C", "D", "dt_bias"] + (["final", "initial_states"] if states else [])
    errs = {n: Err() for n in names}
    per = heads // groups
    small = {n: torch.zeros_like(leaves[i]) for i, n in ((2, "A"), (5, "D"), (6, "dt_bias"))}
    for gi in range(groups):
        hs, gs = slice(gi * per, (gi + 1) * per), slice(gi, gi + 1)
        part = [_leaf(t[:, :, hs].contiguous()) for t in (x, dt)] + [_leaf(A[hs])]
        part += [_leaf(t[:, :, gs].contiguous()) for t in (B, C)] + [_leaf(D[hs]), _leaf(dt_bias[hs])]
        h0_part = _leaf(h0[:, hs].contiguous()) if states else None
        outs = env.ssd_raw(*part[:5], chunk, D=part[5], dt_bias=part[6], initial_states=h0_part, **kw)
        yo, fo = outs if states else (outs, None)
        wrt = part + ([h0_part] if states else [])
        cot = (gy[:, :, hs].contiguous(), gf[:, hs].contiguous()) if states else gy[:, :, hs].contiguous()
        go = torch.autograd.grad((yo, fo) if states else yo, wrt, cot)
        errs["y"].add(y[:, :, hs], yo.detach())
        for i, n in ((0, "x"), (1, "dt")):
            errs[n].add(grads[i][:, :, hs], go[i])
        for i, n in ((3, "B"), (4, "C")):
            errs[n].add(grads[i][:, :, gs], go[i])
        for i, n in ((2, "A"), (5, "D"), (6, "dt_bias")):
            small[n][hs] = go[i]
        if states:
            errs["final"].add(final[:, hs].detach(), fo.detach())
            errs["initial_states"].add(grads[7][:, hs], go[7])
        del part, yo, go, outs
    for i, n in ((2, "A"), (5, "D"), (6, "dt_bias")):
        errs[n].add(grads[i], small[n])
    rec |= _errors(errs, tol=1e-2)
    if states or cuts:  # the slice reference below runs without documents or states
        return rec

    # fp32 reference on 2 heads of group 0 and the first 64K tokens (causal: they depend on nothing later).
    T, hr = min(65536 if not env.quick else 4096, length), min(2, per)
    with torch.no_grad():
        yr = ssd_chunk_scan_ref(
            x[:, :T, :hr].float(), dt[:, :T, :hr].float(), A[:hr], B[:, :T, :1].float(), C[:, :T, :1].float(),
            chunk, D=D[:hr], dt_bias=dt_bias[:hr], dt_softplus=True,
        )  # fmt: skip
    ref = Err().add(y[:, :T, :hr], yr).result()
    rec["reference_slice"] = {"tokens": T, "heads": hr, **ref, "tol": 2e-2, "ok": ref["rel"] <= 2e-2}
    rec["ok"] = rec["ok"] and rec["reference_slice"]["ok"]
    return rec


def case_ssd_time(env: Env, length: int, heads: int, groups: int = 8, chunk: int = 128, iters: int = 0) -> dict:
    from mamba_cp.kernels import index_width

    leaves, gy = _ssd_inputs(env, length, heads, groups)
    x, dt, A, B, C, D, dt_bias = leaves
    kw = {"D": D, "dt_bias": dt_bias, "dt_softplus": True}
    split = index_width.plan_ssd_split(x, dt, B, C, chunk, limit=env.ssd_limit)
    two = index_width.SsdSplit(((0, 1),), ((0, heads),), index_width._token_pieces(length, chunk, 2))
    calls = {
        "dispatcher": lambda: env.ssd(x, dt, A, B, C, chunk, **kw),
        "bare_kernel": lambda: env.ssd_raw(x, dt, A, B, C, chunk, **kw),
        "forced_2_pieces": lambda: index_width.ssd_chunk_scan_split(
            env.ssd_raw, x, dt, A, B, C, chunk, **kw, split=two
        ),
    }
    iters = iters or (3 if env.quick else 10)
    outs, times = {}, {name: [] for name in calls}
    for name, f in calls.items():  # warm-ups
        for _ in range(3):
            y = f()
            outs[name] = [y.detach(), *torch.autograd.grad(y, leaves, gy)]
    for _ in range(iters):  # interleaved, so drift hits every call alike
        for name, f in calls.items():
            stop = _timer(env.device)
            torch.autograd.grad(f(), leaves, gy)
            times[name].append(stop())
    med = {name: statistics.median(t) for name, t in times.items()}
    # The forward is deterministic; mamba_ssm's backward accumulates some gradients with atomics.
    same = torch.equal(outs["dispatcher"][0], outs["bare_kernel"][0])
    names = ["y", "x", "dt", "A", "B", "C", "D", "dt_bias"]

    def errors(got, want):
        return {n: Err().add(a, b).result() for n, a, b in zip(names, got, want, strict=True)}

    grads, cut = errors(outs["dispatcher"], outs["bare_kernel"]), errors(outs["forced_2_pieces"], outs["bare_kernel"])
    return {
        "shape": [1, length, heads, 64], "calls": split.calls, "median_ms": med, "iters": iters,
        "dispatcher_over_bare": med["dispatcher"] / med["bare_kernel"],
        "cut_2_over_bare": med["forced_2_pieces"] / med["bare_kernel"],
        "dispatcher_y_bitwise_equal_to_bare": same, "dispatcher_grad_errors": grads, "cut_2_errors": cut,
        "ok": split.calls == 1 and same,
    }  # fmt: skip


def case_ssd_batch_probe(env: Env, batch: int, length: int, heads: int, groups: int = 8, chunk: int = 128) -> dict:
    """One uncut mamba_ssm forward over rows of 2**30 elements, 2**32 in all (batch stride below 2**31, so
    ``pid_b * stride_batch`` is int32): rows past the second should come out wrong (or the call crash),
    which is why the splitter cuts such batches. Each row is compared with the row's own call."""
    g = torch.Generator(device=env.device).manual_seed(3)
    x = torch.randn(batch, length, heads, 64, generator=g, device=env.device).to(torch.bfloat16)
    dt = (torch.randn(batch, length, heads, generator=g, device=env.device) * 0.5).to(torch.bfloat16)
    A = -torch.rand(heads, generator=g, device=env.device) - 0.5
    B = (torch.randn(batch, length, groups, 128, generator=g, device=env.device) * 0.3).to(torch.bfloat16)
    C = (torch.randn(batch, length, groups, 128, generator=g, device=env.device) * 0.3).to(torch.bfloat16)
    rec = {"shape": list(x.shape), "elements": x.numel(), "batch_stride": x.stride(0), "uncut": True}
    with torch.no_grad():
        y = env.ssd_raw(x, dt, A, B, C, chunk, dt_softplus=True)
        rows = []
        for b in range(batch):
            yb = env.ssd_raw(x[b : b + 1], dt[b : b + 1], A, B[b : b + 1], C[b : b + 1], chunk, dt_softplus=True)
            rows.append(Err().add(y[b : b + 1], yb).result())
    rec["rows"] = rows
    rec["rows_exact"] = [r["max_abs"] == 0.0 for r in rows]
    rec["ok"] = True  # a probe: the rows say what the kernel does
    return rec


# ------------------------------------------------------------------------------------------------ conv


def case_conv(env: Env, impl: str, length: int, channels: int, cuts=(), uncut: bool = False) -> dict:
    dev, bf = env.device, torch.bfloat16
    g = torch.Generator(device=dev).manual_seed(1)
    x = _leaf(torch.randn(1, length, channels, generator=g, device=dev).to(bf))
    w = _leaf((torch.randn(channels, 4, generator=g, device=dev) * 0.5).to(bf))
    b = _leaf((torch.randn(channels, generator=g, device=dev) * 0.1).to(bf))
    gy = torch.randn(1, length, channels, generator=g, device=dev).to(bf)
    seq = _seq_idx(length, cuts, dev) if cuts else None
    from mamba_cp.kernels import index_width

    raw, opts = env.convs[impl]
    call = raw if uncut else functools.partial(index_width.causal_conv1d_split, raw, **opts)
    calls = 1 if uncut else index_width.plan_conv_split(1, length, channels, 4, strides=x.stride()[:2], **opts).calls
    rec = {"impl": impl, "shape": [1, length, channels], "elements": length * channels, "seq_idx_cuts": list(cuts)}
    rec |= {"calls": calls, "limits": {} if uncut else opts}
    stop = _timer(dev)
    y = call(x, w, b, seq, "silu")
    dx, dw, db = torch.autograd.grad(y, (x, w, b), gy)
    rec["first_fwd_bwd_ms"] = stop()
    y = y.detach()

    # Oracle: windows of 128K tokens, each read with its 3-token halo, on contiguous copies.
    step = 131072 if not env.quick else 4096
    errs = {n: Err() for n in ("y", "x", "weight", "bias")}
    dx_o = torch.zeros_like(dx)
    dw_o, db_o = torch.zeros_like(dw, dtype=torch.float32), torch.zeros_like(db, dtype=torch.float32)
    for l0 in range(0, length, step):
        l1, s0 = min(l0 + step, length), max(l0 - 3, 0)
        xw, wo, bo = _leaf(x[:, s0:l1].contiguous()), _leaf(w), _leaf(b)
        yw = raw(xw, wo, bo, seq[:, s0:l1].contiguous() if seq is not None else None, "silu")
        gw = torch.zeros_like(yw)
        gw[:, l0 - s0 :] = gy[:, l0:l1]
        gx, gwt, gb = torch.autograd.grad(yw, (xw, wo, bo), gw)
        errs["y"].add(y[:, l0:l1], yw.detach()[:, l0 - s0 :])
        dx_o[:, s0:l1] += gx
        dw_o += gwt.float()
        db_o += gb.float()
    errs["x"].add(dx, dx_o)
    errs["weight"].add(dw, dw_o)
    errs["bias"].add(db, db_o)
    return rec | _errors(errs, tol=1e-2)


# ------------------------------------------------------------------------------------------------ norm


def case_norm(env: Env, rows: int, dim: int, group: int) -> dict:
    dev, bf = env.device, torch.bfloat16
    g = torch.Generator(device=dev).manual_seed(2)
    y = _leaf(torch.randn(1, rows, dim, generator=g, device=dev).to(bf))
    wide = _leaf(torch.randn(1, rows, dim + 256, generator=g, device=dev).to(bf))
    w = _leaf((torch.rand(dim, generator=g, device=dev) + 0.5).to(bf))
    gy = torch.randn(1, rows, dim, generator=g, device=dev).to(bf)
    rec = {"shape": [1, rows, dim], "elements": rows * dim, "group_size": group, "z": "strided column view"}
    stop = _timer(dev)
    out = env.norm(y, wide[..., 256:], w, 1e-5, group, False)
    dy, dwide, dw = torch.autograd.grad(out, (y, wide, w), gy)
    rec["first_fwd_bwd_ms"] = stop()
    out = out.detach()
    errs = {n: Err() for n in ("out", "y", "z", "weight")}
    dw_o = torch.zeros(dim, device=dev, dtype=torch.float32)
    step = 65536 if not env.quick else 4096
    for r0 in range(0, rows, step):
        r1 = min(r0 + step, rows)
        yb, zb, wo = _leaf(y[:, r0:r1].contiguous()), _leaf(wide[:, r0:r1, 256:].contiguous()), _leaf(w)
        ob = env.norm_raw(yb, zb, wo, 1e-5, group, False)
        gyb, gzb, gwb = torch.autograd.grad(ob, (yb, zb, wo), gy[:, r0:r1])
        errs["out"].add(out[:, r0:r1], ob.detach())
        errs["y"].add(dy[:, r0:r1], gyb)
        errs["z"].add(dwide[:, r0:r1, 256:], gzb)
        dw_o += gwb.float()
    errs["weight"].add(dw, dw_o)
    rec["untouched_columns_zero"] = bool((dwide[..., :256] == 0).all())
    return rec | _errors(errs, tol=1e-2) | ({} if rec["untouched_columns_zero"] else {"ok": False})


# ------------------------------------------------------------------------------------------------ driver


def _cuda_env(quick: bool) -> Env:
    from mamba_cp import kernels
    from mamba_cp.kernels import cuda, index_width

    fn = cuda.mamba_ssd()
    if fn is None:
        raise RuntimeError("mamba_ssm's Triton SSD does not import")
    raw = functools.partial(cuda.ssd_chunk_scan_cuda, fn)
    if quick:
        ssd = functools.partial(index_width.ssd_chunk_scan_split, raw, limit=QUICK_LIMIT)
    else:
        ssd = kernels.ssd_chunk_scan
    env = Env("cuda", quick, ssd, raw, QUICK_LIMIT if quick else cuda.MAMBA_SSM_LIMIT)
    if (tri := cuda.triton_conv()) is not None:  # the dispatcher's limits (lowered when quick)
        env.convs["triton"] = (tri, {"limit": None, "max_tokens": 10000 if quick else cuda.TRITON_CONV_MAX_TOKENS})
    if (pkg := cuda.causal_conv1d_pkg()) is not None:
        limit = QUICK_LIMIT if quick else cuda.CAUSAL_CONV1D_LIMIT
        opts = {"limit": limit, "max_tokens": cuda.CAUSAL_CONV1D_MAX_TOKENS}
        env.convs["causal_conv1d"] = (functools.partial(cuda.causal_conv1d_cuda, pkg), opts)
    if (norm_fn := cuda.mamba_rmsnorm()) is not None:

        def norm_raw(x, z, w, eps, gs, nbg):
            return norm_fn(x, w, None, z=z, eps=eps, group_size=gs, norm_before_gate=nbg)

        env.norm_raw = norm_raw
        env.norm = (
            functools.partial(index_width.rmsnorm_gated_split, norm_raw, limit=QUICK_LIMIT)
            if quick
            else kernels.rmsnorm_gated
        )
    return env


def cases(env: Env) -> list[tuple[str, Callable[[], dict]]]:
    """The cases in run order, at full or quick sizes."""
    q = env.quick
    out = [
        ("ssd_1m_64h", functools.partial(case_ssd, env, 32768 if q else 1 << 20, 16 if q else 64)),
        ("ssd_2m_32h", functools.partial(case_ssd, env, 65536 if q else 1 << 21, 8 if q else 32)),
        ("ssd_time_128k_128h", functools.partial(case_ssd_time, env, 16384 if q else 1 << 17, 32 if q else 128)),
        # State passing's stream rows: [2, c] segments with documents starting inside, an initial state per row
        # and the final states (the summaries), each row past the width (2**31 elements at 512K x 64 x 64).
        (
            "ssd_rows_docs_states_2x512k_64h",
            functools.partial(
                case_ssd,
                env,
                16384 if q else 1 << 19,
                16 if q else 64,
                batch=2,
                states=True,
                cuts=((1000, 9000), (5000,)) if q else ((1000, 300000), (131072,)),
            ),
        ),
    ]
    conv_shapes = [((65536, 512), ()), ((32768, 1024), (1000, 4096, 4099))] if q else []
    conv_shapes = conv_shapes or [((1 << 20, 5120), ()), ((1 << 19, 10240), (1000, 131072, 131075, 300000))]
    for impl in env.convs:
        for (length, channels), cuts in conv_shapes:
            name = f"conv_{impl}_{length // 1024}k_{channels}"
            out.append((name, functools.partial(case_conv, env, impl, length, channels, cuts)))
    if env.norm is not None:
        sizes = (32768, 1024, 128) if q else (1 << 19, 8192, 1024)
        out.append(("norm_512k_8192", functools.partial(case_norm, env, *sizes)))
    # Probes last: an uncut call past a width may leave the CUDA context unusable (run them alone with --cases).
    if "causal_conv1d" in env.convs:
        probe = (8192, 1024) if q else (327680, 10240)
        out.append(("conv_pkg_uncut_probe", lambda: case_conv(env, "causal_conv1d", *probe, uncut=True)))
    sizes = (4, 4096, 16) if q else (4, 1 << 17, 128)
    out.append(("ssd_batch_stride_probe", functools.partial(case_ssd_batch_probe, env, *sizes)))
    return out


def _environment() -> dict:
    import triton

    info = {"torch": torch.__version__, "triton": triton.__version__, "python": platform.python_version()}
    info["device"] = torch.cuda.get_device_name()
    for pkg in ("mamba_ssm", "causal_conv1d"):
        try:
            info[pkg] = __import__(pkg).__version__
        except Exception as e:  # noqa: BLE001 - report, do not fail
            info[pkg] = f"unavailable ({type(e).__name__})"
    from mamba_cp import kernels

    info["selected"] = kernels.selected("cuda", torch.bfloat16)
    return info


def run(env: Env, out_path: str, budget_s: float, only: set[str] | None = None) -> list[dict]:
    """Run the cases, appending a JSON line per case to ``out_path``; returns the records."""
    start, records = time.perf_counter(), []
    for name, fn in cases(env):
        if only and name not in only:
            continue
        rec = {"case": name, "quick": env.quick}
        if time.perf_counter() - start > budget_s:
            rec["skipped"] = f"budget of {budget_s:.0f} s spent"
        else:
            t0 = time.perf_counter()
            if env.device.startswith("cuda"):
                torch.cuda.reset_peak_memory_stats()
            try:
                rec |= fn()
            except Exception as e:  # noqa: BLE001 - record it and go on with the next case
                rec |= {"ok": False, "error": f"{type(e).__name__}: {e}"[:2000]}
                rec["traceback"] = traceback.format_exc()[-4000:]
            rec["wall_s"] = round(time.perf_counter() - t0, 1)
            if env.device.startswith("cuda"):
                rec.setdefault("peak_gib", torch.cuda.max_memory_allocated() / 2**30)
                torch.cuda.empty_cache()
        line = json.dumps(rec, default=str)
        print(line, flush=True)
        with open(out_path, "a") as f:
            f.write(line + "\n")
        records.append(rec)
    return records


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=os.environ.get("OUT", "."), help="folder of index_width.jsonl ($OUT)")
    parser.add_argument("--budget-s", type=float, default=540.0, help="start no case after this many seconds")
    parser.add_argument("--quick", action="store_true", help="small sizes, lowered limits")
    parser.add_argument("--cases", default="", help="comma-separated case names to run (default: all)")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("check_index_width: no CUDA device here; nothing to check (it needs one GPU)")
        return 0
    os.makedirs(args.out, exist_ok=True)
    out_path = os.path.join(args.out, "index_width.jsonl")
    env_line = {"case": "environment", **_environment()}
    print(json.dumps(env_line, default=str), flush=True)
    with open(out_path, "a") as f:
        f.write(json.dumps(env_line, default=str) + "\n")
    only = {c for c in args.cases.split(",") if c} or None
    records = run(_cuda_env(args.quick), out_path, args.budget_s, only)
    bad = [r["case"] for r in records if not r.get("ok", "skipped" in r)]
    print(f"check_index_width: {len(records)} cases, not ok: {bad or 'none'}; lines in {out_path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
