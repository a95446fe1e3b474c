"""Benchmark a Mamba2 mixer under context parallelism: mamba_cp's strategies against NeMo AutoModel's module.

Run one process per GPU (``torchrun --standalone --nproc-per-node 2 benchmarks/bench_mixer.py``); the CP
group is the whole world. For every sequence length and layout (BSHD ``[1, L, D]`` and a packed THD batch of
many documents) it times, per rank, the mixer's forward + backward:

* ``cp1``: the plain mixer on the whole batch (every rank runs it on its own GPU; no collective),
* ``ours:<strategy>`` for every strategy in :data:`mamba_cp.parallelize.STRATEGIES`,
* ``nemo``: a mixer forward driven by NeMo AutoModel 0.7's ``MambaContextParallel`` (``pre_conv_ssm`` /
  ``post_conv_ssm``, loaded by file path from ``--nemo-path``) with the same kernels and parameters: ``z``
  travels with ``x | B | C | dt`` and gates ``y`` inside the scan, as NeMo's NemotronH mixer does.

It also times the transport alone (pre fwd, pre bwd, post fwd, post bwd, each with device events around
the calls on a leaf tensor), counts the bytes every rank sends off-rank per layer (a dispatch mode sums the
c10d collectives of one forward + backward), and reads the peak memory per rank. Rank 0 writes
``bench_mixer.json``, ``bench_mixer.md`` and ``bench_mixer.png`` (when matplotlib imports) to ``--out``.

``--device cpu`` runs the same code over gloo with a tiny mixer (CI's smoke test). ``--parity`` first checks
the context-parallel mixer against cp=1 on the device (outputs and every gradient, bf16 and fp32, BSHD and
THD) and the NeMo-driven forward against cp=1. ``main(argv)`` is the entry point (``mamba-cp bench``).
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import datetime
import importlib.util
import json
import math
import os
import platform
import statistics
import sys
import tempfile
import time
import types
from collections.abc import Callable
from pathlib import Path

import torch
import torch.distributed as dist
from torch.utils._python_dispatch import TorchDispatchMode

from mamba_cp import kernels
from mamba_cp.gradients import all_reduce_gradients
from mamba_cp.mixer import Mamba2Mixer
from mamba_cp.parallelize import STRATEGIES, parallelize
from mamba_cp.sharding import shard

REPO = Path(__file__).resolve().parents[1]
DEFAULT_NEMO = REPO / ".carry" / "nemo" / "nemo_mamba_cp.py"

MODELS = {
    # NemotronH-8B-like mixer.
    "nemotron8b": dict(hidden_size=4096, num_heads=128, head_dim=64, n_groups=8, state_size=128, conv_kernel=4,
                       chunk_size=128),
    # Small enough for CPU smoke runs.
    "tiny": dict(hidden_size=32, num_heads=4, head_dim=8, n_groups=2, state_size=8, conv_kernel=4, chunk_size=16),
}  # fmt: skip


# ------------------------------------------------------------------------------------------------ set-up


def expose_mamba_ssm_triton() -> str:
    """Make ``mamba_ssm.ops.triton.*`` importable when the package ``__init__`` cannot import.

    mamba_ssm 2.3.2's ``__init__`` imports its compiled ``selective_scan_cuda``; the Triton kernels need
    nothing compiled. Benchmark-only: registers a bare package module for ``mamba_ssm`` in ``sys.modules``
    (the library itself never does this). Returns ``"package"``, ``"stub"`` or ``"missing"``.
    """
    try:
        import mamba_ssm  # noqa: F401

        return "package"
    except Exception:  # noqa: BLE001 - the compiled extension is missing or broken
        pass
    spec = importlib.util.find_spec("mamba_ssm")
    if spec is None or not spec.submodule_search_locations:
        return "missing"
    package = types.ModuleType("mamba_ssm")
    package.__path__ = list(spec.submodule_search_locations)
    package.__file__ = spec.origin
    sys.modules["mamba_ssm"] = package
    from mamba_cp.kernels import cuda

    cuda.mamba_ssd.cache_clear()
    cuda.mamba_rmsnorm.cache_clear()
    return "stub"


def load_nemo(path: Path) -> type | None:
    """NeMo AutoModel's ``MambaContextParallel`` class, loaded by file path (it imports only torch)."""
    if not path.exists():
        return None
    spec = importlib.util.spec_from_file_location("nemo_mamba_cp", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.MambaContextParallel


def init_distributed(device: str) -> tuple[int, int, bool]:
    """Join (or create) the default process group; returns ``(rank, world, created_here)``."""
    if dist.is_initialized():
        return dist.get_rank(), dist.get_world_size(), False
    backend = "nccl" if device == "cuda" else "gloo"
    if "RANK" in os.environ:  # torchrun
        if device == "cuda":
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group(backend, timeout=datetime.timedelta(minutes=10))
    else:  # a plain single process
        store = dist.FileStore(os.path.join(tempfile.mkdtemp(prefix="bench_mixer_"), "store"), 1)
        dist.init_process_group(backend, store=store, rank=0, world_size=1)
    return dist.get_rank(), dist.get_world_size(), True


def doc_lengths(total: int, docs: int, multiple: int, seed: int) -> list[int]:
    """``docs`` mixed lengths (log-uniform over ~30x), each a multiple of ``multiple``, summing to ``total``."""
    gen = torch.Generator().manual_seed(seed)
    weights = torch.exp(torch.rand(docs, generator=gen) * math.log(30.0))
    units = total // multiple
    if units < docs:
        raise ValueError(f"{total} tokens cannot hold {docs} documents of a multiple of {multiple}")
    raw = (weights / weights.sum() * (units - docs)).floor().long() + 1  # every document gets >= 1 unit
    raw[-1] += units - int(raw.sum())
    return [int(n) * multiple for n in raw]


# ------------------------------------------------------------------------------------------------ mixers


def nemo_forward(mixer: Mamba2Mixer, ncp, hidden: torch.Tensor, cu: torch.Tensor | None, seq_idx) -> torch.Tensor:
    """A Mamba2 mixer forward driven by NeMo's ``pre_conv_ssm`` / ``post_conv_ssm`` (as in NeMo's NemotronH
    mixer: ``z`` travels, the scan gates ``y`` with it, the norm runs after the return trip).

    ``hidden`` is ``[B, L_local, D]`` (BSHD) or ``[T_local, D]`` (THD, with global ``cu``); ``seq_idx``
    ``[1, T]`` int32 for THD. Same kernels (:mod:`mamba_cp.kernels`) and parameters as our mixer.
    """
    packed = cu is not None
    proj = mixer.in_proj(hidden)  # [B, L_local, W] or [T_local, W]
    proj = ncp.pre_conv_ssm(proj, cu_seqlens=cu)
    if packed:
        proj = proj.unsqueeze(0)
    b, length = proj.shape[:2]
    h_l, p, g_l, n = ncp.num_heads_local, ncp.head_dim, ncp.n_groups_local, ncp.d_state
    d_l = h_l * p
    z, xBC, dt = torch.split(proj, [d_l, d_l + 2 * g_l * n, h_l], dim=-1)
    xBC = kernels.causal_conv1d(xBC, ncp.get_conv1d_weight(), ncp.get_conv1d_bias(), seq_idx=seq_idx)
    x, B, C = torch.split(xBC, [d_l, g_l * n, g_l * n], dim=-1)
    y = kernels.ssd_chunk_scan(
        x.reshape(b, length, h_l, p),
        dt,
        -torch.exp(ncp.get_A_log().float()),
        B.reshape(b, length, g_l, n),
        C.reshape(b, length, g_l, n),
        mixer.chunk_size,
        D=ncp.get_D(),
        z=z.reshape(b, length, h_l, p),
        dt_bias=ncp.get_dt_bias(),
        seq_idx=seq_idx,
        dt_softplus=True,
        dt_limit=mixer.time_step_limit,
    ).reshape(b, length, d_l)
    if packed:
        y = y.squeeze(0)
    y = ncp.post_conv_ssm(y, cu_seqlens=cu)
    normed = kernels.rmsnorm_gated(y, None, mixer.norm.weight, eps=mixer.norm.eps, group_size=mixer.norm.group_size)
    return mixer.out_proj(normed)


# ------------------------------------------------------------------------------------------------ measuring


class CommBytes(TorchDispatchMode):
    """Sums the bytes this rank sends to other ranks through c10d collectives inside the block."""

    def __init__(self, world: int) -> None:
        super().__init__()
        self.world = world
        self.bytes = 0.0
        self.calls: dict[str, int] = {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = str(func.overloadpacket)
        if name.startswith("c10d."):
            op = name.split(".", 1)[1]
            self.calls[op] = self.calls.get(op, 0) + 1
            tensors = [a for a in _flat(args) if isinstance(a, torch.Tensor)]
            w = self.world
            if "alltoall" in op and tensors:
                # (output, input, ...): every rank keeps 1/w of its input.
                self.bytes += _nbytes(tensors[1] if len(tensors) > 1 else tensors[0]) * (w - 1) / w
            elif "allgather" in op and tensors:
                self.bytes += _nbytes(tensors[-1]) * (w - 1)
            elif "allreduce" in op:
                self.bytes += sum(_nbytes(t) for t in tensors) * 2 * (w - 1) / w
            elif "reduce_scatter" in op and tensors:
                self.bytes += _nbytes(tensors[-1]) * (w - 1) / w
            elif op.startswith("send"):
                self.bytes += sum(_nbytes(t) for t in tensors)
        return func(*args, **(kwargs or {}))


def _flat(obj):
    if isinstance(obj, list | tuple):
        for o in obj:
            yield from _flat(o)
    else:
        yield obj


def _nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


class Clock:
    """Device events on CUDA (host clock after a sync elsewhere); milliseconds."""

    def __init__(self, device: torch.device) -> None:
        self.cuda = device.type == "cuda"

    def mark(self):
        if self.cuda:
            ev = torch.cuda.Event(enable_timing=True)
            ev.record()
            return ev
        return time.perf_counter()

    def elapsed(self, a, b) -> float:
        if self.cuda:
            return a.elapsed_time(b)
        return (b - a) * 1e3

    def sync(self) -> None:
        if self.cuda:
            torch.cuda.synchronize()


def _max_over_ranks(value: float, device: torch.device) -> float:
    t = torch.tensor([value], dtype=torch.float64, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return float(t.item())


def time_step(step: Callable[[], None], clock: Clock, warmup: int, iters: int, device: torch.device) -> dict:
    """Median ms of ``step`` (fwd+bwd) over ``iters`` after ``warmup``, max over ranks; peak memory too."""
    for _ in range(warmup):
        step()
    clock.sync()
    dist.barrier()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
    times = []
    for _ in range(iters):
        a = clock.mark()
        step()
        b = clock.mark()
        clock.sync()
        times.append(clock.elapsed(a, b))
    out = {"ms": _max_over_ranks(statistics.median(times), device), "ms_min": min(times)}
    if device.type == "cuda":
        peak = torch.cuda.max_memory_allocated(device)
        out["peak_bytes"] = _max_over_ranks(peak, device)
        out["peak_delta_bytes"] = _max_over_ranks(peak - base, device)
    return out


def time_parts(parts: dict[str, Callable[[], None]], clock: Clock, warmup: int, iters: int, device) -> dict:
    """Median ms of each named callable (run in order, each timed on its own), max over ranks."""
    for _ in range(warmup):
        for fn in parts.values():
            fn()
    clock.sync()
    dist.barrier()
    samples: dict[str, list[float]] = {k: [] for k in parts}
    for _ in range(iters):
        for name, fn in parts.items():
            a = clock.mark()
            fn()
            b = clock.mark()
            clock.sync()
            samples[name].append(clock.elapsed(a, b))
    result = {k: _max_over_ranks(statistics.median(v), device) for k, v in samples.items()}
    result["total"] = sum(result[k] for k in parts)
    return result


# ------------------------------------------------------------------------------------------------ one case


class Case:
    """One layout and length: the global batch, this rank's shard, and the step closures."""

    def __init__(self, args, mixer: Mamba2Mixer, layout: str, length: int, rank: int, world: int, device) -> None:
        self.layout, self.length, self.rank, self.world, self.device = layout, length, rank, world, device
        self.packed_layout = "stream" if layout == "stream" else "sequences"  # "stream": the pack as one row
        d = mixer.hidden_size
        gen = torch.Generator(device="cpu").manual_seed(args.seed + length)
        if layout == "bshd":
            self.cu = None
            self.x = torch.randn(1, length, d, generator=gen).to(mixer.in_proj.weight.dtype)
            self.seq_dim = 1
            self.lengths = [length]
        else:
            docs = min(args.docs, max(1, length // (8 * world)))  # tiny CPU sizes get fewer documents
            self.lengths = doc_lengths(length, docs, 2 * world, args.seed)
            self.cu = torch.tensor([0, *torch.tensor(self.lengths).cumsum(0).tolist()], dtype=torch.int32)
            self.x = torch.randn(length, d, generator=gen).to(mixer.in_proj.weight.dtype)
            self.seq_dim = 0
        self.cu_dev = self.cu.to(device) if self.cu is not None else None
        # The global batch stays on the host (moved over only for the cp=1 run), so a CP run's peak memory
        # holds this rank's shard alone.
        self.grad = torch.randn(self.x.shape, generator=gen).to(self.x.dtype)
        cut = dict(packed_layout=self.packed_layout)
        self.x_local = shard(self.x, world, rank, self.seq_dim, self.cu, **cut).to(device)
        self.grad_local = shard(self.grad, world, rank, self.seq_dim, self.cu, **cut).to(device)
        self.seq_idx = None
        if self.cu is not None:
            pos = torch.arange(length, device=device)
            self.seq_idx = torch.bucketize(pos, self.cu_dev[1:].long(), right=True).to(torch.int32)[None]


def mixer_step(module: Mamba2Mixer, x: torch.Tensor, grad: torch.Tensor, cu) -> Callable[[], None]:
    """fwd+bwd of one of our mixers on ``x``."""
    params = list(module.parameters())

    def step() -> None:
        for p in params:
            p.grad = None
        xi = x.detach().requires_grad_(True)
        module(xi, cu_seqlens=cu).backward(grad)

    return step


def nemo_step(mixer: Mamba2Mixer, ncp, case: Case) -> Callable[[], None]:
    params = list(mixer.parameters())

    def step() -> None:
        for p in params:
            p.grad = None
        xi = case.x_local.detach().requires_grad_(True)
        nemo_forward(mixer, ncp, xi, case.cu_dev, case.seq_idx).backward(case.grad_local)

    return step


def transport_parts(kind: str, cp_obj, mixer: Mamba2Mixer, case: Case) -> dict[str, Callable[[], None]]:
    """pre fwd / pre bwd / post fwd / post bwd of one transport, on leaf tensors of the mixer's shapes."""
    dev, dtype = case.device, case.x_local.dtype
    gen = torch.Generator(device="cpu").manual_seed(7)
    local_rows = case.x_local.shape[-2]
    batch = 1
    width = mixer.in_proj.out_features
    proj = torch.randn(batch, local_rows, width, generator=gen).to(dev, dtype)
    d_l = mixer.intermediate_size // case.world
    y_hp = torch.randn(batch, local_rows * case.world, d_l, generator=gen).to(dev, dtype)
    state: dict = {}
    packed = case.cu is not None

    if kind == "ours":
        plan = cp_obj.plan_for(proj if not packed else proj[0], case.cu_dev)

        def pre_fwd() -> None:
            leaf = proj.detach().requires_grad_(True)
            _, xBC, dt = torch.split(leaf, [mixer.intermediate_size, mixer.conv_dim, mixer.num_heads], dim=-1)
            state["pre"] = cp_obj.scatter(xBC, dt, plan)
            state["pre_grads"] = state.get("pre_grads") or [torch.randn_like(t) for t in state["pre"]]

        def pre_bwd() -> None:
            torch.autograd.backward(state.pop("pre"), state["pre_grads"])

        def post_fwd() -> None:
            leaf = y_hp.detach().requires_grad_(True)
            state["post"] = cp_obj.gather(leaf, plan)
            state["post_grad"] = state.get("post_grad") if "post_grad" in state else torch.randn_like(state["post"])

        def post_bwd() -> None:
            state.pop("post").backward(state["post_grad"])

    else:

        def pre_fwd() -> None:
            leaf = proj.detach().requires_grad_(True)
            state["pre"] = cp_obj.pre_conv_ssm(leaf[0] if packed else leaf, cu_seqlens=case.cu_dev)
            if "pre_grad" not in state:
                state["pre_grad"] = torch.randn_like(state["pre"])

        def pre_bwd() -> None:
            state.pop("pre").backward(state["pre_grad"])

        def post_fwd() -> None:
            leaf = y_hp.detach().requires_grad_(True)
            state["post"] = cp_obj.post_conv_ssm(leaf[0] if packed else leaf, cu_seqlens=case.cu_dev)
            if "post_grad" not in state:
                state["post_grad"] = torch.randn_like(state["post"])

        def post_bwd() -> None:
            state.pop("post").backward(state["post_grad"])

    return {"pre_fwd": pre_fwd, "pre_bwd": pre_bwd, "post_fwd": post_fwd, "post_bwd": post_bwd}


def count_bytes(step: Callable[[], None], world: int) -> tuple[float, dict]:
    """Bytes and calls of the collectives of one steady-state ``step``: it runs once first, so that the batch's
    plans (and their once-per-batch cross-rank check) exist, as they do for every step but the first."""
    step()
    mode = CommBytes(world)
    with mode:
        step()
    return mode.bytes, mode.calls


# ------------------------------------------------------------------------------------------------ parity


def parity_checks(args, rank: int, world: int, device: torch.device, nemo_cls) -> list[dict]:
    """Ours at cp=world vs cp=1 (outputs and every gradient, after summing over ranks) and NeMo's forward."""
    from mamba_cp.testing.parity import ParityCase, case_dict, parity_worker, worst_relative

    if world == 1:
        return []
    if device.type == "cuda":
        # The benchmark's head_dim / d_state / chunk: mamba_ssm's autotuned configs are reused, not re-tuned.
        dims = dict(hidden_size=256, num_heads=8, head_dim=64, n_groups=2, state_size=128, chunk_size=128)
        bshd, thd = dict(batch=2, seqlen=512), dict(seqlens=[128, 64, 256, 64, 512])
    else:
        dims = dict(hidden_size=16, num_heads=4, head_dim=4, n_groups=2, state_size=8, chunk_size=8)
        bshd, thd = dict(batch=2, seqlen=32), dict(seqlens=[16, 8, 24])
    rows = []
    dtypes = ["bfloat16", "float32"] if device.type == "cuda" else ["float64"]
    for strategy in STRATEGIES:
        for dtype in dtypes:
            for layout, extra in (("bshd", bshd), ("thd", thd)):
                case = ParityCase(layout=layout, dtype=dtype, strategy=strategy, **dims, **extra)
                # float32 runs the reference kernels on the GPU (a second mamba_ssm autotune costs minutes);
                # what differs between cp=1 and cp=2 is the transport, which runs either way.
                with _kernels_env("reference" if dtype == "float32" else "auto"):
                    res = parity_worker(rank, world, case_dict(case), device=str(device))
                gathered = [None] * world
                dist.all_gather_object(gathered, res)
                worst = worst_relative(gathered)
                rows.append({"check": f"ours:{strategy} vs cp1", "layout": layout, "dtype": dtype, "worst": worst})
    if nemo_cls is not None:
        for dtype in dtypes:
            for layout, extra in (("bshd", bshd), ("thd", thd)):
                case = ParityCase(layout=layout, dtype=dtype, **dims, **extra)
                with _kernels_env("reference" if dtype == "float32" else "auto"):
                    rows.append(_nemo_parity(case, rank, world, device, nemo_cls))
    return rows


@contextlib.contextmanager
def _kernels_env(mode: str):
    old = os.environ.get(kernels.KERNELS_ENV)
    os.environ[kernels.KERNELS_ENV] = mode
    try:
        yield
    finally:
        if old is None:
            os.environ.pop(kernels.KERNELS_ENV, None)
        else:
            os.environ[kernels.KERNELS_ENV] = old


def _nemo_parity(case, rank: int, world: int, device, nemo_cls) -> dict:
    from mamba_cp.testing.parity import build_mixer

    ref = build_mixer(case, device)
    mixer = copy.deepcopy(ref)
    ncp = nemo_cls(dist.group.WORLD, mixer.num_heads, mixer.head_dim, mixer.n_groups, mixer.ssm_state_size, mixer)
    dtype = getattr(torch, case.dtype)
    gen = torch.Generator(device="cpu").manual_seed(case.seed + 1)
    if case.layout == "bshd":
        x = torch.randn(case.batch, case.seqlen, case.hidden_size, generator=gen).to(device, dtype)
        cu, seq_dim, seq_idx = None, 1, None
    else:
        x = torch.randn(sum(case.seqlens), case.hidden_size, generator=gen).to(device, dtype)
        cu = torch.tensor([0, *torch.tensor(case.seqlens).cumsum(0).tolist()], dtype=torch.int32)
        seq_dim = 0
        pos = torch.arange(x.shape[0], device=device)
        seq_idx = torch.bucketize(pos, cu.to(device)[1:].long(), right=True).to(torch.int32)[None]
    w = torch.randn(x.shape, generator=gen).to(device, dtype)
    xr = x.clone().requires_grad_(True)
    out_ref = ref(xr, cu_seqlens=cu.to(device) if cu is not None else None)
    (out_ref * w).sum().backward()
    xl = shard(x, world, rank, seq_dim, cu).detach().requires_grad_(True)
    out = nemo_forward(mixer, ncp, xl, cu.to(device) if cu is not None else None, seq_idx)
    (out * shard(w, world, rank, seq_dim, cu)).sum().backward()
    all_reduce_gradients(mixer, dist.group.WORLD)

    def rel(a, b) -> float:
        return _max_over_ranks(float((a.double() - b.double()).abs().max() / b.double().abs().max()), device)

    worst = {
        "output": rel(out.detach(), shard(out_ref.detach(), world, rank, seq_dim, cu)),
        "input.grad": rel(xl.grad, shard(xr.grad, world, rank, seq_dim, cu)),
    }
    ref_grads = dict(ref.named_parameters())
    for name, p in mixer.named_parameters():
        worst[f"{name}.grad"] = rel(p.grad, ref_grads[name].grad)
    return {"check": "nemo vs cp1", "layout": case.layout, "dtype": case.dtype, "worst": worst}


# ------------------------------------------------------------------------------------------------ reports


def _fmt_ms(v) -> str:
    return "-" if v is None else f"{v:.2f}"


def markdown(report: dict) -> str:
    """The results as markdown tables (one row per layout, length and implementation)."""
    env = report["env"]
    lines = [
        f"# bench_mixer: {env['device_name']} x{report['world']}, {report['model']} mixer, {report['dtype']}",
        "",
        f"kernels: {env['kernels']}; torch {env['torch']}; command: `{report['command']}`",
        "",
        "| layout | L | impl | cp | fwd+bwd ms | transport ms (pre f/b, post f/b) | off-rank MB/layer | peak GiB/rank "
        "| efficiency |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in report["results"]:
        tr = r.get("transport")
        tr_s = "-"
        if tr:
            parts = f"{tr['pre_fwd']:.2f}/{tr['pre_bwd']:.2f}, {tr['post_fwd']:.2f}/{tr['post_bwd']:.2f}"
            tr_s = f"{tr['total']:.2f} ({parts})"
        peak = r.get("peak_bytes")
        peak_s = "-" if peak is None else f"{peak / 2**30:.2f}"
        eff_s = "-" if r.get("efficiency") is None else f"{r['efficiency']:.3f}"
        size = f"{r['L'] // 1024}K" if r["L"] >= 1024 else str(r["L"])
        lines.append(
            f"| {r['layout']} | {size} | {r['impl']} | {r['cp']} | {_fmt_ms(r['ms'])} | {tr_s} | "
            f"{r.get('offrank_bytes', 0) / 1e6:.1f} | {peak_s} | {eff_s} |"
        )
    if report.get("parity"):
        lines += ["", "## parity (max |cp - ref| / max |ref| over outputs and every gradient)", ""]
        lines += ["| check | layout | dtype | worst | worst tensor |", "|---|---|---|---|---|"]
        for p in report["parity"]:
            name, val = max(p["worst"].items(), key=lambda kv: kv[1])
            lines.append(f"| {p['check']} | {p['layout']} | {p['dtype']} | {val:.2e} | {name} |")
    return "\n".join(lines) + "\n"


def plot(report: dict, path: Path) -> str:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except Exception as err:  # noqa: BLE001
        return f"no PNG: matplotlib unavailable ({err})"
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    impls = sorted({r["impl"] for r in report["results"]})
    for layout, style in (("bshd", "-"), ("thd", "--")):
        for impl in impls:
            rows = [r for r in report["results"] if r["impl"] == impl and r["layout"] == layout]
            timed = [r for r in rows if r["ms"] is not None]
            rows.sort(key=lambda r: r["L"])
            label = f"{impl} {layout}"
            if timed:
                axes[0].plot([r["L"] for r in timed], [r["ms"] for r in timed], style, marker="o", label=label)
            trows = [r for r in rows if r.get("transport")]
            if trows:
                axes[1].plot([r["L"] for r in trows], [r["transport"]["total"] for r in trows], style, marker="o",
                             label=f"{impl} {layout}")  # fmt: skip
    for ax, title in zip(axes, ("mixer fwd+bwd (ms)", "transport pre+post fwd+bwd (ms)"), strict=True):
        ax.set_xscale("log", base=2)
        ax.set_xlabel("sequence length L")
        ax.set_title(title)
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=7)
    fig.suptitle(f"{report['env']['device_name']} x{report['world']}, {report['model']} mixer, {report['dtype']}")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return f"wrote {path}"


# ------------------------------------------------------------------------------------------------ main


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="bench_mixer", description=__doc__.split("\n\n")[0])
    p.add_argument("--device", choices=["auto", "cuda", "cpu"], default="auto")
    p.add_argument("--model", choices=sorted(MODELS), default=None, help="default: nemotron8b on CUDA, tiny on CPU")
    p.add_argument("--lengths", default=None, help="comma-separated L (default 16384,65536,131072; CPU 64,128)")
    p.add_argument("--layouts", default="bshd,thd")
    p.add_argument("--strategies", default="all", help="comma-separated names from STRATEGIES, or 'all'")
    p.add_argument("--no-nemo", action="store_true", help="skip NeMo AutoModel's module")
    p.add_argument("--no-cp1", action="store_true", help="skip the cp=1 baseline")
    p.add_argument(
        "--unfused", action="store_true", help="also run hidden-parallel with fuse_projection=False (plain in_proj)"
    )
    p.add_argument("--transport-only", action="store_true", help="time only the transports (no kernels, no cp1)")
    p.add_argument("--nemo-path", default=os.environ.get("MAMBA_CP_NEMO_PATH", str(DEFAULT_NEMO)))
    p.add_argument("--docs", type=int, default=64, help="documents in the packed (THD) batch")
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--warmup", type=int, default=None)
    p.add_argument("--iters", type=int, default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--parity", action="store_true", help="check cp vs cp=1 (ours and NeMo's forward) first")
    p.add_argument("--out", default="benchmarks/results", help="folder for bench_mixer.{json,md,png}")
    p.add_argument("--tag", default="", help="suffix for the output file names")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    """Entry point (``mamba-cp bench`` passes its arguments here); returns an exit code."""
    args = parse_args(list(argv) if argv is not None else sys.argv[1:])
    dev_kind = args.device if args.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    mamba_ssm_import = expose_mamba_ssm_triton() if dev_kind == "cuda" else "not used"
    rank, world, created = init_distributed(dev_kind)
    device = torch.device("cuda", torch.cuda.current_device()) if dev_kind == "cuda" else torch.device("cpu")
    model = args.model or ("nemotron8b" if dev_kind == "cuda" else "tiny")
    lengths = [int(v) for v in (args.lengths or ("16384,65536,131072" if dev_kind == "cuda" else "64,128")).split(",")]
    warmup = args.warmup if args.warmup is not None else (3 if dev_kind == "cuda" else 1)
    iters = args.iters if args.iters is not None else (10 if dev_kind == "cuda" else 2)
    strategies = list(STRATEGIES) if args.strategies == "all" else args.strategies.split(",")
    dtype = getattr(torch, args.dtype)
    nemo_cls = None if args.no_nemo or world == 1 else load_nemo(Path(args.nemo_path))
    clock = Clock(device)
    log = print if rank == 0 else (lambda *a, **k: None)

    env = {
        "device_name": torch.cuda.get_device_name(device) if dev_kind == "cuda" else platform.processor() or "cpu",
        "torch": torch.__version__,
        "kernels": kernels.selected(device, dtype, MODELS[model]["conv_kernel"]),
        "mamba_ssm_import": mamba_ssm_import,
        "nemo": str(args.nemo_path) if nemo_cls is not None else None,
        "nccl": ".".join(map(str, torch.cuda.nccl.version())) if dev_kind == "cuda" else None,
    }
    log(f"[bench] world={world} device={env['device_name']} model={model} kernels={env['kernels']}", flush=True)
    if args.parity and nemo_cls is None and not args.no_nemo and world > 1:
        log(f"[bench] NeMo module not found at {args.nemo_path}: skipping it", flush=True)
    report = {
        "model": model,
        "config": MODELS[model],
        "dtype": args.dtype,
        "world": world,
        "env": env,
        "command": "torchrun --standalone --nproc-per-node {} benchmarks/bench_mixer.py {}".format(
            world, " ".join(argv if argv is not None else sys.argv[1:])
        ),
        "results": [],
        "parity": [],
    }
    torch.manual_seed(args.seed)
    base = Mamba2Mixer(**MODELS[model], device=device, dtype=dtype)
    cp1_ms: dict[tuple[str, int], float] = {}
    for length in lengths:
        for layout in args.layouts.split(","):
            case = Case(args, base, layout, length, rank, world, device)

            def record(
                impl: str, cp: int, timing: dict, offrank=0.0, transport=None, calls=None, layout=layout, length=length
            ) -> None:
                row = {"layout": layout, "L": length, "impl": impl, "cp": cp, **timing, "offrank_bytes": offrank}
                row["transport"] = transport
                row["collectives"] = calls
                key = (layout, length)
                if impl == "cp1":
                    cp1_ms[key] = timing["ms"]
                timed = timing["ms"] is not None and key in cp1_ms and cp > 1
                row["efficiency"] = cp1_ms[key] / (cp * timing["ms"]) if timed else None
                report["results"].append(row)
                tr = f" transport {transport['total']:.2f} ms" if transport else ""
                peak = ""
                if "peak_bytes" in timing:
                    peak = (
                        f" peak {timing['peak_bytes'] / 2**30:.2f} GiB (act. {timing['peak_delta_bytes'] / 2**30:.2f})"
                    )
                eff = f" eff {row['efficiency']:.3f}" if row["efficiency"] is not None else ""
                log(
                    f"[bench] L={length} {layout} cp={cp} {impl}: {_fmt_ms(timing['ms'])} ms{tr}{peak}{eff}", flush=True
                )

            if not args.no_cp1 and not args.transport_only:
                ref = copy.deepcopy(base)
                step = mixer_step(ref, case.x.to(device), case.grad.to(device), case.cu_dev)
                record("cp1", 1, time_step(step, clock, warmup, iters, device))
                del ref, step
                _free(device)
            if world > 1:
                # (strategy, fuse_projection); the unfused hidden-parallel variant follows the fused one.
                variants = [(name, True) for name in strategies]
                if args.transport_only:
                    variants = [v for v in variants if v[0] == "hidden"]
                if "hidden" in strategies and args.unfused:
                    at = variants.index(("hidden", True)) + 1
                    variants[at:at] = [("hidden", False)]
                for name, fused in variants:
                    m = parallelize(
                        copy.deepcopy(base),
                        dist.group.WORLD,
                        strategy=name,
                        fuse_projection=fused,
                        packed_layout=case.packed_layout,
                    )
                    transport = None
                    if name == "hidden":
                        parts = transport_parts("ours", m.strategy, m, case)
                        transport = time_parts(parts, clock, warmup, iters, device)
                    step = (
                        _chain(parts.values())
                        if args.transport_only
                        else mixer_step(m, case.x_local, case.grad_local, case.cu_dev)
                    )
                    timing = {"ms": None} if args.transport_only else time_step(step, clock, warmup, iters, device)
                    offrank, calls = count_bytes(step, world)
                    label = f"ours:{name}" + ("" if fused else "[unfused]")
                    record(label, world, timing, _max_over_ranks(offrank, device), transport, calls)
                    del m, step
                    _free(device)
                if nemo_cls is not None and case.packed_layout == "sequences":  # NeMo's module: per-sequence packs
                    m = copy.deepcopy(base)
                    ncp = nemo_cls(dist.group.WORLD, m.num_heads, m.head_dim, m.n_groups, m.ssm_state_size, m)
                    parts = transport_parts("nemo", ncp, m, case)
                    transport = time_parts(parts, clock, warmup, iters, device)
                    step = _chain(parts.values()) if args.transport_only else nemo_step(m, ncp, case)
                    timing = {"ms": None} if args.transport_only else time_step(step, clock, warmup, iters, device)
                    offrank, calls = count_bytes(step, world)
                    record("nemo", world, timing, _max_over_ranks(offrank, device), transport, calls)
                    del m, ncp, step
                    _free(device)
            del case
            _free(device)

    if args.parity:  # after the timings: it reuses their autotuned kernels
        report["parity"] = parity_checks(args, rank, world, device, nemo_cls)
        for p in report["parity"]:
            name, val = max(p["worst"].items(), key=lambda kv: kv[1])
            log(f"[parity] {p['check']:<26} {p['layout']} {p['dtype']:<9} worst {val:.2e} ({name})", flush=True)

    if rank == 0:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        stem = f"bench_mixer{('_' + args.tag) if args.tag else ''}"
        (out / f"{stem}.json").write_text(json.dumps(report, indent=1, default=str))
        (out / f"{stem}.md").write_text(markdown(report))
        msg = plot(report, out / f"{stem}.png") if report["results"] else "no PNG: no results"
        print(f"[bench] wrote {out / stem}.json and .md; {msg}", flush=True)
        print(markdown(report), flush=True)
    if created:
        dist.destroy_process_group()
    return 0


def _chain(fns) -> Callable[[], None]:
    fns = list(fns)

    def run() -> None:
        for fn in fns:
            fn()

    return run


def _free(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.empty_cache()


if __name__ == "__main__":
    with contextlib.suppress(KeyboardInterrupt):
        sys.exit(main())
