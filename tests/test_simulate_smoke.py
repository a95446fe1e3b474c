"""The one-device rank simulator (benchmarks/simulate_rank.py): CPU rows under the fake process group, its JSON,
the crash-restart of its child process, and the arithmetic behind its extrapolations and step estimates."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest
import torch

from mamba_cp.ssm_block import SSMShape
from mamba_cp.traffic import STRATEGY_BYTES

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "simulate_rank.py"


@pytest.fixture(scope="module")
def sim():
    spec = importlib.util.spec_from_file_location("simulate_rank", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _rows(path: Path) -> dict[str, dict]:
    report = json.loads(path.read_text())
    return {r["key"]: r for r in report["rows"]}


# ------------------------------------------------------------------------------------------------ CPU runs

COMMON = ["--device", "cpu", "--isolate", "off", "--warmup", "1", "--iters", "1", "--hybrid-iters", "1"]


def test_mixer_rows_on_cpu(sim, tmp_path):
    argv = [*COMMON, "--what", "mixer", "--cps", "1,2", "--lengths", "128", "--out", str(tmp_path)]
    assert sim.main(argv) == 0
    report = json.loads((tmp_path / "simulate_rank.json").read_text())
    assert report["env"]["card_memory_bytes"] is None and "None on CPU" in report["method"]["peak"]
    rows = {r["key"]: r for r in report["rows"]}
    expected = {f"mixer/{lay}/L128/cp{cp}/{s}" for lay in ("bshd", "thd") for cp, s in
                ((1, "plain"), (2, "hidden"), (2, "state_passing"))}  # fmt: skip
    assert set(rows) == expected
    for key, row in rows.items():
        assert row["status"] == "ok", (key, row.get("error"))
        assert row["ms"] > 0 and row["peak_bytes"] is None  # no peak memory on CPU
        if row["spec"]["cp"] == 1:
            assert row["estimates"] == []
            continue
        assert row["counted_bytes"] > 0 and row["plan_bytes"] > 0
        for est in row["estimates"]:
            assert est["estimate"] is True and est["comm_ms"] > 0
            assert est["step_ms"] == pytest.approx(est["compute_ms"] + est["exposed_ms"])
            assert 0 <= est["exposed_ms"] <= est["comm_ms"] + 1e-9
    hidden = rows["mixer/bshd/L128/cp2/hidden"]
    assert set(hidden["hideable_ms"]) == {"z_first_half", "z_second_half", "dW_z", "dh_z"}
    assert hidden["collectives"] == {"alltoall_base_": 4}
    # The plan's bytes (STRATEGY_BYTES, fwd + bwd, float32 here) are what the all-to-alls were handed, less the
    # rank's own share.
    dims = report["settings"]["mixer_config"]
    shape = SSMShape(dims["num_heads"], dims["head_dim"], dims["n_groups"], dims["state_size"])
    assert hidden["plan_bytes"] == 2 * STRATEGY_BYTES["hidden"](shape, 128, 2, 4)["off_rank"]
    assert hidden["counted_bytes"] == pytest.approx(hidden["plan_bytes"])
    assert rows["mixer/thd/L128/cp2/state_passing"]["sequences"] > 1
    md = (tmp_path / "simulate_rank.md").read_text()
    assert "Whole-step ESTIMATE" in md and "| thd | 128 |" in md


def test_hybrid_rows_on_cpu(sim, tmp_path):
    argv = [*COMMON, "--what", "hybrid", "--cps", "1,2", "--strategies", "hidden", "--layouts", "bshd",
            "--lengths", "64", "--out", str(tmp_path)]  # fmt: skip
    assert sim.main(argv) == 0
    rows = _rows(tmp_path / "simulate_rank.json")
    assert set(rows) == {"hybrid/bshd/L64/cp1/plain", "hybrid/bshd/L64/cp2/hidden"}
    row = rows["hybrid/bshd/L64/cp2/hidden"]
    assert row["status"] == "ok", row.get("error")
    assert [d["layers"] for d in row["depths"]] == [5, 10]
    for d in row["depths"]:
        assert d["ms"] > 0 and d["peak_bytes"] is None
        assert set(d["kind_ms"]) == {"M", "*", "-"} and all(v > 0 for v in d["kind_ms"].values())
        assert d["kind_param_bytes"]["-"] > 0
    full = row["full"]
    assert full["layers"] == 52 and full["counts"] == {"M": 24, "*": 4, "-": 24} and full["ms"] > 0
    assert "peak_bytes" not in full  # nothing to extrapolate from without a peak
    (est150, est25) = row["estimates"]
    assert est150["bandwidth_gbps"] == 150 and est25["bandwidth_gbps"] == 25
    assert est25["comm_ms"] > est150["comm_ms"] > 0 and est150["compute_ms"] == full["ms"]


def test_stream_rows_on_cpu(sim, tmp_path):
    """The ``stream`` layout: the pack cut as one stream, mixer and hybrid, both strategies; the plan bytes of state
    passing are a row's (one chain) whatever the documents."""
    argv = [*COMMON, "--what", "mixer,hybrid", "--cps", "2", "--layouts", "stream", "--lengths", "64", "--docs", "5",
            "--out", str(tmp_path)]  # fmt: skip
    assert sim.main(argv) == 0
    report = json.loads((tmp_path / "simulate_rank.json").read_text())
    rows = {r["key"]: r for r in report["rows"]}
    assert {r["status"] for r in rows.values()} == {"ok"}, {k: r.get("error") for k, r in rows.items()}
    assert set(rows) == {f"{w}/stream/L64/cp2/{s}" for w in ("mixer", "hybrid") for s in ("hidden", "state_passing")}
    dims = report["settings"]["mixer_config"]
    shape = SSMShape(dims["num_heads"], dims["head_dim"], dims["n_groups"], dims["state_size"])
    sp = rows["mixer/stream/L64/cp2/state_passing"]
    assert sp["sequences"] > 1
    want = STRATEGY_BYTES["state_passing"](shape, 64, 2, 4, conv_kernel=dims["conv_kernel"], stream=True)
    assert sp["plan_bytes"] == 2 * want["off_rank"]


