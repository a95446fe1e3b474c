"""Shared test set-up: ranks are forked from this process, so warm what they would each pay for."""

import sys

import pytest
import torch

from mamba_cp.testing.dispatch import warm_up


@pytest.fixture(scope="session")
def triton_required() -> None:
    """Triton is a test dependency on Linux (its CPU interpreter runs our kernels): a missing install fails the
    tests that use this fixture there instead of skipping them unnoticed; elsewhere they are skipped."""
    if sys.platform == "linux":
        import triton  # noqa: F401
    else:
        pytest.importorskip("triton")


@pytest.fixture(scope="session", autouse=True)
def _warm_before_forking():
    torch.set_num_threads(1)  # two cores shared by forked ranks: no oversubscription
    warm_up()
