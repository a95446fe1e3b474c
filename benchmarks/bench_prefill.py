"""GPU benchmark of ``mamba_cp.prefill``: one rank of a CP group on one GPU, per-rank time and peak memory.

A fake process group (``torch.testing._internal.distributed.fake_pg``: ``FakeStore`` + the ``"fake"`` backend,
re-initialised for every row, as ``benchmarks/simulate_rank.py`` does) makes every collective complete at once
without moving data between ranks (it hands every rank's slot this rank's buffer), so rank 0 runs exactly its own
share of the prefill: its head-tail shard of the prompt through every layer (``torch.no_grad()``), its
``scan_with_states`` and the gathers that build the cache, with its own memory. Communication time is therefore
not in the numbers (``mamba-cp plan`` and ``simulate_rank.py``'s comm model give it); the cache-building gathers
move ``S * (H*P*N + C*K)`` values per Mamba layer and the keys and values of every token per attention layer.

Model: a transformers ``NemotronHForCausalLM`` of NemotronH-8B width (``--model nemotron8b``: hidden 4096, 128
Mamba heads x 64, 8 groups, state 128, 32 query / 8 kv heads of 128, MLP 21504; random weights, small vocab) with
``--pattern`` (default NemotronH-8B's 52 layers: 24 Mamba2, 4 attention, 24 MLP), ``attn_implementation="sdpa"``,
in ``--dtype`` (bf16), parallelized over the fake group by ``mamba_cp.parallelize`` (``plain``: cp=1, no CP).
One prompt ``[1, L]`` for every ``L`` in ``--lengths`` (128K, 512K, 1M) and ``cp`` in ``--cps`` (1..8).

Measured per row: the median time of ``--iters`` prefills after ``--warmup`` (CUDA events), the peak allocated
memory over them (``torch.cuda.max_memory_allocated`` after ``reset_peak_memory_stats``; the weights are
allocated before the reset and reported as ``weights_gib``, ``act_gib`` is the peak less what was allocated at
the reset, the returned cache included), and the bytes of the cache the prefill returns (``cache_gib``: the
attention layers' keys and values grow with ``L``, the Mamba layers' states do not). A row that runs out of memory
is recorded with the error and the run goes on. Outputs: ``--out``/``bench_prefill.json`` and ``.md``.

Without CUDA (``--device cuda``, the default) it prints that it needs CUDA and exits 0: nothing is measured. With
``--device cpu --model tiny`` the same code runs on the CPU (host clock, no peak): a smoke test of the script.
"""

from __future__ import annotations

import argparse
import gc
import json
import statistics
import sys
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent

# The sibling benchmarks: the hybrid widths, layer patterns and fake group of simulate_rank, bench_mixer's clock.
sys.path.insert(0, str(HERE))
import bench_mixer as bm  # noqa: E402
import simulate_rank as sim  # noqa: E402

NEMOTRON_H_8B_PATTERN, LAYER_KINDS, MODELS = sim.NEMOTRON_H_8B_PATTERN, sim.LAYER_KINDS, sim.HYBRIDS
fake_group = sim.fake_group

GIB = 2**30


def int_list(text: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be comma-separated integers, got {text!r}") from None
    if not values or any(v < 1 for v in values):
        raise argparse.ArgumentTypeError(f"every value must be >= 1, got {text!r}")
    return values


def parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="bench_prefill.py", description=__doc__.split("\n\n")[0])
    p.add_argument("--lengths", type=int_list, default=[131072, 524288, 1048576], help="prompt tokens L")
    p.add_argument("--cps", type=int_list, default=[1, 2, 4, 8])
    p.add_argument("--strategies", default="hidden,state_passing")
    p.add_argument("--model", choices=sorted(MODELS), default="nemotron8b")
    p.add_argument("--pattern", default=NEMOTRON_H_8B_PATTERN, help="NemotronH layer letters: M Mamba2, * attn, - MLP")
    p.add_argument("--vocab", type=int, default=1024)
    p.add_argument("--dtype", choices=["bfloat16", "float16", "float32"], default="bfloat16")
    p.add_argument("--device", default="cuda")
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--iters", type=int, default=3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=HERE / "results")
    p.add_argument("--budget-s", type=float, default=1e9, help="start no row after this many seconds")
    return p.parse_args(argv)


def build_model(args: argparse.Namespace, device: torch.device):
    """The NemotronH hybrid of ``--pattern`` in eval mode, built once: in float32, converted by
    ``mamba_cp.parallelize(model, 1)``, then cast (``A_log``, ``D``, ``dt_bias`` stay float32). Each row
    parallelizes it again over its own fake group (same parameters)."""
    import transformers

    import mamba_cp

    config = transformers.NemotronHConfig(
        vocab_size=args.vocab,
        layers_block_type=[LAYER_KINDS[c] for c in args.pattern],
        attn_implementation="sdpa",
        **MODELS[args.model],
    )
    torch.manual_seed(args.seed)
    with torch.device(device):
        model = transformers.NemotronHForCausalLM(config)
    mamba_cp.parallelize(model, 1)
    return model.to(getattr(torch, args.dtype)).eval()


