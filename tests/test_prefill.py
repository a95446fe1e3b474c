"""Prefill under CP (``mamba_cp.prefill``): the cache and the greedy tokens equal the plain model's; errors first.

The parity runs are real gloo processes (``run_on_ranks``), float64 under ``KeepFloat64``, cp 2 and 4, both
strategies, BSHD (two prompts) and a pack of three prompts of different lengths (compared with the plain model run
per prompt): the last-token logits and every cache tensor (per Mamba layer its conv and SSM states, per attention
layer its keys and values) to rounding level, and 16 greedy tokens from ``mamba_cp.generate`` on every rank equal
to the plain model's ``generate``. The harness is ``mamba_cp.prefill_check`` (what ``mamba-cp generate`` runs).
"""

from __future__ import annotations

import copy
import importlib.util
import json
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

pytest.importorskip("transformers")

import transformers  # noqa: E402

import mamba_cp  # noqa: E402
from mamba_cp import CPGroup  # noqa: E402
from mamba_cp.integrations.transformers import KeepFloat64  # noqa: E402
from mamba_cp.prefill import _finish  # noqa: E402
from mamba_cp.prefill_check import TOLERANCE, Case, check_case, check_worker, small_model, worst  # noqa: E402
from mamba_cp.strategies import final_states  # noqa: E402
from mamba_cp.strategies.state_passing import StatePassing  # noqa: E402
from mamba_cp.testing import run_on_ranks  # noqa: E402
from mamba_cp.testing.dispatch import OpRecorder  # noqa: E402

MODELS = ("mamba2", "nemotron_h")


def cases_for(cp: int) -> list[Case]:
    cases = [Case(m, layout, s) for m in MODELS for layout in ("bshd", "thd") for s in ("hidden", "state_passing")]
    if cp == 2:
        cases.append(Case("nemotron_h", "thd", "hidden-unfused"))  # in_proj outside the transport
    return cases


@pytest.fixture(scope="module")
def parity() -> dict[int, dict[str, list[dict]]]:
    out = {}
    for cp in (2, 4):
        per_rank = run_on_ranks(check_worker, cp, cases_for(cp))
        out[cp] = {case.name: [r[case.name] for r in per_rank] for case in cases_for(cp)}
    return out


IDS = [(cp, case.name) for cp in (2, 4) for case in cases_for(cp)]


@pytest.mark.parametrize("cp,name", IDS, ids=[f"cp{cp}-{name}" for cp, name in IDS])
def test_prefill_cache_and_greedy_tokens_match_plain_model(parity, cp, name):
    errors, tokens_equal = worst(parity[cp][name])
    kinds = {key.rsplit(".", 1)[-1] for key in errors}
    assert {"logits", "conv", "ssm"} <= kinds, f"missing comparisons: {sorted(errors)}"
    if name.startswith("nemotron_h"):
        assert {"keys", "values"} <= kinds
    if "thd" in name:
        assert {key.split(".")[0] for key in errors} == {"prompt0", "prompt1", "prompt2"}
    bad = {k: v for k, v in errors.items() if not v <= TOLERANCE}
    assert not bad, f"cp={cp} {name}: above {TOLERANCE}: {bad}"
    assert tokens_equal, f"cp={cp} {name}: greedy tokens differ from the plain model's generate"
    assert all(len(row) == 16 for r in parity[cp][name] for row in r["tokens"])


# --------------------------------------------------------------------------------------------------
# Planted bugs are caught
# --------------------------------------------------------------------------------------------------

_original_rows = StatePassing._ssd_rows
_original_tails = StatePassing._segment_tails


def _final_state_from_zero(self, x, A_H, B, C, dt_p, dA, params, plan, with_states):
    """Bug: the end state of the tail segment without its incoming state (the output ``y`` stays right)."""
    y, _ = _original_rows(self, x, A_H, B, C, dt_p, dA, params, plan, with_states)
    if not with_states:
        return y, None
    rows, c = 2 * plan.batch, plan.seg_len

    def seg(t):
        return t.reshape(rows, c, t.shape[-1])

    _, end = self._kernel(seg(x), seg(dt_p), A_H, seg(B), seg(C), params, return_final_states=True)
    return y, end.view(plan.batch, 2, *end.shape[1:])[:, 1]


