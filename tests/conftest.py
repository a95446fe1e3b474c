"""Shared test set-up: ranks are forked from this process, so warm what they would each pay for."""

import pytest
import torch

from mamba_cp.testing.dispatch import warm_up


@pytest.fixture(scope="session", autouse=True)
def _warm_before_forking():
    torch.set_num_threads(1)  # two cores shared by forked ranks: no oversubscription
    warm_up()