def test_cli_runs_the_simulator(tmp_path, capsys):
    from mamba_cp.cli import main

    argv = ["bench", "--simulate", *COMMON, "--what", "mixer", "--cps", "2", "--strategies", "hidden",
            "--layouts", "bshd", "--lengths", "64", "--out", str(tmp_path)]  # fmt: skip
    assert main(argv) == 0
    assert "[sim] mixer bshd 64 cp=2 hidden:" in capsys.readouterr().out
    assert _rows(tmp_path / "simulate_rank.json")["mixer/bshd/L64/cp2/hidden"]["status"] == "ok"


def test_child_crash_is_recorded_and_the_run_goes_on(sim, tmp_path):
    crash = "mixer/bshd/L64/cp2/hidden"
    argv = ["--device", "cpu", "--isolate", "on", "--what", "mixer", "--cps", "1,2", "--layouts", "bshd",
            "--lengths", "64", "--warmup", "1", "--iters", "1", "--out", str(tmp_path),
            "--crash-row", crash]  # fmt: skip
    assert sim.main(argv) == 0
    rows = _rows(tmp_path / "simulate_rank.json")
    assert rows[crash]["status"] == "error" and rows[crash]["error"].startswith("crash (child exit 70)")
    for key in ("mixer/bshd/L64/cp1/plain", "mixer/bshd/L64/cp2/state_passing"):
        assert rows[key]["status"] == "ok" and rows[key]["ms"] > 0  # run by the restarted child


def test_budget_skips_rows(sim, tmp_path):
    argv = [*COMMON, "--what", "mixer", "--cps", "2", "--strategies", "hidden", "--layouts", "bshd",
            "--lengths", "64,128", "--budget-s", "0", "--out", str(tmp_path)]  # fmt: skip
    assert sim.main(argv) == 0
    rows = _rows(tmp_path / "simulate_rank.json")
    assert {r["status"] for r in rows.values()} == {"skipped"} and len(rows) == 2
    assert all("budget" in r["error"] for r in rows.values())


# ------------------------------------------------------------------------------------------------ arithmetic


def _depth(layers: str, act: float, kinds: dict[str, float], fixed: float) -> dict:
    """A synthetic measured depth: fixed + per-layer activation + weights and gradients of its layers."""
    param = sum(kinds[c] for c in layers)
    return {"layers": len(layers), "peak_bytes": fixed + act * len(layers) + 2 * param,
            "layer_param_bytes": param, "kind_param_bytes": kinds}  # fmt: skip


def test_extrapolated_peak_recovers_a_linear_model(sim):
    kinds = {"M": 220.0, "*": 84.0, "-": 352.0}
    d1, d2 = _depth("M-M*-", 10.0, kinds, 1000.0), _depth("M-M*-" * 2, 10.0, kinds, 1000.0)
    full = sim.NEMOTRON_H_8B_PATTERN
    truth = _depth(full, 10.0, kinds, 1000.0)["peak_bytes"]
    got = sim.extrapolate_peak(d1, d2, full)
    assert got["peak_bytes"] == pytest.approx(truth) and got["per_layer_act_bytes"] == pytest.approx(10.0)
    with pytest.raises(ValueError, match="no layer of kind"):
        sim.extrapolate_peak(d1, d2, "ME")


