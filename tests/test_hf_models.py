"""transformers hybrids under mamba_cp: CP equals no CP (logits and every gradient), HF parity, checkpoints, errors.

The CP runs use real gloo processes, float64, and :class:`KeepFloat64` on both sides: transformers computes some
layers in float32 whatever the model dtype (NemotronH's block RMSNorm multiplies its weight in float32, so that
weight's gradient is a float32 sum over tokens), which would cap the comparison at float32 rounding for reasons
that have nothing to do with CP.
"""

from __future__ import annotations

import contextlib
import copy
import importlib.util
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
from mamba_cp.parallelize import STRATEGIES  # noqa: E402
from mamba_cp.testing import run_on_ranks  # noqa: E402

TOL = 1e-10  # relative to the largest reference value; observed ~1e-15
VOCAB = 64
MAMBA = dict(hidden_size=32, vocab_size=VOCAB)


def nemotron_h(**overrides) -> transformers.PreTrainedModel:
    """Mamba2, attention (4 query / 2 kv heads, no RoPE), MLP, Mamba2."""
    kwargs = dict(
        MAMBA,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=8,
        intermediate_size=48,
        mamba_num_heads=8,
        mamba_head_dim=8,
        n_groups=2,
        ssm_state_size=8,
        conv_kernel=4,
        chunk_size=8,
        layers_block_type=["linear_attention", "full_attention", "mlp", "linear_attention"],
        attn_implementation="sdpa",
    )
    kwargs.update(overrides)
    return transformers.NemotronHForCausalLM(transformers.NemotronHConfig(**kwargs))


def mamba2(**overrides) -> transformers.PreTrainedModel:
    kwargs = dict(
        MAMBA, num_heads=8, head_dim=8, n_groups=2, state_size=8, expand=2, conv_kernel=4, chunk_size=8,
        num_hidden_layers=2, time_step_limit=(0.01, 2.0), use_conv_bias=True,
    )  # fmt: skip
    kwargs.update(overrides)
    return transformers.Mamba2ForCausalLM(transformers.Mamba2Config(**kwargs))


def bamba(**overrides) -> transformers.PreTrainedModel:
    """Mamba2, attention with RoPE (positions matter), Mamba2."""
    kwargs = dict(
        MAMBA, num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2, intermediate_size=48,
        mamba_n_heads=8, mamba_d_head=8, mamba_n_groups=2, mamba_d_state=8, mamba_d_conv=4, mamba_chunk_size=8,
        mamba_expand=2, attn_layer_indices=[1], attn_implementation="sdpa",
    )  # fmt: skip
    kwargs.update(overrides)
    return transformers.BambaForCausalLM(transformers.BambaConfig(**kwargs))


def granite(**overrides) -> transformers.PreTrainedModel:
    kwargs = dict(
        MAMBA, num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2, intermediate_size=48,
        mamba_n_heads=8, mamba_d_head=8, mamba_n_groups=2, mamba_d_state=8, mamba_d_conv=4, mamba_chunk_size=8,
        mamba_expand=2, layer_types=["mamba", "attention", "mamba"], num_local_experts=0,
        position_embedding_type="rope", attn_implementation="eager",
    )  # fmt: skip
    kwargs.update(overrides)
    return transformers.GraniteMoeHybridForCausalLM(transformers.GraniteMoeHybridConfig(**kwargs))


def zamba2(**overrides) -> transformers.PreTrainedModel:
    kwargs = dict(
        MAMBA, num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=4, mamba_d_state=8,
        mamba_headdim=8, mamba_ngroups=2, n_mamba_heads=8, chunk_size=8, mamba_expand=2, intermediate_size=48,
        layers_block_type=["mamba", "hybrid", "mamba"], num_mem_blocks=1, use_mem_rope=True,
    )  # fmt: skip
    kwargs.update(overrides)
    return transformers.Zamba2ForCausalLM(transformers.Zamba2Config(**kwargs))


BUILDERS = {"mamba2": mamba2, "nemotron_h": nemotron_h, "bamba": bamba, "granite": granite, "zamba2": zamba2}


def build(name: str, seed: int = 0, **overrides) -> transformers.PreTrainedModel:
    """A seeded float64 model with non-trivial norm weights, D and conv biases (so their gradients are tested)."""
    torch.manual_seed(seed)
    model = BUILDERS[name](**overrides).double()
    with torch.no_grad():
        for pname, p in model.named_parameters():
            if pname.endswith(("norm.weight", ".D", "norm_f.weight", "layernorm.weight")):
                p.uniform_(0.5, 1.5)
            elif pname.endswith("conv1d.bias"):
                p.uniform_(-0.5, 0.5)
    return model