def _tails_of_wrong_chunk(self, xBC_BLC, width, plan):
    """Bug: each segment's conv tail taken from this rank's other chunk (head for tail and tail for head)."""
    swapped = xBC_BLC.unflatten(1, (2, plan.seg_len)).flip(1).flatten(1, 2)
    return _original_tails(self, swapped, width, plan)


_original_last_tokens = final_states.last_tokens


def _window_one_token_early(xBC_BLC, width, ranges):
    """Bug (hidden-parallel, whole sequences): the conv window ends one token before the sequence does."""
    return _original_last_tokens(xBC_BLC[:, :-1], width, ranges)


PLANTS = {
    "sp-final-from-zero": ("state_passing", StatePassing, "_ssd_rows", _final_state_from_zero),
    "sp-conv-wrong-chunk": ("state_passing", StatePassing, "_segment_tails", _tails_of_wrong_chunk),
    "hidden-conv-early": ("hidden", final_states, "last_tokens", _window_one_token_early),
}


def planted_worker(rank: int, world: int, plant: str) -> dict:
    strategy, owner, name, replacement = PLANTS[plant]
    original = getattr(owner, name)
    setattr(owner, name, replacement)
    try:
        torch.set_num_threads(1)
        with KeepFloat64():
            return check_case(Case("nemotron_h", "bshd", strategy, tokens=4), rank, world)
    finally:
        setattr(owner, name, original)


@pytest.mark.parametrize("plant", list(PLANTS))
def test_planted_bug_is_caught(plant):
    errors, _ = worst(run_on_ranks(planted_worker, 2, plant))
    caught = {k: v for k, v in errors.items() if v > 1e-3}
    assert caught, f"planted bug {plant!r} went unnoticed: {errors}"
    assert "logits" not in caught  # the forward itself is right: only the handed-over state is wrong
    assert all(k.endswith(("ssm", "conv")) for k in caught), caught


# --------------------------------------------------------------------------------------------------
# Bad input: ValueError on every rank before any collective
# --------------------------------------------------------------------------------------------------


def _bad_call(case: str, world: int):
    group = dist.group.WORLD
    ids = torch.randint(1, 64, (1, 4 * world))
    if case == "length":
        return lambda: mamba_cp.prefill(mamba_cp.parallelize(small_model("mamba2"), group), ids[:, :3], group)
    if case == "pack-length":
        cu = torch.tensor([0, 8, 14, 16])
        model = mamba_cp.parallelize(small_model("mamba2"), group)
        return lambda: mamba_cp.prefill(model, ids[:, :8], group, cu_seqlens=cu)
    if case == "not-parallelized":
        return lambda: mamba_cp.prefill(small_model("nemotron_h"), ids, group)
    if case == "other-group":
        return lambda: mamba_cp.prefill(mamba_cp.parallelize(small_model("nemotron_h"), 1), ids, group)
    if case == "not-transformers":
        stack = torch.nn.Sequential(mamba_cp.Mamba2Mixer(16, 4, 4, state_size=8, chunk_size=8))
        mamba_cp.parallelize(stack, group)
        return lambda: mamba_cp.prefill(stack, ids, group)
    model = mamba_cp.parallelize(small_model("nemotron_h"), group)
    if case == "cache-class":
        return lambda: mamba_cp.prefill(model, ids, group, cache=transformers.DynamicCache())
    if case == "cache-of-other-model":
        other = transformers.DynamicCache(config=small_model("mamba2").config)
        return lambda: mamba_cp.prefill(model, ids, group, cache=other)
    if case == "cache-filled":
        filled = transformers.DynamicCache(config=model.config)
        filled.update(torch.zeros(1, 2, 3, 8), torch.zeros(1, 2, 3, 8), 1)
        return lambda: mamba_cp.prefill(model, ids, group, cache=filled)
    if case == "cache-uneven-pack":
        cu = torch.tensor([0, 8, 12])
        empty = transformers.DynamicCache(config=model.config)
        return lambda: mamba_cp.prefill(model, ids[:, :6], group, cu_seqlens=cu, cache=empty)
    raise AssertionError(case)