def test_extrapolated_time_adds_per_kind_layer_times(sim):
    d = {"rest_ms": 5.0, "kind_ms": {"M": 2.0, "*": 7.0, "-": 1.0}}
    assert sim.extrapolate_time(d, sim.NEMOTRON_H_8B_PATTERN) == pytest.approx(5 + 24 * 2 + 4 * 7 + 24 * 1)


def test_longest_length(sim):
    gib = 2**30
    cap = 100 * gib
    interp = sim.longest_length([(100, 40 * gib, "ok"), (200, 160 * gib, "ok")], cap, extrapolate=True)
    assert interp["L"] == pytest.approx(150) and "interpolated" in interp["how"]
    bounded = sim.longest_length([(100, 40 * gib, "ok"), (200, None, "oom")], cap, extrapolate=False)
    assert bounded["L"] == 100 and "< 200 (oom)" in bounded["how"]
    extra = sim.longest_length([(100, 20 * gib, "ok"), (200, 40 * gib, "ok")], cap, extrapolate=True)
    assert extra["L"] == pytest.approx(500) and "extrapolated" in extra["how"]
    skipped = sim.longest_length([(100, 20 * gib, "ok"), (200, None, "skipped")], cap, extrapolate=False)
    assert skipped["L"] == 100 and "not measured (skipped)" in skipped["how"]
    assert sim.longest_length([(100, None, "oom")], cap, extrapolate=True)["L"] is None


def test_exchanges_match_strategy_bytes_and_hide(sim):
    shape = SSMShape(128, 64, 8, 128)
    tokens, cp = 131072, 4
    ex = sim.mixer_exchanges(shape, tokens, cp, "hidden", 1, 4)
    assert sum(e["bytes"] for e in ex) == 2 * STRATEGY_BYTES["hidden"](shape, tokens, cp)["off_rank"]
    sp = sim.mixer_exchanges(shape, tokens, cp, "state_passing", 64, 4)
    per_pass = STRATEGY_BYTES["state_passing"](shape, tokens, cp, conv_kernel=4, num_seqs=64)["off_rank"]
    assert sum(e["bytes"] for e in sp) == 2 * per_pass
    hide = {"z_first_half": 1.0, "z_second_half": 1.0, "dW_z": 100.0, "dh_z": 0.0}
    one = sim.exposed_ms(ex, hide, 100.0, 0.0, passes=1)
    comm = [e["bytes"] / 100e9 * 1e3 for e in ex]
    want = sum(max(0.0, c - hide[e["hide"]]) for c, e in zip(comm, ex, strict=True))
    assert one["comm_ms"] == pytest.approx(sum(comm)) and one["exposed_ms"] == pytest.approx(want)
    two = sim.exposed_ms(ex, hide, 100.0, 0.0, passes=2)  # checkpointing: the forward exchanges run twice
    assert two["comm_ms"] == pytest.approx(sum(comm) + comm[0] + comm[1])
    assert sim.mixer_exchanges(shape, tokens, 1, "hidden", 1, 4) == []


def test_int32_guard_matches_the_known_crashes(sim):
    """docs/design.md §6: the plain mixer crashes at 512K (not 256K), hidden-parallel at 1M with cp=2; state passing
    at cp=2 runs 1M on BSHD and would crash at 2M (128 heads x 64)."""

    def hazard(length, cp, strategy, layout="bshd"):
        return sim.int32_hazard(sim.RowSpec("mixer", layout, length, cp, strategy), 128, 64)

    assert hazard(2**18, 1, "plain") is None and hazard(2**19, 1, "plain")
    assert hazard(2**19, 2, "hidden") is None and hazard(2**20, 2, "hidden")
    assert hazard(2**20, 2, "state_passing") is None and hazard(2**21, 2, "state_passing")
    assert hazard(2**20, 2, "state_passing", "thd")  # the packed local stream is one kernel row
    assert hazard(2**21, 8, "hidden") is None


def test_rows_are_planned_cheapest_first(sim):
    args = sim.resolve(sim.parse_args(["--device", "cpu", "--cps", "1,2,4", "--lengths", "64,128"]), [])
    rows = sim.plan_rows(args)
    assert len(rows) == 2 * 2 * 2 * (1 + 2 * 2)  # what x L x layout x (plain + 2 cps x 2 strategies)
    mixer = [r for r in rows if r.what == "mixer"]
    assert mixer == rows[: len(mixer)]
    assert [r.cost() for r in mixer] == sorted(r.cost() for r in mixer)


