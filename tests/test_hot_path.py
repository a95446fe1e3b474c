"""The per-layer path of every strategy: its collectives per layer, no host sync, one plan per batch for every layer."""

import pytest
import torch
import torch.distributed as dist
import torch.nn as nn

import mamba_cp
from mamba_cp import Mamba2Mixer
from mamba_cp.strategies import hidden
from mamba_cp.testing import run_on_ranks
from mamba_cp.testing.dispatch import OpRecorder

LAYERS = 3


class Stack(nn.Module):
    """Residual stack of mixers, each called with the batch's cu_seqlens (as a model would)."""

    def __init__(self):
        super().__init__()
        self.layers = nn.ModuleList(
            Mamba2Mixer(hidden_size=8, num_heads=4, head_dim=2, n_groups=2, state_size=4, chunk_size=4)
            for _ in range(LAYERS)
        )

    def forward(self, x, cu_seqlens=None):
        for layer in self.layers:
            x = x + layer(x, cu_seqlens=cu_seqlens)
        return x


PATHS = ("hidden_fused", "hidden_unfused", "state_passing")

PER_LAYER = {  # path -> (forward collectives, backward collectives) per layer, by dispatched op name
    # x|B|C|dt in, y out: one all-to-all each way, fused with in_proj or not
    "hidden_fused": ({"c10d.alltoall_base_": 2}, {"c10d.alltoall_base_": 2}),
    "hidden_unfused": ({"c10d.alltoall_base_": 2}, {"c10d.alltoall_base_": 2}),
    # conv halos: an all-gather forward, its adjoint (a reduce-scatter) backward; segment states: two all-to-alls
    "state_passing": (
        {"c10d._allgather_base_": 1, "c10d.alltoall_base_": 2},
        {"c10d._reduce_scatter_base_": 1, "c10d.alltoall_base_": 2},
    ),
}


def parallelize_path(model: nn.Module, path: str) -> nn.Module:
    """The one place that picks a path (the unfused hidden-parallel switch lives here only)."""
    if path == "hidden_fused":
        return mamba_cp.parallelize(model, dist.group.WORLD, strategy="hidden")
    if path == "hidden_unfused":
        return mamba_cp.parallelize(model, dist.group.WORLD, strategy="hidden", fuse_projection=False)
    if path == "state_passing":
        return mamba_cp.parallelize(model, dist.group.WORLD, strategy="state_passing")
    raise ValueError(path)


