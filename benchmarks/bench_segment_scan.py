"""Benchmark the fused segment kernels (:mod:`mamba_cp.kernels.segment_scan`) on one GPU.

For each layout and local token count it times, forward and forward + backward, the two per-segment ops of
state passing:

* ``states``: the segment summaries ``final[s] = sum_{t in s} w_t x_t B_t^T`` (backward: ``dx, dB, dw``);
* ``correction``: ``y = y0 + scale * C . h_in[seg]`` (backward: ``dy0 = dy, dC, dh_in, dscale``);

with three numbers per row: the new Triton path (``triton``), today's batched matmuls over the slot grid
(``legacy``: ``SegmentStates`` / ``StateCorrection`` of the state-passing module, with the slot layout of
``mamba_cp.segments.build_segment_plan``), and a bandwidth floor (the bytes an ideal fused kernel reads and
writes, at ``--bandwidth`` TB/s). Times are medians of CUDA events. Every row is checked against the readable
float32 reference on a slice (the heads of group 0 and the segments in the first tokens: the full
reference contracts over an ``[S, T]`` membership matrix, too large at these sizes), for both paths.

Layouts: ``bshd`` is one row of a BSHD batch (2 segments of ``T/2``); ``docsD-cpC`` is a packed batch of ``D``
documents (mixed lengths, log-uniform over ~30x) sharded head-tail over ``C`` ranks, seen from rank 0: 2
segments of every document, ``2 D`` in all.

Prints one line per row and appends one JSON line per row to ``$OUT/bench_segment_scan.jsonl`` (``--out``).
Exits 0 with a message when CUDA is absent. ``--budget-s`` stops starting rows when the time is nearly spent
(rows run from the smallest ``T`` up).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from mamba_cp.kernels import segment_scan as ss

SHAPE = {"H": 128, "P": 64, "G": 8, "N": 128}
"""NemotronH-8B-like mixer: 128 heads x 64, 8 groups, d_state 128."""
CHECK_TOKENS = 1 << 16
"""The correctness slice covers the segments that end within this many first tokens (at least one segment)..."""
CHECK_CELLS = 1 << 21
"""... and at most this many (segments x tokens) cells: the reference's einsum forms a ``[k, T_s, N]`` float32
intermediate per group (1 GB at this bound)."""


# ------------------------------------------------------------------------------------------------ set-up


def legacy_ops() -> tuple[type | None, type | None, str]:
    """Today's ``SegmentStates`` and ``StateCorrection`` (wherever the refactor put them) and where they came from."""
    for name in ("mamba_cp.strategies.state_passing", "mamba_cp.state_passing"):
        try:
            module = __import__(name, fromlist=["SegmentStates", "StateCorrection"])
            return module.SegmentStates, module.StateCorrection, name
        except (ImportError, AttributeError):
            continue
    return None, None, "not found (neither mamba_cp.strategies.state_passing nor mamba_cp.state_passing)"


def doc_lengths(total: int, docs: int, multiple: int, seed: int) -> list[int]:
    """``docs`` mixed lengths (log-uniform over ~30x), each a multiple of ``multiple``, summing to ``total``."""
    gen = torch.Generator().manual_seed(seed)
    weights = torch.exp(torch.rand(docs, generator=gen) * math.log(30.0))
    units = total // multiple
    raw = (weights / weights.sum() * (units - docs)).floor().long() + 1  # every document gets >= 1 unit
    raw[-1] += units - int(raw.sum())
    return [int(n) * multiple for n in raw]


@dataclass
class Layout:
    name: str
    starts: list[int]
    stops: list[int]
    slots: object | None
    """The legacy path's ``SlotLayout`` (None when it could not be built)."""
    note: str = ""


