"""Where the time of one Mamba2 mixer forward + backward goes, per rank, for every CP strategy.

Run one process per GPU (``torchrun --standalone --nproc-per-node 2 benchmarks/profile_mixer.py``); the CP group
is the whole world. For every layout, length and row (``cp1``, ``ours:<strategy>``, ``nemo``; built exactly as
``bench_mixer.py`` builds them) it measures:

* **step ms**: fwd+bwd, CUDA events, median over ``--iters``, max over ranks (``bench_mixer.time_step``);
* **no-comm ms**: the same step with every collective replaced by a local stand-in of the same shapes that
  moves nothing between ranks (:class:`NoComm`). Its results are numerically wrong; it only times the compute.
  **Exposed comm** = step - no-comm: the communication time that compute does not hide;
* **categories**: ``--profile-steps`` steps under ``torch.profiler``; the device time of every kernel (on CPU:
  the self CPU time of every op) summed per category of :data:`CATEGORIES`, per step, per rank. The top kernels
  by time are kept too, so the categories can be checked.

Rank 0 prints a line per row while it runs and writes ``profile_mixer[_TAG].json`` / ``.md`` to ``--out``.
``--device cpu`` runs a tiny mixer over gloo (``tests/test_profile_smoke.py``).
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import json
import os
import platform
import re
import sys
import time
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch.autograd import DeviceType
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_mixer as bm  # noqa: E402 - the sibling benchmark: mixers, batches, NeMo loading, timing

from mamba_cp import kernels  # noqa: E402
from mamba_cp.parallelize import STRATEGIES, parallelize  # noqa: E402

# ------------------------------------------------------------------------------------------------ categories

# First match wins (case-insensitive, searched anywhere in the kernel / op name), so the specific patterns come
# before the broad ones: mamba_ssm's ``_bmm_chunk_*`` kernels are SSD, not gemm; NCCL's names hold "reduce";
# aten::chunk (a view) is caught by the first rule before the SSD rule sees it.
# The CUDA names were checked against the top-kernel lists of a run on 2x H200 (torch 2.11, mamba_ssm 2.3.2's
# Triton kernels, our Triton conv; 2026-11-28): no kernel fell to "other". Check again after a stack change.
CATEGORIES: list[tuple[str, str]] = [
    # CPU only: view / allocation ops that launch no kernel; their self time is dispatcher overhead.
    (
        "other",
        r"^aten::(view|_unsafe_view|as_strided|reshape|permute|transpose|t|expand|unsqueeze|squeeze|slice|select|"
        r"narrow|split|split_with_sizes|unbind|chunk|alias|detach|empty|empty_like|empty_strided|new_empty|"
        r"resolve_conj|resolve_neg|lift_fresh)$",
    ),
    # NCCL kernels (ncclDevKernel_SendRecv, ..._AllGather_RING_LL, ...); on CPU the gloo ops (c10d::*) and our /
    # NeMo's autograd functions around them (AllToAll, AllGather, ...: on CPU their self time is the wait).
    ("nccl", r"nccl|c10d::|gloo|all_?to_?all|all_?gather|reduce_?scatter|all_?reduce|sendrecv"),
    # mamba_ssm's Triton SSD kernels (_chunk_cumsum_*, _chunk_state_*, _state_passing_*, _bmm_chunk_*,
    # _chunk_scan_*).
    ("ssd", r"chunk|state_passing|ssd"),
    # Our Triton conv (kernels/triton_conv.py: _conv_fwd_kernel, _conv_bwd_kernel) or the causal_conv1d package.
    ("conv", r"causal_conv|_conv_(fwd|bwd)_kernel|conv1d|convolution|conv_depthwise"),
    # mamba_ssm's gated RMSNorm (layernorm_gated.py: _layer_norm_fwd_1pass_kernel, _layer_norm_bwd_kernel).
    ("norm", r"layer_?norm|rms_?norm|_norm_(fwd|bwd)"),
    # cuBLAS / cuBLASLt / CUTLASS / nvjet gemms; on CPU aten::mm / addmm / bmm / matmul / linear.
    ("gemm", r"gemm|cutlass|cublas|xmma|nvjet|matmul|addmm|bmm|(?<![a-z])mm(?![a-z])|aten::linear"),
    # Copies (direct_copy_kernel, Memcpy, CatArrayBatchedCopy), fills (FillFunctor, Memset: zeroing buffers),
    # gathers, index kernels (vectorized_gather_kernel, indexFuncLargeIndex, index_elementwise_kernel).
    (
        "copy/index",
        r"copy|memcpy|memset|index|gather|scatter|(?<![a-z])(cat|take)(?![a-z])|clone|contiguous|fill",
    ),
    # Every other elementwise / reduction / scan kernel (cumsum: tensor_kernel_scan_*); on CPU every other aten op.
    ("elementwise/reduce", r"elementwise|reduce|reduction|scan|cub::|^aten::|triton_"),
]
OTHER = "other"
# Table order (the match order above puts the specific patterns first).
CATEGORY_NAMES = ["gemm", "ssd", "conv", "norm", "nccl", "copy/index", "elementwise/reduce", OTHER]
_COMPILED = [(name, re.compile(pattern, re.IGNORECASE)) for name, pattern in CATEGORIES]
assert {name for name, _ in CATEGORIES} <= set(CATEGORY_NAMES), "a rule names a category the tables lack"
TOP_KERNELS = 15


def categorize(name: str) -> str:
    """The category of a kernel (CUDA) or op (CPU) name."""
    for category, pattern in _COMPILED:
        if pattern.search(name):
            return category
    return OTHER


def device_times(prof: profile, on_cuda: bool) -> dict[str, list[float]]:
    """``name -> [total us, calls]`` over the profiled block.

    CUDA: the device events (kernels, memcpys, memsets) and their durations; CPU ops are skipped, since their
    device time is their kernels' again. CPU: the self CPU time of every op (children excluded, so no op is
    counted twice). User annotations (``record_function`` ranges) are skipped on both.
    """
    totals: dict[str, list[float]] = {}
    for ev in prof.events():
        if ev.is_user_annotation or ev.is_async:
            continue
        if on_cuda:
            if ev.device_type != DeviceType.CUDA:
                continue
            us = ev.time_range.elapsed_us()
        else:
            if ev.device_type != DeviceType.CPU:
                continue
            us = ev.self_cpu_time_total
        entry = totals.setdefault(ev.name, [0.0, 0])
        entry[0] += us
        entry[1] += 1
    return totals


def breakdown(totals: dict[str, list[float]], steps: int) -> dict[str, Any]:
    """Per-step ms per category, their sum, and the top kernels."""
    per_cat = dict.fromkeys(CATEGORY_NAMES, 0.0)
    rows = []
    for name, (us, calls) in totals.items():
        cat = categorize(name)
        ms = us / 1e3 / steps
        per_cat[cat] += ms
        rows.append({"name": name, "category": cat, "ms": ms, "calls": calls / steps})
    rows.sort(key=lambda r: r["ms"], reverse=True)
    return {"categories_ms": per_cat, "kernel_sum_ms": sum(per_cat.values()), "top": rows[:TOP_KERNELS]}


# ------------------------------------------------------------------------------------------------ no-comm mode

# The collectives the strategies and NeMo's module call; the *_single ones exist in newer torch only.
COLLECTIVES = (
    "all_to_all_single",
    "all_gather_into_tensor",
    "reduce_scatter_tensor",
    "all_gather_single",
    "reduce_scatter_single",
    "all_reduce",
)


class DoneWork:
    """What a stand-in returns for ``async_op=True``: a work handle that is already complete."""

    def wait(self, timeout: Any = None) -> bool:
        return True

    def is_completed(self) -> bool:
        return True

    def is_success(self) -> bool:
        return True

    def synchronize(self) -> None:
        pass

    def get_future(self) -> torch.futures.Future:
        fut: torch.futures.Future = torch.futures.Future()
        fut.set_result(None)
        return fut


def _done(async_op: bool) -> DoneWork | None:
    return DoneWork() if async_op else None


def _rank_and_size(group: Any) -> tuple[int, int]:
    # get_rank / get_world_size are local look-ups, never collectives, and are not patched.
    return dist.get_rank(group), dist.get_world_size(group)


def _copy_flat(dst: torch.Tensor, src: torch.Tensor) -> None:
    """``dst <- src`` for equal shapes; otherwise the common prefix in flat order (uneven splits)."""
    if dst.shape == src.shape:
        dst.copy_(src)
    else:
        n = min(dst.numel(), src.numel())
        dst.view(-1)[:n].copy_(src.reshape(-1)[:n])


class NoComm:
    """Replaces every collective of :data:`COLLECTIVES` by a local stand-in of the same shapes, while active.

    A module that calls ``dist.all_to_all_single(...)`` looks the name up on ``torch.distributed`` at each call;
    one that bound the function at import (``collectives._all_gather_single = dist.all_gather_single``) holds
    the function object itself. So the stand-ins go into ``torch.distributed``, ``distributed_c10d`` and every
    given namespace (the ``mamba_cp.*`` modules, NeMo's module), under every name that holds an original
    (found by identity, so any alias is reached). The sites are found once (:meth:`__init__`); entering and
    leaving only swaps them, a few microseconds, since the swap runs inside the timed step. Not reached: a
    collective held inside a container (a dict of functions) or called through functional collectives / DTensor
    (none of the rows does either today).

    The stand-ins copy the input into the output (all-to-all: the whole buffer, as if every block came back;
    all-gather: the input into every rank's slice, so the output is finite; reduce-scatter: this rank's slice;
    all-reduce: nothing) and count their calls in :attr:`calls`. The values are wrong by design.
    """

    def __init__(self, namespaces: Iterable[dict[str, Any]] = ()) -> None:
        self.calls: dict[str, int] = {}
        originals = {name: getattr(dist, name) for name in COLLECTIVES if hasattr(dist, name)}
        standins = {name: getattr(self, f"_{name}") for name in originals}
        by_id = {id(fn): standins[name] for name, fn in originals.items()}
        spaces = [vars(dist), vars(dist.distributed_c10d), *_mamba_cp_namespaces(), *namespaces]
        self.sites: list[tuple[dict[str, Any], str, Any, Any]] = []
        seen: set[int] = set()
        for ns in spaces:
            if id(ns) in seen:
                continue
            seen.add(id(ns))
            for key, value in list(ns.items()):
                if id(value) in by_id:
                    self.sites.append((ns, key, value, by_id[id(value)]))
        self.active = False

    def __enter__(self) -> NoComm:
        for ns, key, _, standin in self.sites:
            ns[key] = standin
        self.active = True
        return self

    def __exit__(self, *exc: object) -> None:
        for ns, key, original, _ in self.sites:
            ns[key] = original
        self.active = False

    def patched_names(self) -> list[str]:
        """``module.name`` of every patched site (for the report)."""
        return sorted({f"{ns.get('__name__', '?')}.{key}" for ns, key, _, _ in self.sites})

    def _count(self, name: str) -> None:
        self.calls[name] = self.calls.get(name, 0) + 1

    # The stand-ins: same signatures as torch.distributed's.

    def _all_to_all_single(
        self, output, input, output_split_sizes=None, input_split_sizes=None, group=None, async_op=False
    ) -> DoneWork | None:
        self._count("all_to_all_single")
        _copy_flat(output, input)
        return _done(async_op)

    def _all_gather_into_tensor(self, output_tensor, input_tensor, group=None, async_op=False) -> DoneWork | None:
        return self._gather("all_gather_into_tensor", output_tensor, input_tensor, group, async_op)

    def _all_gather_single(self, output_tensor, input_tensor, group=None, async_op=False) -> DoneWork | None:
        return self._gather("all_gather_single", output_tensor, input_tensor, group, async_op)

    def _reduce_scatter_tensor(self, output, input, op=None, group=None, async_op=False) -> DoneWork | None:
        return self._scatter("reduce_scatter_tensor", output, input, group, async_op)

    def _reduce_scatter_single(self, output, input, op=None, group=None, async_op=False) -> DoneWork | None:
        return self._scatter("reduce_scatter_single", output, input, group, async_op)

    def _gather(self, name: str, output, input, group, async_op: bool) -> DoneWork | None:
        self._count(name)
        _, size = _rank_and_size(group)
        output.view(size, -1).copy_(input.reshape(1, -1).expand(size, -1))
        return _done(async_op)

    def _scatter(self, name: str, output, input, group, async_op: bool) -> DoneWork | None:
        self._count(name)
        rank, size = _rank_and_size(group)
        output.copy_(input.reshape(size, -1)[rank].view(output.shape))
        return _done(async_op)

    def _all_reduce(self, tensor, op=None, group=None, async_op=False) -> DoneWork | None:
        self._count("all_reduce")
        return _done(async_op)


def _mamba_cp_namespaces() -> list[dict[str, Any]]:
    return [vars(m) for name, m in list(sys.modules.items()) if name.split(".")[0] == "mamba_cp" and m is not None]


def no_comm_step(step: Callable[[], None], patch: NoComm) -> Callable[[], None]:
    """``step`` with the stand-ins in place for its duration only: the timing helper's own collectives (barrier,
    the max over ranks) stay real."""

    def run() -> None:
        with patch:
            step()

    return run


# ------------------------------------------------------------------------------------------------ rows


def build_rows(
    names: list[str], base, case: bm.Case, device: torch.device, world: int, nemo_cls: type | None, log
) -> Iterator[tuple[str, int, Callable[[], None], list[dict[str, Any]]]]:
    """``(label, cp, step, extra namespaces)`` for each requested row, built as bench_mixer builds them; each
    row's modules live only while the caller uses it (one row on the device at a time)."""
    for name in names:
        if name == "cp1":
            ref = copy.deepcopy(base)
            yield "cp1", 1, bm.mixer_step(ref, case.x.to(device), case.grad.to(device), case.cu_dev), []
            del ref
        elif name == "nemo":
            if case.packed_layout == "stream":
                log("[profile] skipping nemo: its module takes packs cut per sequence", flush=True)
                continue
            if world == 1 or nemo_cls is None:
                log(f"[profile] skipping nemo: {'cp=1' if world == 1 else 'NeMo module not found'}", flush=True)
                continue
            m = copy.deepcopy(base)
            ncp = nemo_cls(dist.group.WORLD, m.num_heads, m.head_dim, m.n_groups, m.ssm_state_size, m)
            # NeMo's module is loaded by file path and is not in sys.modules: reach its globals through a function.
            yield "nemo", world, bm.nemo_step(m, ncp, case), [nemo_cls.__init__.__globals__]
            del m, ncp
        else:
            if world == 1:
                log(f"[profile] skipping ours:{name}: cp=1", flush=True)
                continue
            m = parallelize(copy.deepcopy(base), dist.group.WORLD, strategy=name, packed_layout=case.packed_layout)
            yield f"ours:{name}", world, bm.mixer_step(m, case.x_local, case.grad_local, case.cu_dev), []
            del m
        bm._free(device)


