"""The CPU check of :func:`mamba_cp.prefill` against the plain model: what ``mamba-cp generate`` runs.

Each rank (gloo, forked by :func:`mamba_cp.testing.run_on_ranks`) builds the same small random-weight float64
transformers model, parallelizes it, prefills its head-tail shard of the prompts, then compares on its own with
the unparallelized model: the last-token logits, every cache tensor (per Mamba layer the conv and SSM states, per
attention layer the keys and values) and ``tokens`` greedy tokens from :func:`mamba_cp.generate` against the
plain model's ``generate`` (a pack: the plain model run per prompt). Errors are ``max |ours - plain| / max
|plain|``; everything runs under :class:`~mamba_cp.integrations.transformers.KeepFloat64` (transformers' float32
islands would cap the comparison at float32 rounding for reasons that have nothing to do with CP).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch

TOLERANCE = 1e-10
"""Largest accepted relative difference (float64; observed ~1e-15)."""

VOCAB = 64
MODELS = ("mamba2", "nemotron_h")


def small_model(name: str, seed: int = 0):
    """A seeded float64 ``Mamba2ForCausalLM`` (2 Mamba layers) or ``NemotronHForCausalLM`` (Mamba2, attention
    with 4 query / 2 kv heads, MLP, Mamba2) with random norm weights, ``D`` and conv biases; end-of-sequence off in
    its generation config, so that greedy runs have a fixed length."""
    import transformers

    torch.manual_seed(seed)
    if name == "mamba2":
        config = transformers.Mamba2Config(
            hidden_size=32, vocab_size=VOCAB, num_heads=8, head_dim=8, n_groups=2, state_size=8, expand=2,
            conv_kernel=4, chunk_size=8, num_hidden_layers=2, time_step_limit=(0.01, 2.0), use_conv_bias=True,
        )  # fmt: skip
        model = transformers.Mamba2ForCausalLM(config)
    elif name == "nemotron_h":
        config = transformers.NemotronHConfig(
            hidden_size=32, vocab_size=VOCAB, num_attention_heads=4, num_key_value_heads=2, head_dim=8,
            intermediate_size=48, mamba_num_heads=8, mamba_head_dim=8, n_groups=2, ssm_state_size=8, conv_kernel=4,
            chunk_size=8, layers_block_type=["linear_attention", "full_attention", "mlp", "linear_attention"],
            attn_implementation="sdpa",
        )  # fmt: skip
        model = transformers.NemotronHForCausalLM(config)
    else:
        raise ValueError(f"model must be one of {MODELS}, got {name!r}")
    model = model.double().eval()
    with torch.no_grad():
        for pname, p in model.named_parameters():
            if pname.endswith(("norm.weight", ".D", "norm_f.weight")):
                p.uniform_(0.5, 1.5)
            elif pname.endswith("conv1d.bias"):
                p.uniform_(-0.5, 0.5)
            elif pname.endswith(("embeddings.weight", "embed_tokens.weight")):
                p.mul_(20.0)  # sharper logits: greedy tokens that do not settle into one repeated token
    model.generation_config.eos_token_id = None
    model.generation_config.pad_token_id = 0
    return model


def prompts_for(layout: str, cp: int, seed: int = 7) -> list[torch.Tensor]:
    """``bshd``: two prompts of ``8 * cp`` tokens; ``thd``: a pack of three of ``4, 2, 6`` times ``cp`` tokens
    (every length a multiple of ``2 * cp``); tokens from 1 to ``VOCAB - 1`` (no pad token)."""
    gen = torch.Generator().manual_seed(seed)
    lengths = [8 * cp, 8 * cp] if layout == "bshd" else [4 * cp, 2 * cp, 6 * cp]
    return [torch.randint(1, VOCAB, (n,), generator=gen) for n in lengths]


@dataclass(frozen=True)
class Case:
    """One check: a model of :data:`MODELS`, ``"bshd"`` or ``"thd"``, a strategy (``"hidden"``,
    ``"hidden-unfused"``, ``"state_passing"``) and the greedy tokens to compare."""

    model: str
    layout: str
    strategy: str
    tokens: int = 16

    @property
    def name(self) -> str:
        return f"{self.model}-{self.layout}-{self.strategy}"


def _relative(a: torch.Tensor, b: torch.Tensor) -> float:
    scale = float(b.abs().max())
    err = float((a.to(b.dtype) - b).abs().max())
    return err / scale if scale > 0 else err


def _cache_tensors(cache, row: int | None) -> dict[str, torch.Tensor]:
    """Every tensor a generation cache holds, by ``layer.kind`` (row ``row`` only when given)."""
    out = {}
    pick = (lambda t: t) if row is None else (lambda t: t[row : row + 1])
    for i, layer in enumerate(cache.layers):
        if getattr(layer, "conv_states", None) and layer.conv_states.get(0) is not None:
            out[f"{i}.conv"] = pick(layer.conv_states[0])
            out[f"{i}.ssm"] = pick(layer.recurrent_states[0])
        if getattr(layer, "keys", None) is not None and layer.keys.numel():
            out[f"{i}.keys"], out[f"{i}.values"] = pick(layer.keys), pick(layer.values)
    return out


def check_case(case: Case, rank: int, world: int) -> dict:
    """Prefill ``case`` over the ranks, generate, compare with the plain model on this rank.

    Returns ``{"errors": {tensor: relative error}, "tokens_equal": bool, "tokens": [[...], ...]}``."""
    import torch.distributed as dist

    import mamba_cp

    group = dist.group.WORLD if world > 1 else 1
    model = small_model(case.model)
    plain = copy.deepcopy(model)
    strategy, _, option = case.strategy.partition("-")  # "hidden-unfused": in_proj not fused with the transport
    cp_model = mamba_cp.parallelize(model, group, strategy=strategy, fuse_projection=option != "unfused")
    prompts = prompts_for(case.layout, world)
    if case.layout == "bshd":
        ids, cu = torch.stack(prompts), None
    else:
        ids = torch.cat(prompts)[None]
        cu = torch.tensor([0, *torch.tensor([p.numel() for p in prompts]).cumsum(0).tolist()], dtype=torch.int32)
    local = mamba_cp.shard(ids, world, rank, seq_dim=1, cu_seqlens=cu)
    result = mamba_cp.prefill(cp_model, local, group, cu_seqlens=cu)

    errors: dict[str, float] = {}
    references = [torch.stack(prompts)] if case.layout == "bshd" else [p[None] for p in prompts]
    ref_tokens = []
    for i, ref_ids in enumerate(references):
        with torch.no_grad():
            out = plain(input_ids=ref_ids, use_cache=True)
        ref_cache = getattr(out, "past_key_values", None) or out.cache_params
        rows = slice(None) if case.layout == "bshd" else slice(i, i + 1)
        tag = "" if case.layout == "bshd" else f"prompt{i}."
        errors[f"{tag}logits"] = _relative(result.logits[rows], out.logits[:, -1])
        if not torch.equal(torch.stack(list(result.prompts[rows])), ref_ids):
            errors[f"{tag}prompt_ids"] = 1.0
        if result.cache is not None:
            ours = _cache_tensors(result.cache, None if case.layout == "bshd" else i)
        else:
            ours = _cache_tensors(result.row_caches[i], None)
        theirs = _cache_tensors(ref_cache, None)
        if sorted(ours) != sorted(theirs):
            errors[f"{tag}cache layers"] = 1.0
        for key in theirs:
            if key in ours:
                same = ours[key].shape == theirs[key].shape and ours[key].dtype == theirs[key].dtype
                errors[f"{tag}{key}"] = _relative(ours[key], theirs[key]) if same else 1.0
        mask = torch.ones_like(ref_ids)
        ref = plain.generate(ref_ids, attention_mask=mask, max_new_tokens=case.tokens, do_sample=False)
        ref_tokens.append(ref[:, ref_ids.shape[1] :])
    new = mamba_cp.generate(cp_model, result, case.tokens)  # after the cache comparison: it advances the cache
    expected = torch.cat(ref_tokens)
    return {
        "errors": errors,
        "tokens_equal": bool(new.shape == expected.shape and torch.equal(new, expected)),
        "tokens": new.tolist(),
    }


def check_worker(rank: int, world: int, cases: list[Case]) -> dict[str, dict]:
    """Every case on this rank (what :func:`mamba_cp.testing.run_on_ranks` calls)."""
    from .integrations.transformers import KeepFloat64

    torch.set_num_threads(1)
    with KeepFloat64():
        return {case.name: check_case(case, rank, world) for case in cases}


def worst(per_rank: list[dict]) -> tuple[dict[str, float], bool]:
    """The largest error of each tensor over the ranks, and whether every rank's tokens matched."""
    errors: dict[str, float] = {}
    for result in per_rank:
        for key, value in result["errors"].items():
            errors[key] = max(errors.get(key, 0.0), value)
    return errors, all(result["tokens_equal"] for result in per_rank)


__all__ = ["MODELS", "TOLERANCE", "Case", "check_case", "check_worker", "prompts_for", "small_model", "worst"]
