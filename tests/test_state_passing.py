"""State-passing CP: float64 parity with the plain mixer (outputs and every gradient), the per-layer
collectives, ``strategy="auto"``, and the traffic model.

Parity runs in real gloo processes through :mod:`mamba_cp.testing.parity`; all cases of one ``cp`` share one
launch (cached per module) and each case is its own test. Scenario names: a BSHD *segment* is one of a
rank's two chunks (``L / (2*cp)`` tokens); in THD every sequence is cut into ``2*cp`` segments, so

* ``short_seq``: a sequence of ``2*cp`` tokens, one token per segment (shorter than the conv halo: the
  halo of a segment then comes from up to three ranks);
* ``long_seq``: a sequence much longer than the chunk size, spanning several SSD chunks per segment;
* ``mid_run``: on rank 0 the tail of sequence ``s`` and the head of ``s + 1`` are one contiguous run, so
  a sequence starts in the middle of it (every THD case with several sequences has this).
"""

from __future__ import annotations

import copy
import functools

import pytest
import torch
import torch.distributed as dist
import torch.nn as nn

import mamba_cp
from mamba_cp import Mamba2Mixer
from mamba_cp.groups import CPGroup
from mamba_cp.parallelize import auto_strategy
from mamba_cp.segments import SegmentPlanCache
from mamba_cp.ssm_block import SSMShape
from mamba_cp.state_passing import StatePassingContextParallel
from mamba_cp.testing import run_on_ranks
from mamba_cp.testing.dispatch import OpRecorder
from mamba_cp.testing.parity import ParityCase, build_mixer, case_dict, parity_worker, worst_relative
from mamba_cp.traffic import hidden_parallel_bytes, state_passing_bytes

RTOL = 1e-10  # float64 rounding is ~1e-15; any real mistake shows up at >= 1e-3


def sp(**kw) -> ParityCase:
    return ParityCase(strategy="state_passing", **kw)


# (cp, id, case). Sizes: hidden 16, head_dim 4, state 8, chunk 4-8.
PARITY = [
    (2, "bshd_B2_H4_G2", sp(batch=2, seqlen=32)),
    (2, "bshd_H3_not_divisible_G1_lt_cp", sp(batch=2, seqlen=24, num_heads=3, n_groups=1)),
    (2, "bshd_G4_gt_cp_chunk4", sp(batch=3, seqlen=16, num_heads=4, n_groups=4, chunk_size=4)),
    (2, "bshd_chunk8_not_dividing_segment6_bias_dtlimit", sp(seqlen=24, use_bias=True, time_step_limit=(0.01, 0.3))),
    (2, "bshd_segment2_shorter_than_halo", sp(batch=2, seqlen=8, chunk_size=4)),
    (2, "thd_short_seq_long_seq_mid_run", sp(layout="thd", seqlens=[4, 40, 12, 8])),
    (2, "thd_long_seq_single", sp(layout="thd", seqlens=[44], num_heads=3, n_groups=3, chunk_size=4)),
    (4, "bshd_B2_H2_not_divisible_G1_lt_cp", sp(batch=2, seqlen=48, num_heads=2, n_groups=1, chunk_size=4)),
    (4, "bshd_H6_G2_lt_cp_chunk8_not_dividing_segment6", sp(batch=2, seqlen=48, num_heads=6, n_groups=2)),
    (4, "thd_short_seqs_long_seq_mid_run_G6_gt_cp", sp(layout="thd", seqlens=[8, 64, 16, 8], num_heads=6, n_groups=6)),
    (8, "thd_short_long_mid_run_H3", sp(layout="thd", seqlens=[16, 96, 32], num_heads=3, n_groups=1, chunk_size=4)),
    (8, "bshd_B2_H2", sp(batch=2, seqlen=32, num_heads=2, n_groups=2, chunk_size=4)),
]


def _parity_many(rank: int, world: int, cases: list[dict]) -> list[dict]:
    return [parity_worker(rank, world, c) for c in cases]


@functools.cache
def _results(cp: int) -> dict[str, dict[str, float]]:
    """Every parity case of this ``cp``, in one launch: ``{case id: {tensor: worst relative error}}``."""
    chosen = [(name, case) for c, name, case in PARITY if c == cp]
    per_rank = run_on_ranks(_parity_many, cp, [case_dict(case) for _, case in chosen], timeout=180)
    return {name: worst_relative([r[i] for r in per_rank]) for i, (name, _) in enumerate(chosen)}


@pytest.mark.parametrize(("cp", "name"), [pytest.param(cp, name, id=f"cp{cp}-{name}") for cp, name, _ in PARITY])
def test_parity_float64(cp: int, name: str) -> None:
    worst = _results(cp)[name]
    assert {"output", "input.grad", "conv1d.weight.grad", "A_log.grad", "dt_bias.grad"} <= set(worst)
    bad = {k: v for k, v in worst.items() if not v <= RTOL}
    assert not bad, f"relative errors above {RTOL}: {bad}"


