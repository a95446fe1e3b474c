"""Where one simulated CP rank's time and memory go: per-kernel device time and the tensors alive at the peak.

One GPU, torch's fake process group (as ``simulate_rank.py``: rank 0 runs exactly its own compute on its own shard;
collectives move nothing). For every row ``LAYOUT:L:CP:STRATEGY`` of ``--rows`` it builds the mixer and the batch as
``simulate_rank.mixer_row_step`` does for ``simulate_rank``'s rows, warms up, and then:

* **kernels**: ``--profile-steps`` fwd+bwd steps under ``torch.profiler``; the device time of every kernel, per
  step, summed per category and listed for the top kernels (``profile_mixer.breakdown``);
* **memory**: one step under ``torch.cuda.memory._record_memory_history``; the allocation trace is replayed to find
  the step's peak, and the blocks alive there are listed by size with the Python frame that allocated them (the
  first frame inside ``mamba_cp``, ``mamba_ssm`` or the benchmark; ``autograd`` for native backward ops, which
  run without Python frames). The step's own allocations only: weights, batch and optimizer-free gradients made
  before the step are the ``baseline``.

Writes ``profile_rank[_TAG].json`` to ``--out`` (rewritten after every row) and prints a summary per row. Needs CUDA.

    python benchmarks/profile_rank.py --rows bshd:128K:2:hidden,bshd:128K:2:state_passing --out "$OUT"
"""

from __future__ import annotations

import argparse
import collections
import json
import sys
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, str(Path(__file__).resolve().parent))
import profile_mixer as pm  # noqa: E402 - per-kernel categories
import simulate_rank as sim  # noqa: E402 - the fake group, the mixer rows and their batches

_OWN_CODE = ("mamba_cp", "mamba_ssm", "benchmarks")


def parse_row(text: str) -> sim.RowSpec:
    """``LAYOUT:L:CP:STRATEGY`` (``L`` with a K/M suffix) -> a mixer :class:`simulate_rank.RowSpec`."""
    layout, length, cp, strategy = text.split(":")
    return sim.RowSpec("mixer", layout, sim._size(length), int(cp), strategy)


def _frame(frames: list[dict]) -> str:
    for f in frames:
        name = f.get("filename", "")
        if any(part in name for part in _OWN_CODE):
            short = name.split("site-packages/")[-1].split("src/")[-1]
            return f"{short}:{f.get('line')} {f.get('name')}"
    return "autograd (native op)" if not frames else f"{frames[0].get('filename')}:{frames[0].get('line')}"


def live_at_peak(snapshot: dict, device: int = 0, top: int = 15) -> dict:
    """Replay the allocation trace: the peak of the bytes allocated during the recording, and the blocks alive
    there grouped by allocating frame (largest first)."""
    live: dict[int, tuple[int, str]] = {}
    now = peak = 0
    at_peak: dict[int, tuple[int, str]] = {}
    for ev in snapshot["device_traces"][device]:
        action, addr, size = ev["action"], ev["addr"], ev["size"]
        if action == "alloc":
            live[addr] = (size, _frame(ev.get("frames", [])))
            now += size
            if now > peak:
                peak, at_peak = now, dict(live)
        elif action == "free_completed" and addr in live:
            now -= live.pop(addr)[0]
    groups: dict[str, list[int]] = collections.defaultdict(list)
    for size, frame in at_peak.values():
        groups[frame].append(size)
    rows = sorted(groups.items(), key=lambda kv: -sum(kv[1]))
    return {
        "step_peak_gib": peak / 2**30,
        "blocks": [
            {"frame": frame, "gib": sum(sizes) / 2**30, "count": len(sizes), "largest_mib": max(sizes) / 2**20}
            for frame, sizes in rows[:top]
        ],
    }


def profile_row(spec: sim.RowSpec, args, device: torch.device) -> dict:
    with sim.fake_group(spec.cp) as group:
        step, _ = sim.mixer_row_step(spec, args, device, group)
        clock = sim.bench.Clock(device)
        timing = sim.bench.time_step(step, clock, args.warmup, args.iters, device)
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            for _ in range(args.profile_steps):
                step()
            torch.cuda.synchronize(device)
        kernels = pm.breakdown(pm.device_times(prof, True), args.profile_steps)
        del prof
        step()  # the previous step's gradients exist when the recorded step starts, as in training
        torch.cuda.synchronize(device)
        baseline = torch.cuda.memory_allocated(device)
        torch.cuda.memory._record_memory_history(max_entries=200_000, stacks="python")
        step()
        torch.cuda.synchronize(device)
        snapshot = torch.cuda.memory._snapshot()
        torch.cuda.memory._record_memory_history(enabled=None)
        memory = live_at_peak(snapshot, device.index or 0) | {"baseline_gib": baseline / 2**30}
        del snapshot, step
        sim.free_memory(device)
    return {"row": spec.key, "ms": timing["ms"], "peak_gib": timing.get("peak_bytes", 0) / 2**30,
            "kernels": kernels, "memory": memory}  # fmt: skip


def summary(rec: dict) -> str:
    k, m = rec["kernels"], rec["memory"]
    cats = ", ".join(f"{c} {v:.1f}" for c, v in k["categories_ms"].items() if v >= 0.05)
    head = f"{rec['row']}: {rec['ms']:.1f} ms, peak {rec['peak_gib']:.2f} GiB"
    lines = [f"{head}; kernels {k['kernel_sum_ms']:.1f} ms ({cats})"]
    lines += [f"    {t['ms']:7.2f} ms x{t['calls']:.0f} {t['name'][:110]}" for t in k["top"]]
    lines.append(f"  step peak {m['step_peak_gib']:.2f} GiB over baseline {m['baseline_gib']:.2f}; alive at the peak:")
    for b in m["blocks"]:
        lines.append(f"    {b['gib']:6.3f} GiB x{b['count']} (max {b['largest_mib']:.0f} MiB) {b['frame']}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rows", required=True, help="comma-separated LAYOUT:L:CP:STRATEGY")
    p.add_argument("--model", default="nemotron8b")
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--docs", type=int, default=64)
    p.add_argument("--multiple", type=int, default=None, help="document lengths' multiple (default 2*cp)")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--iters", type=int, default=5)
    p.add_argument("--profile-steps", type=int, default=3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="benchmarks/results")
    p.add_argument("--tag", default="")
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        print("profile_rank: needs CUDA; nothing to do")
        return 0
    device = torch.device("cuda", torch.cuda.current_device())
    args.mamba_ssm_import = sim.bench.expose_mamba_ssm_triton()
    args.int32_guard = False
    out = Path(args.out) / f"profile_rank{'_' + args.tag if args.tag else ''}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    records = []
    for text in args.rows.split(","):
        spec = parse_row(text)
        if args.multiple is None:
            args.multiple = 2 * spec.cp
        try:
            rec = profile_row(spec, args, device)
        except Exception as err:  # noqa: BLE001 - a failed row is recorded and the next one runs
            rec = {"row": spec.key, "error": sim.first_line(err)}
            sim.free_memory(device)
        records.append(rec)
        print(summary(rec) if "error" not in rec else f"{rec['row']}: {rec['error']}", flush=True)
        out.write_text(json.dumps({"env": sim.environment(args, device), "rows": records}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