def make_layout(kind: str, tokens: int, device: torch.device, seed: int) -> Layout:
    """Segments of rank 0 for ``kind`` (``bshd`` or ``docsD-cpC``) and ``tokens`` local tokens."""
    from mamba_cp import segments

    if kind == "bshd":
        starts, stops = ss.row_segments(2, tokens // 2)
        try:
            plan = segments.build_segment_plan(2, 0, 1, tokens, None, halo=3, block_size=128, device=device)
            return Layout(kind, starts, stops, plan.slots)
        except Exception as err:  # noqa: BLE001 - the refactor may have changed the plan's API
            return Layout(kind, starts, stops, None, f"legacy slot layout unavailable: {err!r}")
    docs, cp = (int(part[len(tag) :]) for part, tag in zip(kind.split("-"), ("docs", "cp"), strict=True))
    lengths = doc_lengths(tokens * cp, docs, 2 * cp, seed)
    cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32)
    # Rank 0 holds chunk 0 and chunk 2cp-1 of every document, in document order.
    starts, stops, pos = [], [], 0
    for n in lengths:
        c = n // (2 * cp)
        starts += [pos, pos + c]
        stops += [pos + c, pos + 2 * c]
        pos += 2 * c
    try:
        plan = segments.build_segment_plan(
            cp, 0, 1, tokens, cu, halo=3, block_size=128, state_size=SHAPE["N"], device=device
        )
        first, stop = plan.packed.seg_first.tolist(), plan.packed.seg_stop.tolist()
        if (first, stop) != (starts, stops):
            return Layout(kind, starts, stops, None, "legacy plan's segments differ from ours")
        return Layout(kind, starts, stops, plan.slots)
    except Exception as err:  # noqa: BLE001
        return Layout(kind, starts, stops, None, f"legacy slot layout unavailable: {err!r}")


def make_inputs(tokens: int, num_segs: int, device: torch.device, dtype: torch.dtype, seed: int) -> dict:
    """x | B | C as strided column views of one conv output, y0, w, scale, h_in and upstream gradients."""
    h, p, g, n = SHAPE["H"], SHAPE["P"], SHAPE["G"], SHAPE["N"]
    torch.manual_seed(seed)
    conv = torch.randn(tokens, h * p + 2 * g * n, device=device, dtype=dtype).requires_grad_(True)
    hp, gn = h * p, g * n
    return {
        "conv": conv,
        "x": conv[:, :hp].unflatten(1, (h, p)),
        "B": conv[:, hp : hp + gn].unflatten(1, (g, n)),
        "C": conv[:, hp + gn :].unflatten(1, (g, n)),
        "y0": torch.randn(tokens, h, p, device=device, dtype=dtype).requires_grad_(True),
        "w": torch.rand(tokens, h, device=device).requires_grad_(True),
        "scale": torch.rand(tokens, h, device=device).requires_grad_(True),
        "h_in": torch.randn(num_segs, h, p, n, device=device).requires_grad_(True),
        "g_final": torch.randn(num_segs, h, p, n, device=device),
        "g_y": torch.randn(tokens, h, p, device=device, dtype=dtype),
    }


def floor_bytes(op: str, passes: str, tokens: int, num_segs: int, act_bytes: int) -> int:
    """Bytes an ideal fused kernel moves: every operand read once, every output written once."""
    h, p, g, n = SHAPE["H"], SHAPE["P"], SHAPE["G"], SHAPE["N"]
    thp, tgn, th, state = (
        tokens * h * p * act_bytes,
        tokens * g * n * act_bytes,
        tokens * h * 4,
        num_segs * h * p * n * 4,
    )
    if op == "states":
        fwd = thp + tgn + th + state  # x, B, w -> final
        bwd = (thp + tgn + th + state) + (thp + tgn + th)  # x, B, w, d_final -> dx, dB, dw
    else:
        fwd = thp + tgn + th + state + thp  # y0, C, scale, h_in -> y
        bwd = (thp + tgn + th + state) + (tgn + th + state)  # dy, C, scale, h_in -> dC, dscale, dh_in
    return fwd if passes == "fwd" else fwd + bwd


# ------------------------------------------------------------------------------------------------ the ops


def op_call(op: str, impl: str, t: dict, work: ss.SegmentWork, slots, legacy: tuple) -> Callable[[], torch.Tensor]:
    """The forward of ``op`` on ``impl`` (``triton`` or ``legacy``) as a closure."""
    states_cls, corr_cls = legacy[:2]
    if op == "states":
        if impl == "triton":
            return lambda: ss.segment_states(t["x"], t["B"], t["w"], work, impl="triton")
        return lambda: states_cls.apply(t["x"], t["B"], t["w"], slots)
    if impl == "triton":
        return lambda: ss.state_correction(t["y0"], t["C"], t["h_in"], t["scale"], work, impl="triton")
    return lambda: corr_cls.apply(t["y0"], t["C"], t["h_in"], t["scale"], slots)


def grad_inputs(op: str, t: dict) -> tuple[list[torch.Tensor], torch.Tensor]:
    """The tensors whose gradients a training step needs (the x/B/C views themselves, not the conv leaf, so
    that no ``[T, conv_dim]`` gradient is assembled) and the upstream gradient."""
    if op == "states":
        return [t["x"], t["B"], t["w"]], t["g_final"]
    return [t["y0"], t["C"], t["h_in"], t["scale"]], t["g_y"]