def batch(layout: str, cp: int) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Global ``input_ids`` ``[B, L]`` (BSHD) or ``[1, T]`` with ``cu_seqlens`` (packed), lengths fit ``2*cp``."""
    gen = torch.Generator().manual_seed(7)
    if layout == "bshd":
        return torch.randint(0, VOCAB, (2, 8 * cp), generator=gen), None
    lengths = [4 * cp, 2 * cp, 6 * cp, 2 * cp]  # a sequence cut across ranks, short ones, unequal lengths
    cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32)
    return torch.randint(0, VOCAB, (1, sum(lengths)), generator=gen), cu


def _case(name: str, layout: str, variant: str, rank: int, world: int) -> dict[str, tuple[float, float]]:
    """``variant``: the CP strategy, with ``-ckpt`` for activation checkpointing on the CP model."""
    group = dist.group.WORLD
    strategy, *options = variant.split("-")
    model = build(name)
    plain_state = {k: v.clone() for k, v in model.state_dict().items()}
    reference = mamba_cp.parallelize(copy.deepcopy(model), 1)  # same math without CP
    cp_model = mamba_cp.parallelize(model, group, strategy=strategy)
    if "ckpt" in options:  # layers re-run their forward during backward: inside the batch context
        # KeepFloat64 is a thread-local mode that the recompute would not see: pass it along.
        recompute = {"use_reentrant": False, "context_fn": lambda: (contextlib.nullcontext(), KeepFloat64())}
        cp_model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=recompute)
    ids, cu = batch(layout, world)
    weight = torch.randn(*ids.shape, VOCAB, generator=torch.Generator().manual_seed(3), dtype=torch.float64)

    with mamba_cp.batch_context(cu_seqlens=cu):
        ref_logits = reference(input_ids=ids).logits
    (ref_logits * weight).sum().backward()
    with mamba_cp.batch_context(cu_seqlens=cu, cp_group=group) as ctx:
        logits = cp_model(input_ids=ctx.shard(ids)).logits
        (logits * ctx.shard(weight)).sum().backward()
        ref_local = ctx.shard(ref_logits.detach())
    mamba_cp.all_reduce_gradients(cp_model, group)

    def diff(a: torch.Tensor, b: torch.Tensor) -> tuple[float, float]:
        return float((a.detach() - b.detach()).abs().max()), float(b.detach().abs().max())

    result = {"logits": diff(logits, ref_local)}
    ref_params = dict(reference.named_parameters())
    for pname, p in cp_model.named_parameters():
        if p.grad is None or ref_params[pname].grad is None:
            raise AssertionError(f"{name}: parameter {pname} got no gradient")
        result[f"{pname}.grad"] = diff(p.grad, ref_params[pname].grad)
    # The parallelized model's checkpoint is the plain model's: same keys, same values.
    state = cp_model.state_dict()
    assert list(state) == list(plain_state), f"{name}: state_dict keys changed"
    assert all(torch.equal(state[k], plain_state[k]) for k in state), f"{name}: state_dict values changed"
    return result


def parity_worker(rank: int, world: int, cases: list[tuple[str, str, str]]) -> dict[str, dict]:
    """Every case on this rank; ``{case id: {tensor: (max |cp - ref|, max |ref|)}}``."""
    torch.set_num_threads(1)
    with KeepFloat64():
        return {"-".join(case): _case(*case, rank, world) for case in cases}


def cases_for(cp: int) -> list[tuple[str, str, str]]:
    cases = [(m, layout, "hidden") for m in ("mamba2", "nemotron_h") for layout in ("bshd", "thd")]
    if cp == 2:
        cases += [("bamba", "bshd", "hidden"), ("bamba", "thd", "hidden")]  # RoPE: positions must be true ones
        cases += [("nemotron_h", "thd", "hidden-ckpt")]
        if "state_passing" in STRATEGIES:
            cases += [("nemotron_h", "thd", "state_passing")]
    return cases


@pytest.fixture(scope="module")
def parity_results() -> dict[int, dict[str, dict]]:
    """One set of forked ranks per cp runs every case (forking once keeps the file fast)."""
    out = {}
    for cp in (2, 4):
        per_rank = run_on_ranks(parity_worker, cp, cases_for(cp))
        out[cp] = {case: [r[case] for r in per_rank] for case in per_rank[0]}
    return out


PARITY_IDS = [(cp, "-".join(case)) for cp in (2, 4) for case in cases_for(cp)]


@pytest.mark.parametrize("cp,case", PARITY_IDS, ids=[f"cp{cp}-{case}" for cp, case in PARITY_IDS])
def test_cp_matches_no_cp(parity_results, cp, case):
    worst: dict[str, float] = {}
    for per_rank in parity_results[cp][case]:
        for tensor, (err, scale) in per_rank.items():
            worst[tensor] = max(worst.get(tensor, 0.0), err / scale if scale > 0 else err)
    assert any(k.endswith("dt_bias.grad") for k in worst) and "logits" in worst
    bad = {k: v for k, v in worst.items() if not v <= TOL}
    assert not bad, f"cp={cp} {case}: above {TOL}: {bad}"


# --------------------------------------------------------------------------------------------------
# Single process: HF's own forward, checkpoints, conversion
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", list(BUILDERS))
def test_matches_transformers_own_forward(name):
    """The converted model (CP off) equals the unconverted transformers model: float64 end to end to
    rounding level, and in transformers' native precision (float32 islands) to float32 rounding."""
    model = build(name)
    hf = copy.deepcopy(model)
    mamba_cp.parallelize(model, 1)
    ids, _ = batch("bshd", 2)
    with KeepFloat64():
        ours, theirs = model(input_ids=ids).logits, hf(input_ids=ids, use_cache=False).logits
        ours.square().sum().backward()
        theirs.square().sum().backward()
    assert ours.dtype == torch.float64
    assert (ours - theirs).abs().max() <= TOL * theirs.abs().max()
    for (pname, p), q in zip(model.named_parameters(), hf.parameters(), strict=True):
        assert (p.grad - q.grad).abs().max() <= TOL * q.grad.abs().max(), pname
    with torch.no_grad():
        native = model(input_ids=ids).logits
        assert (native - hf(input_ids=ids, use_cache=False).logits).abs().max() <= 1e-5 * native.abs().max()


