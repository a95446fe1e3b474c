"""Bad input: a ValueError that names the value and the rule, on every rank, before any collective."""

import re

import pytest
import torch
import torch.distributed as dist

import mamba_cp
from mamba_cp import Mamba2Mixer
from mamba_cp.testing import RankFailure, run_on_ranks
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


def run_layer(x, cu=None, heads=4, groups=2, strategy="hidden", packed_layout="sequences"):
    m = mamba_cp.parallelize(mixer(heads, groups), dist.group.WORLD, strategy=strategy, packed_layout=packed_layout)
    m(x, cu_seqlens=cu)


def f64(*shape):
    return torch.zeros(*shape, dtype=torch.float64)


CONFIG_CASES = {
    "num_heads % cp": (2, lambda: bad_heads(), r"num_heads \(3\) must be divisible by cp_size \(2\)"),
    "cp % n_groups": (
        4,
        lambda: bad_groups_below_cp(),
        r"cp_size \(4\) must be divisible by n_groups when n_groups < cp_size \(3\)",
    ),
    "n_groups % cp": (2, lambda: bad_groups_above_cp(), r"n_groups \(3\) must be divisible by cp_size"),
    "no mixer": (2, lambda: mamba_cp.parallelize(torch.nn.Linear(2, 2), dist.group.WORLD), "contains no Mamba2Mixer"),
    "unknown strategy": (
        2,
        lambda: mamba_cp.parallelize(mixer(), dist.group.WORLD, strategy="ring"),
        r"unknown CP strategy 'ring'",
    ),
    "unknown packed layout": (
        2,
        lambda: mamba_cp.parallelize(mixer(), dist.group.WORLD, packed_layout="documents"),
        r"packed_layout must be one of \['sequences', 'stream'\], got 'documents'",
    ),
}
"""Errors of parallelize itself: ``name -> (cp, call, pattern)``."""

LAYER_CASES = {
    "bshd L % 2cp": (
        (f64(1, 3, 8), None),
        {
            "hidden": r"global sequence length L .* \(6\) must be divisible by 2\*cp_size \(4\)",
            "state_passing": r"global sequence length L \(local length x cp_size = 3 x 2\) must be a positive "
            r"multiple of 2\*cp_size \(4\)",
        },
    ),
    "thd sequence % 2cp": ((f64(7, 8), torch.tensor([0, 8, 14])), r"sequence 1 has length 6, which is not a multiple"),
    "stream T % 2cp": (
        (f64(7, 8), torch.tensor([0, 5, 14]), "stream"),
        r"the packed batch has 14 tokens, which is not a multiple of 2\*cp_size \(4\)",
    ),
    "cu_seqlens start": ((f64(8, 8), torch.tensor([4, 8, 16])), r"cu_seqlens must start at 0, got cu_seqlens\[0\]=4"),
    "cu_seqlens increasing": (
        (f64(8, 8), torch.tensor([0, 8, 8, 16])),
        r"strictly increasing.*sequence 1 has length 0",
    ),
    "cu_seqlens end": (
        (f64(8, 8), torch.tensor([0, 8, 12])),
        r"must end at the global token count 16 .* got cu_seqlens\[-1\]=12",
    ),
    "cu_seqlens dtype": (
        (f64(8, 8), torch.tensor([0.0, 8.0, 16.0])),
        r"cu_seqlens must have dtype torch.int32 or torch.int64, got torch.float32",
    ),
    "cu_seqlens type": ((f64(8, 8), {"cu": [0, 16]}), r"cu_seqlens must be a torch.Tensor, a list/tuple of ints"),
    "hidden size": ((f64(1, 8, 6), None), r"last dim \(6\) must equal the mixer's hidden_size \(8\)"),
    "packed batch B > 1": (
        (f64(2, 8, 8), torch.tensor([0, 8, 16])),
        r"packed batch must be \[T, 8\] or \[1, T, 8\], got shape \(2, 8, 8\)",
    ),
    "empty batch B = 0": ((f64(0, 8, 8), None), r"an empty batch cannot be run: got shape \(0, 8, 8\)"),
    "empty batch L = 0": ((f64(1, 0, 8), None), r"an empty batch cannot be run: got shape \(1, 0, 8\)"),
    "empty pack T = 0": ((f64(0, 8), torch.tensor([0, 0])), r"an empty batch cannot be run|strictly increasing"),
}
"""Errors of a layer's call, for each strategy: ``name -> ((x, cu_seqlens), pattern or {strategy: pattern})``."""

STRATEGIES = ["hidden", "state_passing"]


def _call(name: str, strategy: str | None):
    if strategy is None:
        return CONFIG_CASES[name][1]()
    (x, cu, *layout), _ = LAYER_CASES[name]
    return run_layer(x, cu, strategy=strategy, packed_layout=layout[0] if layout else "sequences")


def _error_worker(rank, world, name, strategy):
    recorder = OpRecorder()
    try:
        with recorder:
            _call(name, strategy)
    except ValueError as err:
        return ("ValueError", str(err), sum(recorder.collectives.values()))
    return ("no error", "", sum(recorder.collectives.values()))


CASES = [pytest.param(name, None, id=name) for name in CONFIG_CASES] + [
    pytest.param(name, strategy, id=f"{name}-{strategy}") for name in LAYER_CASES for strategy in STRATEGIES
]


@pytest.mark.parametrize(("name", "strategy"), CASES)
def test_bad_input_raises_on_every_rank_before_any_collective(name, strategy):
    if strategy is None:
        cp, _, pattern = CONFIG_CASES[name]
    else:
        cp, pattern = 2, LAYER_CASES[name][1]
        pattern = pattern[strategy] if isinstance(pattern, dict) else pattern
    results = run_on_ranks(_error_worker, cp, name, strategy, timeout=60)
    for rank, (kind, message, collectives) in enumerate(results):
        assert kind == "ValueError", f"rank {rank}: expected a ValueError"
        assert collectives == 0, f"rank {rank} issued {collectives} collectives before raising"
        assert re.search(pattern, message), f"rank {rank}: {message!r} does not match {pattern!r}"


def _one_rank_check_removed_worker(rank, world, strategy):
    """A planted bug: this rank's checks of the batch are skipped, as if only rank 0 validated it."""
    from mamba_cp import validation

    if rank == 1:
        validation.check_cu_seqlens = lambda cu, total, multiple_of=1: cu.tolist()
        from mamba_cp import layout, segments

        layout.check_cu_seqlens = segments.check_cu_seqlens = validation.check_cu_seqlens
    return _error_worker(rank, world, "thd sequence % 2cp", strategy)


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_a_check_on_one_rank_only_would_be_caught(strategy):
    """Planted bug: with rank 1's checks removed, the test above could not pass (rank 1 goes on into a collective
    and fails or hangs there instead of raising the ValueError before it)."""
    try:
        results = run_on_ranks(_one_rank_check_removed_worker, 2, strategy, timeout=10)
    except RankFailure:
        return
    assert not all(kind == "ValueError" and collectives == 0 for kind, _, collectives in results), results


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