def step(op: str, passes: str, fwd: Callable[[], torch.Tensor], t: dict) -> Callable[[], object]:
    if passes == "fwd":

        def run():
            with torch.no_grad():
                return fwd()

        return run
    inputs, grad = grad_inputs(op, t)
    return lambda: torch.autograd.grad(fwd(), inputs, grad)


def median_ms(fn: Callable[[], object], warmup: int, iters: int) -> float:
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(iters):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b))
    return statistics.median(times)


def check_slice(layout: Layout) -> tuple[int, int]:
    """``(k, T_s)``: the first ``k`` segments (at least one) end by token ``T_s``, within the slice's bounds."""
    k = 1
    while k < len(layout.stops) and layout.stops[k] <= CHECK_TOKENS and (k + 1) * layout.stops[k] <= CHECK_CELLS:
        k += 1
    return k, layout.stops[k - 1]


def rel_err(got: torch.Tensor, want: torch.Tensor) -> float:
    got, want = got.detach().float(), want.detach().float()
    return float((got - want).abs().max() / want.abs().max().clamp_min(1e-30))


def check(op: str, passes: str, fwd: Callable[[], torch.Tensor], t: dict, layout: Layout) -> float:
    """Largest relative error (``max |got - want| / max |want|``) of the output and, for ``fwd+bwd``, of every
    gradient, over the heads of group 0 and the first segments, against the float32 reference."""
    h, g = SHAPE["H"], SHAPE["G"]
    heads = slice(0, h // g)
    k, t_s = check_slice(layout)
    work = ss.build_segment_work(layout.starts[:k], layout.stops[:k], t_s, t["x"].device)
    out = fwd()
    inputs, grad = grad_inputs(op, t)
    grads = torch.autograd.grad(out, inputs, grad) if passes == "fwd+bwd" else None

    def leaf(v: torch.Tensor) -> torch.Tensor:
        return v.detach().float().requires_grad_(True)

    if op == "states":
        x, B, w = leaf(t["x"][:t_s, heads]), leaf(t["B"][:t_s, :1]), leaf(t["w"][:t_s, heads])
        want = ss.segment_states_ref(x, B, w, work)
        errs = [rel_err(out[:k, heads], want)]
        if grads is not None:
            ref = torch.autograd.grad(want, (x, B, w), t["g_final"][:k, heads])
            got = (grads[0][:t_s, heads], grads[1][:t_s, :1], grads[2][:t_s, heads])
            errs += [rel_err(a, b) for a, b in zip(got, ref, strict=True)]
    else:
        y0, C = leaf(t["y0"][:t_s, heads]), leaf(t["C"][:t_s, :1])
        h_in, scale = leaf(t["h_in"][:k, heads]), leaf(t["scale"][:t_s, heads])
        want = ss.state_correction_ref(y0, C, h_in, scale, work)
        errs = [rel_err(out[:t_s, heads], want)]
        if grads is not None:
            ref = torch.autograd.grad(want, (y0, C, h_in, scale), t["g_y"][:t_s, heads].float())
            got = (grads[0][:t_s, heads], grads[1][:t_s, :1], grads[2][:k, heads], grads[3][:t_s, heads])
            errs += [rel_err(a, b) for a, b in zip(got, ref, strict=True)]
    return max(errs)


# ------------------------------------------------------------------------------------------------ main


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="bench_segment_scan", description=__doc__.split("\n\n")[0])
    p.add_argument("--tokens", default="16384,65536,131072,524288", help="comma-separated local token counts")
    p.add_argument("--layouts", default="bshd,docs64-cp2,docs512-cp8", help="bshd and/or docsD-cpC, comma-separated")
    p.add_argument("--ops", default="states,correction")
    p.add_argument("--passes", default="fwd,fwd+bwd")
    p.add_argument("--impls", default="triton,legacy")
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--piece-tokens", type=int, default=8192, help="build_segment_work's piece length")
    p.add_argument("--tile-tokens", type=int, default=64, help="build_segment_work's tile length")
    p.add_argument("--bandwidth", type=float, default=4.0, help="TB/s of the bandwidth floor")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--iters", type=int, default=10)
    p.add_argument("--budget-s", type=float, default=540.0, help="start no row after this many seconds")
    p.add_argument("--no-check", action="store_true", help="skip the correctness checks")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=os.environ.get("OUT", "."), help="folder for bench_segment_scan.jsonl")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(list(argv) if argv is not None else sys.argv[1:])
    if not torch.cuda.is_available():
        print("[bench_segment_scan] CUDA is not available: nothing to benchmark (the kernels need a GPU)")
        return 0
    start = time.perf_counter()
    device = torch.device("cuda", torch.cuda.current_device())
    dtype = getattr(torch, args.dtype)
    legacy = legacy_ops()
    impls = args.impls.split(",")
    if "legacy" in impls and legacy[0] is None:
        print(f"[bench_segment_scan] legacy ops {legacy[2]}: timing the Triton path only", flush=True)
        impls = [i for i in impls if i != "legacy"]
    import triton

    env = {
        "device": torch.cuda.get_device_name(device),
        "torch": torch.__version__,
        "triton_version": triton.__version__,
        "legacy_from": legacy[2],
        "dtype": args.dtype,
        "shape": SHAPE,
        "piece_tokens": args.piece_tokens,
        "tile_tokens": args.tile_tokens,
        "bandwidth_TBps": args.bandwidth,
    }
    print(f"[bench_segment_scan] {json.dumps(env)}", flush=True)
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    jsonl = out_dir / "bench_segment_scan.jsonl"
    act_bytes = torch.empty(0, dtype=dtype).element_size()
    skipped = []
    for tokens in (int(v) for v in args.tokens.split(",")):
        for kind in args.layouts.split(","):
            if time.perf_counter() - start > args.budget_s:
                skipped.append(f"{kind}@{tokens}")
                continue
            layout = make_layout(kind, tokens, device, args.seed)
            if layout.note:
                print(f"[bench_segment_scan] {kind} T={tokens}: {layout.note}", flush=True)
            num_segs = len(layout.starts)
            work = ss.build_segment_work(
                layout.starts, layout.stops, tokens, device,
                piece_tokens=args.piece_tokens, tile_tokens=args.tile_tokens,
            )  # fmt: skip
            t = make_inputs(tokens, num_segs, device, dtype, args.seed)
            for op in args.ops.split(","):
                for passes in args.passes.split(","):
                    if time.perf_counter() - start > args.budget_s:
                        skipped.append(f"{kind}@{tokens}/{op}/{passes}")
                        continue
                    row = {
                        "layout": kind, "tokens": tokens, "segments": num_segs, "op": op, "passes": passes,
                        "pieces": work.num_pieces, "tiles": work.num_tiles, "partials": work.num_partials,
                        "floor_ms": floor_bytes(op, passes, tokens, num_segs, act_bytes) / (args.bandwidth * 1e9),
                    }  # fmt: skip
                    for impl in impls:
                        if impl == "legacy" and layout.slots is None:
                            row[impl] = {"error": layout.note}
                            continue
                        fwd = op_call(op, impl, t, work, layout.slots, legacy)
                        try:
                            result = {"ms": median_ms(step(op, passes, fwd, t), args.warmup, args.iters)}
                            if not args.no_check:
                                result["max_rel_err"] = check(op, passes, fwd, t, layout)
                        except torch.cuda.OutOfMemoryError as err:
                            result = {"error": f"out of memory: {str(err).splitlines()[0]}"}
                        torch.cuda.empty_cache()
                        row[impl] = result
                    row.update(env)
                    with jsonl.open("a") as f:
                        f.write(json.dumps(row) + "\n")
                    print(format_row(row, impls), flush=True)
            del t, work
            torch.cuda.empty_cache()
    if skipped:
        print(f"[bench_segment_scan] budget of {args.budget_s:.0f} s spent; skipped: {', '.join(skipped)}")
    print(f"[bench_segment_scan] done in {time.perf_counter() - start:.0f} s; rows appended to {jsonl}")
    return 0


def format_row(row: dict, impls: list[str]) -> str:
    parts = [f"{row['layout']:>12} T={row['tokens']:>7} S={row['segments']:>5} {row['op']:>10} {row['passes']:>7}"]
    for impl in impls:
        r = row.get(impl, {})
        if "ms" in r:
            err = f" err {r['max_rel_err']:.1e}" if "max_rel_err" in r else ""
            parts.append(f"{impl} {r['ms']:8.3f} ms{err}")
        else:
            parts.append(f"{impl} -- ({r.get('error', 'not run')})")
    parts.append(f"floor {row['floor_ms']:7.3f} ms")
    if "ms" in row.get("triton", {}) and "ms" in row.get("legacy", {}):
        parts.append(f"legacy/triton {row['legacy']['ms'] / row['triton']['ms']:.2f}x")
    if "ms" in row.get("triton", {}):
        parts.append(f"triton/floor {row['triton']['ms'] / row['floor_ms']:.2f}x")
    return " | ".join(parts)


if __name__ == "__main__":
    sys.exit(main())
