"""The ``mamba-cp`` command: ``demo``, ``verify``, ``generate``, ``bench`` and ``plan``.

``demo`` runs a tiny mixer at cp=2 on CPU (gloo, two forked processes) with and without CP, on a BSHD and a
packed THD batch, and prints the largest relative difference of the output and of every gradient.
``verify`` does the same for any configuration: on CPU it spawns gloo processes itself; launched with
``torchrun`` it uses the launched ranks (NCCL on GPUs with ``--device cuda``). ``generate`` prefills a small
random-weight transformers model under CP and compares its greedy tokens and cache with plain generation.
``bench`` runs ``benchmarks/bench_mixer.py``; ``plan`` prints the bytes each strategy moves per layer.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections.abc import Sequence

TOLERANCE = {"float64": 1e-10, "float32": 1e-4, "bfloat16": 3e-2, "float16": 5e-3}
"""Largest accepted ``max|cp - ref| / max|ref|`` per dtype (float64: rounding level)."""


def _print_report(title: str, worst: dict[str, float], tol: float) -> bool:
    ok = all(v <= tol for v in worst.values())
    print(f"\n{title}")
    print(f"  {'tensor':<22} {'max rel. diff':>14}")
    for name, value in worst.items():
        flag = "" if value <= tol else "  <-- above tolerance"
        print(f"  {name:<22} {value:14.3e}{flag}")
    print(f"  {'PASS' if ok else 'FAIL'} (tolerance {tol:.0e})")
    return ok


def _run_case(case, cp: int, device: str) -> dict[str, float]:
    from .testing import run_on_ranks
    from .testing.parity import case_dict, parity_worker, worst_relative

    if "RANK" in os.environ and "WORLD_SIZE" in os.environ:
        return _run_case_launched(case, device)
    if device != "cpu":
        raise SystemExit("verify on GPUs must be launched with torchrun (one process per GPU)")
    return worst_relative(run_on_ranks(parity_worker, cp, case_dict(case)))


def _run_case_launched(case, device: str) -> dict[str, float]:
    """Run under torchrun: this process is one rank; results are gathered to every rank."""
    import torch
    import torch.distributed as dist

    from .testing.parity import case_dict, parity_worker, worst_relative

    owned = not dist.is_initialized()
    if owned:
        backend = "nccl" if device == "cuda" else "gloo"
        if device == "cuda":
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group(backend)
    try:
        rank, world = dist.get_rank(), dist.get_world_size()
        dev = f"cuda:{torch.cuda.current_device()}" if device == "cuda" else "cpu"
        mine = parity_worker(rank, world, case_dict(case), dev)
        everyone: list = [None] * world
        dist.all_gather_object(everyone, mine)
        return worst_relative(everyone)
    finally:
        if owned:
            dist.destroy_process_group()


def demo(argv: Sequence[str] | None = None) -> int:
    """cp=2 on CPU, BSHD and packed THD (per sequence, and as one stream), float64: prints the differences and
    returns 0 if exact."""
    from .testing.parity import ParityCase

    argparse.ArgumentParser(prog="mamba-cp demo", description=demo.__doc__).parse_args(argv)
    cp = 2
    cases = [
        ("BSHD batch [B=2, L=64] sharded head-tail over cp=2", ParityCase(layout="bshd", batch=2, seqlen=64)),
        ("packed THD batch, seqlens [28, 4, 44, 12], cp=2", ParityCase(layout="thd", seqlens=[28, 4, 44, 12])),
        (
            "packed THD cut as one stream, seqlens [27, 5, 43, 13], state passing, cp=2",
            ParityCase(layout="thd", seqlens=[27, 5, 43, 13], packed_layout="stream", strategy="state_passing"),
        ),
    ]
    print("mamba-cp demo: a Mamba2 mixer (hidden 16, 4 heads x 4, 2 groups, state 8, conv 4, chunk 8), float64,")
    print("CP over 2 gloo processes (hidden-parallel unless said) vs the same mixer without CP.")
    print("Compared: output, input gradient and every parameter gradient (CP gradients summed over ranks).")
    ok = True
    for title, case in cases:
        start = time.perf_counter()
        worst = _run_case(case, cp, "cpu")
        ok &= _print_report(f"{title} ({time.perf_counter() - start:.2f} s)", worst, TOLERANCE[case.dtype])
    print("\nall exact to rounding level" if ok else "\nMISMATCH: CP differs from the plain mixer")
    return 0 if ok else 1


def positive_int(text: str) -> int:
    """argparse type: an integer >= 1 (a CP size, a length, a head count...)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be an integer >= 1, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be an integer >= 1, got {value}")
    return value