def profile_steps(step: Callable[[], None], steps: int, clock: bm.Clock, on_cuda: bool) -> tuple[dict, profile]:
    """Breakdown of ``steps`` (warm) steps under the profiler, this rank only; and the profile itself."""
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if on_cuda else [])
    clock.sync()
    dist.barrier()
    with profile(activities=activities) as prof:
        for _ in range(steps):
            step()
        clock.sync()  # every kernel inside the profiled window
    return breakdown(device_times(prof, on_cuda), steps), prof


def measure_row(
    label: str,
    cp: int,
    step: Callable[[], None],
    namespaces: list[dict[str, Any]],
    args: argparse.Namespace,
    clock: bm.Clock,
    device: torch.device,
    world: int,
    trace_path: Path | None,
) -> dict[str, Any]:
    on_cuda = device.type == "cuda"
    start = time.perf_counter()
    timing = bm.time_step(step, clock, args.warmup, args.iters, device)
    _, real_calls = bm.count_bytes(step, world)  # collectives of one normal step (dispatch-level)
    patch = NoComm(namespaces)  # after the warm-up: every lazily imported mamba_cp module is in sys.modules
    quiet = no_comm_step(step, patch)
    _, nocomm_calls = bm.count_bytes(quiet, world)  # must be {}; a warm-up step, then the counted one
    standin_calls = {name: n // 2 for name, n in patch.calls.items()}  # per step (count_bytes ran two)
    nocomm = bm.time_step(quiet, clock, 0, args.iters, device)
    mine, prof = profile_steps(step, args.profile_steps, clock, on_cuda)
    if trace_path is not None and dist.get_rank() == 0:
        prof.export_chrome_trace(str(trace_path))
    del prof
    every = [None] * world
    if getattr(args, "fake_cp", None):  # a fake group moves no objects: rank 0 stands for every rank
        every = [mine] * world
    else:
        dist.all_gather_object(every, mine)
    mean = {c: sum(r["categories_ms"][c] for r in every) / world for c in CATEGORY_NAMES}
    row = {
        "impl": label,
        "cp": cp,
        "step_ms": timing["ms"],
        "step_ms_min": timing["ms_min"],
        "nocomm_ms": nocomm["ms"],
        "exposed_comm_ms": timing["ms"] - nocomm["ms"],
        "peak_bytes": timing.get("peak_bytes"),
        "peak_delta_bytes": timing.get("peak_delta_bytes"),  # the step's own activations and transients
        "categories_ms": mean,  # mean over ranks, per step
        "kernel_sum_ms": sum(mean.values()),
        "per_rank": every,  # each rank's categories, kernel sum and top kernels
        "collectives": real_calls,
        "collectives_nocomm": nocomm_calls,
        "standin_calls": standin_calls,
        "patched": patch.patched_names(),
        "wall_s": time.perf_counter() - start,  # what measuring this row cost (the GPU-time budget)
    }
    return row


# ------------------------------------------------------------------------------------------------ reports


def _size(length: int) -> str:
    return f"{length // 1024}K" if length >= 1024 and length % 1024 == 0 else str(length)


def _short(name: str, width: int = 110) -> str:
    name = name.removeprefix("void ").replace("|", "\\|")
    return name if len(name) <= width else name[: width - 3] + "..."


def markdown(report: dict[str, Any]) -> str:
    env = report["env"]
    lines = [
        f"# profile_mixer: {env['device_name']} x{report['world']}, {report['model']} mixer, {report['dtype']}",
        "",
        f"kernels: {env['kernels']}; torch {env['torch']}; command: `{report['command']}`",
        "",
        f"step: fwd+bwd, median of {report['iters']}, max over ranks. no-comm: the same step with every collective "
        "replaced by a local copy of the same shapes (results numerically wrong: it times compute only). exposed "
        f"comm = step - no-comm. Categories: {report['time_kind']} per step, mean over ranks, from "
        f"{report['profile_steps']} profiled steps (with communication); `sum` can exceed the step where streams "
        "overlap and fall short of it where the device idles. cp1 has no collective: its exposed comm is the noise.",
    ]
    cats = CATEGORY_NAMES
    for section in report["sections"]:
        lines += ["", f"## {section['layout'].upper()}, L = {_size(section['L'])}", ""]
        lines.append("| row | step ms | no-comm ms | exposed comm ms | " + " | ".join(cats) + " | sum |")
        lines.append("|---" * (5 + len(cats)) + "|")
        for r in section["rows"]:
            cells = [f"{r['categories_ms'][c]:.2f}" for c in cats]
            lines.append(
                f"| {r['impl']} | {r['step_ms']:.2f} | {r['nocomm_ms']:.2f} | {r['exposed_comm_ms']:.2f} | "
                + " | ".join(cells)
                + f" | {r['kernel_sum_ms']:.2f} |"
            )
    lines += ["", f"## Top {TOP_KERNELS} kernels per row (rank 0, ms per step)"]
    for section in report["sections"]:
        for r in section["rows"]:
            lines += ["", f"### {section['layout']} {_size(section['L'])} {r['impl']}", ""]
            lines += ["| ms | calls | category | kernel |", "|---|---|---|---|"]
            for k in r["per_rank"][0]["top"]:
                lines.append(f"| {k['ms']:.3f} | {k['calls']:g} | {k['category']} | `{_short(k['name'])}` |")
    return "\n".join(lines) + "\n"


def write(report: dict[str, Any], out: Path, stem: str) -> str:
    """Writes ``stem.json`` and ``stem.md`` to ``out``; returns the markdown."""
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{stem}.json").write_text(json.dumps(report, indent=1, default=str))
    text = markdown(report)
    (out / f"{stem}.md").write_text(text)
    return text


def _log_row(log, layout: str, length: int, row: dict[str, Any]) -> None:
    cats = " ".join(f"{c} {row['categories_ms'][c]:.2f}" for c in CATEGORY_NAMES if row["categories_ms"][c] > 0)
    log(
        f"[profile] L={length} {layout} {row['impl']}: step {row['step_ms']:.2f} ms, no-comm {row['nocomm_ms']:.2f}, "
        f"exposed comm {row['exposed_comm_ms']:.2f} | {cats} ({row['wall_s']:.1f} s)"
        + (f" | peak {row['peak_bytes'] / 2**30:.2f} GiB" if row.get("peak_bytes") else "")
        + (f" act. {row['peak_delta_bytes'] / 2**30:.2f}" if row.get("peak_delta_bytes") else ""),
        flush=True,
    )
    for k in row["per_rank"][0]["top"]:
        log(f"    {k['ms']:9.3f} ms {k['calls']:6g}x {k['category']:<18} {_short(k['name'])}", flush=True)


# ------------------------------------------------------------------------------------------------ main


def parse_rows(spec: str) -> list[str]:
    """``cp1,hidden,ours:state_passing,nemo`` -> ``["cp1", "hidden", "state_passing", "nemo"]`` (validated)."""
    names = []
    for item in (s.strip() for s in spec.split(",") if s.strip()):
        name = item.removeprefix("ours:")
        if name not in ("cp1", "nemo", *STRATEGIES):
            raise SystemExit(f"unknown row {item!r}; choose from cp1, nemo, {', '.join(STRATEGIES)}")
        names.append(name)
    return names


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="profile_mixer", description=__doc__.split("\n\n")[0])
    p.add_argument("--device", choices=["auto", "cuda", "cpu"], default="auto")
    p.add_argument("--model", choices=sorted(bm.MODELS), default=None, help="default: nemotron8b on CUDA, tiny on CPU")
    p.add_argument("--lengths", default=None, help="comma-separated L (default 131072; CPU 64)")
    p.add_argument("--layouts", default="bshd,thd")
    p.add_argument("--rows", default=",".join(["cp1", *STRATEGIES, "nemo"]), help="cp1, strategy names, nemo")
    p.add_argument("--nemo-path", default=os.environ.get("MAMBA_CP_NEMO_PATH", str(bm.DEFAULT_NEMO)))
    p.add_argument("--docs", type=int, default=64, help="documents in the packed (THD) batch")
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--warmup", type=int, default=None, help="warm-up steps per row (default 2; CPU 1)")
    p.add_argument("--iters", type=int, default=None, help="timed steps per mode (default 5; CPU 2)")
    p.add_argument("--profile-steps", type=int, default=3, help="steps under the profiler per row")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--trace", action="store_true", help="also write rank 0's chrome trace of every row to --out")
    p.add_argument("--out", default="benchmarks/results", help="folder for profile_mixer.{json,md}")
    p.add_argument("--tag", default="", help="suffix for the output file names")
    p.add_argument(
        "--fake-cp", type=int, default=None, help="one process as rank 0 of a fake group of this size (compute only)"
    )
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    argv = list(argv) if argv is not None else sys.argv[1:]
    args = parse_args(argv)
    dev_kind = args.device if args.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    mamba_ssm_import = bm.expose_mamba_ssm_triton() if dev_kind == "cuda" else "not used"
    if args.fake_cp:  # torch's fake process group: rank 0's compute and memory, collectives move nothing
        from torch.testing._internal.distributed.fake_pg import FakeStore

        if dev_kind == "cuda":
            torch.cuda.set_device(0)
        dist.init_process_group("fake", store=FakeStore(), rank=0, world_size=args.fake_cp)
    rank, world, created = bm.init_distributed(dev_kind)
    created = created or bool(args.fake_cp)
    device = torch.device("cuda", torch.cuda.current_device()) if dev_kind == "cuda" else torch.device("cpu")
    model = args.model or ("nemotron8b" if dev_kind == "cuda" else "tiny")
    lengths = [int(v) for v in (args.lengths or ("131072" if dev_kind == "cuda" else "64")).split(",")]
    args.warmup = args.warmup if args.warmup is not None else (2 if dev_kind == "cuda" else 1)
    args.iters = args.iters if args.iters is not None else (5 if dev_kind == "cuda" else 2)
    rows = parse_rows(args.rows)
    dtype = getattr(torch, args.dtype)
    nemo_cls = bm.load_nemo(Path(args.nemo_path)) if "nemo" in rows and world > 1 else None
    clock = bm.Clock(device)
    log = print if rank == 0 else (lambda *a, **k: None)
    out = Path(args.out)
    stem = f"profile_mixer{('_' + args.tag) if args.tag else ''}"

    env = {
        "device_name": torch.cuda.get_device_name(device) if dev_kind == "cuda" else platform.processor() or "cpu",
        "torch": torch.__version__,
        "kernels": kernels.selected(device, dtype, bm.MODELS[model]["conv_kernel"]),
        "mamba_ssm_import": mamba_ssm_import,
        "nemo": str(args.nemo_path) if nemo_cls is not None else None,
        "nccl": ".".join(map(str, torch.cuda.nccl.version())) if dev_kind == "cuda" else None,
    }
    log(f"[profile] world={world} device={env['device_name']} model={model} kernels={env['kernels']}", flush=True)
    report: dict[str, Any] = {
        "model": model,
        "config": bm.MODELS[model],
        "dtype": args.dtype,
        "world": world,
        "env": env,
        "iters": args.iters,
        "profile_steps": args.profile_steps,
        "time_kind": "device ms (kernels, memcpy, memset)" if dev_kind == "cuda" else "self CPU ms of ops",
        "categories": CATEGORIES,
        "nocomm_note": "no-comm steps replace every collective by a local copy: numerically wrong, compute only",
        "command": f"python benchmarks/profile_mixer.py {' '.join(argv)}"
        if args.fake_cp
        else f"torchrun --standalone --nproc-per-node {world} benchmarks/profile_mixer.py {' '.join(argv)}",
        "fake_group": bool(args.fake_cp),
        "sections": [],
    }
    if args.trace and rank == 0:
        out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(args.seed)
    base = bm.Mamba2Mixer(**bm.MODELS[model], device=device, dtype=dtype)
    for length in lengths:
        for layout in args.layouts.split(","):
            case = bm.Case(args, base, layout, length, rank, world, device)
            section = {"layout": layout, "L": length, "rows": []}
            for label, cp, step, namespaces in build_rows(rows, base, case, device, world, nemo_cls, log):
                trace = out / f"{stem}_{layout}_{length}_{label.replace(':', '_')}.trace.json" if args.trace else None
                row = measure_row(label, cp, step, namespaces, args, clock, device, world, trace)
                section["rows"].append(row)
                _log_row(log, layout, length, row)
                del step
            report["sections"].append(section)
            if rank == 0:  # after every section, so a later failure keeps what was measured
                write(report, out, stem)
            del case
            bm._free(device)

    if rank == 0:
        text = write(report, out, stem)
        print(f"[profile] wrote {out / stem}.json and .md", flush=True)
        print(text, flush=True)
    if created:
        dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    with contextlib.suppress(KeyboardInterrupt):
        sys.exit(main())
