"""The mixer benchmark's CPU mode: two gloo ranks, tiny sizes, every registered strategy; it writes its JSON."""

from __future__ import annotations

import importlib.util
import json
import time
from pathlib import Path

from mamba_cp.parallelize import STRATEGIES
from mamba_cp.testing import run_on_ranks

BENCH = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_mixer.py"


def _bench_worker(rank: int, world_size: int, out: str) -> int:
    spec = importlib.util.spec_from_file_location("bench_mixer", BENCH)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    argv = ["--device", "cpu", "--lengths", "64", "--warmup", "1", "--iters", "1", "--out", out, "--no-nemo"]
    return module.main(argv)


def test_bench_cpu_smoke(tmp_path):
    start = time.perf_counter()
    assert run_on_ranks(_bench_worker, 2, str(tmp_path), timeout=60) == [0, 0]
    assert time.perf_counter() - start < 30
    report = json.loads((tmp_path / "bench_mixer.json").read_text())
    impls = {(r["layout"], r["impl"]) for r in report["results"]}
    for layout in ("bshd", "thd"):
        assert (layout, "cp1") in impls
        for name in STRATEGIES:
            assert (layout, f"ours:{name}") in impls
    hidden = next(r for r in report["results"] if r["impl"] == "ours:hidden")
    assert hidden["offrank_bytes"] > 0 and hidden["collectives"] == {"alltoall_base_": 4}
    assert set(hidden["transport"]) == {"pre_fwd", "pre_bwd", "post_fwd", "post_bwd", "total"}
    assert (tmp_path / "bench_mixer.md").read_text().startswith("# bench_mixer")