def cache_bytes(result) -> int:
    """Bytes of every tensor the returned cache(s) hold."""
    caches = [result.cache] if result.cache is not None else list(result.row_caches)
    total = 0
    for cache in caches:
        for layer in cache.layers:
            for name in ("keys", "values"):
                t = getattr(layer, name, None)
                total += t.numel() * t.element_size() if isinstance(t, torch.Tensor) else 0
            for states in (getattr(layer, "conv_states", {}), getattr(layer, "recurrent_states", {})):
                total += sum(t.numel() * t.element_size() for t in states.values() if isinstance(t, torch.Tensor))
    return total


def run_row(args: argparse.Namespace, model, device: torch.device, length: int, cp: int, strategy: str) -> dict:
    import mamba_cp

    row = {"L": length, "cp": cp, "strategy": strategy, "local_tokens": length // cp}
    if length % (2 * cp):
        return {**row, "error": f"L ({length}) is not a multiple of 2*cp ({2 * cp})"}
    clock = bm.Clock(device)
    with fake_group(cp) as group:
        cp_group = 1 if strategy == "plain" else group
        mamba_cp.parallelize(model, cp_group, strategy="hidden" if strategy == "plain" else strategy)
        gen = torch.Generator(device=device).manual_seed(args.seed)
        ids = torch.randint(0, args.vocab, (1, length // cp), generator=gen, device=device)
        try:
            for _ in range(args.warmup):
                mamba_cp.prefill(model, ids, cp_group)
            gc.collect()
            if device.type == "cuda":
                torch.cuda.synchronize()
                torch.cuda.empty_cache()
                torch.cuda.reset_peak_memory_stats(device)
                base = torch.cuda.memory_allocated(device)
            times, result = [], None
            for _ in range(args.iters):
                result = None  # the previous cache is freed before the next prefill
                a = clock.mark()
                result = mamba_cp.prefill(model, ids, cp_group)
                b = clock.mark()
                clock.sync()
                times.append(clock.elapsed(a, b))
            row.update(ms=statistics.median(times), ms_min=min(times), cache_gib=cache_bytes(result) / GIB)
            if device.type == "cuda":
                peak = torch.cuda.max_memory_allocated(device)
                row.update(peak_gib=peak / GIB, weights_gib=base / GIB, act_gib=(peak - base) / GIB)
            else:
                row.update(peak_gib=None, weights_gib=None, act_gib=None)
        except torch.OutOfMemoryError as err:
            row["error"] = "out of memory: " + str(err).splitlines()[0][:160]
        except RuntimeError as err:
            row["error"] = str(err).splitlines()[0][:200]
        finally:
            del ids
            result = None
            gc.collect()
            if device.type == "cuda":
                torch.cuda.empty_cache()
    return row


def markdown(rows: list[dict], env: dict) -> str:
    lines = [
        "# mamba_cp.prefill, one rank of cp (fake process group)",
        "",
        f"{env['device_name']}, torch {env['torch']}, transformers {env['transformers']}, model {env['model']} "
        f"({len(env['pattern'])} layers), {env['dtype']}. Time and peak of rank 0's prefill (its shard of one "
        "prompt through every layer, the states gathered into the cache); communication not included.",
        "",
        "| L | cp | strategy | ms | peak GiB | act GiB | cache GiB | note |",
        "|---:|---:|---|---:|---:|---:|---:|---|",
    ]

    def fmt(v, spec):
        return "-" if v is None else format(v, spec)

    for r in rows:
        lines.append(
            f"| {r['L']} | {r['cp']} | {r['strategy']} | {fmt(r.get('ms'), '.1f')} | {fmt(r.get('peak_gib'), '.2f')} "
            f"| {fmt(r.get('act_gib'), '.2f')} | {fmt(r.get('cache_gib'), '.4f')} | {r.get('error', '')} |"
        )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print(
            "bench_prefill.py needs CUDA (one GPU; a fake process group stands for the other CP ranks) and this "
            "machine has none: nothing was measured. (--device cpu --model tiny runs the same code on the CPU.)"
        )
        return 0
    import transformers

    strategies = [s for s in args.strategies.split(",") if s]
    env = {
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU",
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "model": args.model,
        "pattern": args.pattern,
        "dtype": args.dtype,
        "command": " ".join(sys.argv),
    }
    model = build_model(args, device)
    rows, start = [], time.perf_counter()
    args.out.mkdir(parents=True, exist_ok=True)
    for length in args.lengths:
        for cp in args.cps:
            for strategy in ["plain"] if cp == 1 else strategies:
                if time.perf_counter() - start > args.budget_s:
                    row = {"L": length, "cp": cp, "strategy": strategy, "error": "not run: --budget-s spent"}
                else:
                    row = run_row(args, model, device, length, cp, strategy)
                rows.append(row)
                print(json.dumps(row), flush=True)
                # after every row, so that a run stopped from outside keeps what it measured
                (args.out / "bench_prefill.json").write_text(json.dumps({"env": env, "rows": rows}, indent=1))
                (args.out / "bench_prefill.md").write_text(markdown(rows, env))
    print(markdown(rows, env))
    return 0


if __name__ == "__main__":
    sys.exit(main())