def positive_int_list(text: str) -> list[int]:
    """argparse type: a comma-separated list of integers, each >= 1 (``"2,4,8"``)."""
    items = [item.strip() for item in text.split(",")]
    if not text.strip() or any(not item for item in items):
        raise argparse.ArgumentTypeError(f"must be a comma-separated list of integers >= 1, got {text!r}")
    values = []
    for item in items:
        try:
            values.append(positive_int(item))
        except argparse.ArgumentTypeError as err:
            raise argparse.ArgumentTypeError(f"each value of {text!r} {err}") from None
    return values


def verify(argv: Sequence[str] | None = None) -> int:
    """Parity of any configuration; exit status 1 if any difference is above the dtype's tolerance."""
    from .testing.parity import ParityCase

    p = argparse.ArgumentParser(prog="mamba-cp verify", description=verify.__doc__)
    p.add_argument(
        "--cp", type=positive_int, default=2, help="CP size >= 1 (ignored under torchrun: the world size is used)"
    )
    p.add_argument("--layout", choices=["bshd", "thd"], default="bshd")
    p.add_argument(
        "--packed-layout", choices=["sequences", "stream"], default="sequences", help="how a THD pack is cut"
    )
    p.add_argument("--strategy", default="hidden")
    p.add_argument("--batch", type=positive_int, default=2)
    p.add_argument("--seqlen", type=positive_int, default=64, help="BSHD sequence length (a multiple of 2*cp)")
    p.add_argument("--seqlens", type=positive_int_list, default=[16, 8, 24], help="THD lengths, comma-separated")
    p.add_argument("--hidden", type=positive_int, default=16)
    p.add_argument("--heads", type=positive_int, default=4)
    p.add_argument("--head-dim", type=positive_int, default=4)
    p.add_argument("--groups", type=positive_int, default=2)
    p.add_argument("--state", type=positive_int, default=8)
    p.add_argument("--conv", type=positive_int, default=4)
    p.add_argument("--chunk", type=positive_int, default=8)
    p.add_argument("--dtype", choices=sorted(TOLERANCE), default="float64")
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    case = ParityCase(
        layout=args.layout,
        batch=args.batch,
        seqlen=args.seqlen,
        seqlens=args.seqlens,
        packed_layout=args.packed_layout,
        hidden_size=args.hidden,
        num_heads=args.heads,
        head_dim=args.head_dim,
        n_groups=args.groups,
        state_size=args.state,
        conv_kernel=args.conv,
        chunk_size=args.chunk,
        dtype=args.dtype,
        seed=args.seed,
        strategy=args.strategy,
    )
    cp = int(os.environ.get("WORLD_SIZE", args.cp))
    worst = _run_case(case, cp, args.device)
    if int(os.environ.get("RANK", "0")) != 0:
        return 0 if all(v <= TOLERANCE[args.dtype] for v in worst.values()) else 1
    ok = _print_report(f"cp={cp} {args.strategy}: {case.describe()}", worst, TOLERANCE[args.dtype])
    return 0 if ok else 1


def bench(argv: Sequence[str] | None = None) -> int:
    """Run ``benchmarks/bench_mixer.py`` (from a source checkout) with the given arguments; with ``--simulate``,
    ``benchmarks/simulate_rank.py`` instead (one CP rank per row on one device, under a fake process group)."""
    import importlib.util
    from pathlib import Path

    argv = list(argv) if argv is not None else []
    simulate = "--simulate" in argv
    if simulate:
        argv = [a for a in argv if a != "--simulate"]
    name = "simulate_rank" if simulate else "bench_mixer"
    path = Path(__file__).resolve().parents[2] / "benchmarks" / f"{name}.py"
    if not path.exists():
        print(f"mamba-cp bench needs a source checkout: {path} not found", file=sys.stderr)
        return 2
    if not simulate and "RANK" not in os.environ:
        print(
            "mamba-cp bench: not launched by torchrun, so only the cp=1 rows run; for cp=N use "
            "`torchrun --standalone --nproc-per-node N -m mamba_cp.cli bench ...`, or simulate one rank of cp=N "
            "on one device with `mamba-cp bench --simulate ...`",
            file=sys.stderr,
        )
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return int(module.main(argv) or 0)


