"""The mixer profiler's CPU mode: two gloo ranks, tiny sizes, every row; its categories and its no-comm mode."""

from __future__ import annotations

import copy
import json
import math
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from mamba_cp.parallelize import STRATEGIES, parallelize
from mamba_cp.testing import run_on_ranks

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"
sys.path.insert(0, str(BENCHMARKS))
import bench_mixer  # noqa: E402
import profile_mixer  # noqa: E402

NEMO = bench_mixer.DEFAULT_NEMO  # git-ignored: the nemo row runs only where the file was fetched


def _profile_worker(rank: int, world_size: int, out: str, rows: str) -> dict:
    argv = ["--device", "cpu", "--lengths", "64", "--warmup", "1", "--iters", "1", "--profile-steps", "1"]
    argv += ["--rows", rows, "--nemo-path", str(NEMO), "--out", out, "--tag", "smoke"]
    assert profile_mixer.main(argv) == 0
    return _async_no_comm(rank, world_size)


def _async_no_comm(rank: int, world_size: int) -> dict:
    """The fused hidden-parallel path (``async_op=True`` all-to-alls, ``.wait()``) under the stand-ins: no real
    collective, and the stand-ins' gather / scatter slices are this rank's."""
    torch.manual_seed(0)
    base = bench_mixer.Mamba2Mixer(**bench_mixer.MODELS["tiny"], dtype=torch.float32)
    m = parallelize(copy.deepcopy(base), dist.group.WORLD, strategy="hidden")
    x = torch.randn(1, 32, base.hidden_size)
    patch = profile_mixer.NoComm()

    def step() -> None:
        with patch:
            m(x.requires_grad_(True)).sum().backward()

    _, real = bench_mixer.count_bytes(step, world_size)
    with patch:
        gathered = torch.empty(world_size, 3)
        dist.all_gather_into_tensor(gathered, torch.full((3,), float(rank)))
        scattered = torch.empty(2)
        work = dist.reduce_scatter_tensor(scattered, torch.arange(2.0 * world_size), async_op=True)
        done = work.wait() and work.is_completed()
    return {
        "real": real,
        "standin": dict(patch.calls),
        "gathered": gathered.tolist(),
        "scattered": scattered.tolist(),
        "done": done,
    }


def test_profile_cpu_smoke(tmp_path):
    rows = ["cp1", *STRATEGIES] + (["nemo"] if NEMO.exists() else [])
    start = time.perf_counter()
    results = run_on_ranks(_profile_worker, 2, str(tmp_path), ",".join(rows), timeout=60)
    assert time.perf_counter() - start < 20
    report = json.loads((tmp_path / "profile_mixer_smoke.json").read_text())
    labels = ["cp1", *(f"ours:{s}" for s in STRATEGIES)] + (["nemo"] if NEMO.exists() else [])
    assert [(s["layout"], s["L"]) for s in report["sections"]] == [("bshd", 64), ("thd", 64)]
    for section in report["sections"]:
        assert [r["impl"] for r in section["rows"]] == labels
        for r in section["rows"]:
            for rank_view in r["per_rank"]:
                assert list(rank_view["categories_ms"]) == profile_mixer.CATEGORY_NAMES
                assert rank_view["top"] and len(rank_view["top"]) <= profile_mixer.TOP_KERNELS
            assert list(r["categories_ms"]) == profile_mixer.CATEGORY_NAMES
            assert all(math.isfinite(v) and v >= 0 for v in r["categories_ms"].values())
            assert r["kernel_sum_ms"] > 0 and r["step_ms"] > 0 and r["nocomm_ms"] > 0
            assert math.isfinite(r["exposed_comm_ms"])
            # No real collective in no-comm mode; every real one of the normal step had its stand-in.
            assert r["collectives_nocomm"] == {}
            assert sum(r["standin_calls"].values()) == sum(r["collectives"].values())
            if r["cp"] > 1:
                assert sum(r["collectives"].values()) > 0
                assert r["categories_ms"]["nccl"] > 0
        sp = next(r for r in section["rows"] if r["impl"] == "ours:state_passing")
        assert any("gather" in name for name in sp["standin_calls"])
    hidden = next(r for r in report["sections"][0]["rows"] if r["impl"] == "ours:hidden")
    assert hidden["collectives"] == {"alltoall_base_": 4} and hidden["standin_calls"] == {"all_to_all_single": 4}
    assert any(p.startswith("mamba_cp.collectives.") for p in hidden["patched"])  # names bound at import
    text = (tmp_path / "profile_mixer_smoke.md").read_text()
    assert text.startswith("# profile_mixer") and "## THD, L = 64" in text and "exposed comm ms" in text

    for rank, res in enumerate(results):
        assert res["real"] == {} and res["standin"]["all_to_all_single"] >= 4 and res["done"]
        assert res["gathered"] == [[float(rank)] * 3] * 2
        assert res["scattered"] == [2.0 * rank, 2.0 * rank + 1]