def _gpu_like_rows(sim) -> list[dict]:
    """Rows as a CUDA run would record them (peaks present), for the report code that CPU runs cannot reach."""
    gib = 2**30
    rows = []

    def add(what, length, cp, strategy, status="ok", **fields):
        spec = sim.RowSpec(what, "bshd", length, cp, strategy)
        rows.append({"key": spec.key, "spec": spec._asdict(), "status": status, "seconds": 1.0, **fields})

    add("mixer", 2**17, 1, "plain", ms=196.0, peak_bytes=30 * gib, estimates=[])
    add("mixer", 2**18, 1, "plain", status="oom", error="OutOfMemoryError: CUDA out of memory.")
    est = [{"bandwidth_gbps": 150.0, "latency_us": 10.0, "comm_bytes": 1e9, "comm_ms": 7.0, "hidden_ms": 5.0,
            "exposed_ms": 2.0, "compute_ms": 50.0, "step_ms": 52.0, "estimate": True}]  # fmt: skip
    add("mixer", 2**17, 4, "hidden", ms=50.0, peak_bytes=9 * gib, estimates=est, hideable_ms={"dW_z": 1.0})
    for length, peak in ((2**17, 40 * gib), (2**18, 70 * gib)):
        depths = [{"layers": n, "ms": 100.0 * n, "peak_bytes": peak / 4 * n} for n in (5, 10)]
        full = {"layers": 52, "ms": 5200.0, "peak_bytes": peak, "train_peak_bytes": peak + 20 * gib}
        add("hybrid", length, 8, "hidden", ms=1000.0, peak_bytes=peak / 2, depths=depths, full=full, estimates=est)
    return rows


def test_report_tables_with_card_memory(sim, tmp_path):
    args = sim.resolve(sim.parse_args(["--device", "cpu", "--out", str(tmp_path), "--cps", "1,4,8"]), [])
    env = {"device_name": "NVIDIA H200", "card_memory_bytes": 100 * 2**30, "torch": "2.11", "transformers": "5.17",
           "kernels": {"ssd_chunk_scan": "mamba_ssm"}}  # fmt: skip
    rows = _gpu_like_rows(sim)
    report = sim.write_report(args, tmp_path / "log.jsonl", png=False, rows=rows, env=env)
    longest = {(e["what"], e["strategy"], e["cp"]): e for e in report["longest"]}
    assert longest[("mixer", "plain", 1)]["fwd_bwd"]["how"] == ">= 128K, < 256K (oom)"
    # hybrid: 40 GiB at 128K, 70 GiB at 256K -> 100 GiB crossed at 384K by extrapolation; with optimizer 60/90.
    assert longest[("hybrid", "hidden", 8)]["fwd_bwd"]["L"] == pytest.approx(3 * 2**17)
    assert longest[("hybrid", "hidden", 8)]["train"]["L"] == pytest.approx(2**17 + 2**17 * 40 / 30)
    md = (tmp_path / "simulate_rank.md").read_text()
    assert "Longest trainable L: full-depth hybrid with optimizer state" in md and "384K (extrapolated" in md
    assert "| bshd | 128K | 30.0 (oom" not in md and "OOM" in md
    assert "100.0 GiB (total_memory read from the device" in md


# ------------------------------------------------------------------------------------------------ pair_rank


def test_pair_rank_interleaves_the_steps_and_reports_ratios(tmp_path):
    """``pair_rank.py``: both strategies' real mixers on one fake group (CPU, tiny model), the step order reversed
    every other round, and the summary's numbers computed from the recorded times."""
    sys.path.insert(0, str(SCRIPT.parent))
    import pair_rank

    order: list[str] = []
    clock = pair_rank.bench.Clock(torch.device("cpu"))
    steps = {"a": lambda: order.append("a"), "b": lambda: order.append("b")}
    times = pair_rank.interleaved(steps, clock, warmup=1, rounds=3)
    assert order == ["a", "b", "a", "b", "b", "a", "a", "b"] and all(len(v) == 3 for v in times.values())
    got = pair_rank.summarize({"h": [1.0, 2.0, 4.0, 4.0], "s": [2.0, 2.0, 2.0, 6.0]}, "h", "s")
    assert got["ratio_of_medians"] == 2.0 / 3.0 and got["round_ratio"] == {"median": 1.25, "min": 0.5, "max": 2.0}
    assert got["own_drift"] == {"h": 1.5 / 4.0, "s": 1.0 / 2.0}
    with pytest.raises(ValueError, match="cp must be at least 2"):
        pair_rank.parse_row("bshd:1K:1")

    argv = ["--rows", "bshd:64:2,stream:128:4", "--rounds", "2", "--warmup", "1", "--docs", "3", "--out", str(tmp_path)]
    assert pair_rank.main(argv) == 0
    report = json.loads((tmp_path / "pair_rank.json").read_text())
    assert [r["row"] for r in report["rows"]] == ["bshd:64:2", "stream:128:4"]
    for row in report["rows"]:
        med = row["median_ms"]
        assert row["ratio_of_medians"] == med["state_passing"] / med["hidden"] > 0
        assert all(len(v) == 2 for v in row["times_ms"].values())
