"""run_on_ranks: a rank whose process does not exit with status 0 fails the call, even after a correct result."""

import faulthandler
import multiprocessing.util
import os
import signal

import pytest

from mamba_cp.testing import RankFailure, run_on_ranks
from mamba_cp.testing.multiprocess import describe_exit


def _crash_after_result_worker(rank, world, how):
    """Returns a correct result; rank 1 then ends badly in its process teardown, after the result was sent."""
    if rank == 1:
        if how == "abort":  # what "terminate called without an active exception" does: SIGABRT
            crash = (os.kill, (os.getpid(), signal.SIGABRT))
        elif how == "exit 3":
            crash = (os._exit, (3,))
        else:
            crash = None
        if crash is not None:
            faulthandler.disable()  # the crash is intended: no C-level traceback in the test output
            # multiprocessing runs these exit handlers after the target returned (so after the pipe was written)
            multiprocessing.util.Finalize(None, crash[0], args=crash[1], exitpriority=0)
    return {"rank": rank, "sum": 40 + rank}


@pytest.mark.parametrize(("how", "expected"), [("abort", "signal SIGABRT (exit code -6)"), ("exit 3", "exit status 3")])
def test_a_rank_that_exits_badly_after_its_result_fails_the_call(how, expected):
    with pytest.raises(RankFailure) as info:
        run_on_ranks(_crash_after_result_worker, 2, how, timeout=30)
    report = str(info.value)
    assert report.startswith("1 of 2 ranks failed")
    assert f"--- rank 1: its process ended with {expected}" in report
    assert "it had sent its result: {'rank': 1, 'sum': 41}" in report  # what it sent is in the report
    assert "--- rank 0" not in report


def test_clean_ranks_pass():
    assert run_on_ranks(_crash_after_result_worker, 2, "none", timeout=30) == [
        {"rank": 0, "sum": 40},
        {"rank": 1, "sum": 41},
    ]


def _raise_then_abort_worker(rank, world):
    """Every rank raises the same error; rank 0's process then aborts: the abort must not be hidden by the
    re-raise of the common error."""
    if rank == 0:
        faulthandler.disable()
        multiprocessing.util.Finalize(None, os.kill, args=(os.getpid(), signal.SIGABRT), exitpriority=0)
    raise ValueError("the same error on every rank")


def test_a_bad_exit_is_reported_even_when_every_rank_raised_the_same_error():
    with pytest.raises(RankFailure) as info:
        run_on_ranks(_raise_then_abort_worker, 2, timeout=30)
    report = str(info.value)
    assert "2 of 2 ranks failed" in report
    assert "--- rank 0: its process ended with signal SIGABRT" in report
    assert "ValueError: the same error on every rank" in report


def _same_error_worker(rank, world):
    raise ValueError("bad input on every rank")


def test_the_same_error_on_every_rank_is_reraised():
    with pytest.raises(ValueError, match="bad input on every rank"):
        run_on_ranks(_same_error_worker, 2, timeout=30)


def test_describe_exit():
    assert describe_exit(0) == "exit status 0"
    assert describe_exit(-signal.SIGSEGV) == "signal SIGSEGV (exit code -11)"
    assert describe_exit(None).startswith("no exit")
