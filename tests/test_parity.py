"""Hidden-parallel CP equals the plain mixer: output and every gradient, float64, real gloo processes."""

import random

import pytest

from mamba_cp.strategies import HeadShard
from mamba_cp.testing import run_on_ranks
from mamba_cp.testing.parity import ParityCase, case_dict, parity_worker, worst_relative

TOL = 1e-10  # relative to the largest reference value; observed differences are ~1e-15
EXPECTED = {
    "output",
    "input.grad",
    "in_proj.weight.grad",
    "conv1d.weight.grad",
    "conv1d.bias.grad",
    "dt_bias.grad",
    "A_log.grad",
    "D.grad",
    "norm.weight.grad",
    "out_proj.weight.grad",
}

CASES = {
    # BSHD, B > 1
    "bshd-G==cp": (2, ParityCase(layout="bshd", batch=2, seqlen=32, num_heads=4, n_groups=2)),
    "bshd-G<cp": (4, ParityCase(layout="bshd", batch=3, seqlen=16, num_heads=4, n_groups=1)),
    "bshd-G<cp-repeat2": (4, ParityCase(layout="bshd", batch=2, seqlen=24, num_heads=8, n_groups=2)),
    "bshd-G>cp": (2, ParityCase(layout="bshd", batch=2, seqlen=16, num_heads=8, n_groups=4)),
    "bshd-G==cp-4": (4, ParityCase(layout="bshd", batch=2, seqlen=32, num_heads=4, n_groups=4)),
    "bshd-chunk-not-dividing-L": (2, ParityCase(layout="bshd", batch=2, seqlen=20, chunk_size=8)),
    "bshd-cp1": (1, ParityCase(layout="bshd", batch=2, seqlen=17)),
    "bshd-bias-dtlimit": (
        2,
        ParityCase(layout="bshd", batch=2, seqlen=16, use_bias=True, time_step_limit=(0.01, 0.5), conv_kernel=3),
    ),
    # the unfused in_proj + transport (fuse_projection=False), with and without repeated groups and biases
    "bshd-unfused": (2, ParityCase(layout="bshd", batch=2, seqlen=16, fuse_projection=False)),
    "bshd-G<cp-bias-unfused": (
        4,
        ParityCase(layout="bshd", batch=2, seqlen=16, num_heads=4, n_groups=1, use_bias=True, fuse_projection=False),
    ),
    "thd-unfused": (2, ParityCase(layout="thd", seqlens=[12, 4, 20], fuse_projection=False)),
    "bshd-G<cp-bias": (4, ParityCase(layout="bshd", batch=2, seqlen=16, num_heads=8, n_groups=2, use_bias=True)),
    # packed THD: several sequences of different lengths
    "thd-mixed": (2, ParityCase(layout="thd", seqlens=[16, 4, 28, 8])),
    "thd-G<cp": (4, ParityCase(layout="thd", seqlens=[8, 24, 16], num_heads=4, n_groups=1)),
    "thd-G>cp": (2, ParityCase(layout="thd", seqlens=[12, 4, 20], num_heads=8, n_groups=8)),
    "thd-one-seq": (4, ParityCase(layout="thd", seqlens=[40])),
    "thd-many-short": (4, ParityCase(layout="thd", seqlens=[8] * 7 + [16])),
    "thd-cp1": (1, ParityCase(layout="thd", seqlens=[5, 11, 3])),
    # cp=8 on CPU (the scaling issue's CPU share)
    "bshd-cp8-G<cp": (8, ParityCase(layout="bshd", batch=2, seqlen=32, num_heads=8, n_groups=2)),
    "bshd-cp8-G>cp": (8, ParityCase(layout="bshd", batch=1, seqlen=16, num_heads=16, n_groups=16, head_dim=2)),
    "thd-cp8-G==cp": (8, ParityCase(layout="thd", seqlens=[16, 48, 32], num_heads=8, n_groups=8)),
}


def check(cp: int, case: ParityCase) -> dict[str, float]:
    worst = worst_relative(run_on_ranks(parity_worker, cp, case_dict(case)))
    assert set(worst) >= EXPECTED
    bad = {k: v for k, v in worst.items() if not v <= TOL}
    assert not bad, f"cp={cp} {case.describe()}: above {TOL}: {bad}"
    return worst


@pytest.mark.parametrize("name", list(CASES))
def test_parity(name):
    cp, case = CASES[name]
    check(cp, case)


def test_parity_float32_and_one_bfloat16_run():
    check_worst = worst_relative(run_on_ranks(parity_worker, 2, case_dict(ParityCase(dtype="float32"))))
    assert max(check_worst.values()) < 1e-5
    bf16 = worst_relative(run_on_ranks(parity_worker, 2, case_dict(ParityCase(dtype="bfloat16", seqlen=16))))
    assert max(bf16.values()) < 5e-2


def draw_case(rng: random.Random) -> tuple[int, ParityCase]:
    """A random valid configuration: cp, heads, groups, layout and lengths drawn together."""
    cp = rng.choice([1, 2, 4])
    groups = rng.choice([g for g in (1, 2, 4, 8) if g % cp == 0 or cp % g == 0])
    heads = groups * rng.choice([1, 2]) * max(1, cp // groups)
    if heads % cp:
        heads *= cp
    common = dict(
        num_heads=heads,
        n_groups=groups,
        head_dim=rng.choice([2, 4]),
        state_size=rng.choice([2, 4, 8]),
        conv_kernel=rng.choice([2, 3, 4]),
        chunk_size=rng.choice([4, 8, 16]),
        seed=rng.randrange(1000),
    )
    if rng.random() < 0.5:
        return cp, ParityCase(layout="bshd", batch=rng.choice([1, 2, 3]), seqlen=2 * cp * rng.randint(1, 6), **common)
    seqlens = [2 * cp * rng.randint(1, 5) for _ in range(rng.randint(1, 5))]
    return cp, ParityCase(layout="thd", seqlens=seqlens, **common)


@pytest.mark.parametrize("seed", range(12))
def test_parity_property(seed):
    """Seeded random configurations (heads, groups, cp, lengths, kernel and chunk sizes)."""
    cp, case = draw_case(random.Random(seed))
    check(cp, case)


def _wrong_slice_worker(rank, world, case):
    """Parity with a planted bug (every rank uses rank 0's A_log): the harness must see it."""
    original = HeadShard.slice_vector
    HeadShard.slice_vector = lambda self, param: param[: self.num_heads_local]
    try:
        return parity_worker(rank, world, case)
    finally:
        HeadShard.slice_vector = original


def test_harness_detects_a_wrong_parameter_slice():
    worst = worst_relative(run_on_ranks(_wrong_slice_worker, 2, case_dict(ParityCase())))
    assert worst["output"] > 1e-3 and worst["A_log.grad"] > 1e-3