def test_conversion_keeps_modules_parameters_and_classes():
    model = build("nemotron_h")
    mixer = model.model.layers[0].mixer
    params = dict(model.named_parameters())
    mamba_cp.parallelize(model, 1)
    assert model.model.layers[0].mixer is mixer  # the same object: the class is swapped in place
    assert isinstance(mixer, mamba_cp.Mamba2Mixer)
    assert isinstance(mixer, transformers.models.nemotron_h.modeling_nemotron_h.NemotronHMamba2Mixer)
    assert all(p is params[n] for n, p in model.named_parameters())
    assert [n for n, _ in mamba_cp.find_mixers(model)] == ["model.layers.0.mixer", "model.layers.3.mixer"]
    mamba_cp.parallelize(model, 1)  # idempotent
    assert all(p is params[n] for n, p in model.named_parameters())


def test_checkpoint_round_trip(tmp_path: Path):
    """save_pretrained from a parallelized model loads into a plain transformers model with identical weights."""
    model = mamba_cp.parallelize(build("nemotron_h"), 1)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.01)
    model.save_pretrained(tmp_path)
    plain = transformers.NemotronHForCausalLM.from_pretrained(tmp_path, dtype=torch.float64)
    assert type(plain.model.layers[0].mixer).__name__ == "NemotronHMamba2Mixer"
    assert plain.config._attn_implementation != "mamba_cp"
    mine, theirs = model.state_dict(), plain.state_dict()
    assert list(mine) == list(theirs)
    assert all(torch.equal(mine[k], theirs[k]) for k in mine)


def test_config_object_is_not_shared_after_parallelize():
    """A reference model built from the same config object keeps its attention implementation."""
    config = build("nemotron_h").config
    torch.manual_seed(0)
    a, b = transformers.NemotronHForCausalLM(config), transformers.NemotronHForCausalLM(config)
    mamba_cp.parallelize(a, 1)
    assert a.config._attn_implementation == "mamba_cp"
    assert b.config._attn_implementation == "sdpa" and config._attn_implementation == "sdpa"


# --------------------------------------------------------------------------------------------------
# Errors a user can act on (checked before any collective: a fake 2-rank group needs no processes)
# --------------------------------------------------------------------------------------------------

CP2 = CPGroup(group=None, size=2, rank=0)
CP4 = CPGroup(group=None, size=4, rank=0)


def test_model_without_mamba2_mixer():
    torch.manual_seed(0)
    llama = transformers.LlamaForCausalLM(
        transformers.LlamaConfig(vocab_size=32, hidden_size=16, num_hidden_layers=1, num_attention_heads=2)
    )
    with pytest.raises(ValueError, match=r"LlamaForCausalLM contains no Mamba2 mixer .*NemotronHMamba2Mixer"):
        mamba_cp.parallelize(llama, CP2)


