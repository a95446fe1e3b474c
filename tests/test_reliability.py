"""Cases a new user runs into, each giving the right answer or a clear error on every rank (never a silently wrong
result): double backward, cu_seqlens edited in place or passed as a list, CP before init_process_group, copies and
pickles of a parallelized model, ranks that pass different batches, a rank that fails during a state-passing step,
attention masks under CP."""

from __future__ import annotations

import copy
import io
import re

import numpy as np
import pytest
import torch
import torch.distributed as dist

import mamba_cp
from mamba_cp import Mamba2Mixer
from mamba_cp.testing import RankFailure, run_on_ranks
from mamba_cp.testing.dispatch import OpRecorder
from mamba_cp.testing.parity import ParityCase, build_mixer

CU = [0, 8, 24, 32]


def _mixer(dtype=torch.float64) -> Mamba2Mixer:
    return build_mixer(ParityCase(dtype="float64" if dtype == torch.float64 else "float32"), torch.device("cpu"))


def _batch(world: int, rank: int, packed: bool):
    gen = torch.Generator().manual_seed(1)
    if packed:
        x = torch.randn(32, 16, generator=gen, dtype=torch.float64)
        cu = torch.tensor(CU)
        return x, cu, mamba_cp.shard(x, world, rank, 0, cu), 0
    x = torch.randn(1, 32, 16, generator=gen, dtype=torch.float64)
    return x, None, mamba_cp.shard(x, world, rank), 1


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max())


# --------------------------------------------------------------------------------------------------- double backward


def _second_order_worker(rank: int, world: int, strategy: str, fuse: bool, packed: bool):
    """The gradient of ``|d loss / d x|^2`` with respect to the parameters (double backward), CP against no CP."""
    ref = _mixer()
    cp_model = mamba_cp.parallelize(copy.deepcopy(ref), dist.group.WORLD, strategy=strategy, fuse_projection=fuse)
    x, cu, x_local, dim = _batch(world, rank, packed)

    def second_order(model, inp, cu_seqlens):
        inp = inp.clone().requires_grad_(True)
        (g,) = torch.autograd.grad(model(inp, cu_seqlens=cu_seqlens).square().sum(), inp, create_graph=True)
        return g.square().sum()

    try:
        second_order(cp_model, x_local, cu).backward()
    except RuntimeError as err:
        return ("error", str(err))
    mamba_cp.all_reduce_gradients(cp_model, dist.group.WORLD)
    second_order(ref, x, cu).backward()
    ref_grads = dict(ref.named_parameters())
    return ("ok", max(_rel(p.grad, ref_grads[n].grad) for n, p in cp_model.named_parameters()))


@pytest.mark.parametrize("packed", [False, True], ids=["bshd", "thd"])
@pytest.mark.parametrize(("strategy", "fuse"), [("hidden", False), ("state_passing", True)], ids=["unfused", "sp"])
def test_double_backward_is_exact_where_supported(strategy: str, fuse: bool, packed: bool):
    for kind, value in run_on_ranks(_second_order_worker, 2, strategy, fuse, packed):
        assert kind == "ok", value
        assert value < 1e-10, value


def test_double_backward_through_the_fused_projection_is_a_clear_error():
    for kind, message in run_on_ranks(_second_order_worker, 2, "hidden", True, False):
        assert kind == "error"
        assert "double backward (create_graph=True) reached hidden-parallel's fused in_proj" in message
        assert "fuse_projection=False" in message


# ---------------------------------------------------------------------------------------------- cu_seqlens as given


def _cu_forms_worker(rank: int, world: int, how: str):
    """The output for one packed batch whose cu_seqlens is edited in place between two calls, or given as a list,
    a tuple or a NumPy array, against the same model called with a fresh tensor of the same values."""
    model = mamba_cp.parallelize(_mixer(), dist.group.WORLD)
    x, _, _, _ = _batch(world, rank, True)
    if how in ("numpy view", ".data"):
        cu = torch.tensor([0, 8, 16, 32])
        model(mamba_cp.shard(x, world, rank, 0, cu), cu_seqlens=cu)  # a plan for the old values is cached
        if how == "numpy view":
            cu.numpy()[2] = 24
        else:
            cu.data[2] = 24  # neither route bumps the tensor's version counter
    else:
        cu = {"list": CU, "tuple": tuple(CU), "numpy": np.array(CU)}[how]
    want_cu = torch.tensor(CU)
    x_local = mamba_cp.shard(x, world, rank, 0, want_cu)
    got = model(x_local, cu_seqlens=cu)
    want = mamba_cp.parallelize(_mixer(), dist.group.WORLD)(x_local, cu_seqlens=want_cu)
    return _rel(got, want)


@pytest.mark.parametrize("how", ["numpy view", ".data", "list", "tuple", "numpy"])
def test_cu_seqlens_edited_in_place_or_not_a_tensor(how: str):
    for err in run_on_ranks(_cu_forms_worker, 2, how):
        assert err == 0.0


# -------------------------------------------------------------------------------------------------- CP off / on


def test_parallelize_before_init_process_group_is_refused():
    assert not dist.is_initialized()
    with pytest.raises(ValueError, match=r"dist.group.WORLD is None before init_process_group.*cp_group=1"):
        mamba_cp.parallelize(_mixer(), dist.group.WORLD)
    assert isinstance(mamba_cp.parallelize(_mixer(), 1).strategy, mamba_cp.LocalStrategy)  # CP off, asked for