CP1 = [
    pytest.param(sp(batch=2, seqlen=12, chunk_size=4), None, id="bshd_segment6"),
    pytest.param(sp(batch=1, seqlen=4, chunk_size=4), None, id="bshd_segment2_shorter_than_halo"),
    pytest.param(sp(num_heads=6, n_groups=3, chunk_size=4), [2, 10, 2, 16], id="thd_short_long"),
]


@pytest.mark.parametrize(("case", "seqlens"), CP1)
def test_parity_cp1_two_segments_per_row(case: ParityCase, seqlens: list[int] | None) -> None:
    """Without processes: one rank, still two segments per sequence passing state through the plan."""
    ref = build_mixer(case, torch.device("cpu"))
    mixer = copy.deepcopy(ref)
    mixer.context_parallel = StatePassingContextParallel(CPGroup(None, 1, 0), mixer, SegmentPlanCache())
    gen = torch.Generator().manual_seed(1)
    cu = None if seqlens is None else torch.tensor([0, *torch.tensor(seqlens).cumsum(0).tolist()])
    shape = (case.batch, case.seqlen, case.hidden_size) if cu is None else (sum(seqlens), case.hidden_size)
    x = torch.randn(shape, generator=gen, dtype=torch.float64)
    weight = torch.randn(shape, generator=gen, dtype=torch.float64)
    leaves = [x.clone().requires_grad_(True) for _ in range(2)]
    outs = [m(leaf, cu_seqlens=cu) for m, leaf in zip((ref, mixer), leaves, strict=True)]
    for out in outs:
        (out * weight).sum().backward()
    pairs = {"output": (outs[1], outs[0]), "input.grad": (leaves[1].grad, leaves[0].grad)}
    ref_params = dict(ref.named_parameters())
    pairs |= {f"{n}.grad": (p.grad, ref_params[n].grad) for n, p in mixer.named_parameters()}
    for what, (got, want) in pairs.items():
        err = float((got - want).detach().abs().max() / want.detach().abs().max())
        assert err <= RTOL, f"{what}: relative error {err:.2e}"


# ---------------------------------------------------------------------------------------------------- hot path

LAYERS = 3
TINY = {"hidden_size": 8, "num_heads": 3, "head_dim": 2, "n_groups": 1, "state_size": 4, "chunk_size": 4}


class Stack(nn.Module):
    """Residual stack of mixers, each called with the batch's cu_seqlens (as a model would)."""

    def __init__(self, dtype: torch.dtype = torch.float32):
        super().__init__()
        self.layers = nn.ModuleList(Mamba2Mixer(**TINY, dtype=dtype) for _ in range(LAYERS))

    def forward(self, x, cu_seqlens=None):
        for layer in self.layers:
            x = x + layer(x, cu_seqlens=cu_seqlens)
        return x


class _ByteRecorder(OpRecorder):
    """:class:`OpRecorder` that also sums the bytes of each collective's *input* (``args[1]``: for
    ``_allgather_base_(output, input, ...)`` the buffer this rank contributes)."""

    def __init__(self) -> None:
        super().__init__()
        self.sent = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if str(func.overloadpacket).startswith("c10d."):
            self.sent += args[1].numel() * args[1].element_size()
        return super().__torch_dispatch__(func, types, args, kwargs)


