"""Benchmark packed (document-causal) attention on one GPU: the dense-mask sdpa path against the FlexAttention path.

What one CP rank of a NemotronH-8B-like attention layer runs at cp=8 after the all-to-all: 4 query heads and 1
key/value head of 128 (32 / 8 query heads, 8 / 8 kv heads), bf16, over the whole packed batch of ``T`` tokens in
true order (64 documents of random lengths, multiples of 16 = 2*cp), forward + backward:

* ``dense``: ``torch.nn.functional.scaled_dot_product_attention`` with the ``[1, 1, T, T]`` bool block-diagonal
  causal mask (:func:`mamba_cp.attention.causal_mask`), what packed sdpa batches ran before; skipped past
  ``--dense-max`` tokens (at 1M the mask alone is 1 TiB);
* ``flex``: :func:`mamba_cp.document_attention.document_attention` with the batch's
  :class:`~mamba_cp.document_attention.DocumentMask` (compiled FlexAttention, the ``BlockMask`` built from
  ``cu_seqlens`` as tile lists).

Per row: median ms of forward + backward (``torch.cuda.Event``), peak GiB (``torch.cuda.max_memory_allocated``
after a reset, inputs and mask resident), the mask's build ms and bytes, the first call's seconds (compilation),
and whether a second batch of other document lengths at the same ``T`` compiled a new graph. Before the rows a
check runs both paths at a small ``T`` in float32 and bf16 (output and the three input gradients) and plants an
off-by-one tile to show the kernel reads the tiles. A line per row is printed and a JSON line appended to
``$OUT/bench_attention.jsonl`` (``--out`` when ``$OUT`` is unset) as it goes; ``--budget-s`` stops starting rows
after that many seconds. Without CUDA it prints why and exits 0.

    python benchmarks/bench_attention.py [--lengths 64K,128K,1M] [--budget-s 480]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

from mamba_cp.attention import causal_mask
from mamba_cp.document_attention import document_attention, document_mask
from mamba_cp.layout import build_token_plan

DEFAULT_LENGTHS = "64K,128K,1M"


def parse_lengths(text: str) -> list[int]:
    """``"64K,128K,1M"`` / ``"65536,131072"`` -> token counts (``K`` = 1024, ``M`` = 1024 * 1024)."""
    out = []
    for item in text.split(","):
        item = item.strip().upper()
        scale = {"K": 1024, "M": 1024 * 1024}.get(item[-1:], 1)
        value = int(item[:-1] if scale > 1 else item) * scale
        if value < 1:
            raise ValueError(f"lengths must be positive, got {item!r}")
        out.append(value)
    return out


def document_bounds(length: int, docs: int, multiple: int, seed: int) -> torch.Tensor:
    """``[docs + 1]`` int64 ``cu_seqlens``: ``docs`` random lengths, multiples of ``multiple``, summing to
    ``length``."""
    units = length // multiple
    if units < docs or length % multiple:
        raise ValueError(f"length {length} must be a multiple of {multiple} holding at least {docs} documents")
    gen = torch.Generator().manual_seed(seed)
    weights = torch.rand(docs, generator=gen) + 0.25
    sizes = (weights / weights.sum() * (units - docs)).floor().long() + 1
    sizes[-1] += units - int(sizes.sum())
    return torch.cat([torch.zeros(1, dtype=torch.long), (sizes * multiple).cumsum(0)])


def qkv(length: int, heads: int, kv_heads: int, d: int, dtype, device, seed: int = 0):
    """Leaf ``[1, T, (H + 2 H_kv) * d]`` buffer and its ``[1, h, T, d]`` q/k/v views, as the all-to-all returns them."""
    gen = torch.Generator(device=device).manual_seed(seed)
    full = torch.randn(1, length, (heads + 2 * kv_heads) * d, device=device, dtype=dtype, generator=gen)
    full.requires_grad_(True)

    def views():
        q, k, v = torch.split(full, [heads * d, kv_heads * d, kv_heads * d], dim=-1)
        return (
            q.view(1, length, heads, d).transpose(1, 2),
            k.view(1, length, kv_heads, d).transpose(1, 2),
            v.view(1, length, kv_heads, d).transpose(1, 2),
        )

    return full, views


def dense_attention(q, k, v, mask: torch.Tensor, scale: float) -> torch.Tensor:
    return torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale, enable_gqa=True)


def time_fwd_bwd(run: Callable[[], torch.Tensor], grad: torch.Tensor, leaf: torch.Tensor, warmup: int, iters: int):
    """``(median ms, every ms, first call s, peak GiB)`` of ``run().backward(grad)``."""
    start = time.perf_counter()
    run().backward(grad)
    torch.cuda.synchronize()
    first_s = time.perf_counter() - start
    for _ in range(warmup):
        leaf.grad = None
        run().backward(grad)
    times = []
    for _ in range(iters):
        leaf.grad = None
        begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        begin.record()
        run().backward(grad)
        end.record()
        torch.cuda.synchronize()
        times.append(begin.elapsed_time(end))
    leaf.grad = None
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    run().backward(grad)
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated() / 2**30
    leaf.grad = None
    return statistics.median(times), times, first_s, peak


def mask_bytes(mask) -> int:
    if isinstance(mask, torch.Tensor):
        return mask.numel() * mask.element_size()
    tensors = [mask.kv_num_blocks, mask.kv_indices, mask.full_kv_num_blocks, mask.full_kv_indices]
    bm = mask.block_mask
    if bm is not None:
        tensors = [t for t in bm.as_tuple() if isinstance(t, torch.Tensor)]
    return sum(t.numel() * t.element_size() for t in {id(t): t for t in tensors}.values())


def build_mask(impl: str, cu: torch.Tensor, length: int, device, block: int):
    plan = build_token_plan(1, 1, length, cu, device)
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    start = time.perf_counter()
    mask = causal_mask(plan, device) if impl == "dense" else document_mask(plan, device, block, backend="flex")
    torch.cuda.synchronize()
    ms = (time.perf_counter() - start) * 1e3
    return mask, ms, (torch.cuda.max_memory_allocated() - base) / 2**30


def graphs() -> int:
    from torch._dynamo.utils import counters

    return int(counters["stats"]["unique_graphs"])


# ------------------------------------------------------------------------------------------------ check


def check(args, device) -> dict:
    """flex against dense at a small T, float32 and bf16, output and gradients; plus a planted off-by-one tile."""
    import mamba_cp.document_attention as da

    length = args.check_length
    cu = document_bounds(length, args.docs, 16, seed=1).to(device)
    scale = args.head_dim**-0.5
    result = {"row": "check", "T": length}
    ok = True
    for dtype, tol in ((torch.float32, 1e-4), (torch.bfloat16, 3e-2)):
        full, views = qkv(length, args.heads, args.kv_heads, args.head_dim, dtype, device, seed=2)
        grad = torch.randn(1, args.heads, length, args.head_dim, device=device, dtype=dtype)
        plan = build_token_plan(1, 1, length, cu, device)
        outs = {}
        for impl in ("dense", "flex"):
            if impl == "dense":
                mask = causal_mask(plan, device)
                out = dense_attention(*views(), mask, scale)
            else:
                mask = document_mask(plan, device, args.block_size, backend="flex")
                out = document_attention(*views(), mask, scale=scale, backend="flex")
            out.backward(grad)
            outs[impl] = (out.detach().float(), full.grad.float())
            full.grad = None
        ref_out, ref_grad = outs["dense"]
        errs = {
            "output": float((outs["flex"][0] - ref_out).abs().max() / ref_out.abs().max()),
            "grad": float((outs["flex"][1] - ref_grad).abs().max() / ref_grad.abs().max()),
        }
        name = str(dtype).removeprefix("torch.")
        result[name] = errs
        ok &= all(e <= tol for e in errs.values())
        if dtype == torch.float32:  # the kernel must read the tiles: an off-by-one full tile changes the output
            real = da._tiles

            def planted(*a, real=real):
                counts, indices, full_counts, full_indices = (t.clone() for t in real(*a))
                rows = torch.nonzero(counts > 1).flatten().tolist()
                for i in rows:  # the last off-diagonal partial tile becomes full
                    start = i - int(full_counts[i]) - 1
                    full_indices[i, : full_counts[i] + 1] = torch.arange(start, i, dtype=torch.int32, device=device)
                    full_counts[i] += 1
                    indices[i, counts[i] - 2] = i
                    counts[i] -= 1
                return counts, indices, full_counts, full_indices

            da._tiles = planted
            try:  # with grad, as above: the compiled graph is reused (same shapes), no inference compile
                bad = document_mask(plan, device, args.block_size, backend="flex")
                out = document_attention(*views(), bad, scale=scale, backend="flex").detach()
            finally:
                da._tiles = real
            result["planted_error"] = float((out.float() - ref_out).abs().max() / ref_out.abs().max())
            ok &= result["planted_error"] > 1e-2
    result["ok"] = ok
    return result


# ------------------------------------------------------------------------------------------------ rows


def row(impl: str, length: int, args, device) -> dict:
    dtype = getattr(torch, args.dtype)
    cu = document_bounds(length, args.docs, 16, seed=length).to(device)
    full, views = qkv(length, args.heads, args.kv_heads, args.head_dim, dtype, device)
    grad = torch.randn(1, args.heads, length, args.head_dim, device=device, dtype=dtype)
    scale = args.head_dim**-0.5
    mask, build_ms, build_peak = build_mask(impl, cu, length, device, args.block_size)
    if impl == "dense":

        def run():
            return dense_attention(*views(), mask, scale)
    else:

        def run():
            return document_attention(*views(), mask, scale=scale, backend="flex")

    graphs_before = graphs()
    ms, times, first_s, peak = time_fwd_bwd(run, grad, full, args.warmup, args.iters)
    out = {
        "row": impl,
        "T": length,
        "docs": args.docs,
        "heads": args.heads,
        "kv_heads": args.kv_heads,
        "head_dim": args.head_dim,
        "dtype": args.dtype,
        "ms": round(ms, 3),
        "ms_all": [round(t, 3) for t in times],
        "peak_gib": round(peak, 3),
        "first_call_s": round(first_s, 2),
        "mask_build_ms": round(build_ms, 2),
        "mask_build_peak_gib": round(build_peak, 3),
        "mask_gib": round(mask_bytes(mask) / 2**30, 4),
        "inputs_gib": round(full.numel() * full.element_size() / 2**30, 4),
    }
    if impl == "flex":  # a new batch (other document lengths, same T): does it compile a new graph?
        del mask
        other = document_bounds(length, args.docs, 16, seed=length + 1).to(device)
        mask = document_mask(build_token_plan(1, 1, length, other, device), device, args.block_size, backend="flex")
        before = graphs()
        run().backward(grad)
        torch.cuda.synchronize()
        out["graphs_compiled"] = before - graphs_before
        out["recompiled_for_new_batch"] = graphs() != before
    return out


def emit(record: dict, path: Path) -> None:
    print(json.dumps(record) if record.get("row") == "env" else _line(record), flush=True)
    with path.open("a") as f:
        f.write(json.dumps(record) + "\n")


def _line(r: dict) -> str:
    if r.get("row") == "check":
        return (
            f"check T={r['T']}: float32 {r['float32']}, bfloat16 {r['bfloat16']}, "
            f"planted {r['planted_error']:.3g}, ok={r['ok']}"
        )
    if "skipped" in r:
        return f"{r['row']:>5} T={r['T']:>8}: skipped ({r['skipped']})"
    extra = f", new batch recompiled: {r['recompiled_for_new_batch']}" if "recompiled_for_new_batch" in r else ""
    return (
        f"{r['row']:>5} T={r['T']:>8}: {r['ms']:9.2f} ms fwd+bwd, peak {r['peak_gib']:7.3f} GiB, "
        f"mask {r['mask_gib']:.4f} GiB built in {r['mask_build_ms']:.1f} ms (peak {r['mask_build_peak_gib']:.3f} GiB), "
        f"first call {r['first_call_s']:.1f} s{extra}"
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--lengths", default=DEFAULT_LENGTHS, help="token counts T, e.g. 64K,128K,1M")
    parser.add_argument("--docs", type=int, default=64)
    parser.add_argument("--heads", type=int, default=4, help="query heads of one rank")
    parser.add_argument("--kv-heads", type=int, default=1, help="key/value heads of one rank")
    parser.add_argument("--head-dim", type=int, default=128)
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--block-size", type=int, default=128)
    parser.add_argument("--dense-max", type=int, default=65536, help="skip the dense path past this T")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--iters", type=int, default=5)
    parser.add_argument("--check-length", type=int, default=8240, help="T of the flex-vs-dense check (0: skip)")
    parser.add_argument("--budget-s", type=float, default=480.0, help="start no new row after this many seconds")
    parser.add_argument("--out", default=".", help="folder of bench_attention.jsonl when $OUT is unset")
    args = parser.parse_args(argv)
    lengths = parse_lengths(args.lengths)
    if not torch.cuda.is_available():
        print("bench_attention: CUDA is not available, nothing to measure (it times one GPU); exiting", flush=True)
        return 0
    start = time.monotonic()
    device = torch.device("cuda")
    path = Path(os.environ.get("OUT") or args.out) / "bench_attention.jsonl"
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    emit(
        {
            "row": "env",
            "torch": torch.__version__,
            "triton": triton_version,
            "gpu": torch.cuda.get_device_name(),
            "python": platform.python_version(),
            "argv": sys.argv[1:] if argv is None else argv,
        },
        path,
    )
    ok = True
    if args.check_length:
        result = check(args, device)
        ok = result["ok"]
        emit(result, path)
    for length in lengths:
        for impl in ("dense", "flex"):
            if impl == "dense" and length > args.dense_max:
                emit({"row": impl, "T": length, "skipped": f"T > --dense-max {args.dense_max}"}, path)
                continue
            if time.monotonic() - start > args.budget_s:
                emit({"row": impl, "T": length, "skipped": f"--budget-s {args.budget_s} spent"}, path)
                continue
            try:
                record = row(impl, length, args, device)
            except torch.OutOfMemoryError as err:
                record = {"row": impl, "T": length, "skipped": f"out of memory: {str(err).splitlines()[0]}"}
            torch.cuda.empty_cache()
            emit(record, path)
    print(f"bench_attention: done in {time.monotonic() - start:.0f} s; rows in {path}", flush=True)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