@pytest.mark.parametrize(
    ("name", "category"),
    [
        ("_chunk_scan_fwd_kernel", "ssd"),
        ("_bmm_chunk_fwd_kernel", "ssd"),
        ("_state_passing_bwd_kernel", "ssd"),
        ("_chunk_cumsum_fwd_kernel", "ssd"),
        ("_conv_bwd_kernel", "conv"),
        ("_layer_norm_fwd_1pass_kernel", "norm"),
        ("ncclDevKernel_SendRecv(ncclDevKernelArgsStorage<4096ul>)", "nccl"),
        ("ncclDevKernel_AllGather_RING_LL(ncclDevKernelArgsStorage<4096ul>)", "nccl"),
        ("sm90_xmma_gemm_bf16bf16_bf16f32_f32_tn_n_tilesize128x128x64_warpgroupsize1x1x1", "gemm"),
        # Seen on 2x H200 (torch 2.11, mamba_ssm 2.3.2):
        ("nvjet_sm90_tst_192x192_64x4_1x2_h_bz_coopB_TNN", "gemm"),
        ("sm80_xmma_gemm_f32f32_f32f32_f32_nn_n_tilesize128x128x8_stage3_warpsize2x2x1_ffma_aligna4", "gemm"),
        ("at::native::vectorized_elementwise_kernel<8, at::native::FillFunctor<c10::BFloat16>>", "copy/index"),
        ("at::native::tensor_kernel_scan_outer_dim<double, unsigned int, std::plus<double> >", "elementwise/reduce"),
        ("at::native::indexFuncLargeIndex<float, long, unsigned int, 2, 2, -2, true>", "copy/index"),
        ("at::native::vectorized_gather_kernel<16, long>(char*, char*, long*, int, long)", "copy/index"),
        ("at::native::(anonymous namespace)::CatArrayBatchedCopy_vectorized<OpaqueType<2u>>", "copy/index"),
        ("_chunk_scan_chunk_state_bwd_dx_kernel", "ssd"),
        ("_layer_norm_bwd_kernel", "norm"),
        ("void at::native::elementwise_kernel<128, 4, direct_copy_kernel_cuda(at::TensorIteratorBase&)>", "copy/index"),
        ("Memcpy DtoD (Device -> Device)", "copy/index"),
        ("void at::native::index_elementwise_kernel<128, 4>", "copy/index"),
        ("void at::native::vectorized_elementwise_kernel<4, at::native::CUDAFunctor_add<float>>", "elementwise/reduce"),
        ("void at::native::reduce_kernel<512, 1, at::native::ReduceOp<float>>", "elementwise/reduce"),
        ("aten::mm", "gemm"),
        ("aten::chunk", "other"),
        ("aten::cat", "copy/index"),
        ("aten::mul", "elementwise/reduce"),
        ("c10d::alltoall_base_", "nccl"),
        ("autograd::engine::evaluate_function: MulBackward0", "other"),
    ],
)
def test_categories(name, category):
    assert profile_mixer.categorize(name) == category


def test_fake_group_profile_is_one_rank_of_a_larger_group(tmp_path):
    """``--fake-cp 4`` in one process: rank 0 of a fake group of four profiles every strategy row (its own shard,
    its collectives counted), for BSHD, a pack cut per sequence and one cut as a stream; the group is gone
    afterwards."""
    argv = ["--device", "cpu", "--fake-cp", "4", "--lengths", "64", "--warmup", "1", "--iters", "1"]
    argv += ["--layouts", "bshd,thd,stream"]
    argv += ["--profile-steps", "1", "--rows", "hidden,state_passing", "--out", str(tmp_path), "--tag", "fake"]
    assert profile_mixer.main(argv) == 0
    assert not dist.is_initialized()
    report = json.loads((tmp_path / "profile_mixer_fake.json").read_text())
    assert report["world"] == 4 and report["fake_group"] and report["command"].startswith("python ")
    rows = [r for section in report["sections"] for r in section["rows"]]
    assert sorted({r["impl"] for r in rows}) == ["ours:hidden", "ours:state_passing"] and len(rows) == 6
    assert [section["layout"] for section in report["sections"]] == ["bshd", "thd", "stream"]
    assert all(r["cp"] == 4 and r["step_ms"] > 0 and r["collectives"] for r in rows), rows


# ------------------------------------------------------------------------------------------------ profile_rank


def test_profile_rank_replays_the_allocation_trace_to_the_peak():
    """``profile_rank.live_at_peak`` on a hand-made trace: the peak is the largest running sum of the step's
    allocations, and the blocks listed are those alive at that moment, grouped by their first library frame."""
    import profile_rank

    own = [{"filename": "/x/site-packages/mamba_cp/strategies/base.py", "line": 7, "name": "project"}]
    trace = [
        {"action": "alloc", "addr": 1, "size": 100, "frames": own},
        {"action": "alloc", "addr": 2, "size": 300, "frames": []},
        {"action": "alloc", "addr": 3, "size": 50, "frames": own},
        {"action": "free_completed", "addr": 2, "size": 300},
        {"action": "alloc", "addr": 4, "size": 200, "frames": own},  # 350 alive: below the peak of 450
    ]
    got = profile_rank.live_at_peak({"device_traces": [trace]})
    assert got["step_peak_gib"] * 2**30 == 450
    blocks = {b["frame"]: (round(b["gib"] * 2**30), b["count"]) for b in got["blocks"]}
    assert blocks == {"autograd (native op)": (300, 1), "mamba_cp/strategies/base.py:7 project": (150, 2)}
    assert profile_rank.parse_row("stream:1M:8:state_passing").length == 2**20
    if not torch.cuda.is_available():
        assert profile_rank.main(["--rows", "bshd:128K:2:hidden"]) == 0  # says it needs CUDA, runs nothing
