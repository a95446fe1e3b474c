"""torch.compile: a parallelized mixer and every layer of a NemotronH hybrid compile with ``fullgraph=True``, give
the eager result, trace with no graph break, keep the fused projection's overlap, and take a new batch without
recompiling (cp=2, gloo, float32)."""

from __future__ import annotations

import copy

import pytest
import torch
import torch._dynamo as dynamo
import torch.distributed as dist
from torch._dynamo.testing import CompileCounterWithBackend

import mamba_cp
from mamba_cp.testing import run_on_ranks
from mamba_cp.testing.parity import ParityCase, build_mixer

CONFIGS = [(s, p) for s in ("hidden", "state_passing") for p in (False, True, "stream")]
"""(strategy, packed): BSHD, a pack cut per sequence, or a pack cut as one stream."""


def _mixer_batch(world: int, rank: int, packed: bool | str, seed: int = 1):
    gen = torch.Generator().manual_seed(seed)
    if packed == "stream":  # documents of any length
        cu = torch.tensor({1: [0, 3, 21, 32], 2: [0, 7, 20, 32], 3: [0, 1, 2, 32]}[seed])
        return mamba_cp.shard(torch.randn(32, 16, generator=gen), world, rank, 0, cu, packed_layout="stream"), cu
    if packed:
        cu = torch.tensor({1: [0, 8, 24, 32], 2: [0, 16, 20, 32], 3: [0, 4, 12, 32]}[seed])
        return mamba_cp.shard(torch.randn(32, 16, generator=gen), world, rank, 0, cu), cu
    return mamba_cp.shard(torch.randn(1, 32, 16, generator=gen), world, rank), None


def _step(model, x, cu) -> tuple[torch.Tensor, list[torch.Tensor]]:
    x = x.clone().requires_grad_(True)
    out = model(x, cu)
    out.square().sum().backward()
    grads = [x.grad] + [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    return out.detach(), grads


def _mixer_worker(rank: int, world: int, backend: str, configs: list) -> list:
    results = []
    for strategy, packed in configs:
        model = mamba_cp.parallelize(
            build_mixer(ParityCase(dtype="float32"), torch.device("cpu")),
            dist.group.WORLD,
            strategy=strategy,
            packed_layout="stream" if packed == "stream" else "sequences",
        )
        x, cu = _mixer_batch(world, rank, packed)
        mamba_cp.prepare_batch(model, 1, x.shape[-2], cu)
        breaks = dynamo.explain(model)(x, cu).graph_break_count
        dynamo.reset()
        counter = CompileCounterWithBackend(backend)
        compiled = torch.compile(model, fullgraph=True, backend=counter)
        errors = []
        for seed in (1, 2, 3):  # more batches: other values, other cu_seqlens, the same shapes
            x, cu = _mixer_batch(world, rank, packed, seed)
            mamba_cp.prepare_batch(model, 1, x.shape[-2], cu)
            got, want = _step(compiled, x, cu), _step(model, x, cu)
            errors.append(max(float((a - b).abs().max() / b.abs().max()) for a, b in zip(got[1], want[1], strict=True)))
            errors.append(float((got[0] - want[0]).abs().max() / want[0].abs().max()))
        results.append({"breaks": breaks, "error": max(errors), "compiles": counter.frame_count})
        dynamo.reset()
    return results


@pytest.mark.parametrize("backend", ["aot_eager", "inductor"])
def test_parallelized_mixer_compiles_fullgraph_and_equals_eager(backend: str) -> None:
    configs = CONFIGS if backend == "aot_eager" else [("hidden", False)]  # inductor: one (compiling costs ~30 s)
    for rank_results in run_on_ranks(_mixer_worker, 2, backend, configs, timeout=600):
        for (strategy, packed), r in zip(configs, rank_results, strict=True):
            what = f"{strategy} {packed if packed == 'stream' else 'packed' if packed else 'bshd'}"
            assert r["breaks"] == 0, what
            assert r["error"] < (1e-6 if backend == "aot_eager" else 1e-4), (what, r["error"])
            # Later batches (other documents: index lists of other lengths, marked dynamic) reuse the graph.
            assert r["compiles"] == 1, (what, r)


def _hybrid_worker(rank: int, world: int, backend: str, configs: list) -> list:
    from tests.test_hf_models import build

    results = []
    for strategy, packed in configs:
        torch.manual_seed(0)
        model = mamba_cp.parallelize(build("nemotron_h").float(), dist.group.WORLD, strategy=strategy)
        eager = copy.deepcopy(model)
        layers = model.model.layers
        for i in range(len(layers)):  # per block, as torchtitan compiles
            layers[i] = torch.compile(layers[i], fullgraph=True, backend=backend)
        ids = torch.randint(3, 64, (1, 32), generator=torch.Generator().manual_seed(1))
        cu = torch.tensor([0, 8, 32]) if packed else None
        outs = []
        for m in (model, eager):
            with mamba_cp.batch_context(cu_seqlens=cu, cp_group=dist.group.WORLD) as batch:
                logits = m(input_ids=batch.shard(ids)).logits
                logits.square().sum().backward()
            outs.append((logits.detach(), [p.grad for p in m.parameters()]))
        (a, ga), (b, gb) = outs
        rel = [float((a - b).abs().max() / b.abs().max())]
        rel += [float((x - y).abs().max() / y.abs().max()) for x, y in zip(ga, gb, strict=True) if y.abs().max() > 0]
        results.append(max(rel))
        dynamo.reset()
    return results


@pytest.mark.parametrize("backend", ["aot_eager", "inductor"])
def test_hybrid_layers_compile_fullgraph_and_equal_eager(backend: str) -> None:
    pytest.importorskip("transformers")
    configs = CONFIGS if backend == "aot_eager" else [("hidden", True)]
    for rank_results in run_on_ranks(_hybrid_worker, 2, backend, configs, timeout=600):
        for config, err in zip(configs, rank_results, strict=True):
            assert err < (1e-6 if backend == "aot_eager" else 1e-4), (config, err)


def _graph_worker(rank: int, world: int) -> list[str]:
    """The ops of the compiled forward graph of the fused hidden-parallel mixer, in order."""
    from torch._functorch.aot_autograd import aot_module_simplified

    graphs = []

    def backend(gm, example_inputs):
        def keep(graph, _):
            graphs.append([str(n.target) for n in graph.graph.nodes if n.op == "call_function"])
            return graph

        return aot_module_simplified(gm, example_inputs, fw_compiler=keep, bw_compiler=keep)

    model = mamba_cp.parallelize(build_mixer(ParityCase(dtype="float32"), torch.device("cpu")), dist.group.WORLD)
    x, cu = _mixer_batch(world, rank, False)
    mamba_cp.prepare_batch(model, 1, x.shape[-2], cu)
    torch.compile(model, fullgraph=True, backend=backend)(x.requires_grad_(True), cu).sum().backward()
    return graphs


def test_compiled_fused_projection_keeps_its_overlap() -> None:
    """In the compiled forward, a GEMM of ``z`` runs between each all-to-all and its wait (the backward likewise
    computes ``dW_z`` / ``dh`` while the gradients travel)."""
    forward, backward = run_on_ranks(_graph_worker, 2)[0]
    for ops in (forward, backward):
        starts = [i for i, op in enumerate(ops) if "all_to_all_single" in op]
        assert len(starts) == 2, ops
        for start in starts:
            wait = next(i for i in range(start, len(ops)) if "wait_tensor" in ops[i])
            between = ops[start + 1 : wait]
            assert any(op.split(".")[-2] in ("mm", "addmm") for op in between if "." in op), between
