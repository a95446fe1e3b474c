"""Device-independent work counts of one mixer forward+backward per rank, for each CP strategy.

Runs real gloo ranks on the CPU with the NemotronH-8B-like SSM dimensions (128 heads x 64, 8 groups, state 128,
conv 4, chunk 128; the model width only sizes in_proj/out_proj, which every strategy shares, so it is small
here) and counts, per rank, with a dispatch mode:

* **bytes written**: the outputs of every non-view op (each copy, cast, elementwise op and matmul result),
  the memory traffic that bounds the non-matmul work on a GPU;
* **matmul FLOPs** (torch's flop counter), split by the dtype the matmul ran in;
* **bytes written in the forward outside the conv, scan and norm kernels** (and outside in_proj / out_proj,
  which every strategy shares): the strategy's own work (transport packs and gathers, halos, state passing,
  output corrections), which runs as these same torch ops on a GPU; and **how many ops** wrote them, each one
  kernel launch there (host time per layer where the GPU work between launches is small).

The SSD scan and the conv run the pure-PyTorch references here, the same for every strategy (all strategies do
the same scan work per rank: whole sequences for 1/cp of the heads, or 1/cp of the tokens for all heads), so the
differences between rows are the strategies' own work. Counts grow linearly with the tokens. Usage::

    python benchmarks/count_mixer_work.py [--tokens 4096] [--cp 2] [--docs 16]
"""

from __future__ import annotations

import argparse
import copy
import sys
from collections import Counter

import torch
import torch.distributed as dist
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.flop_counter import FlopCounterMode

import mamba_cp
from mamba_cp import kernels
from mamba_cp.testing import run_on_ranks


class ByteCounter(TorchDispatchMode):
    """Bytes written by non-view ops and how many such ops ran, per op name (ops inside the kernels skipped while
    ``inside`` is set)."""

    def __init__(self) -> None:
        super().__init__()
        self.written: Counter[str] = Counter()
        self.calls: Counter[str] = Counter()
        self.inside = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if not func.is_view and not self.inside:
            flat = out if isinstance(out, list | tuple) else [out]
            size = sum(t.numel() * t.element_size() for t in flat if isinstance(t, torch.Tensor))
            self.written[str(func.overloadpacket)] += size
            self.calls[str(func.overloadpacket)] += 1
        return out


def build(hidden: int, dtype: torch.dtype) -> mamba_cp.Mamba2Mixer:
    torch.manual_seed(0)
    return mamba_cp.Mamba2Mixer(
        hidden_size=hidden, num_heads=128, head_dim=64, n_groups=8, state_size=128, conv_kernel=4, chunk_size=128,
        dtype=dtype,
    )  # fmt: skip


def packed_lengths(tokens: int, docs: int, unit: int) -> list[int]:
    """``docs`` mixed lengths (weights 1..5, multiples of ``unit``) summing to ``tokens``."""
    weights = [1 + (i * 7) % 5 for i in range(docs)]
    units = tokens // unit
    lengths = [unit * max(1, units * w // sum(weights)) for w in weights[:-1]]
    lengths.append(tokens - sum(lengths))
    if tokens % unit or lengths[-1] < unit:
        raise ValueError(f"cannot pack {docs} documents of multiples of {unit} into {tokens} tokens")
    return lengths


def _worker(rank: int, world: int, strategy: str, layout: str, tokens: int, docs: int, hidden: int, unit: int) -> dict:
    dtype = torch.bfloat16
    mixer = build(hidden, dtype)
    if strategy != "cp1":
        mamba_cp.parallelize(mixer, dist.group.WORLD, strategy=strategy)
    cp = 1 if strategy == "cp1" else world
    if layout == "thd":
        lengths = packed_lengths(tokens, docs, unit)
        cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32)
        x = torch.randn(tokens, hidden, dtype=dtype)
        x = mamba_cp.shard(x, cp, rank if cp > 1 else 0, seq_dim=0, cu_seqlens=cu)
    else:
        cu, x = None, torch.randn(1, tokens, hidden, dtype=dtype)
        x = mamba_cp.shard(x, cp, rank if cp > 1 else 0)
    x.requires_grad_(True)
    mixer(x, cu).float().pow(2).sum().backward()  # builds the batch plan
    counter, flops = ByteCounter(), FlopCounterMode(display=False)
    with counter, flops:
        mixer(copy.copy(x), cu).float().pow(2).sum().backward()
    # Forward only, outside the conv / scan / norm kernels: the strategy's own work (transport, halos, state
    # passing, corrections). The kernels' entry points are wrapped here, in this measuring process only.
    outside = ByteCounter()

    def opaque(fn):
        def wrapped(*a, **k):
            outside.inside += 1
            try:
                return fn(*a, **k)
            finally:
                outside.inside -= 1

        return wrapped

    for name in ("causal_conv1d", "ssd_chunk_scan", "rmsnorm_gated"):
        setattr(kernels, name, opaque(getattr(kernels, name)))
    with torch.no_grad(), outside:
        mixer(x.detach(), cu)
    projections = {"addmm", "mm", "_unsafe_view", "t"}  # in_proj / out_proj, shared by every strategy
    return {
        "written": dict(counter.written),
        "flops": flops.get_total_flops(),
        "outside": sum(v for k, v in outside.written.items() if k.removeprefix("aten.") not in projections),
        "outside_ops": sum(v for k, v in outside.calls.items() if k.removeprefix("aten.") not in projections),
        "outside_top": {k: v for k, v in outside.written.items() if k.removeprefix("aten.") not in projections},
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tokens", type=int, default=4096, help="global tokens (B=1)")
    p.add_argument("--cp", type=int, default=2)
    p.add_argument("--docs", type=int, default=16, help="documents in the packed batch")
    p.add_argument("--hidden", type=int, default=256)
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    print(
        f"per rank, one mixer fwd+bwd, {args.tokens} tokens, cp={args.cp}, bf16, 128 heads x 64, state 128 "
        f"(THD: {args.docs} documents); GB written by non-view ops, GFLOP of matmuls"
    )
    print(
        f"{'layout':<6} {'strategy':<14} {'GB written':>11} {'GFLOP':>9} {'fwd GB outside':>15} {'fwd ops':>8}  "
        "largest forward writers outside the kernels (GB)"
    )
    for layout in ("bshd", "thd"):
        for strategy in ("cp1", "hidden", "state_passing"):
            world = 1 if strategy == "cp1" else args.cp
            res = run_on_ranks(
                _worker, world, strategy, layout, args.tokens, args.docs, args.hidden, 2 * args.cp, timeout=900
            )
            worst = max(res, key=lambda r: sum(r["written"].values()))
            total = sum(worst["written"].values()) / 1e9
            top = sorted(worst["outside_top"].items(), key=lambda kv: -kv[1])[:6]
            tops = ", ".join(f"{k.removeprefix('aten.')} {v / 1e9:.3f}" for k, v in top)
            print(
                f"{layout:<6} {strategy:<14} {total:>11.2f} {worst['flops'] / 1e9:>9.1f} "
                f"{worst['outside'] / 1e9:>15.3f} {worst['outside_ops']:>8}  {tops}"
            )
            sys.stdout.flush()
    return 0


if __name__ == "__main__":
    sys.exit(main())