def test_falcon_h1_is_refused_with_the_reason():
    torch.manual_seed(0)
    config = transformers.FalconH1Config(
        vocab_size=32, hidden_size=16, num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=2,
        mamba_n_heads=4, mamba_d_head=8, mamba_d_ssm=32, mamba_n_groups=1, mamba_d_state=8, mamba_chunk_size=8,
    )  # fmt: skip
    falcon = transformers.FalconH1ForCausalLM(config)
    with pytest.raises(ValueError, match=r"FalconH1Mixer.*μP multipliers"):
        mamba_cp.parallelize(falcon, CP2)


def test_heads_that_do_not_divide():
    with pytest.raises(ValueError, match=r"num_heads \(6\) must be divisible by cp_size \(4\)"):
        mamba_cp.parallelize(build("nemotron_h", mamba_num_heads=6, n_groups=1), CP4)
    with pytest.raises(ValueError, match=r"attention .* attention num_heads \(6\) must be divisible by cp_size \(4\)"):
        mamba_cp.parallelize(build("nemotron_h", num_attention_heads=6, num_key_value_heads=2), CP4)
    with pytest.raises(ValueError, match=r"cp_size \(4\) must be divisible by num_key_value_heads .* \(3\)"):
        mamba_cp.parallelize(build("nemotron_h", num_attention_heads=12, num_key_value_heads=3), CP4)


def test_sequence_length_that_does_not_fit():
    model = mamba_cp.parallelize(build("nemotron_h"), CP2)
    with pytest.raises(ValueError, match=r"sequence length \(10\) must be divisible by 2\*cp_size \(4\)"):
        model(input_ids=torch.zeros(1, 5, dtype=torch.long))  # 5 local tokens x 2 ranks
    bad = torch.tensor([0, 8, 14, 16])
    with pytest.raises(ValueError, match=r"sequence 1 has length 6, which is not a multiple of 2\*cp_size \(4\)"):
        mamba_cp.batch_context(cu_seqlens=bad, cp_group=CP2).__enter__()


def test_padding_and_generation_cache_are_refused():
    model = mamba_cp.parallelize(build("nemotron_h"), CP2)
    mask = torch.ones(1, 8, dtype=torch.long)
    mask[0, 0] = 0
    with pytest.raises(ValueError, match="pass no attention_mask"):  # under CP any mask is refused (same on all ranks)
        model(input_ids=torch.zeros(1, 8, dtype=torch.long), attention_mask=mask)
    off = mamba_cp.parallelize(build("nemotron_h"), 1)
    with pytest.raises(ValueError, match="padded batches are not supported"):  # without CP: padding is refused
        off(input_ids=torch.zeros(1, 8, dtype=torch.long), attention_mask=mask)
    with pytest.raises(ValueError, match="use_cache=False"):
        model(input_ids=torch.zeros(1, 8, dtype=torch.long), use_cache=True)


def test_padding_free_mask_is_accepted_and_cache_still_works_without_cp():
    model = build("nemotron_h")
    hf = copy.deepcopy(model)
    mamba_cp.parallelize(model, 1)
    ids = torch.randint(3, VOCAB, (1, 8))  # no pad token (0): generate would mask it
    out = model(input_ids=ids, attention_mask=torch.ones_like(ids)).logits  # all ones: dropped
    assert torch.allclose(out, hf(input_ids=ids, use_cache=False).logits, rtol=1e-5, atol=1e-6)
    generated = model.generate(ids, max_new_tokens=3, do_sample=False, use_cache=True)  # HF's cached path
    assert generated.shape == (1, 11)


# --------------------------------------------------------------------------------------------------
# The example
# --------------------------------------------------------------------------------------------------


def _load_example():
    path = Path(__file__).resolve().parents[1] / "examples" / "train_long_context.py"
    spec = importlib.util.spec_from_file_location("train_long_context", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize(
    "extra", [[], ["--packed", "--cp", "4"], ["--fsdp"]], ids=["bshd-cp2", "thd-cp4", "bshd-cp2-fsdp2"]
)
def test_example_loss_curves_agree(extra, capsys):
    example = _load_example()
    cp_losses, ref_losses = example.main(["--steps", "3", "--seq-len", "32", "--hidden-size", "32", *extra])
    assert len(cp_losses) == len(ref_losses) == 3
    for a, b in zip(cp_losses, ref_losses, strict=True):
        assert abs(a - b) <= 1e-12 * abs(b)
    assert "largest relative difference" in capsys.readouterr().out
