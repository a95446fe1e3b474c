"""Bad input: a ValueError that names the value and the rule, on every rank, before any collective."""

import pytest
import torch
import torch.distributed as dist

import mamba_cp
from mamba_cp import Mamba2Mixer
from mamba_cp.testing import run_on_ranks
from mamba_cp.testing.dispatch import OpRecorder


def mixer(heads=4, groups=2, hidden=8):
    torch.manual_seed(0)
    return Mamba2Mixer(
        hidden_size=hidden, num_heads=heads, head_dim=2, n_groups=groups, state_size=4, chunk_size=4,
        dtype=torch.float64,
    )  # fmt: skip


def bad_heads():
    mamba_cp.parallelize(mixer(heads=3, groups=1), dist.group.WORLD)


def bad_groups_below_cp():
    mamba_cp.parallelize(mixer(heads=12, groups=3), dist.group.WORLD)


def bad_groups_above_cp():
    mamba_cp.parallelize(mixer(heads=6, groups=3), dist.group.WORLD)


def run_layer(x, cu=None, heads=4, groups=2):
    m = mamba_cp.parallelize(mixer(heads, groups), dist.group.WORLD)
    m(x, cu_seqlens=cu)


CASES = {
    "num_heads % cp": (2, lambda: bad_heads(), r"num_heads \(3\) must be divisible by cp_size \(2\)"),
    "cp % n_groups": (
        4,
        lambda: bad_groups_below_cp(),
        r"cp_size \(4\) must be divisible by n_groups when n_groups < cp_size \(3\)",
    ),
    "n_groups % cp": (2, lambda: bad_groups_above_cp(), r"n_groups \(3\) must be divisible by cp_size"),
    "bshd L % 2cp": (
        2,
        lambda: run_layer(torch.zeros(1, 3, 8, dtype=torch.float64)),
        r"global sequence length L .* \(6\) must be divisible by 2\*cp_size \(4\)",
    ),
    "thd sequence % 2cp": (
        2,
        lambda: run_layer(torch.zeros(7, 8, dtype=torch.float64), torch.tensor([0, 8, 14])),
        r"sequence 1 has length 6, which is not a multiple of 2\*cp_size \(4\)",
    ),
    "cu_seqlens start": (
        2,
        lambda: run_layer(torch.zeros(8, 8, dtype=torch.float64), torch.tensor([4, 8, 16])),
        r"cu_seqlens must start at 0, got cu_seqlens\[0\]=4",
    ),
    "cu_seqlens increasing": (
        2,
        lambda: run_layer(torch.zeros(8, 8, dtype=torch.float64), torch.tensor([0, 8, 8, 16])),
        r"strictly increasing.*sequence 1 has length 0",
    ),
    "cu_seqlens end": (
        2,
        lambda: run_layer(torch.zeros(8, 8, dtype=torch.float64), torch.tensor([0, 8, 12])),
        r"must end at the global token count 16 .* got cu_seqlens\[-1\]=12",
    ),
    "cu_seqlens dtype": (
        2,
        lambda: run_layer(torch.zeros(8, 8, dtype=torch.float64), torch.tensor([0.0, 8.0, 16.0])),
        r"cu_seqlens must have dtype torch.int32 or torch.int64, got torch.float32",
    ),
    "hidden size": (
        2,
        lambda: run_layer(torch.zeros(1, 8, 6, dtype=torch.float64)),
        r"last dim \(6\) must equal the mixer's hidden_size \(8\)",
    ),
    "packed batch B > 1": (
        2,
        lambda: run_layer(torch.zeros(2, 8, 8, dtype=torch.float64), torch.tensor([0, 8, 16])),
        r"packed batch must be \[T, 8\] or \[1, T, 8\], got shape \(2, 8, 8\)",
    ),
    "no mixer": (2, lambda: mamba_cp.parallelize(torch.nn.Linear(2, 2), dist.group.WORLD), "contains no Mamba2Mixer"),
    "unknown strategy": (
        2,
        lambda: mamba_cp.parallelize(mixer(), dist.group.WORLD, strategy="ring"),
        r"unknown CP strategy 'ring'",
    ),
}


def _error_worker(rank, world, name):
    recorder = OpRecorder()
    try:
        with recorder:
            CASES[name][1]()
    except ValueError as err:
        return ("ValueError", str(err), sum(recorder.collectives.values()))
    return ("no error", "", sum(recorder.collectives.values()))


@pytest.mark.parametrize("name", list(CASES))
def test_bad_input_raises_on_every_rank_before_any_collective(name):
    cp, _, pattern = CASES[name]
    results = run_on_ranks(_error_worker, cp, name, timeout=60)
    for rank, (kind, message, collectives) in enumerate(results):
        assert kind == "ValueError", f"rank {rank}: expected a ValueError"
        assert collectives == 0, f"rank {rank} issued {collectives} collectives before raising"
        import re

        assert re.search(pattern, message), f"rank {rank}: {message!r} does not match {pattern!r}"


def test_sharding_helpers_refuse_to_cut_or_pad():
    with pytest.raises(ValueError, match=r"sequence length \(10\) must be divisible by 2\*cp_size \(4\)"):
        mamba_cp.shard(torch.zeros(1, 10), 2, 0)
    with pytest.raises(ValueError, match="sequence 0 has length 6"):
        mamba_cp.shard(torch.zeros(14), 2, 0, seq_dim=0, cu_seqlens=torch.tensor([0, 6, 14]))
    with pytest.raises(ValueError, match=r"cp_rank \(2\) must be in \[0, cp_size=2\)"):
        mamba_cp.shard(torch.zeros(1, 8), 2, 2)


def test_mixer_config_errors():
    with pytest.raises(ValueError, match=r"num_heads \(6\) must be divisible by n_groups \(4\)"):
        Mamba2Mixer(hidden_size=8, num_heads=6, head_dim=2, n_groups=4)
    with pytest.raises(ValueError, match=r"must equal expand \* hidden_size"):
        Mamba2Mixer(hidden_size=8, num_heads=4, head_dim=2, expand=2)