BAD = {
    "length": r"prompt length L \(local length x cp_size = 3 x 2 = 6\) must be divisible by 2\*cp_size \(4\)",
    "pack-length": r"sequence 1 has length 6, which is not a multiple of 2\*cp_size \(4\)",
    "not-parallelized": r"NemotronHForCausalLM was not prepared by mamba_cp.parallelize",
    "other-group": r"parallelized over CP group size\(s\) \[1\].*cp_group of size 2",
    "not-transformers": r"needs a transformers causal LM.*mamba_cp.capture_states",
    "cache-class": r"uses a DynamicCache with layers \['LinearAttentionLayer', 'DynamicLayer'.*got a DynamicCache with "
    r"layers \[\]",
    "cache-of-other-model": r"got a DynamicCache with layers \['LinearAttentionLayer', 'LinearAttentionLayer'\]",
    "cache-filled": r"must be empty; its layer 1 already holds states",
    "cache-uneven-pack": r"different lengths \(\[8, 4\]\) and NemotronHForCausalLM has attention layers",
}


def bad_input_worker(rank: int, world: int) -> dict[str, tuple[str, str, int]]:
    torch.set_num_threads(1)
    out = {}
    for case in BAD:
        call = _bad_call(case, world)
        recorder = OpRecorder()
        try:
            with recorder:
                call()
            out[case] = ("no error", "", sum(recorder.collectives.values()))
        except Exception as err:  # noqa: BLE001 - reported to the parent
            out[case] = (type(err).__name__, str(err), sum(recorder.collectives.values()))
    return out


@pytest.fixture(scope="module")
def bad_inputs() -> list[dict]:
    return run_on_ranks(bad_input_worker, 2)


@pytest.mark.parametrize("case", list(BAD))
def test_bad_input_raises_on_every_rank_before_any_collective(bad_inputs, case):
    import re

    for rank, results in enumerate(bad_inputs):
        kind, message, collectives = results[case]
        assert kind in ("ValueError", "ConfigError"), f"rank {rank}: {kind}: {message}"
        assert re.search(BAD[case], message), f"rank {rank}: {message}"
        assert collectives == 0, f"rank {rank}: {collectives} collectives before the error"


# --------------------------------------------------------------------------------------------------
# Decoding on a parallelized model; our own mixer stacks
# --------------------------------------------------------------------------------------------------


def test_decoding_turns_cp_off_and_restores_it():
    """A model parallelized for cp=2 (a group object that cannot run collectives: none may happen) decodes from a
    plain cache inside ``decoding`` exactly as the plain model, and is parallelized again afterwards."""
    plain = small_model("nemotron_h")
    model = mamba_cp.parallelize(copy.deepcopy(plain), CPGroup(group=None, size=2, rank=0))
    ids = torch.randint(1, 64, (1, 12), generator=torch.Generator().manual_seed(0))
    strategies = [m.strategy for _, m in mamba_cp.find_mixers(model)]
    with pytest.raises(ValueError, match="use_cache=False"):
        model(input_ids=ids, use_cache=True)
    with KeepFloat64():
        with torch.no_grad():
            cache = plain(input_ids=ids, use_cache=True).past_key_values
        ref = plain.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=6, do_sample=False)
        with mamba_cp.decoding(model):
            assert model.config._attn_implementation == "sdpa"
            out = model.generate(ref[:, :13], attention_mask=torch.ones_like(ref[:, :13]), past_key_values=cache,
                                 max_new_tokens=5, do_sample=False)  # fmt: skip
    assert torch.equal(out, ref)
    assert [m.strategy for _, m in mamba_cp.find_mixers(model)] == strategies
    assert model.config._attn_implementation == "mamba_cp"
    with pytest.raises(ValueError, match="use_cache=False"):  # the CP pre-hook is back
        model(input_ids=ids, use_cache=True)