# ----------------------------------------------------------------------------------------- copies and pickles


def _copy_worker(rank: int, world: int, strategy: str):
    model = mamba_cp.parallelize(_mixer(), dist.group.WORLD, strategy=strategy)
    _, _, x_local, _ = _batch(world, rank, False)
    out = model(x_local)
    twin = copy.deepcopy(model)  # an EMA copy: it keeps CP, on the same ranks
    same = torch.equal(twin(x_local), out) and twin.strategy.group.group is model.strategy.group.group
    buf = io.BytesIO()
    torch.save(model, buf)  # a whole-model checkpoint
    buf.seek(0)
    loaded = torch.load(buf, weights_only=False)
    params_equal = all(torch.equal(a, b) for a, b in zip(loaded.parameters(), model.parameters(), strict=True))
    try:
        loaded(x_local)
        message = "no error"
    except RuntimeError as err:
        message = str(err)
    return same, params_equal, message


@pytest.mark.parametrize("strategy", ["hidden", "state_passing"])
def test_deepcopy_keeps_cp_and_a_loaded_pickle_says_to_parallelize_again(strategy: str):
    for same, params_equal, message in run_on_ranks(_copy_worker, 2, strategy):
        assert same and params_equal
        assert "pickled and loaded again" in message and "mamba_cp.parallelize(model, cp_group) again" in message


def _hf_pickle_worker(rank: int, world: int) -> tuple:
    from tests.test_hf_models import build  # the tiny random transformers models of the HF tests

    model = mamba_cp.parallelize(build("nemotron_h"), dist.group.WORLD)
    buf = io.BytesIO()
    torch.save(model, buf)
    buf.seek(0)
    loaded = torch.load(buf, weights_only=False)
    mixer = loaded.model.layers[0].mixer
    return type(mixer).__name__, sorted(loaded.state_dict()) == sorted(model.state_dict())


def test_a_converted_transformers_model_pickles():
    pytest.importorskip("transformers")
    for name, keys in run_on_ranks(_hf_pickle_worker, 2):
        assert name == "ContextParallelNemotronHMamba2Mixer" and keys


# ------------------------------------------------------------------------------- ranks that disagree or fail


def _different_lengths_worker(rank: int, world: int, strategy: str):
    """Ranks pass different local lengths (each valid on its own), debug mode off."""
    model = mamba_cp.parallelize(_mixer(), dist.group.WORLD, strategy=strategy, debug=False)
    x = torch.randn(1, 8 if rank == 0 else 12, 16, dtype=torch.float64)
    with OpRecorder() as rec:
        try:
            model(x)
        except ValueError as err:
            return str(err), dict(rec.collectives)
    return "no error", dict(rec.collectives)


@pytest.mark.parametrize("strategy", ["hidden", "state_passing"])
def test_ranks_with_different_local_lengths_fail_on_every_rank(strategy: str):
    results = run_on_ranks(_different_lengths_worker, 2, strategy)
    for message, _ in results:
        assert "passed different batches" in message, message
        assert "rank 0: 8 local tokens per row" in message and "rank 1: 12 local tokens per row" in message
    assert results[0][0] == results[1][0]  # the same decision, and the same words, on every rank
    if strategy == "state_passing":  # no extra collective: the check rides with the state summaries
        assert results[0][1] == {"c10d._allgather_base_": 1}  # the first exchange of the layer: the halos


def _sp_failure_worker(rank: int, world: int):
    model = mamba_cp.parallelize(_mixer(), dist.group.WORLD, strategy="state_passing")
    _, _, x_local, _ = _batch(world, rank, False)
    model(x_local)  # one step together: plans exist
    if rank == 1:
        raise RuntimeError("simulated crash on rank 1 in the middle of the step")
    model(x_local).sum().backward()
    return "finished"


def test_a_rank_failing_during_a_state_passing_step_is_reported_with_context():
    with pytest.raises(RankFailure) as info:
        run_on_ranks(_sp_failure_worker, 2, timeout=10)
    report = str(info.value)
    assert "simulated crash" in report and "did not finish" not in report
    assert re.search(r"mamba_cp all-gather \(forward\) failed on CP rank 0 of 2 with a local buffer of shape", report)
    assert "another rank probably raised, crashed or passed a batch of another shape" in report


# ------------------------------------------------------------------------------------ attention masks under CP


def _mask_worker(rank: int, world: int, how: str):
    from tests.test_hf_models import build

    model = mamba_cp.parallelize(build("nemotron_h"), dist.group.WORLD)
    ids = torch.randint(0, 64, (1, 16))
    if how == "4-D":
        mask = torch.ones(1, 1, 16, 16, dtype=torch.bool)
    else:  # padding on rank 1's shard only: a decision from the values would differ across ranks
        mask = torch.ones(1, 16, dtype=torch.long)
        mask[0, -3:] = 0 if rank == 1 else 1
    with OpRecorder() as rec:
        try:
            model(input_ids=ids, attention_mask=mask)
        except ValueError as err:
            return str(err), sum(rec.collectives.values())
    return "no error", sum(rec.collectives.values())


@pytest.mark.parametrize("how", ["4-D", "2-D padding on one rank"])
def test_attention_masks_under_cp_are_refused_on_every_rank_before_any_collective(how: str):
    pytest.importorskip("transformers")
    results = run_on_ranks(_mask_worker, 2, how)
    for message, collectives in results:
        assert "pass no attention_mask" in message and collectives == 0, (message, collectives)
