"""The per-layer path: one all-to-all each way, no host syncs, one plan per batch for every layer."""

import pytest
import torch
import torch.distributed as dist
import torch.nn as nn

import mamba_cp
from mamba_cp import Mamba2Mixer
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


def _hot_path_worker(rank, world, layout):
    torch.manual_seed(0)
    model = mamba_cp.parallelize(Stack(), dist.group.WORLD)
    if layout == "thd":
        cu = torch.tensor([0, 8, 12, 24], dtype=torch.int32)
        x = torch.randn(24 // world, 8, requires_grad=True)
    else:
        cu, x = None, torch.randn(2, 16 // world, 8, requires_grad=True)
    model(x, cu).sum().backward()  # first step of this batch: builds (and validates) the plan
    with OpRecorder() as forward:
        out = model(x, cu)
    with OpRecorder() as backward:
        out.sum().backward()
    plans = model.layers[0].context_parallel.plans
    assert all(layer.context_parallel.plans is plans for layer in model.layers), "layers must share one cache"
    return {
        "forward_all_to_all": forward.all_to_alls,
        "backward_all_to_all": backward.all_to_alls,
        "other_collectives": sum(forward.collectives.values())
        + sum(backward.collectives.values())
        - forward.all_to_alls
        - backward.all_to_alls,
        "host_syncs": forward.host_syncs + backward.host_syncs,
        "plan_builds": plans.builds,
    }


@pytest.mark.parametrize("layout", ["bshd", "thd"])
def test_one_all_to_all_each_way_and_no_host_sync(layout):
    for stats in run_on_ranks(_hot_path_worker, 2, layout):
        assert stats == {
            "forward_all_to_all": 2 * LAYERS,  # x|B|C|dt in, y out: one collective each way per layer
            "backward_all_to_all": 2 * LAYERS,
            "other_collectives": 0,
            "host_syncs": 0,
            "plan_builds": 1,  # one plan for the batch, shared by all layers and both passes
        }


def _largest_saved_storage_worker(rank, world, fuse, release):
    """The largest storage that a hidden-parallel mixer's forward saves for backward, over the in_proj output's
    size (``[B, L_local, 2*H*P + 2*G*N + H]``); how often in_proj ran as a module in that forward; and
    whether it ran once a forward hook was registered on it."""
    torch.manual_seed(0)
    mixer = mamba_cp.parallelize(
        Mamba2Mixer(hidden_size=8, num_heads=4, head_dim=2, n_groups=2, state_size=4, chunk_size=4), dist.group.WORLD
    )
    mixer.context_parallel.fuse_projection = fuse
    mixer.context_parallel.releases_projection = release
    module_calls, hook_calls, storages = [], [], []
    plain_forward = mixer.in_proj.forward
    mixer.in_proj.forward = lambda t: module_calls.append(1) or plain_forward(t)  # counts, registers no hook
    x = torch.randn(2, 16 // world, 8, requires_grad=True)
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


@pytest.mark.parametrize("fuse", [True, False])
def test_hidden_parallel_keeps_no_in_proj_output_for_backward(fuse):
    """Fused: in_proj writes the send buffer and z directly. Unfused: z is copied out. Either way nothing saved
    for backward holds the whole in_proj output (without the copy, the norm's saved z view keeps all of it)."""
    for ratio, unhooked_calls, hooked_calls in run_on_ranks(_largest_saved_storage_worker, 2, fuse, True):
        assert ratio < 1.0
        assert unhooked_calls == (0 if fuse else 1)  # fused: the module itself never runs
        assert hooked_calls == 1
    if not fuse:
        assert all(r[0] >= 1.0 for r in run_on_ranks(_largest_saved_storage_worker, 2, False, False))