def stack_worker(rank: int, world: int) -> dict[str, float]:
    """``capture_states`` on a stack of our mixers: the states under CP equal those without CP."""
    torch.set_num_threads(1)
    torch.manual_seed(0)
    stack = torch.nn.Sequential(
        *[mamba_cp.Mamba2Mixer(16, 4, 4, n_groups=2, state_size=8, chunk_size=4, dtype=torch.float64) for _ in "ab"]
    )
    reference = copy.deepcopy(stack)
    out = {}
    for strategy in ("hidden", "state_passing"):
        model = mamba_cp.parallelize(copy.deepcopy(stack), dist.group.WORLD, strategy=strategy)
        for layout, cu in (("bshd", None), ("thd", torch.tensor([0, 4 * world, 6 * world, 12 * world]))):
            x = torch.randn(2 if cu is None else 1, 12 * world, 16, dtype=torch.float64)
            local = mamba_cp.shard(x, world, rank, seq_dim=1, cu_seqlens=cu)
            with torch.no_grad(), mamba_cp.capture_states(reference) as want, mamba_cp.capture_states(model) as got:
                if cu is None:
                    reference(x), model(local)
                else:  # nn.Sequential passes no cu_seqlens: the first layer alone
                    reference[0](x, cu_seqlens=cu), model[0](local, cu_seqlens=cu)
            for name in want:
                for field in ("ssm", "conv"):
                    a, b = getattr(got[name], field), getattr(want[name], field)
                    out[f"{strategy}-{layout}-{name}.{field}"] = float((a - b).abs().max() / b.abs().max())
    return out


def test_capture_states_of_a_mixer_stack():
    per_rank = run_on_ranks(stack_worker, 2)
    assert len(per_rank[0]) == 2 * 3 * 2  # strategies x (2 layers BSHD + 1 layer packed) x fields
    bad = {k: v for r in per_rank for k, v in r.items() if not v <= TOLERANCE}
    assert not bad, bad


def test_greedy_output_ends_like_transformers():
    """Rows are padded after their first end-of-sequence token; columns after every row has ended are dropped."""
    tokens = torch.tensor([[5, 2, 7, 8, 9], [5, 6, 7, 2, 9]])
    assert _finish(tokens, [2], 0).tolist() == [[5, 2, 0, 0], [5, 6, 7, 2]]
    assert _finish(tokens, [], 0).tolist() == tokens.tolist()


def test_generate_refuses_sampling():
    with pytest.raises(ValueError, match="greedy"):
        mamba_cp.generate(torch.nn.Linear(1, 1), None, 4, do_sample=True)
    with pytest.raises(ValueError, match="max_new_tokens must be an int >= 1"):
        mamba_cp.generate(torch.nn.Linear(1, 1), None, 0)


# --------------------------------------------------------------------------------------------------
# The command line and the GPU benchmark script
# --------------------------------------------------------------------------------------------------


def test_cli_generate(capsys):
    from mamba_cp.cli import main

    assert main(["generate", "--cp", "2", "--model", "mamba2", "--layout", "thd", "--strategy", "state_passing"]) == 0
    out = capsys.readouterr().out
    assert "PASS" in out and "tokens equal to the plain model's generate on every rank: yes" in out


def _bench_prefill():
    path = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_prefill.py"
    spec = importlib.util.spec_from_file_location("bench_prefill", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def test_bench_prefill_exits_cleanly_without_cuda(capsys):
    module = _bench_prefill()
    if torch.cuda.is_available():
        pytest.skip("CUDA present: the benchmark would run")
    assert module.main(["--lengths", "131072", "--cps", "1,2"]) == 0
    assert "needs CUDA" in capsys.readouterr().out


def test_bench_prefill_runs_on_cpu(tmp_path):
    """The GPU benchmark's own code path, small: every row prefills under its fake group and records a time and
    the cache's size; rows past ``--budget-s`` are recorded as not run."""
    module = _bench_prefill()
    argv = ["--device", "cpu", "--model", "tiny", "--pattern", "M-M*-", "--lengths", "64", "--cps", "1,2"]
    assert module.main([*argv, "--iters", "1", "--out", str(tmp_path)]) == 0
    rows = json.loads((tmp_path / "bench_prefill.json").read_text())["rows"]
    assert [(r["cp"], r["strategy"]) for r in rows] == [(1, "plain"), (2, "hidden"), (2, "state_passing")]
    assert all("error" not in r and r["ms"] > 0 and r["cache_gib"] > 0 for r in rows), rows
    assert module.main([*argv, "--budget-s", "0", "--out", str(tmp_path)]) == 0
    rows = json.loads((tmp_path / "bench_prefill.json").read_text())["rows"]
    assert len(rows) == 3 and all(r["error"] == "not run: --budget-s spent" for r in rows), rows