def _batch(layout: str, world: int):
    if layout == "thd":
        return torch.tensor([0, 8, 12, 24], dtype=torch.int32), torch.randn(24 // world, 8, requires_grad=True)
    return None, torch.randn(2, 16 // world, 8, requires_grad=True)


def _hot_path_worker(rank, world, path, plant=None):
    """Per layout: one warm-up step (builds and validates the batch plan), then the recorded step. ``plant``
    (``(op, where)``) plants a host sync into the path first, to show the recorder catches it there."""
    torch.manual_seed(0)
    model = parallelize_path(Stack(), path)
    if plant is not None:
        _plant_sync(*plant)
    in_proj_calls, apart_calls = [], []
    for layer in model.layers:  # count in_proj's module calls without registering a hook (a hook unfuses)
        layer.in_proj.forward = lambda t, f=layer.in_proj.forward: in_proj_calls.append(1) or f(t)
    from mamba_cp.strategies import base

    real_apart = base.project_apart  # this forked process only
    base.project_apart = lambda *a: apart_calls.append(1) or real_apart(*a)
    out = {}
    for layout in ("bshd", "thd"):
        cu, x = _batch(layout, world)
        plans = model.layers[0].strategy.plans
        before = dict(plans.builds)
        model(x, cu).sum().backward()
        warm = dict(plans.builds)
        in_proj_calls.clear()
        apart_calls.clear()
        # cu_seqlens is the collator's CPU tensor in real runs too: reading it waits for no device
        with OpRecorder(host_tensors=[cu]) as forward:
            y = model(x, cu)
        with OpRecorder(host_tensors=[cu]) as backward:
            y.sum().backward()
        out[layout] = {
            "forward": dict(forward.collectives),
            "backward": dict(backward.collectives),
            "forward_syncs": forward.sync_report(),
            "backward_syncs": backward.sync_report(),
            "forward_sync_sites": dict(forward.sync_sites),
            "backward_sync_sites": dict(backward.sync_sites),
            "in_proj_module_calls": len(in_proj_calls),
            "project_apart_calls": len(apart_calls),
            "warm_up_builds": {k: n - before.get(k, 0) for k, n in warm.items() if n != before.get(k, 0)},
            "step_builds": {k: n - warm.get(k, 0) for k, n in plans.builds.items() if n != warm.get(k, 0)},
            "shared_cache": all(layer.strategy.plans is plans for layer in model.layers),
            "strategy": type(model.layers[0].strategy).__name__,
        }
    return out


@pytest.mark.parametrize("path", PATHS)
def test_per_layer_collectives_and_no_host_sync(path):
    """Every path, BSHD and THD: after the batch plan exists, each layer issues exactly its collectives and the
    host never waits for the device, forward or backward."""
    forward_per_layer, backward_per_layer = PER_LAYER[path]
    for rank, stats in enumerate(run_on_ranks(_hot_path_worker, 2, path)):
        for layout, s in stats.items():
            where = f"rank {rank}, {path}, {layout}"
            assert s["forward_syncs"] == "no host sync", f"{where}, forward: {s['forward_syncs']}"
            assert s["backward_syncs"] == "no host sync", f"{where}, backward: {s['backward_syncs']}"
            assert s["forward"] == {op: n * LAYERS for op, n in forward_per_layer.items()}, where
            assert s["backward"] == {op: n * LAYERS for op, n in backward_per_layer.items()}, where
            assert s["shared_cache"], f"{where}: layers must share one plan cache"
            # each per-batch object is built once, in the warm-up step, for all layers; the recorded step builds none
            assert s["warm_up_builds"] and set(s["warm_up_builds"].values()) == {1}, (where, s["warm_up_builds"])
            assert s["step_builds"] == {}, (where, s["step_builds"])
            # the path really is the one named: a plain nn.Linear in_proj is never run as a module; the fused
            # projection reads its weight, the other paths project z apart from xBC | dt (gate_projection)
            assert s["in_proj_module_calls"] == 0, where
            assert s["project_apart_calls"] == (0 if path == "hidden_fused" else LAYERS), where
            assert s["strategy"] == ("StatePassing" if path == "state_passing" else "HiddenParallel"), where


PLANTS = {  # path -> (the host sync planted, the function of that path it is planted into, the event recorded)
    "hidden_fused": ("item", "mamba_cp.strategies.hidden.project_scatter", "aten._local_scalar_dense"),
    "hidden_unfused": ("mask", "mamba_cp.strategies.hidden.seq_to_heads", "aten.index (boolean mask)"),
    "state_passing": ("tolist", "mamba_cp.strategies.state_passing.all_gather", "Tensor.tolist"),
}


def _read(t: torch.Tensor, op: str) -> None:
    """A host read of ``t`` of the kind ``op``: the planted bug."""
    if op == "item":
        t.sum().item()
    elif op == "mask":
        t[t > 0]
    else:
        t.detach().reshape(-1)[:2].tolist()


def _plant_sync(op: str, target: str) -> None:
    """Wrap the function ``target`` (as the strategy module looks it up) so that it reads its first tensor result
    on the host, in forward and (through a gradient hook) in backward. Runs in a forked rank: nothing leaks."""
    import importlib

    module_name, name = target.rsplit(".", 1)
    module = importlib.import_module(module_name)
    original = getattr(module, name)

    def planted(*args, **kwargs):
        result = original(*args, **kwargs)
        first = result[0] if isinstance(result, tuple) else result
        _read(first, op)
        if first.requires_grad:
            first.register_hook(lambda g: _read(g, op))
        return result

    setattr(module, name, planted)


@pytest.mark.parametrize("path", PATHS)
def test_a_host_sync_planted_into_each_path_is_caught(path):
    op, target, event = PLANTS[path]
    for stats in run_on_ranks(_hot_path_worker, 2, path, (op, target)):
        for layout, s in stats.items():
            for direction in ("forward", "backward"):
                report = s[f"{direction}_syncs"]
                assert report.startswith(f"{event} x"), f"{path} {layout} {direction}: {report}"
                assert "test_hot_path.py" in s[f"{direction}_sync_sites"][event]  # names the planted line
                assert "in _read" in s[f"{direction}_sync_sites"][event]


def _largest_saved_storage_worker(rank, world, path, release):
    """The largest storage that a mixer's forward saves for backward, over the in_proj output's size
    (``[B, L_local, 2*H*P + 2*G*N + H]``); how often in_proj ran as a module in that forward; and whether it ran
    once a forward hook was registered on it."""
    torch.manual_seed(0)
    mixer = parallelize_path(
        Mamba2Mixer(hidden_size=8, num_heads=4, head_dim=2, n_groups=2, state_size=4, chunk_size=4), path
    )
    if not release:  # the planted bug: z stays a view of the whole in_proj output
        from mamba_cp.strategies import base

        base.plain_linear = lambda *a: False
        hidden.own_storage = lambda z: z
    module_calls, hook_calls, storages = [], [], []
    plain_forward = mixer.in_proj.forward
    mixer.in_proj.forward = lambda t: module_calls.append(1) or plain_forward(t)  # counts, registers no hook
    x = torch.randn(2, 32 // world, 8, requires_grad=True)  # long enough that no small buffer is as large
    with torch.autograd.graph.saved_tensors_hooks(
        lambda t: storages.append(t.untyped_storage().nbytes()) or t, lambda t: t
    ):
        out = mixer(x)
    handle = mixer.in_proj.register_forward_hook(lambda *a: hook_calls.append(1))
    mixer(x)  # a hook on in_proj turns the fusion off: the module must run
    handle.remove()
    out.sum().backward()
    projection_bytes = x.shape[0] * x.shape[1] * mixer.in_proj.out_features * x.element_size()
    return max(storages) / projection_bytes, len(module_calls) - len(hook_calls), len(hook_calls)


@pytest.mark.parametrize("path", PATHS)
def test_no_path_keeps_the_in_proj_output_for_backward(path):
    """Fused hidden-parallel: in_proj writes the send buffer and z directly. Unfused and state passing: z is
    projected apart from ``xBC | dt`` (``gate_projection``). Either way nothing saved for backward holds the whole
    in_proj output; without that (planted: one buffer, z a view of it) the norm's saved z and the conv's saved xBC
    keep all of it (state passing), or z alone does (unfused, whose scatter repacks xBC)."""
    for ratio, unhooked_calls, hooked_calls in run_on_ranks(_largest_saved_storage_worker, 2, path, True):
        assert ratio < 1.0
        assert unhooked_calls == 0  # a plain nn.Linear is never run as a module
        assert hooked_calls == 1
    if path != "hidden_fused":
        assert all(r[0] >= 1.0 for r in run_on_ranks(_largest_saved_storage_worker, 2, path, False))
