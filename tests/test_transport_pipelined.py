"""The pipelined (row-chunked) transport of the hidden-parallel mixer: same output as the default, exact."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.distributed as dist

from mamba_cp.gradients import all_reduce_gradients
from mamba_cp.parallelize import parallelize
from mamba_cp.sharding import shard
from mamba_cp.testing import run_on_ranks
from mamba_cp.testing.dispatch import OpRecorder
from mamba_cp.testing.parity import ParityCase, build_mixer


def _run(rank: int, world: int, layout: str, chunks: int | None, n_groups: int) -> dict:
    case = ParityCase(layout=layout, n_groups=n_groups, seqlen=48, seqlens=[16, 8, 24, 16])
    ref = build_mixer(case, torch.device("cpu"))
    m = parallelize(copy.deepcopy(ref), dist.group.WORLD)
    m.context_parallel.transport_chunks = chunks
    gen = torch.Generator().manual_seed(3)
    if layout == "bshd":
        x = torch.randn(2, 48, case.hidden_size, generator=gen, dtype=torch.float64)
        cu, dim = None, 1
    else:
        x = torch.randn(64, case.hidden_size, generator=gen, dtype=torch.float64)
        cu, dim = torch.tensor([0, 16, 24, 48, 64], dtype=torch.int32), 0
    xl = shard(x, world, rank, dim, cu).requires_grad_(True)
    with OpRecorder() as rec:
        out = m(xl, cu_seqlens=cu)
        out.square().sum().backward()
    xr = x.clone().requires_grad_(True)
    ref(xr, cu_seqlens=cu).square().sum().backward()
    all_reduce_gradients(m, dist.group.WORLD)
    errs = {"input": float((xl.grad - shard(xr.grad, world, rank, dim, cu)).abs().max())}
    for (name, p), q in zip(m.named_parameters(), ref.parameters(), strict=True):
        errs[name] = float((p.grad - q.grad).abs().max() / q.grad.abs().max())
    return {"out": out.detach().tolist(), "errs": errs, "all_to_alls": rec.all_to_alls}


@pytest.mark.parametrize("layout", ["bshd", "thd"])
@pytest.mark.parametrize("n_groups", [2, 1], ids=["G>=cp", "G<cp"])
def test_chunked_transport_is_exact_and_matches_the_default(layout, n_groups):
    default = run_on_ranks(_run, 2, layout, None, n_groups)
    for chunks, expected in ((1, 4), (3, 12 if n_groups == 2 else 8)):
        got = run_on_ranks(_run, 2, layout, chunks, n_groups)
        for a, b in zip(default, got, strict=True):
            assert a["out"] == b["out"]
            assert max(b["errs"].values()) < 1e-12, b["errs"]
        # G >= cp pipelines both directions; G < cp keeps the default (grouped) path on the way in.
        assert got[0]["all_to_alls"] == expected
    assert default[0]["all_to_alls"] == 4  # one each way, forward and backward
