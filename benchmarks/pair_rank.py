"""Two strategies' per-rank time on the same batch, their steps interleaved: a ratio that drift cannot bias.

``simulate_rank.py`` times each row's steps one after the other, so a card that slows down between two rows (clocks,
heat, another tenant) moves one strategy's time and not the other's: on one H200 the same code's state passing /
hidden-parallel ratio at 128K and cp 2 measured 0.97, 1.03 and 1.03x in three processes (``BENCHMARKS.md`` §19).
Here both mixers are built on one fake process group (rank 0's compute and memory, collectives move nothing, as in
``simulate_rank.py``) with the same batch, warmed up, and timed in ``--rounds`` rounds of one step of each, in an
order that alternates every round. Per ``LAYOUT:L:CP`` it reports each strategy's median, the median and the range
of the per-round ratios, and each strategy's own spread: the median of its first half of rounds over that of its
second half (a ratio between strategies closer to 1 than that is noise).

Writes ``pair_rank[_TAG].json`` to ``--out`` (rewritten after every row) and prints one line per row. Runs on a CPU
too (the ``tiny`` model, for the tests), where only the plumbing means anything.

    python benchmarks/pair_rank.py --rows bshd:128K:2,stream:128K:2 --rounds 20 --out "$OUT"
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from collections.abc import Callable
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import simulate_rank as sim  # noqa: E402 - the fake group, the mixer rows and their batches

bench = sim.bench


def parse_row(text: str) -> tuple[str, int, int]:
    """``LAYOUT:L:CP`` (``L`` with a K/M suffix) -> ``(layout, L, cp)``."""
    layout, length, cp = text.split(":")
    if layout not in ("bshd", "thd", "stream"):
        raise ValueError(f"layout must be bshd, thd or stream, got {layout!r} in {text!r}")
    if int(cp) < 2:
        raise ValueError(f"cp must be at least 2 (both strategies split a batch), got {cp} in {text!r}")
    return layout, sim._size(length), int(cp)


def interleaved(steps: dict[str, Callable[[], None]], clock, warmup: int, rounds: int) -> dict[str, list[float]]:
    """``rounds`` rounds of one timed step of each of ``steps``, the order reversed every other round, after
    ``warmup`` untimed steps of each: the per-round ms of each step."""
    for _ in range(warmup):
        for step in steps.values():
            step()
    clock.sync()
    names = list(steps)
    times: dict[str, list[float]] = {n: [] for n in names}
    for r in range(rounds):
        for name in names if r % 2 == 0 else names[::-1]:
            a = clock.mark()
            steps[name]()
            b = clock.mark()
            clock.sync()
            times[name].append(clock.elapsed(a, b))
    return times


def summarize(times: dict[str, list[float]], first: str, second: str) -> dict:
    """Medians, the per-round ratio ``second / first`` (median, min, max) and each step's first-half over
    second-half median (its own drift)."""
    a, b = times[first], times[second]
    ratios = [y / x for x, y in zip(a, b, strict=True)]
    half = len(a) // 2

    def drift(t: list[float]) -> float | None:
        return statistics.median(t[:half]) / statistics.median(t[half:]) if half else None

    return {
        "median_ms": {first: statistics.median(a), second: statistics.median(b)},
        "ratio_of_medians": statistics.median(b) / statistics.median(a),
        "round_ratio": {"median": statistics.median(ratios), "min": min(ratios), "max": max(ratios)},
        "own_drift": {first: drift(a), second: drift(b)},
    }


def run_row(layout: str, length: int, cp: int, strategies: tuple[str, str], args, device, clock) -> dict:
    """Both strategies' mixers on one fake group of ``cp`` ranks, the same batch, steps interleaved."""
    with sim.fake_group(cp) as group:
        steps = {}
        for strategy in strategies:
            spec = sim.RowSpec("mixer", layout, length, cp, strategy)
            steps[strategy], _ = sim.mixer_row_step(spec, args, device, group)
        times = interleaved(steps, clock, args.warmup, args.rounds)
        del steps
    sim.free_memory(device)
    return {"row": f"{layout}:{length}:{cp}", "times_ms": times, **summarize(times, *strategies)}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rows", required=True, help="comma-separated LAYOUT:L:CP")
    p.add_argument("--strategies", default="hidden,state_passing", help="two strategies; the ratio is second/first")
    p.add_argument("--model", default=None, help="a bench_mixer.MODELS key (default nemotron8b; CPU tiny)")
    p.add_argument("--dtype", default=None, help="default bfloat16 on CUDA, float32 on CPU")
    p.add_argument("--docs", type=int, default=64, help="documents in a packed batch")
    p.add_argument("--multiple", type=int, default=None, help="document lengths' multiple (default 2 * the largest cp)")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--rounds", type=int, default=20)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=None)
    p.add_argument("--tag", default="")
    args = p.parse_args(argv)
    strategies = tuple(args.strategies.split(","))
    if len(strategies) != 2:
        p.error(f"--strategies takes two names, got {args.strategies!r}")
    rows = [parse_row(r) for r in args.rows.split(",")]
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    args.model = args.model or ("nemotron8b" if device.type == "cuda" else "tiny")
    args.dtype = args.dtype or ("bfloat16" if device.type == "cuda" else "float32")
    args.multiple = args.multiple or 2 * max(cp for _, _, cp in rows)  # one pack for every row, as simulate_rank
    clock = bench.Clock(device)
    out = Path(args.out) if args.out else None
    results = []
    for layout, length, cp in rows:
        res = run_row(layout, length, cp, strategies, args, device, clock)
        results.append(res)
        rr, med = res["round_ratio"], res["median_ms"]
        drift = ", ".join(f"{k} {v:.3f}" for k, v in res["own_drift"].items() if v is not None)
        print(
            f"{res['row']}: {strategies[0]} {med[strategies[0]]:.2f} ms, {strategies[1]} {med[strategies[1]]:.2f} ms; "
            f"{strategies[1]}/{strategies[0]} {res['ratio_of_medians']:.3f} (rounds: median {rr['median']:.3f}, "
            f"{rr['min']:.3f}..{rr['max']:.3f}); own drift {drift or 'n/a'}",
            flush=True,
        )
        if out is not None:
            out.mkdir(parents=True, exist_ok=True)
            name = f"pair_rank{'_' + args.tag if args.tag else ''}.json"
            record = {"device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu", "args": vars(args)}
            (out / name).write_text(json.dumps({**record, "rows": results}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