def _hot_path_worker(rank: int, world: int) -> dict:
    out = {}
    for layout in ("bshd", "thd"):
        torch.manual_seed(0)
        model = mamba_cp.parallelize(Stack(torch.float64), dist.group.WORLD, strategy="state_passing")
        if layout == "thd":
            cu = torch.tensor([0, 4, 12, 24], dtype=torch.int32)
            x = torch.randn(24 // world, 8, dtype=torch.float64, requires_grad=True)
        else:
            cu, x = None, torch.randn(2, 16 // world, 8, dtype=torch.float64, requires_grad=True)
        model(x, cu).sum().backward()  # first step of this batch: builds (and validates) the plan
        with _ByteRecorder() as forward:
            y = model(x, cu)
        with OpRecorder() as backward:
            y.sum().backward()
        caches = {id(layer.context_parallel.plans) for layer in model.layers}
        out[layout] = {
            "forward": dict(forward.collectives),
            "backward": dict(backward.collectives),
            "host_syncs": forward.host_syncs + backward.host_syncs,
            "plan_builds": model.layers[0].context_parallel.plans.builds,
            "shared_caches": len(caches),
            "forward_bytes": forward.sent,
            "repr": repr(model.layers[0]),
        }
    return out


@functools.cache
def _hot_path() -> list[dict]:
    return run_on_ranks(_hot_path_worker, 2)


@pytest.mark.parametrize("layout", ["bshd", "thd"])
def test_collectives_and_no_host_sync(layout: str) -> None:
    """After the plan is cached, a step issues per layer two small all-gathers forward (conv halos,
    state summaries) and two reduce-scatters backward; no all-to-all and no host sync."""
    for rank_stats in _hot_path():
        stats = rank_stats[layout]
        assert stats["forward"] == {"c10d._allgather_base_": 2 * LAYERS}
        assert stats["backward"] == {"c10d._reduce_scatter_base_": 2 * LAYERS}
        assert stats["host_syncs"] == 0
        assert stats["plan_builds"] == 1 and stats["shared_caches"] == 1  # one plan per batch for all layers
        assert "StatePassingContextParallel(cp_size=2" in stats["repr"]


def test_measured_bytes_match_traffic_model() -> None:
    """The byte model is what the collectives actually carry (float64 tiny mixers, cp=2)."""
    dims = SSMShape(num_heads=3, head_dim=2, n_groups=1, d_state=4)
    for rank_stats in _hot_path():
        for layout, num_seqs in (("bshd", 2), ("thd", 3)):
            model = state_passing_bytes(dims, 0, 2, 8, conv_kernel=4, num_seqs=num_seqs, state_bytes=8)
            assert rank_stats[layout]["forward_bytes"] == LAYERS * model["send_buffers"], layout
            assert model["off_rank"] == model["send_buffers"]  # cp - 1 = 1 peer


NEMOTRON = SSMShape(num_heads=128, head_dim=64, n_groups=8, d_state=128)
"""NemotronH-8B-like mixer (d_model 4096, d_conv 4) at L = 128K, bf16, B = 1; summaries in float32."""
NEMOTRON_OFF_RANK = {  # cp: (state passing, hidden-parallel) bytes one rank sends per layer forward
    2: (8_512_512, 1_216_348_160),
    4: (25_537_536, 912_261_120),
    8: (59_587_584, 532_152_320),
}


@pytest.mark.parametrize("cp", sorted(NEMOTRON_OFF_RANK))
def test_nemotron_bytes_per_layer(cp: int) -> None:
    state = state_passing_bytes(NEMOTRON, 131072, cp)["off_rank"]
    hidden = hidden_parallel_bytes(NEMOTRON, 128 * 1024, cp)["off_rank"]
    assert (state, hidden) == NEMOTRON_OFF_RANK[cp]
    # By hand: halos 2 x 3 tokens x 10240 channels in bf16, summaries 2 x (128*64*128 + 128) in float32.
    assert state == (cp - 1) * (2 * 3 * 10240 * 2 + 2 * (128 * 64 * 128 + 128) * 4)
    assert state_passing_bytes(NEMOTRON, 131072, 1)["off_rank"] == 0
    assert hidden / state > 8  # 143x at cp=2, 36x at cp=4, 8.9x at cp=8


# ---------------------------------------------------------------------------------------------------- auto


@pytest.mark.parametrize(
    ("heads", "groups", "cp", "want"),
    [
        (128, 8, 2, "hidden"),  # divisible: hidden-parallel, the faster measured at cp=2
        (30, 2, 2, "hidden"),  # few heads per rank but divisible
        (128, 8, 4, "hidden"),
        (128, 8, 16, "hidden"),  # G < cp, cp % G == 0: groups repeat
        (3, 1, 2, "state_passing"),  # num_heads % cp
        (96, 3, 2, "state_passing"),  # G >= cp and G % cp != 0
        (96, 6, 4, "state_passing"),  # G >= cp and G % cp != 0
        (96, 3, 4, "state_passing"),  # G < cp and cp % G != 0
    ],
)
def test_auto_rule(heads: int, groups: int, cp: int, want: str) -> None:
    assert auto_strategy(heads, groups, cp) == want


def _auto_worker(rank: int, world: int) -> list[str]:
    model = nn.ModuleDict(
        {
            "wide": Mamba2Mixer(hidden_size=16, num_heads=32, head_dim=1, n_groups=2, state_size=4),
            "narrow": Mamba2Mixer(hidden_size=16, num_heads=3, head_dim=4, n_groups=1, state_size=4),
        }
    )
    mamba_cp.parallelize(model, dist.group.WORLD, strategy="auto")
    return [repr(model["wide"]), repr(model["narrow"])]


def test_auto_picks_per_mixer_and_repr_says_so() -> None:
    wide, narrow = run_on_ranks(_auto_worker, 2)[1]
    assert "context_parallel=MambaContextParallel(cp_size=2, cp_rank=1" in wide
    assert "context_parallel=StatePassingContextParallel(cp_size=2, cp_rank=1" in narrow


def test_unknown_strategy_lists_auto() -> None:
    with pytest.raises(ValueError, match="'auto'.*'state_passing'"):
        mamba_cp.parallelize(Mamba2Mixer(hidden_size=8, num_heads=2, head_dim=4, state_size=4), None, "magic")