def plan(argv: Sequence[str] | None = None) -> int:
    """Bytes each strategy moves off-rank per layer (forward; backward is the same) for a mixer and length."""
    from .ssm_block import SSMShape
    from .traffic import STRATEGY_BYTES

    p = argparse.ArgumentParser(prog="mamba-cp plan", description=plan.__doc__)
    p.add_argument("--heads", type=positive_int, default=128)
    p.add_argument("--head-dim", type=positive_int, default=64)
    p.add_argument("--groups", type=positive_int, default=8)
    p.add_argument("--state", type=positive_int, default=128)
    p.add_argument("--tokens", type=positive_int, default=131072, help="global tokens B*L (or T)")
    p.add_argument("--cp", type=positive_int_list, default=[2, 4, 8], help="CP sizes, comma-separated, each >= 1")
    p.add_argument("--dtype-bytes", type=positive_int, default=2)
    args = p.parse_args(argv)
    dims = SSMShape(args.heads, args.head_dim, args.groups, args.state)
    names = {"hidden": "hidden (ours)", "state_passing": "state passing (ours)", "nemo_automodel": "NeMo AutoModel 0.7"}
    print(
        f"mixer: {args.heads} heads x {args.head_dim}, {args.groups} groups, state {args.state}; "
        f"{args.tokens} tokens; {args.dtype_bytes}-byte activations"
    )
    print(f"{'strategy':<22} {'cp':>3} {'MB off-rank per rank per layer (fwd)':>38}")
    for key, fn in STRATEGY_BYTES.items():
        for cp in args.cp:
            off = fn(dims, args.tokens, cp, args.dtype_bytes)["off_rank"]
            print(f"{names[key]:<22} {cp:>3} {off / 1e6:>38.1f}")
    return 0


def generate(argv: Sequence[str] | None = None) -> int:
    """Prefill under CP, generate greedily, compare tokens and cache with the plain model; exit status 1 on a
    mismatch. CPU: a small random-weight float64 model, one gloo process per rank (forked)."""
    from .prefill_check import MODELS, TOLERANCE, Case, check_worker, worst
    from .testing import run_on_ranks

    p = argparse.ArgumentParser(prog="mamba-cp generate", description=generate.__doc__)
    p.add_argument("--cp", type=positive_int, default=2, help="CP size >= 1 (gloo processes)")
    p.add_argument("--model", choices=MODELS, default="nemotron_h")
    p.add_argument("--strategy", choices=["hidden", "state_passing"], default="hidden")
    p.add_argument("--layout", choices=["bshd", "thd"], default="bshd", help="two prompts, or a pack of three")
    p.add_argument("--tokens", type=positive_int, default=16, help="greedy tokens to generate")
    args = p.parse_args(argv)
    case = Case(args.model, args.layout, args.strategy, args.tokens)
    start = time.perf_counter()
    per_rank = [check_worker(0, 1, [case])] if args.cp == 1 else run_on_ranks(check_worker, args.cp, [case])
    errors, tokens_ok = worst([r[case.name] for r in per_rank])
    print(
        f"mamba-cp generate: {args.model} ({args.layout}), {args.strategy} CP over {args.cp} gloo process(es), "
        f"float64; prefill under CP, then {args.tokens} greedy tokens on every rank without CP, against the plain "
        f"model ({time.perf_counter() - start:.1f} s)"
    )
    ok = _print_report("last-token logits and every cache tensor (max over ranks)", errors, TOLERANCE)
    print(f"\ngenerated (rank 0): {per_rank[0][case.name]['tokens']}")
    print(f"tokens equal to the plain model's generate on every rank: {'yes' if tokens_ok else 'NO'}")
    return 0 if ok and tokens_ok else 1


COMMANDS = {"demo": demo, "verify": verify, "bench": bench, "plan": plan, "generate": generate}


def main(argv: Sequence[str] | None = None) -> int:
    """Run ``mamba-cp COMMAND [options]``; returns the exit status (2 for bad options or a refused configuration,
    with the reason on stderr)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in COMMANDS:
        print("usage: mamba-cp {demo,verify,bench,plan} [options]   (mamba-cp COMMAND --help for options)")
        return 0 if argv and argv[0] in ("-h", "--help") else 2
    try:
        return COMMANDS[argv[0]](argv[1:])
    except ValueError as err:  # a configuration the library refuses: say why, no traceback
        print(f"mamba-cp {argv[0]}: error: {err}", file=sys.stderr)
        return 2
    except SystemExit as stop:  # argparse: a bad option (2, message printed) or --help (0); a status to return
        if stop.code is None or isinstance(stop.code, int):
            return stop.code or 0
        print(stop.code, file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
