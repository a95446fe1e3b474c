"""Debug mode and faults: ranks that disagree or fail are reported, never left hanging."""

import re
import time

import pytest
import torch
import torch.distributed as dist

import mamba_cp
from mamba_cp import Mamba2Mixer
from mamba_cp.testing import RankFailure, run_on_ranks


def make_model(debug):
    torch.manual_seed(0)
    mixer = Mamba2Mixer(hidden_size=8, num_heads=4, head_dim=2, n_groups=2, state_size=4, chunk_size=4)
    return mamba_cp.parallelize(mixer, dist.group.WORLD, debug=debug)


def _debug_worker(rank, world, what):
    model = make_model(debug=True)
    if what == "cu_seqlens":  # both valid, but different: without the check the ranks would mix batches
        cu = torch.tensor([0, 8, 16] if rank == 0 else [0, 4, 16], dtype=torch.int32)
        x = torch.randn(16 // world, 8)
    elif what == "shape":
        cu, x = None, torch.randn(1, 4 if rank == 0 else 8, 8)
    else:
        cu, x = None, torch.randn(1, 8, 8)
    try:
        model(x, cu)
    except ValueError as err:
        return str(err)
    return "no error"


def test_debug_mode_names_disagreeing_cu_seqlens_on_every_rank():
    messages = run_on_ranks(_debug_worker, 2, "cu_seqlens", timeout=30)
    for message in messages:
        assert "cu_seqlens differs across CP ranks (rank 0: [0, 8, 16], rank 1: [0, 4, 16])" in message


def test_debug_mode_names_disagreeing_shapes():
    for message in run_on_ranks(_debug_worker, 2, "shape", timeout=30):
        assert "local shape differs across CP ranks (rank 0: (1, 4, 8), rank 1: (1, 8, 8))" in message


def test_debug_mode_passes_agreeing_ranks_and_is_off_by_default(monkeypatch):
    assert run_on_ranks(_debug_worker, 2, "agree", timeout=30) == ["no error", "no error"]
    monkeypatch.delenv("MAMBA_CP_DEBUG", raising=False)
    model = mamba_cp.parallelize(Mamba2Mixer(hidden_size=8, num_heads=4, head_dim=2), 1)
    assert not getattr(model.strategy, "debug", False)


def test_debug_mode_from_environment(monkeypatch):
    from mamba_cp.consistency import debug_from_env

    monkeypatch.setenv("MAMBA_CP_DEBUG", "1")
    assert debug_from_env()
    monkeypatch.setenv("MAMBA_CP_DEBUG", "0")
    assert not debug_from_env()


def _one_rank_fails_worker(rank, world, how):
    model = make_model(debug=False)
    x = torch.randn(1, 8, 8)
    if rank == 1:
        if how == "bad input":
            x = torch.randn(1, 8, 5)  # a ValueError on this rank only, before its collective
        elif how == "stall":
            time.sleep(8)  # alive but absent from the collective, past the group's 4 s timeout
            return "stalled"
        else:
            raise RuntimeError("simulated crash on rank 1 in the middle of the step")
    model(x).sum().backward()
    return "finished"


@pytest.mark.parametrize("how", ["bad input", "crash", "stall"])
def test_one_failing_rank_does_not_hang_the_others(how):
    with pytest.raises(RankFailure) as info:
        run_on_ranks(_one_rank_fails_worker, 2, how, timeout=4)
    report = str(info.value)
    assert "did not finish" not in report  # every rank ended by itself: none was killed by the harness
    # the surviving rank fails in its first collective (the batch's one-time layout check) with an error that says
    # where and why
    assert re.search(r"mamba_cp [\w -]+ \([\w ]+\) failed on CP rank 0 of 2 with a local buffer of shape", report)
    if how == "stall":  # the waiting rank gives up at the process group's timeout, with our message
        assert "1 of 2 ranks failed" in report and "Timed out waiting 4000ms" in report
        return
    assert "2 of 2 ranks failed" in report
    assert ("hidden_size (8)" in report) if how == "bad input" else ("simulated crash" in report)
