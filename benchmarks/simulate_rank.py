"""Simulate one rank of a CP group on a single GPU: per-rank time, memory and the longest trainable length.

A fake process group (``torch.testing._internal.distributed.fake_pg``: ``FakeStore`` + the ``"fake"``
backend, re-initialised for every row) makes every collective complete at once without moving data, so
rank 0 runs exactly its own compute on its own shard, with its own memory, through the unchanged library.
For every ``cp`` in ``--cps``, strategy in ``--strategies`` (``cp=1``: the plain model, once), layout
(``bshd``: one row ``[1, L]``; ``thd``: a pack of ``--docs`` documents of mixed lengths from
``bench_mixer.doc_lengths``, the same documents for every ``cp``, cut per document; ``stream``: the same pack cut
as one stream, ``packed_layout="stream"``) and length ``L`` it measures rank 0's forward + backward:

* ``mixer``: the NemotronH-8B-like Mamba2 mixer (``bench_mixer.MODELS``), as ``bench_mixer`` times it.
* ``hybrid``: a transformers ``NemotronHForCausalLM`` of NemotronH-8B width (random weights, small vocab,
  ``attn_implementation="sdpa"``, non-reentrant activation checkpointing per layer, optionally FSDP2 over
  the fake group), parallelized by ``mamba_cp.parallelize`` and fed through ``mamba_cp.batch_context``.

**What is measured.** Time: median over ``--iters`` steps after ``--warmup`` (CUDA events, host clock on
CPU; ``bench_mixer.time_step``); the mixer's first warm-up step runs under ``bench_mixer.CommBytes``, which
counts the bytes the collectives were handed (the hybrid's with ``--count-hybrid-bytes``: its dispatch mode
costs seconds per step there). Peak: ``torch.cuda.max_memory_allocated`` over the timed steps, after
``reset_peak_memory_stats``; the batch (this rank's shard, built on the GPU), the weights and the gradients
(the previous step's, freed when the next starts) are allocated before the reset, so the peak counts
everything a training step holds except optimizer state; ``act`` is the peak minus what was allocated at
the reset. Allocated bytes, not the allocator's reserved pool (also recorded). On CPU there is no peak
(``None``): ``torch.cuda`` cannot measure host memory.

**Full-depth hybrid (extrapolation).** The hybrid is measured at two depths, ``k1`` and ``k2`` repetitions
of ``--pattern`` (NemotronH's ``M`` Mamba2 / ``*`` attention / ``-`` MLP letters). With per-layer
checkpointing every layer adds its saved input (the same for every kind of layer) plus its weights and
gradients (known per kind from the model), while the transient of the one layer being recomputed does not
grow with depth; so the per-layer activation cost is the measured peak difference minus the difference in
weight+gradient bytes, divided by the layer difference, and the full model's peak is the shallow peak plus
that cost for every extra layer plus the extra layers' weight+gradient bytes (``--full-layers``, default
NemotronH-8B's 52 layers with its pattern: 24 Mamba2, 4 attention, 24 MLP). The full model's compute time
adds, per kind of layer, its measured fwd+recompute+bwd time (CUDA events at every layer's entry and exit
in the forward pass and at every layer's recompute in the backward pass, from the deeper model) to the rest
of the step (the embedding, the head and the loss); if the recompute marks are missing it falls back to a
line through the two depths' times (``time_method`` says which). The longest trainable ``L`` for a cp and
strategy is where that extrapolated peak crosses the card's memory (``total_memory`` read from the device,
less ``--headroom-gib``), interpolated linearly in ``L`` between the two measured lengths around it
(extrapolated linearly from the two longest when all fit; labelled so); a second column adds optimizer
state (``--optim-bytes-per-param`` per parameter, sharded by ``cp`` with ``--fsdp``). For the mixer alone the
longest length is bounded by the rows that ran and the first that ran out of memory.

**Whole-step estimate (an estimate, not a measurement).** Per-rank compute (the measured step) plus the
communication each strategy needs, from ``mamba_cp.traffic.STRATEGY_BYTES`` (the numbers ``mamba-cp plan``
prints; the backward moves what the forward does) and, for attention, the head-parallel all-to-alls,
over ``--bandwidth-gbps`` (GB/s per GPU, one column per value; default 150 intra-node and 25 inter-node)
plus ``--latency-us`` per collective. Hidden-parallel's fused projection runs the GEMMs of the gate ``z``
while its all-to-alls fly (half of ``z`` during each forward exchange, ``dW_z`` and ``dh = dz @ W_z``
during the backward ones); those four GEMMs are timed on their own on this rank's shapes, and each exchange
adds ``exposed = max(0, comm - hideable)``. State passing's all-gathers and the attention all-to-alls hide
nothing here. Under checkpointing the forward exchanges run twice (the recompute). The gradient reduction
over the CP ranks (FSDP or ``all_reduce_gradients``), the same for every strategy and usually overlapped
with the backward, is not included.

**Rows that fail.** Each row runs in its own ``try``: an out-of-memory or any other error marks the row
with the error's first line and the run goes on. A kernel crash leaves the CUDA context unusable, so on CUDA
the rows run in a child process (``--isolate``) that is restarted after such a crash, the row marked with
the crash. mamba_ssm 2.3.2's SSD kernels crash beyond 2**31 elements in one batch row (docs/design.md §6); rows
that would hand them that are skipped (``--int32-guard``; ``auto``, the default, skips them unless
``mamba_cp.kernels`` cuts SSD calls to fit, ``kernels.index_width``). ``--budget-s`` stops starting rows
after that many seconds, and skips a row whose predicted time (from the rows already run) would overrun it.

Outputs in ``--out``: ``simulate_rank.json`` (rewritten after every row), ``simulate_rank.md``,
``simulate_rank.png`` (when matplotlib imports), ``simulate_rank.rows.jsonl`` (the raw per-row log).
``--merge A.json B.json`` rebuilds the tables from several runs. ``main(argv)`` is the entry point
(``mamba-cp bench --simulate ...``).
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import gc
import importlib.util
import json
import os
import platform
import statistics
import subprocess
import sys
import threading
import time
import warnings
from collections.abc import Callable, Iterator
from functools import partial
from pathlib import Path
from typing import NamedTuple

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

import mamba_cp
from mamba_cp import Mamba2Mixer, kernels, parallelize
from mamba_cp.ssm_block import SSMShape
from mamba_cp.traffic import STRATEGY_BYTES

HERE = Path(__file__).resolve().parent


def _load_bench_mixer():
    """``benchmarks/bench_mixer.py`` as a module (its timing, models and batch helpers are reused)."""
    if "bench_mixer" in sys.modules:
        return sys.modules["bench_mixer"]
    spec = importlib.util.spec_from_file_location("bench_mixer", HERE / "bench_mixer.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["bench_mixer"] = module
    spec.loader.exec_module(module)
    return module


bench = _load_bench_mixer()

NEMOTRON_H_8B_PATTERN = "M-M-M-M*-M-M-M-M-M*-M-M-M-M-M*-M-M-M-M-M*-M-M-M-M-M-"
"""nvidia/Nemotron-H-8B-Base-8K's ``hybrid_override_pattern`` (52 layers: 24 Mamba2, 4 attention, 24 MLP)."""

LAYER_KINDS = {"M": "linear_attention", "*": "full_attention", "-": "mlp"}
"""Pattern letter -> ``NemotronHConfig.layers_block_type`` entry (the names transformers 5.17 to 5.23 take)."""

HYBRIDS = {
    # NemotronH-8B width.
    "nemotron8b": dict(hidden_size=4096, mamba_num_heads=128, mamba_head_dim=64, n_groups=8, ssm_state_size=128,
                       conv_kernel=4, chunk_size=128, num_attention_heads=32, num_key_value_heads=8, head_dim=128,
                       intermediate_size=21504),
    # Small enough for CPU smoke runs.
    "tiny": dict(hidden_size=64, mamba_num_heads=8, mamba_head_dim=16, n_groups=2, ssm_state_size=16, conv_kernel=4,
                 chunk_size=16, num_attention_heads=4, num_key_value_heads=2, head_dim=16, intermediate_size=128),
}  # fmt: skip

STICKY_EXIT = 3
"""Exit status of a child whose CUDA context died (the parent restarts it)."""
_STICKY_MARKS = ("illegal memory access", "device-side assert", "unspecified launch failure", "misaligned address")
_INT32_ELEMENTS = 2**31
_GEMM_TOKENS = 262144
"""The z GEMMs are timed on at most this many tokens and scaled linearly (they are far past saturation)."""


# ------------------------------------------------------------------------------------------------ rows


class RowSpec(NamedTuple):
    """One measurement: what, layout, global length, CP size and strategy (``"plain"`` at cp=1)."""

    what: str
    layout: str
    length: int
    cp: int
    strategy: str

    @property
    def key(self) -> str:
        return f"{self.what}/{self.layout}/L{self.length}/cp{self.cp}/{self.strategy}"

    @property
    def local_tokens(self) -> int:
        return self.length // self.cp

    def cost(self) -> float:
        """Relative work of the row (for ordering and time prediction): linear in this rank's tokens; the
        hybrid's attention adds a term in ``L^2 / cp``."""
        if self.what == "hybrid":
            return self.local_tokens * (1.0 + self.length / 131072)
        return float(self.local_tokens)


def plan_rows(args: argparse.Namespace) -> list[RowSpec]:
    """Every row the arguments ask for, cheapest first within each ``--what``."""
    rows = []
    for what in args.what:
        for length in args.lengths:
            for layout in args.layouts:
                for cp in args.cps:
                    for strategy in ["plain"] if cp == 1 else args.strategies:
                        rows.append(RowSpec(what, layout, length, cp, strategy))
    order = {w: i for i, w in enumerate(args.what)}
    return sorted(rows, key=lambda r: (order[r.what], r.cost(), r.length, r.layout, r.cp, r.strategy))


def packed_layout(layout: str) -> str:
    """The ``packed_layout`` a row's layout runs with (``stream``: the pack cut as one stream)."""
    return "stream" if layout == "stream" else "sequences"


def doc_pack(length: int, docs: int, multiple: int, seed: int) -> list[int]:
    """The packed (THD) layout's document lengths: ``bench_mixer.doc_lengths``, at most ``length / multiple``
    documents so that tiny CPU sizes still pack."""
    return bench.doc_lengths(length, max(1, min(docs, length // multiple)), multiple, seed)


def library_splits_ssd() -> bool:
    """Whether this mamba_cp cuts SSD kernel calls to fit their int32 offsets (``kernels.index_width``); then
    no row needs the guard below."""
    index_width = getattr(kernels, "index_width", None)
    return index_width is not None and hasattr(index_width, "ssd_chunk_scan_split")


def int32_hazard(spec: RowSpec, num_heads: int, head_dim: int) -> str | None:
    """Why mamba_ssm's SSD kernel would crash on this row (more than 2**31 elements in one batch row of ``x``),
    or None. Rows are: the whole sequence for the plain mixer and hidden-parallel (with ``H / cp`` heads),
    a half segment ``L / (2 cp)`` (BSHD) or the local stream ``L / cp`` (THD) for state passing."""
    if spec.strategy == "plain":
        tokens, heads = spec.length, num_heads
    elif spec.strategy == "hidden":
        tokens, heads = spec.length, num_heads // spec.cp
    else:
        per_segment = spec.layout in ("bshd", "stream")
        tokens, heads = (spec.length // (2 * spec.cp) if per_segment else spec.local_tokens), num_heads
    elements = tokens * heads * head_dim
    if elements <= _INT32_ELEMENTS:
        return None
    return (
        f"skipped: the SSD kernel would get {elements / _INT32_ELEMENTS:.2f} x 2^31 elements in one row "
        "(mamba_ssm 2.3.2 int32 offsets crash, docs/design.md §6); --int32-guard off runs it"
    )


# ------------------------------------------------------------------------------------------------ helpers


@contextlib.contextmanager
def fake_group(cp: int) -> Iterator[dist.ProcessGroup]:
    """A fresh fake process group of ``cp`` ranks in which this process is rank 0 (destroyed on exit)."""
    from torch.testing._internal.distributed.fake_pg import FakeStore

    if dist.is_initialized():
        dist.destroy_process_group()
    dist.init_process_group("fake", store=FakeStore(), rank=0, world_size=cp)
    try:
        yield dist.group.WORLD
    finally:
        dist.destroy_process_group()


def free_memory(device: torch.device) -> None:
    """Collect garbage and hand cached blocks back, so that the next row starts from an empty card."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.empty_cache()


def first_line(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    return f"{type(err).__name__}: {text[0][:400] if text else ''}"


def is_sticky(message: str) -> bool:
    """Whether an error leaves the CUDA context unusable (kernel faults are sticky)."""
    return any(mark in message.lower() for mark in _STICKY_MARKS)


def context_alive(device: torch.device) -> bool:
    if device.type != "cuda":
        return True
    try:
        torch.cuda.synchronize(device)
        torch.empty(1, device=device).add_(1).item()
        return True
    except Exception:  # noqa: BLE001 - any failure here means the context is gone
        return False


def peak_fields(timing: dict) -> dict:
    """The memory fields of a ``bench_mixer.time_step`` result (None on CPU)."""
    peak = timing.get("peak_bytes")
    return {
        "peak_bytes": peak,
        "act_bytes": timing.get("peak_delta_bytes"),
        "peak_reserved_bytes": timing.get("peak_reserved_bytes"),
    }


def timed(step: Callable[[], None], clock, warmup: int, iters: int, device: torch.device, cp: int, count: bool) -> dict:
    """``bench_mixer.time_step``; with ``count`` the first warm-up step runs under ``bench_mixer.CommBytes``
    (the bytes handed to collectives; its dispatch mode costs ~0.1-1 ms per op, seconds for a hybrid step).
    Adds the allocator's reserved peak on CUDA."""
    counted, calls = bench.count_bytes(step, cp) if count and warmup > 0 else (None, None)
    timing = bench.time_step(step, clock, warmup - 1 if count and warmup > 0 else warmup, iters, device)
    if device.type == "cuda":
        timing["peak_reserved_bytes"] = torch.cuda.max_memory_reserved(device)
    timing["counted_bytes"] = counted
    timing["collectives"] = calls
    return timing


# ------------------------------------------------------------------------------------------------ comms model


def ssm_shape(dims: dict) -> SSMShape:
    """The whole mixer's :class:`SSMShape` from ``MODELS`` / ``HYBRIDS`` keywords."""
    heads = dims.get("num_heads", dims.get("mamba_num_heads"))
    head_dim = dims.get("head_dim") if "num_heads" in dims else dims["mamba_head_dim"]
    return SSMShape(heads, head_dim, dims["n_groups"], dims.get("state_size", dims.get("ssm_state_size")))


def mixer_exchanges(
    shape: SSMShape,
    tokens: int,
    cp: int,
    strategy: str,
    num_seqs: int,
    conv_kernel: int,
    dtype_bytes: int = 2,
    *,
    stream: bool = False,
) -> list[dict]:
    """Off-rank bytes of every collective one mixer runs in a forward pass, with the GEMM that can hide it.

    hidden: ``x|B|C|dt`` out (hidden by the first half of ``z``) and ``y`` back (the second half); backward:
    ``dy`` out (``dW_z``) and ``d(x|B|C|dt)`` back (``dh = dz @ W_z``). The totals are
    ``STRATEGY_BYTES[strategy]``'s. state_passing: the halo and the state all-gathers (reduce-scatters in
    backward), nothing to hide behind.
    """
    if cp == 1:
        return []
    if strategy == "hidden":
        total = STRATEGY_BYTES["hidden"](shape, tokens, cp, dtype_bytes)["off_rank"]
        back = (tokens // cp) * shape.d_inner * dtype_bytes * (cp - 1) // cp
        there = total - back
        return [
            {"name": "fwd x|B|C|dt", "bytes": there, "hide": "z_first_half", "pass": "fwd"},
            {"name": "fwd y", "bytes": back, "hide": "z_second_half", "pass": "fwd"},
            {"name": "bwd dy", "bytes": back, "hide": "dW_z", "pass": "bwd"},
            {"name": "bwd d(x|B|C|dt)", "bytes": there, "hide": "dh_z", "pass": "bwd"},
        ]
    total = STRATEGY_BYTES["state_passing"](
        shape, tokens, cp, dtype_bytes, conv_kernel=conv_kernel, num_seqs=num_seqs, stream=stream
    )["off_rank"]
    rows = 1 if stream else num_seqs
    halos = 2 * rows * (conv_kernel - 1) * shape.conv_dim * dtype_bytes * (cp - 1)
    states = total - halos
    return [
        {"name": "fwd halos", "bytes": halos, "hide": None, "pass": "fwd"},
        {"name": "fwd states", "bytes": states, "hide": None, "pass": "fwd"},
        {"name": "bwd states", "bytes": states, "hide": None, "pass": "bwd"},
        {"name": "bwd halos", "bytes": halos, "hide": None, "pass": "bwd"},
    ]


def attention_exchanges(
    tokens: int, cp: int, heads: int, kv_heads: int, head_dim: int, dtype_bytes: int = 2
) -> list[dict]:
    """Head-parallel attention's two all-to-alls per pass (``q|k|v`` out, with kv heads repeated up to ``cp``;
    the output back), forward and backward. Not in ``mamba_cp.traffic``: counted here from the layer's shapes."""
    if cp == 1:
        return []
    local = tokens // cp
    there = local * (heads + 2 * max(kv_heads, cp)) * head_dim * dtype_bytes * (cp - 1) // cp
    back = local * heads * head_dim * dtype_bytes * (cp - 1) // cp
    return [
        {"name": "attn fwd q|k|v", "bytes": there, "hide": None, "pass": "fwd"},
        {"name": "attn fwd out", "bytes": back, "hide": None, "pass": "fwd"},
        {"name": "attn bwd d out", "bytes": back, "hide": None, "pass": "bwd"},
        {"name": "attn bwd d(q|k|v)", "bytes": there, "hide": None, "pass": "bwd"},
    ]


def exposed_ms(exchanges: list[dict], hideable: dict, bandwidth_gbps: float, latency_us: float, passes: int) -> dict:
    """Communication time of ``exchanges`` and the part no hideable GEMM covers.

    ``passes`` is how often the forward exchanges run per step (2 under activation checkpointing: the
    forward and its recompute). Per exchange: ``comm = latency + bytes / bandwidth``, ``exposed = max(0, comm
    - hideable[exchange's GEMM])``. Returns ``{"comm_ms", "hideable_ms", "exposed_ms", "bytes"}`` per step.
    """
    comm = hidden = exposed = 0.0
    moved = 0
    for ex in exchanges:
        times = passes if ex["pass"] == "fwd" else 1
        c = latency_us * 1e-3 + ex["bytes"] / (bandwidth_gbps * 1e9) * 1e3
        h = hideable.get(ex["hide"], 0.0) if ex["hide"] else 0.0
        comm += times * c
        hidden += times * min(c, h)
        exposed += times * max(0.0, c - h)
        moved += times * ex["bytes"]
    return {"comm_ms": comm, "hideable_ms": hidden, "exposed_ms": exposed, "bytes": moved}


def step_estimates(compute_ms: float, layers: list[tuple[int, list[dict], dict]], args, passes: int) -> list[dict]:
    """One whole-step estimate per ``(bandwidth, latency)``: ``compute + sum over layers of exposed comm``.

    ``layers`` holds ``(count, exchanges, hideable)`` per kind of layer.
    """
    out = []
    for bw, lat in zip(args.bandwidth_gbps, args.latency_us, strict=True):
        parts = [(n, exposed_ms(ex, hide, bw, lat, passes)) for n, ex, hide in layers]
        comm = sum(n * p["comm_ms"] for n, p in parts)
        hidden = sum(n * p["hideable_ms"] for n, p in parts)
        exposed = sum(n * p["exposed_ms"] for n, p in parts)
        moved = sum(n * p["bytes"] for n, p in parts)
        out.append({
            "bandwidth_gbps": bw, "latency_us": lat, "comm_bytes": moved, "comm_ms": comm, "hidden_ms": hidden,
            "exposed_ms": exposed, "compute_ms": compute_ms, "step_ms": compute_ms + exposed, "estimate": True,
        })  # fmt: skip
    return out


def hideable_gemms(tokens: int, hidden: int, d_inner: int, dtype, device, clock, iters: int) -> dict:
    """Time (ms) of the four ``z`` GEMMs hidden-parallel's fused projection runs while its all-to-alls fly,
    on this rank's shapes: ``z = h @ W_z^T`` for each half of the tokens, ``dW_z = dz^T h``, ``dh = dz @ W_z``.
    Timed on at most ``_GEMM_TOKENS`` tokens and scaled linearly."""
    n = min(tokens, _GEMM_TOKENS)
    scale = tokens / n
    gen = torch.Generator(device=device).manual_seed(3)
    h = torch.randn(n, hidden, generator=gen, device=device, dtype=dtype)
    w_z = torch.randn(d_inner, hidden, generator=gen, device=device, dtype=dtype)
    dz = torch.randn(n, d_inner, generator=gen, device=device, dtype=dtype)
    z = torch.empty(n, d_inner, device=device, dtype=dtype)
    dw = torch.empty(d_inner, hidden, device=device, dtype=dtype)
    half = n // 2
    parts = {
        "z_first_half": lambda: torch.mm(h[:half], w_z.t(), out=z[:half]),
        "z_second_half": lambda: torch.mm(h[half:], w_z.t(), out=z[half:]),
        "dW_z": lambda: torch.mm(dz.t(), h, out=dw),
        "dh_z": lambda: torch.mm(dz, w_z),
    }
    times = bench.time_parts(parts, clock, 1, iters, device)
    return {k: v * scale for k, v in times.items() if k != "total"}


def safe_hideable(spec: RowSpec, hidden: int, d_inner: int, dtype, device, clock) -> dict:
    """:func:`hideable_gemms` for hidden-parallel rows (``{}`` for the others). Running out of memory there
    does not fail the row: nothing is counted as hidden then (a pessimistic estimate)."""
    if spec.strategy != "hidden":
        return {}
    try:
        return hideable_gemms(spec.local_tokens, hidden, d_inner, dtype, device, clock, 3)
    except torch.OutOfMemoryError:
        free_memory(device)
        return {}


# ------------------------------------------------------------------------------------------------ mixer rows


def mixer_batch(spec: RowSpec, hidden: int, dtype, device, args) -> tuple[torch.Tensor, torch.Tensor, object, int]:
    """This rank's input shard, its output gradient (both on ``device``) and the global ``cu_seqlens``.

    The values do not matter for the timing, so the shard is drawn directly on the device (no global batch is
    built). Returns ``(x_local, grad_local, cu_seqlens or None, sequences)``.
    """
    gen = torch.Generator(device=device).manual_seed(args.seed + spec.length)
    if spec.layout == "bshd":
        shape, cu, seqs = (1, spec.local_tokens, hidden), None, 1
    else:
        lengths = doc_pack(spec.length, args.docs, args.multiple, args.seed)
        cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32, device=device)
        shape, seqs = (spec.local_tokens, hidden), len(lengths)
    x = torch.randn(shape, generator=gen, device=device, dtype=dtype)
    g = torch.randn(shape, generator=gen, device=device, dtype=dtype)
    return x, g, cu, seqs


def mixer_row_step(spec: RowSpec, args, device: torch.device, group) -> tuple[Callable[[], None], int]:
    """The row's mixer (``--model``, ``--dtype``; parallelized over ``group`` for ``cp > 1``) and rank 0's batch:
    its fwd+bwd step and the number of sequences in the batch."""
    dims = bench.MODELS[args.model]
    dtype = getattr(torch, args.dtype)
    torch.manual_seed(args.seed)
    mixer = Mamba2Mixer(**dims, device=device, dtype=dtype)
    if spec.cp > 1:
        parallelize(mixer, group, strategy=spec.strategy, packed_layout=packed_layout(spec.layout))
    x, g, cu, seqs = mixer_batch(spec, dims["hidden_size"], dtype, device, args)
    return bench.mixer_step(mixer, x, g, cu), seqs


def run_mixer_row(spec: RowSpec, args, device: torch.device, clock) -> dict:
    """Rank 0's fwd+bwd of the mixer under the fake group; adds the comm model and the step estimate."""
    dims = bench.MODELS[args.model]
    dtype = getattr(torch, args.dtype)
    shape = ssm_shape(dims)
    with fake_group(spec.cp) as group:
        step, seqs = mixer_row_step(spec, args, device, group)
        timing = timed(step, clock, args.warmup, args.iters, device, spec.cp, count=True)
        del step
        free_memory(device)
        hide = safe_hideable(spec, dims["hidden_size"], shape.d_inner, dtype, device, clock)
    nbytes = dtype.itemsize
    exchanges = mixer_exchanges(
        shape, spec.length, spec.cp, spec.strategy, seqs, dims["conv_kernel"], nbytes, stream=spec.layout == "stream"
    )
    return {
        "ms": timing["ms"],
        "ms_min": timing["ms_min"],
        **peak_fields(timing),
        "counted_bytes": timing["counted_bytes"],
        "collectives": timing["collectives"],
        "plan_bytes": sum(e["bytes"] for e in exchanges),
        "sequences": seqs,
        "hideable_ms": hide,
        "estimates": step_estimates(timing["ms"], [(1, exchanges, hide)], args, passes=1) if spec.cp > 1 else [],
    }


# ------------------------------------------------------------------------------------------------ hybrid rows


def nemotron_config(dims: dict, pattern: str, vocab: int):
    """A ``NemotronHConfig`` with ``pattern``'s layers (random weights follow from it; nothing is downloaded)."""
    from transformers import NemotronHConfig

    return NemotronHConfig(
        vocab_size=vocab,
        layers_block_type=[LAYER_KINDS[c] for c in pattern],
        attn_implementation="sdpa",
        use_cache=False,
        **dims,
    )


def enable_checkpointing(model: nn.Module) -> None:
    """Non-reentrant ``torch.utils.checkpoint`` around every layer (transformers' own switch; the name
    changed in 5.23, the old one still works there)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        if hasattr(model, "activation_checkpointing_enable"):
            model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        else:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})


def build_hybrid(
    dims: dict, pattern: str, args, device: torch.device, group, strategy: str, layout: str = "bshd"
) -> nn.Module:
    """The parallelized, checkpointed (optionally FSDP2-sharded) NemotronH hybrid of ``pattern``'s layers."""
    from transformers import NemotronHForCausalLM

    torch.manual_seed(args.seed)
    with torch.device(device):
        model = NemotronHForCausalLM(nemotron_config(dims, pattern, args.vocab))
    model = model.to(getattr(torch, args.dtype)).train()
    enable_checkpointing(model)
    parallelize(
        model,
        group if group.size() > 1 else None,
        strategy="hidden" if strategy == "plain" else strategy,
        packed_layout=packed_layout(layout),
    )
    if args.fsdp and group.size() > 1:
        from torch.distributed.device_mesh import DeviceMesh
        from torch.distributed.fsdp import fully_shard

        mesh = DeviceMesh.from_group(group, device.type)
        for block in model.model.layers:
            fully_shard(block, mesh=mesh)
        fully_shard(model, mesh=mesh)
    return model


def local_param_bytes(module: nn.Module) -> int:
    """Bytes of this rank's share of ``module``'s parameters (FSDP2 shards count their local part)."""
    total = 0
    for p in module.parameters():
        local = p.to_local() if hasattr(p, "to_local") else p
        total += local.numel() * local.element_size()
    return total


def param_count(module: nn.Module) -> int:
    """Parameters of ``module`` (whole, not this rank's shard)."""
    return sum(p.numel() for p in module.parameters())


class LayerClock:
    """Marks at every layer's entry and exit in the forward pass and at every layer's recompute in the
    backward pass (activation checkpointing runs each layer's forward again right before its backward), so
    each layer's fwd + recompute + bwd time and the rest of the step can be read off one step.

    An entry is the first call, in a pass, of the layer or of any of its direct children: depending on the
    transformers version the checkpoint wraps the layer's ``__call__`` (its hooks run again in the
    recompute) or only its ``forward`` (then only its children's hooks do)."""

    def __init__(self, blocks: list[nn.Module], clock) -> None:
        self.clock = clock
        self.phase = "fwd"
        self.current: list[tuple[str, int, object]] = []
        self.seen: set[tuple[str, int]] = set()
        self.steps: list[list[tuple[str, int, object]]] = []
        self.handles = []
        for i, block in enumerate(blocks):
            for module in (block, *block.children()):
                self.handles.append(module.register_forward_pre_hook(partial(self._mark, "pre", i)))
            self.handles.append(block.register_forward_hook(partial(self._mark_post, i)))

    def _mark(self, what: str, i: int, module, args) -> None:
        if (self.phase, i) in self.seen:
            return
        self.seen.add((self.phase, i))
        self.current.append((f"{self.phase}_{what}", i, self.clock.mark()))

    def _mark_post(self, i: int, module, args, output) -> None:
        if self.phase == "fwd":
            self.current.append(("fwd_post", i, self.clock.mark()))

    def begin(self) -> None:
        self.phase = "fwd"
        self.seen = set()
        self.current = [("begin", -1, self.clock.mark())]

    def backward_begins(self) -> None:
        self.phase = "bwd"
        self.current.append(("bwd_begin", -1, self.clock.mark()))

    def end(self) -> None:
        self.current.append(("end", -1, self.clock.mark()))
        self.steps.append(self.current)
        self.current = []

    def remove(self) -> None:
        for h in self.handles:
            h.remove()

    def layer_times(self, marks: list) -> tuple[dict[int, float], float, float]:
        """``({layer: fwd + recompute + bwd ms}, rest ms, total ms)`` of one recorded step."""
        el = self.clock.elapsed
        per: dict[int, float] = collections.defaultdict(float)
        pre = {i: ev for kind, i, ev in marks if kind == "fwd_pre"}
        for kind, i, ev in marks:
            if kind == "fwd_post" and i in pre:
                per[i] += el(pre[i], ev)
        bwd = [(i, ev) for kind, i, ev in marks if kind == "bwd_pre"] + [(-1, marks[-1][2])]
        for (i, ev), (_, nxt) in zip(bwd, bwd[1:], strict=False):
            per[i] += el(ev, nxt)
        total = el(marks[0][2], marks[-1][2])
        return dict(per), total - sum(per.values()), total

    def kind_times(self, pattern: str, last: int) -> tuple[dict[str, float], float, bool]:
        """Median per-layer ms of each kind of layer and median rest ms over the ``last`` recorded steps, and
        whether every layer was seen once forward and once recomputed in each step (else the per-layer
        times miss their backward and must not be used)."""
        samples: dict[str, list[float]] = collections.defaultdict(list)
        rests = []
        complete = bool(self.steps)
        for marks in self.steps[-last:]:
            recomputed = sorted(i for kind, i, _ in marks if kind == "bwd_pre")
            forward = sorted(i for kind, i, _ in marks if kind == "fwd_post")
            complete &= recomputed == forward == list(range(len(pattern)))
            per, rest, _ = self.layer_times(marks)
            for i, ms in per.items():
                samples[pattern[i]].append(ms)
            rests.append(rest)
        per_kind = {k: statistics.median(v) for k, v in samples.items()}
        return per_kind, statistics.median(rests) if rests else 0.0, complete


def hybrid_batch(spec: RowSpec, args, device) -> tuple[torch.Tensor, torch.Tensor, object, int]:
    """This rank's ``input_ids`` and next-token ``labels`` ``[1, L/cp]`` on ``device``, and ``cu_seqlens``."""
    gen = torch.Generator(device=device).manual_seed(args.seed + spec.length)
    ids = torch.randint(0, args.vocab, (1, spec.local_tokens), generator=gen, device=device)
    labels = torch.randint(0, args.vocab, (1, spec.local_tokens), generator=gen, device=device)
    if spec.layout == "bshd":
        return ids, labels, None, 1
    lengths = doc_pack(spec.length, args.docs, args.multiple, args.seed)
    cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32, device=device)
    return ids, labels, cu, len(lengths)


def hybrid_step(
    model: nn.Module, ids, labels, cu, group, layer_clock: LayerClock, layout: str = "bshd"
) -> Callable[[], None]:
    """One training step's fwd+bwd of ``model`` on this rank's tokens (no optimizer step)."""
    params = list(model.parameters())
    cp_group = group if group.size() > 1 else None

    def step() -> None:
        for p in params:
            p.grad = None
        with mamba_cp.batch_context(cu_seqlens=cu, cp_group=cp_group, packed_layout=packed_layout(layout)):
            layer_clock.begin()
            logits = model(input_ids=ids).logits
            loss = F.cross_entropy(logits.flatten(0, 1).float(), labels.flatten())
            layer_clock.backward_begins()
            loss.backward()
            layer_clock.end()

    return step


def measure_depth(spec: RowSpec, pattern: str, args, device, clock) -> dict:
    """One depth of the hybrid: time, peak, per-kind layer times, parameter bytes per kind."""
    dims = HYBRIDS[args.hybrid]
    with fake_group(spec.cp) as group:
        model = build_hybrid(dims, pattern, args, device, group, spec.strategy, spec.layout)
        blocks = list(model.model.layers)
        kind_bytes: dict[str, list[int]] = collections.defaultdict(list)
        kind_params: dict[str, list[int]] = collections.defaultdict(list)
        for c, block in zip(pattern, blocks, strict=True):
            kind_bytes[c].append(local_param_bytes(block))
            kind_params[c].append(param_count(block))
        layer_clock = LayerClock(blocks, clock)
        ids, labels, cu, seqs = hybrid_batch(spec, args, device)
        step = hybrid_step(model, ids, labels, cu, group, layer_clock, spec.layout)
        timing = timed(step, clock, args.hybrid_warmup, args.hybrid_iters, device, spec.cp, args.count_hybrid_bytes)
        per_kind, rest, complete = layer_clock.kind_times(pattern, args.hybrid_iters)
        layer_clock.remove()
        result = {
            "layers": len(pattern),
            "ms": timing["ms"],
            **peak_fields(timing),
            "counted_bytes": timing["counted_bytes"],
            "collectives": timing["collectives"],
            "layer_param_bytes": sum(sum(v) for v in kind_bytes.values()),
            "kind_param_bytes": {k: statistics.mean(v) for k, v in kind_bytes.items()},
            "kind_params": {k: statistics.mean(v) for k, v in kind_params.items()},
            "other_params": param_count(model) - sum(sum(v) for v in kind_params.values()),
            "kind_ms": per_kind,
            "rest_ms": rest,
            "layer_marks_complete": complete,
            "sequences": seqs,
        }
        del step, model, blocks, layer_clock, ids, labels
    return result


def extrapolate_peak(d1: dict, d2: dict, full_pattern: str) -> dict:
    """The full-depth peak from two measured depths (see the module docstring).

    ``d1`` / ``d2``: ``{"layers", "peak_bytes", "layer_param_bytes", "kind_param_bytes"}``. Weights and
    gradients (two copies of ``kind_param_bytes`` per layer of each kind) are counted exactly; the remaining
    per-layer growth (saved layer inputs) is taken from the measured difference.
    """
    dl = d2["layers"] - d1["layers"]
    if dl <= 0:
        raise ValueError("the second depth must have more layers than the first")
    weights_grads = 2 * (d2["layer_param_bytes"] - d1["layer_param_bytes"])
    per_layer_act = (d2["peak_bytes"] - d1["peak_bytes"] - weights_grads) / dl
    kinds = d2["kind_param_bytes"]
    missing = sorted({c for c in full_pattern if c not in kinds})
    if missing:
        raise ValueError(f"the measured pattern has no layer of kind {missing} that the full pattern needs")
    full_layer_bytes = sum(kinds[c] for c in full_pattern)
    peak = (
        d1["peak_bytes"]
        + (len(full_pattern) - d1["layers"]) * per_layer_act
        + 2 * (full_layer_bytes - d1["layer_param_bytes"])
    )
    return {"peak_bytes": peak, "per_layer_act_bytes": per_layer_act, "layer_param_bytes": full_layer_bytes}


def extrapolate_time(d: dict, full_pattern: str) -> float:
    """Full-depth compute ms: the rest of the step plus each layer's measured time for its kind."""
    return d["rest_ms"] + sum(d["kind_ms"][c] for c in full_pattern)


def extrapolate_time_linearly(d1: dict, d2: dict, layers: int) -> float:
    """Full-depth compute ms, linear in the number of layers through the two measured depths (exact only
    when the measured pattern has the full model's mix of layers)."""
    return d1["ms"] + (layers - d1["layers"]) * (d2["ms"] - d1["ms"]) / (d2["layers"] - d1["layers"])


def run_hybrid_row(spec: RowSpec, args, device: torch.device, clock) -> dict:
    """Two depths of the hybrid, the full-depth extrapolation and the step estimate."""
    dims = HYBRIDS[args.hybrid]
    depths = []
    for k in args.depths:
        try:
            depths.append(measure_depth(spec, args.pattern * k, args, device, clock))
        finally:
            free_memory(device)
    d1, d2 = depths
    full = args.full_pattern
    counts = {c: full.count(c) for c in "M*-"}
    params = d2["other_params"] + sum(d2["kind_params"][c] for c in full)
    linear = extrapolate_time_linearly(d1, d2, len(full))
    per_kind = d2["layer_marks_complete"]
    result = {
        "depths": depths,
        "ms": d2["ms"],
        "peak_bytes": d2["peak_bytes"],
        "sequences": d2["sequences"],
        "full": {
            "layers": len(full),
            "counts": counts,
            "params": params,
            "ms": extrapolate_time(d2, full) if per_kind else linear,
            "ms_linear_in_depth": linear,
            "time_method": "per-kind layer times" if per_kind else "linear in depth (layer marks incomplete)",
        },
    }
    if d1["peak_bytes"] is not None and d2["peak_bytes"] is not None:
        peak = extrapolate_peak(d1, d2, full)
        optim = args.optim_bytes_per_param * params / (spec.cp if args.fsdp and spec.cp > 1 else 1)
        result["full"].update(peak, optim_bytes=optim, train_peak_bytes=peak["peak_bytes"] + optim)
    shape = ssm_shape(dims)
    with fake_group(spec.cp):
        hide = safe_hideable(spec, dims["hidden_size"], shape.d_inner, getattr(torch, args.dtype), device, clock)
    nbytes = getattr(torch, args.dtype).itemsize
    mamba = mixer_exchanges(shape, spec.length, spec.cp, spec.strategy, d2["sequences"], dims["conv_kernel"], nbytes)
    attn = attention_exchanges(
        spec.length, spec.cp, dims["num_attention_heads"], dims["num_key_value_heads"], dims["head_dim"], nbytes
    )
    layers = [(counts["M"], mamba, hide), (counts["*"], attn, {})]
    result["hideable_ms"] = hide
    result["plan_bytes"] = sum(
        n * sum(e["bytes"] * (2 if e["pass"] == "fwd" else 1) for e in ex) for n, ex, _ in layers
    )  # per full-depth step: the forward exchanges run twice under checkpointing
    result["estimates"] = step_estimates(result["full"]["ms"], layers, args, passes=2) if spec.cp > 1 else []
    return result


# ------------------------------------------------------------------------------------------------ running


class Runner:
    """Runs rows in this process, appending every event to the JSONL log and rewriting the report."""

    def __init__(self, args: argparse.Namespace, device: torch.device, log_path: Path, deadline: float) -> None:
        self.args, self.device, self.log_path, self.deadline = args, device, log_path, deadline

    def run(self, specs: list[RowSpec]) -> int:
        """Run every row not yet in the log; returns ``STICKY_EXIT`` if the CUDA context died, else 0."""
        clock = bench.Clock(self.device)
        append(self.log_path, {"event": "env", **environment(self.args, self.device)})
        done = {r["key"] for r in read_rows(self.log_path)}
        for spec in specs:
            if spec.key in done:
                continue
            skip = self.skip_reason(spec)
            if skip:
                self.record(spec, {"status": "skipped", "error": skip, "seconds": 0.0})
                continue
            append(self.log_path, {"event": "start", "key": spec.key})
            if spec.key == self.args.crash_row and self.args.child:
                os._exit(70)  # a test's stand-in for a kernel crash that kills the process
            t0 = time.time()
            try:
                run = run_mixer_row if spec.what == "mixer" else run_hybrid_row
                row = {"status": "ok", **run(spec, self.args, self.device, clock)}
            except Exception as err:  # noqa: BLE001 - every failure is a result of the row
                status = "oom" if isinstance(err, torch.OutOfMemoryError) else "error"
                row = {"status": status, "error": first_line(err)}
                del err
            row["seconds"] = time.time() - t0
            free_memory_safely(self.device)
            sticky = row["status"] == "error" and (is_sticky(row["error"]) or not context_alive(self.device))
            self.record(spec, row)
            if sticky and self.device.type == "cuda":
                print(f"[sim] the CUDA context is unusable after {spec.key}; stopping this process", flush=True)
                return STICKY_EXIT
        return 0

    def skip_reason(self, spec: RowSpec) -> str | None:
        """Why a row is not run: past the budget, predicted to overrun it, or a known kernel crash."""
        now = time.time()
        if now >= self.deadline:
            return f"skipped: budget of {self.args.budget_s:.0f} s reached"
        # The lowest seconds per unit of work seen so far (the first rows pay for Triton's autotuning): a row
        # that would not finish even at that rate is skipped, so that cheaper rows after it still run.
        rates = [r["seconds"] / RowSpec(**r["spec"]).cost() for r in read_rows(self.log_path)
                 if r["spec"]["what"] == spec.what and r["status"] == "ok" and r.get("seconds")]  # fmt: skip
        if rates and now + min(rates) * spec.cost() > self.deadline:
            return f"skipped: predicted {min(rates) * spec.cost():.0f} s would overrun the budget"
        if (
            self.args.int32_guard
            and kernels.selected(self.device, getattr(torch, self.args.dtype))["ssd_chunk_scan"] == "mamba_ssm"
        ):
            dims = bench.MODELS[self.args.model] if spec.what == "mixer" else HYBRIDS[self.args.hybrid]
            shape = ssm_shape(dims)
            return int32_hazard(spec, shape.num_heads, shape.head_dim)
        return None

    def record(self, spec: RowSpec, row: dict) -> None:
        row = {"key": spec.key, "spec": spec._asdict(), **row}
        append(self.log_path, {"event": "row", **row})
        print(row_line(row), flush=True)
        write_report(self.args, self.log_path, png=False)


def free_memory_safely(device: torch.device) -> None:
    with contextlib.suppress(Exception):
        free_memory(device)


def append(path: Path, record: dict) -> None:
    with path.open("a") as f:
        f.write(json.dumps(record, default=str) + "\n")
        f.flush()


def read_log(path: Path) -> list[dict]:
    if not path.exists():
        return []
    out = []
    for line in path.read_text().splitlines():
        with contextlib.suppress(json.JSONDecodeError):
            out.append(json.loads(line))
    return out


def read_rows(path: Path) -> list[dict]:
    """The finished rows of a log (the last record of each key)."""
    rows: dict[str, dict] = {}
    for rec in read_log(path):
        if rec.get("event") == "row":
            rows[rec["key"]] = {k: v for k, v in rec.items() if k != "event"}
    return list(rows.values())


def environment(args, device: torch.device) -> dict:
    """The card, its memory and the software (what every report names)."""
    dtype = getattr(torch, args.dtype)
    cuda = device.type == "cuda"
    return {
        "device_name": torch.cuda.get_device_name(device) if cuda else (platform.processor() or "cpu"),
        "card_memory_bytes": torch.cuda.get_device_properties(device).total_memory if cuda else None,
        "torch": torch.__version__,
        "transformers": _version("transformers"),
        "triton": _version("triton"),
        "kernels": kernels.selected(device, dtype, 4),
        "mamba_ssm_import": args.mamba_ssm_import,
        "int32_guard": args.int32_guard,
        "library_splits_ssd": library_splits_ssd(),
        "python": platform.python_version(),
    }


def _version(name: str) -> str | None:
    """An installed distribution's version, without importing it."""
    from importlib import metadata

    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None


def run_isolated(argv: list[str], args, log_path: Path, deadline: float) -> None:
    """Run the rows in child processes, restarting one after a crash (the crashed row marked with it)."""
    cmd = [sys.executable, str(Path(__file__).resolve()), *argv, "--child", str(log_path), "--deadline", str(deadline)]
    env = dict(os.environ)
    src = str(Path(mamba_cp.__file__).resolve().parents[1])
    env["PYTHONPATH"] = os.pathsep.join([src, *([env["PYTHONPATH"]] if env.get("PYTHONPATH") else [])])
    for attempt in range(len(plan_rows(args)) + 1):
        tail: collections.deque[str] = collections.deque(maxlen=40)
        proc = subprocess.Popen(cmd, stderr=subprocess.PIPE, text=True, env=env)
        reader = threading.Thread(target=_tee, args=(proc.stderr, tail), daemon=True)
        reader.start()
        rc = proc.wait()
        reader.join(timeout=5)
        if rc == 0:
            return
        events = read_log(log_path)
        done = {e["key"] for e in events if e.get("event") == "row"}
        started = [e["key"] for e in events if e.get("event") == "start"]
        crashed = next((k for k in reversed(started) if k not in done), None)
        if crashed is None and rc != STICKY_EXIT:
            print(f"[sim] child exited with {rc} outside any row; last stderr:\n{''.join(tail)}", flush=True)
            return
        if crashed is not None:
            message = _crash_message(tail, rc)
            spec = RowSpec(**_spec_of(crashed))
            row = {"key": crashed, "spec": spec._asdict(), "status": "error", "error": message}
            append(log_path, {"event": "row", **row, "seconds": None})
            print(row_line(row), flush=True)
        print(f"[sim] restarting the child process (restart {attempt + 1})", flush=True)


def _tee(stream, tail: collections.deque) -> None:
    for line in stream:
        sys.stderr.write(line)
        tail.append(line)


def _crash_message(tail: collections.deque, rc: int) -> str:
    lines = [ln.strip() for ln in tail if ln.strip()]
    hits = [ln for ln in lines if "error" in ln.lower() or "exception" in ln.lower()]
    what = (hits or lines or ["(no output)"])[-1][:400]
    return f"crash (child exit {rc}): {what}"


def _spec_of(key: str) -> dict:
    what, layout, length, cp, strategy = key.split("/")
    return {"what": what, "layout": layout, "length": int(length[1:]), "cp": int(cp[2:]), "strategy": strategy}


# ------------------------------------------------------------------------------------------------ report


def build_report(args, rows: list[dict], env: dict, command: str) -> dict:
    """The JSON report: settings, method, every row, the longest trainable lengths."""
    capacity = None
    if env.get("card_memory_bytes"):
        capacity = env["card_memory_bytes"] - args.headroom_gib * 2**30
    return {
        "tool": "simulate_rank",
        "command": command,
        "env": env,
        "settings": {
            "mixer_model": args.model,
            "mixer_config": bench.MODELS[args.model],
            "hybrid_model": args.hybrid,
            "hybrid_config": HYBRIDS[args.hybrid],
            "pattern": args.pattern,
            "depths": args.depths,
            "full_pattern": args.full_pattern,
            "vocab": args.vocab,
            "fsdp": args.fsdp,
            "dtype": args.dtype,
            "docs": args.docs,
            "doc_multiple": args.multiple,
            "bandwidth_gbps": args.bandwidth_gbps,
            "latency_us": args.latency_us,
            "optim_bytes_per_param": args.optim_bytes_per_param,
            "capacity_bytes": capacity,
            "headroom_gib": args.headroom_gib,
            "warmup": args.warmup,
            "iters": args.iters,
            "hybrid_warmup": args.hybrid_warmup,
            "hybrid_iters": args.hybrid_iters,
        },
        "method": METHOD,
        "rows": sorted(rows, key=_row_order),
        "longest": longest_table(rows, capacity),
    }


METHOD = {
    "fake_group": "torch's fake process group (FakeStore + 'fake' backend, world_size=cp, rank 0): collectives "
    "return at once without moving data, so the numbers are rank 0's compute and memory alone",
    "peak": "torch.cuda.max_memory_allocated over the timed steps after reset_peak_memory_stats; the batch shard, "
    "weights and gradients are allocated before the reset (counted); optimizer state is not; None on CPU "
    "(torch.cuda cannot measure host memory)",
    "extrapolation": "hybrid peak measured at two depths; per-layer activation growth = (peak difference - "
    "weight+gradient bytes difference) / layer difference; full-depth peak = shallow peak + that growth per "
    "extra layer + the extra layers' weight+gradient bytes; full-depth time = rest of the step + per-kind "
    "layer times (events at every layer's forward and recompute); longest L = where the full-depth peak "
    "crosses the card's memory, interpolated linearly in L (extrapolated past the longest measured L when "
    "all fit)",
    "estimate": "ESTIMATE: step = measured per-rank compute + exposed communication; comm per collective = "
    "latency + off-rank bytes / bandwidth (mamba_cp.traffic.STRATEGY_BYTES for the mixers, the head-parallel "
    "all-to-alls for attention; backward = forward; forward twice under checkpointing); exposed = max(0, "
    "comm - time of the z GEMM that hidden-parallel's fused projection runs during that exchange, timed "
    "separately on the same shapes); gradient reduction over CP not included",
}


def _row_order(r: dict) -> tuple:
    s = r["spec"]
    return (s["what"], s["layout"], s["length"], s["cp"], s["strategy"])


def _capacity_points(rows: list[dict], key: Callable[[dict], float | None]) -> list[tuple[int, float | None, str]]:
    pts = []
    for r in rows:
        pts.append((r["spec"]["length"], key(r) if r["status"] == "ok" else None, r["status"]))
    return sorted(pts)


def longest_length(points: list[tuple[int, float | None, str]], capacity: float, extrapolate: bool) -> dict:
    """Longest ``L`` whose peak fits ``capacity`` from ``(L, peak or None, status)`` points.

    A fitting point followed by a measured peak above capacity: linear interpolation between them. Followed
    by an out-of-memory row: bounded (``>= L``, ``< L_oom``). All fit: with ``extrapolate``, linear
    extrapolation from the two longest; else ``>= L``. Returns ``{"L", "how"}`` (``L`` None when nothing fits).
    """
    fit = [(L, p) for L, p, s in points if s == "ok" and p is not None and p <= capacity]
    if not fit:
        tried = [L for L, _, s in points if s in ("ok", "oom")]
        return {"L": None, "how": f"< {fmt_len(min(tried))}" if tried else "no data"}
    l0, p0 = max(fit)
    above = [(n, p, s) for n, p, s in points if n > l0 and (s == "oom" or (s == "ok" and p is not None))]
    unmeasured = [(n, s) for n, _, s in points if n > l0 and s not in ("ok", "oom")]
    note = f"; {fmt_len(min(unmeasured)[0])} not measured ({min(unmeasured)[1]})" if unmeasured else ""
    if above:
        l1, p1, s1 = min(above)
        if s1 == "ok" and p1 is not None and p1 > p0:
            value = l0 + (capacity - p0) / (p1 - p0) * (l1 - l0)
            return {"L": value, "how": f"interpolated between {fmt_len(l0)} and {fmt_len(l1)}"}
        return {"L": l0, "how": f">= {fmt_len(l0)}, < {fmt_len(l1)} ({s1}){note}"}
    if extrapolate and len(fit) >= 2:
        (la, pa), (lb, pb) = sorted(fit)[-2:]
        if pb > pa:
            value = lb + (capacity - pb) / ((pb - pa) / (lb - la))
            return {"L": value, "how": f"extrapolated from {fmt_len(la)} and {fmt_len(lb)}{note}"}
    return {"L": l0, "how": f">= {fmt_len(l0)} (longest measured){note}"}


def longest_table(rows: list[dict], capacity: float | None) -> list[dict]:
    """Longest trainable L per what, layout, strategy and cp (mixer: bounded by OOM rows; hybrid: the
    full-depth extrapolated peak, with and without optimizer state)."""
    if capacity is None:
        return []
    groups: dict[tuple, list[dict]] = collections.defaultdict(list)
    for r in rows:
        s = r["spec"]
        groups[(s["what"], s["layout"], s["strategy"], s["cp"])].append(r)
    out = []
    for (what, layout, strategy, cp), members in sorted(groups.items()):
        entry = {"what": what, "layout": layout, "strategy": strategy, "cp": cp}
        if what == "mixer":
            entry["fwd_bwd"] = longest_length(_capacity_points(members, lambda r: r["peak_bytes"]), capacity, False)
        else:

            def full(name: str):
                return lambda r: r.get("full", {}).get(name)

            for col, name in (("fwd_bwd", "peak_bytes"), ("train", "train_peak_bytes")):
                entry[col] = longest_length(_capacity_points(members, full(name)), capacity, True)
        out.append(entry)
    return out


def fmt_len(n: float | None) -> str:
    if n is None:
        return "-"
    if n >= 2**20:
        return f"{n / 2**20:.2f}M".replace(".00M", "M")
    if n >= 1024:
        return f"{n / 1024:.0f}K"
    return str(int(n))


def _gib(v) -> str:
    return "-" if v is None else f"{v / 2**30:.1f}"


def _ms(v) -> str:
    if v is None:
        return "-"
    return f"{v:.0f}" if v >= 10000 else f"{v:.1f}"


def row_line(row: dict) -> str:
    """The line printed when a row finishes."""
    s = row["spec"]
    head = f"[sim] {s['what']} {s['layout']} {fmt_len(s['length'])} cp={s['cp']} {s['strategy']}:"
    secs = f" [{row['seconds']:.1f} s]" if row.get("seconds") else ""
    if row["status"] != "ok":
        return f"{head} {row['status'].upper()} {row.get('error', '')[:200]}{secs}"
    peak = row.get("peak_bytes")
    text = f"{head} {_ms(row['ms'])} ms, " + ("peak n/a (CPU)" if peak is None else f"{_gib(peak)} GiB")
    if s["what"] == "hybrid":
        full = row["full"]
        text += f" ({row['depths'][-1]['layers']} layers); {full['layers']} layers: {_ms(full['ms'])} ms" + (
            f", {_gib(full['peak_bytes'])} GiB (extrap.)" if full.get("peak_bytes") else ""
        )
    elif row.get("act_bytes") is not None:
        text += f" (act. {_gib(row['act_bytes'])})"
    if row.get("estimates"):
        est = row["estimates"][0]
        text += (
            f"; est. step @{est['bandwidth_gbps']:g} GB/s {_ms(est['step_ms'])} ms (+{est['exposed_ms']:.1f} exposed)"
        )
    return text + secs


def _cell(r: dict | None) -> str:
    if r is None:
        return ""
    if r["status"] == "ok":
        return f"{_ms(r['ms'])} / {_gib(r.get('peak_bytes'))}"
    return {"oom": "OOM", "skipped": "skip", "error": "err"}[r["status"]]


def markdown(report: dict, summary: bool = False) -> str:
    """The report as markdown: per-rank time and memory, longest trainable L, the step estimate. ``summary``:
    only the per-rank and longest-L tables (what the end of a run prints; the file has everything)."""
    env, st = report["env"], report["settings"]
    rows = report["rows"]
    cap = st["capacity_bytes"]
    card = (
        f"{env['device_name']}, {_gib(env['card_memory_bytes'])} GiB (total_memory read from the device; "
        f"capacity used {_gib(cap)} GiB)"
        if env.get("card_memory_bytes")
        else f"{env['device_name']} (CPU: no peak memory)"
    )
    lines = [
        "# simulate_rank: one CP rank on one device (fake process group)",
        "",
        f"card: {card}; torch {env['torch']}, transformers {env['transformers']}, triton {env.get('triton')}; "
        f"kernels {env['kernels']}; {st['dtype']}",
        f"command: `{report['command']}`",
        "",
    ]
    if summary:
        return "\n".join(lines + _mixer_tables(rows) + _hybrid_tables(rows, st) + _longest_tables(report["longest"]))
    lines += ["", *[f"* **{k}**: {v}" for k, v in report["method"].items()]]
    lines += _mixer_tables(rows)
    lines += _hybrid_tables(rows, st)
    lines += _longest_tables(report["longest"])
    lines += _estimate_tables(rows, st)
    errors = sorted({(r["status"], r.get("error", "")) for r in rows if r["status"] != "ok"})
    if errors:
        lines += ["", "## Rows that did not run", ""]
        for status, err in errors:
            keys = [fmt_key(r) for r in rows if r["status"] == status and r.get("error", "") == err]
            lines.append(f"* {status}: {err} ({len(keys)}: {', '.join(keys[:8])}{' ...' if len(keys) > 8 else ''})")
    return "\n".join(lines) + "\n"


def fmt_key(r: dict) -> str:
    s = r["spec"]
    return f"{s['what']} {s['layout']} {fmt_len(s['length'])} cp{s['cp']} {s['strategy']}"


def _columns(rows: list[dict]) -> list[tuple[int, str]]:
    return sorted({(r["spec"]["cp"], r["spec"]["strategy"]) for r in rows})


def _mixer_tables(rows: list[dict]) -> list[str]:
    mixer = [r for r in rows if r["spec"]["what"] == "mixer"]
    if not mixer:
        return []
    cols = _columns(mixer)
    index = {(r["spec"]["layout"], r["spec"]["length"], r["spec"]["cp"], r["spec"]["strategy"]): r for r in mixer}
    lines = [
        "",
        "## Mixer: rank 0's fwd+bwd ms / peak GiB",
        "",
        "| layout | L | " + " | ".join(f"cp={c} {s}" for c, s in cols) + " |",
        "|---|---|" + "---|" * len(cols),
    ]
    for layout, length in sorted({(k[0], k[1]) for k in index}):
        cells = [_cell(index.get((layout, length, c, s))) for c, s in cols]
        lines.append(f"| {layout} | {fmt_len(length)} | " + " | ".join(cells) + " |")
    return lines


def _hybrid_tables(rows: list[dict], st: dict) -> list[str]:
    hybrid = [r for r in rows if r["spec"]["what"] == "hybrid"]
    if not hybrid:
        return []
    depth_names = " / ".join(str(len(st["pattern"]) * k) for k in st["depths"])
    lines = [
        "",
        f"## Hybrid: measured at {depth_names} layers (`{st['pattern']}` x {st['depths']}), full depth "
        f"{len(st['full_pattern'])} layers extrapolated{' (FSDP2)' if st['fsdp'] else ''}",
        "",
        f"| layout | L | cp | strategy | ms ({depth_names} layers) | peak GiB ({depth_names}) | full-depth ms "
        "(extrap.) | full-depth peak GiB (extrap.) | + optimizer GiB | status |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in hybrid:
        s = r["spec"]
        head = f"| {s['layout']} | {fmt_len(s['length'])} | {s['cp']} | {s['strategy']} |"
        if r["status"] != "ok":
            lines.append(f"{head} - | - | - | - | - | {r['status']}: {r.get('error', '')[:120]} |")
            continue
        d = r["depths"]
        full = r["full"]
        lines.append(
            f"{head} {' / '.join(_ms(x['ms']) for x in d)} | {' / '.join(_gib(x['peak_bytes']) for x in d)} | "
            f"{_ms(full['ms'])} | {_gib(full.get('peak_bytes'))} | {_gib(full.get('train_peak_bytes'))} | ok |"
        )
    return lines


def _longest_tables(longest: list[dict]) -> list[str]:
    if not longest:
        return ["", "## Longest trainable L", "", "No card memory (CPU run): not computed."]
    lines = []
    for what, col, title in (
        ("mixer", "fwd_bwd", "mixer alone, bounded by the rows that ran out of memory"),
        ("hybrid", "fwd_bwd", "full-depth hybrid, fwd+bwd (weights, gradients, activations), extrapolated"),
        ("hybrid", "train", "full-depth hybrid with optimizer state, extrapolated"),
    ):
        entries = [e for e in longest if e["what"] == what and col in e]
        if not entries:
            continue
        cps = sorted({e["cp"] for e in entries})
        lines += [
            "",
            f"## Longest trainable L: {title}",
            "",
            "| layout | strategy | " + " | ".join(f"cp={c}" for c in cps) + " |",
            "|---|---|" + "---|" * len(cps),
        ]
        for layout, strategy in sorted({(e["layout"], e["strategy"]) for e in entries}):
            cells = []
            for c in cps:
                e = next((x for x in entries if (x["layout"], x["strategy"], x["cp"]) == (layout, strategy, c)), None)
                cells.append("" if e is None else _longest_cell(e[col]))
            lines.append(f"| {layout} | {strategy} | " + " | ".join(cells) + " |")
    return lines


def _longest_cell(entry: dict) -> str:
    how = entry["how"]
    return how if how.startswith((">", "<", "no")) else f"{fmt_len(entry['L'])} ({how})"


def _estimate_tables(rows: list[dict], st: dict) -> list[str]:
    timed_rows = [r for r in rows if r["status"] == "ok" and r.get("estimates")]
    if not timed_rows:
        return []
    bws = " | ".join(f"exposed / step ms @{b:g} GB/s (est.)" for b in st["bandwidth_gbps"])
    lines = [
        "",
        "## Whole-step ESTIMATE (measured compute + modelled communication; hybrid at full depth)",
        "",
        f"| what | layout | L | cp | strategy | compute ms | comm MB/step | hideable GEMM ms | {bws} |",
        "|---|---|---|---|---|---|---|---|" + "---|" * len(st["bandwidth_gbps"]),
    ]
    for r in timed_rows:
        s = r["spec"]
        est = r["estimates"]
        hide = sum(r.get("hideable_ms", {}).values()) if r.get("hideable_ms") else 0.0
        cells = " | ".join(f"{e['exposed_ms']:.1f} / {_ms(e['step_ms'])}" for e in est)
        lines.append(
            f"| {s['what']} | {s['layout']} | {fmt_len(s['length'])} | {s['cp']} | {s['strategy']} | "
            f"{_ms(est[0]['compute_ms'])} | {est[0]['comm_bytes'] / 1e6:.0f} | {hide:.1f} | {cells} |"
        )
    return lines


def _series(r: dict) -> tuple[str, int, str]:
    return r["spec"]["layout"], r["spec"]["cp"], r["spec"]["strategy"]


def plot(report: dict, path: Path) -> str:
    """Per-rank ms and peak GiB against L (hybrid: full depth, extrapolated), one line per cp/strategy/layout."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except Exception as err:  # noqa: BLE001
        return f"no PNG: matplotlib unavailable ({err})"
    whats = [
        w for w in ("mixer", "hybrid") if any(r["spec"]["what"] == w and r["status"] == "ok" for r in report["rows"])
    ]
    if not whats:
        return "no PNG: no finished rows"
    fig, axes = plt.subplots(len(whats), 2, figsize=(13, 4.5 * len(whats)), squeeze=False)
    cap = report["settings"]["capacity_bytes"]
    for ax_row, what in zip(axes, whats, strict=True):
        rows = [r for r in report["rows"] if r["spec"]["what"] == what and r["status"] == "ok"]
        series = sorted({_series(r) for r in rows})
        for layout, cp, strategy in series:
            pts = sorted(
                ((r["spec"]["length"], r) for r in rows if _series(r) == (layout, cp, strategy)), key=lambda t: t[0]
            )
            xs = [n for n, _ in pts]
            full = what == "hybrid"
            ms = [r["full"]["ms"] if full else r["ms"] for _, r in pts]
            peak = [(r["full"].get("peak_bytes") if full else r.get("peak_bytes")) for _, r in pts]
            style = "-" if layout == "bshd" else "--"
            label = f"cp={cp} {strategy} {layout}"
            ax_row[0].plot(xs, ms, style, marker="o", label=label)
            if any(p is not None for p in peak):
                ax_row[1].plot(xs, [None if p is None else p / 2**30 for p in peak], style, marker="o", label=label)
        if cap:
            ax_row[1].axhline(cap / 2**30, color="k", lw=0.8, ls=":")
        suffix = " (full depth, extrapolated)" if what == "hybrid" else ""
        for ax, title in zip(ax_row, (f"{what}: rank fwd+bwd ms{suffix}", f"{what}: peak GiB{suffix}"), strict=True):
            ax.set_xscale("log", base=2)
            ax.set_yscale("log")
            ax.set_xlabel("global sequence length L")
            ax.set_title(title)
            ax.grid(True, alpha=0.3)
            ax.legend(fontsize=6, ncol=2)
    fig.suptitle(f"simulate_rank: {report['env']['device_name']} (one rank, fake process group)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return f"wrote {path}"


def write_report(args, log_path: Path, png: bool, rows: list[dict] | None = None, env: dict | None = None) -> dict:
    """Rewrite ``<stem>.json`` and ``<stem>.md`` (and the PNG when ``png``) from the log; returns the report."""
    if env is None:
        envs = [e for e in read_log(log_path) if e.get("event") == "env"]
        env = {k: v for k, v in envs[-1].items() if k != "event"} if envs else {"device_name": "?", "torch": "?"}
        env.setdefault("transformers", "?")
        env.setdefault("kernels", {})
        env.setdefault("card_memory_bytes", None)
    rows = read_rows(log_path) if rows is None else rows
    report = build_report(args, rows, env, args.command)
    out = Path(args.out)
    (out / f"{args.stem}.json").write_text(json.dumps(report, indent=1, default=str))
    (out / f"{args.stem}.md").write_text(markdown(report))
    if png:
        report["png"] = plot(report, out / f"{args.stem}.png")
    return report


# ------------------------------------------------------------------------------------------------ main


def _ints(text: str) -> list[int]:
    return [int(float(v)) if "e" in v.lower() else _size(v) for v in text.split(",") if v]


def _size(v: str) -> int:
    v = v.strip().upper()
    mult = {"K": 1024, "M": 2**20}.get(v[-1:], 1)
    return int(float(v[:-1] if mult > 1 else v) * mult)


def _floats(text: str) -> list[float]:
    return [float(v) for v in text.split(",") if v]


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="simulate_rank", description=__doc__.split("\n\n")[0])
    p.add_argument("--device", choices=["auto", "cuda", "cpu"], default="auto")
    p.add_argument("--what", default="mixer,hybrid", help="comma-separated: mixer, hybrid")
    p.add_argument("--lengths", default=None, help="global L list, K/M suffixes (default 128K..2M; CPU 256,512)")
    p.add_argument("--cps", default="1,2,4,8,16", help="CP sizes (1 = the plain model)")
    p.add_argument("--strategies", default="hidden,state_passing")
    p.add_argument("--layouts", default="bshd,thd")
    p.add_argument("--docs", type=int, default=64, help="documents in a packed (thd) batch")
    p.add_argument("--model", default=None, help="mixer: a bench_mixer.MODELS key (default nemotron8b; CPU tiny)")
    p.add_argument("--hybrid", default=None, help="hybrid width: a HYBRIDS key (default nemotron8b; CPU tiny)")
    p.add_argument("--pattern", default="M-M*-", help="the measured unit of layers (M Mamba2, * attention, - MLP)")
    p.add_argument("--depths", default="1,2", help="two repetition counts of --pattern to measure")
    p.add_argument("--full-layers", type=int, default=52, help="full-depth layers (52: NemotronH-8B's pattern)")
    p.add_argument("--full-pattern", default=None, help="full-depth pattern (default: NemotronH-8B's for 52 layers)")
    p.add_argument("--vocab", type=int, default=1024, help="hybrid vocabulary (small: logits stay small)")
    p.add_argument("--fsdp", action="store_true", help="hybrid: FSDP2 fully_shard every layer over the fake group")
    p.add_argument("--dtype", default=None, help="default bfloat16 on CUDA, float32 on CPU")
    p.add_argument("--warmup", type=int, default=None, help="mixer warm-up steps (default 2; CPU 1)")
    p.add_argument("--iters", type=int, default=None, help="mixer timed steps (default 5; CPU 2)")
    p.add_argument("--hybrid-warmup", type=int, default=1)
    p.add_argument("--hybrid-iters", type=int, default=None, help="hybrid timed steps (default 2; CPU 1)")
    p.add_argument("--bandwidth-gbps", default="150,25", help="GB/s per GPU, one estimate column each")
    p.add_argument("--latency-us", default=None, help="per-collective latency per bandwidth (default 10,30)")
    p.add_argument("--optim-bytes-per-param", type=float, default=12.0, help="fp32 master + Adam m, v")
    p.add_argument("--headroom-gib", type=float, default=0.0, help="card memory kept free in the longest-L rule")
    p.add_argument("--int32-guard", choices=["auto", "on", "off"], default="auto",
                   help="skip rows mamba_ssm's SSD kernel crashes on (auto: unless mamba_cp splits calls)")  # fmt: skip
    p.add_argument("--budget-s", type=float, default=1e9, help="start no row after this many seconds")
    p.add_argument("--isolate", choices=["auto", "on", "off"], default="auto", help="rows in a child process")
    p.add_argument("--out", default="benchmarks/results")
    p.add_argument("--tag", default="")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--merge", nargs="+", default=None, help="rebuild the report from these simulate_rank JSONs")
    p.add_argument("--count-hybrid-bytes", action="store_true", help="count the hybrid's collectives (slow)")
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)
    p.add_argument("--crash-row", default=None, help=argparse.SUPPRESS)  # fault injection for the tests
    p.add_argument("--deadline", type=float, default=None, help=argparse.SUPPRESS)
    return p.parse_args(argv)


def resolve(args: argparse.Namespace, argv: list[str]) -> argparse.Namespace:
    """Defaults that depend on the device, and parsed lists."""
    dev = args.device if args.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    cpu = dev == "cpu"
    args.device = dev
    args.what = [w for w in args.what.split(",") if w]
    bad = set(args.what) - {"mixer", "hybrid"}
    if bad:
        raise SystemExit(f"--what takes mixer,hybrid; got {sorted(bad)}")
    args.lengths = _ints(args.lengths or ("256,512" if cpu else "128K,256K,512K,1M,2M"))
    args.cps = _ints(args.cps)
    args.strategies = [s for s in args.strategies.split(",") if s]
    args.layouts = [s for s in args.layouts.split(",") if s]
    args.model = args.model or ("tiny" if cpu else "nemotron8b")
    args.hybrid = args.hybrid or ("tiny" if cpu else "nemotron8b")
    args.dtype = args.dtype or ("float32" if cpu else "bfloat16")
    args.warmup = args.warmup if args.warmup is not None else (1 if cpu else 2)
    args.iters = args.iters if args.iters is not None else (2 if cpu else 5)
    args.hybrid_iters = args.hybrid_iters if args.hybrid_iters is not None else (1 if cpu else 2)
    args.depths = _ints(args.depths)
    if len(args.depths) != 2 or args.depths[0] >= args.depths[1]:
        raise SystemExit("--depths takes two increasing repetition counts, e.g. 1,2")
    if args.full_pattern is None:
        if args.full_layers == len(NEMOTRON_H_8B_PATTERN):
            args.full_pattern = NEMOTRON_H_8B_PATTERN
        else:
            args.full_pattern = (args.pattern * (args.full_layers // len(args.pattern) + 1))[: args.full_layers]
    args.bandwidth_gbps = _floats(args.bandwidth_gbps)
    lat = _floats(args.latency_us) if args.latency_us else [10.0, 30.0]
    args.latency_us = (lat + [lat[-1]] * len(args.bandwidth_gbps))[: len(args.bandwidth_gbps)]
    args.multiple = 2 * max(args.cps)  # every packed document divides by 2*cp for every cp: one pack for all rows
    args.stem = f"simulate_rank{('_' + args.tag) if args.tag else ''}"
    args.isolate = args.isolate == "on" or (args.isolate == "auto" and not cpu)
    args.int32_guard = args.int32_guard == "on" or (args.int32_guard == "auto" and not library_splits_ssd())
    args.mamba_ssm_import = "not used"
    args.command = "python benchmarks/simulate_rank.py " + " ".join(
        a for a in _strip_private(argv) if not a.startswith("--deadline")
    )
    return args


def _strip_private(argv: list[str]) -> list[str]:
    out, skip = [], False
    for a in argv:
        if skip:
            skip = False
            continue
        if a in ("--child", "--deadline"):
            skip = True
            continue
        out.append(a)
    return out


_MERGED_SETTINGS = {
    "mixer_model": "model", "hybrid_model": "hybrid", "pattern": "pattern", "depths": "depths",
    "full_pattern": "full_pattern", "vocab": "vocab", "fsdp": "fsdp", "dtype": "dtype", "docs": "docs",
    "doc_multiple": "multiple", "bandwidth_gbps": "bandwidth_gbps", "latency_us": "latency_us",
    "optim_bytes_per_param": "optim_bytes_per_param", "warmup": "warmup", "iters": "iters",
    "hybrid_warmup": "hybrid_warmup", "hybrid_iters": "hybrid_iters",
}  # fmt: skip
"""Report settings a merge takes from the first merged run (the rows were measured with them)."""


def merge(args, paths: list[str]) -> int:
    """Rebuild the report (tables, longest L, PNG) from several runs' JSONs; later rows of a key win. The
    settings are the first run's (``--headroom-gib`` is this call's)."""
    rows: dict[str, dict] = {}
    env = None
    for path in paths:
        report = json.loads(Path(path).read_text())
        if env is None:
            env = report["env"]
            for key, attr in _MERGED_SETTINGS.items():
                setattr(args, attr, report["settings"][key])
        for r in report["rows"]:
            rows[r["key"]] = r
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    report = write_report(args, out / f"{args.stem}.rows.jsonl", png=True, rows=list(rows.values()), env=env)
    print(markdown(report, summary=True), flush=True)
    print(f"[sim] merged {len(rows)} rows from {len(paths)} files into {out / args.stem}.json; {report['png']}")
    return 0


def main(argv: list[str] | None = None) -> int:
    """Entry point (``mamba-cp bench --simulate`` passes its remaining arguments here); returns an exit code."""
    argv = list(sys.argv[1:] if argv is None else argv)
    args = resolve(parse_args(argv), argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if args.merge:
        return merge(args, args.merge)
    device = torch.device(args.device)
    if args.child:  # one child process of an isolated run
        if device.type == "cuda":
            args.mamba_ssm_import = bench.expose_mamba_ssm_triton()
        return Runner(args, device, Path(args.child), args.deadline).run(plan_rows(args))
    log_path = out / f"{args.stem}.rows.jsonl"
    log_path.write_text("")  # a new run
    deadline = time.time() + args.budget_s
    specs = plan_rows(args)
    print(f"[sim] {len(specs)} rows on {args.device}; budget {args.budget_s:g} s; out {out}", flush=True)
    if args.isolate:
        run_isolated(_strip_private(argv), args, log_path, deadline)
    else:
        if device.type == "cuda":
            args.mamba_ssm_import = bench.expose_mamba_ssm_triton()
        if Runner(args, device, log_path, deadline).run(specs) == STICKY_EXIT:
            print("[sim] stopped: the CUDA context died (run with --isolate on to restart and go on)", flush=True)
    done = {r["key"] for r in read_rows(log_path)}
    for spec in specs:  # rows a stopped run never reached
        if spec.key not in done:
            row = {"key": spec.key, "spec": spec._asdict(), "status": "skipped", "error": "not reached"}
            append(log_path, {"event": "row", **row, "seconds": None})
    report = write_report(args, log_path, png=True)
    print(markdown(report, summary=True), flush=True)
    print(f"[sim] wrote {out / args.stem}.json and .md; {report['png']}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
