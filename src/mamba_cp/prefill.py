"""Prefill under context parallelism: the whole CP group reads a long prompt, generation continues anywhere.

Shape legend: ``B`` prompts of a BSHD batch, ``L`` tokens per prompt, ``L_local = L / cp``; a pack has ``S``
prompts in one row ``[1, T]`` (global ``cu_seqlens`` ``[S + 1]``), ``T_local = T / cp``; ``S = B`` for BSHD.
``V`` vocabulary, ``H`` Mamba heads, ``P`` head_dim, ``N`` d_state, ``C`` conv channels, ``K`` conv width,
``H_kv`` attention kv heads, ``d`` attention head size.

After a prompt a Mamba2 layer's state is small and independent of the prompt's length (``[S, H, P, N]`` plus
the last ``K`` pre-conv inputs), so a prompt too long for one device can be prefilled by the CP group, in the
same head-tail layout as training, and decoding can continue on any rank without CP::

    model = mamba_cp.parallelize(model, cp_group)                      # as for training
    result = mamba_cp.prefill(model, mamba_cp.shard(ids, cp, rank), cp_group)  # every rank: the same result
    new_tokens = mamba_cp.generate(model, result, max_new_tokens=64)  # greedy, CP off while decoding

:func:`prefill` runs the model's own forward once under CP (``torch.no_grad()``) with every mixer's strategy
asked for its final states (:meth:`~mamba_cp.strategies.base.Strategy.scan_with_states`: hidden-parallel
gathers its heads' states and conv channels; state passing takes the end state of rank 0's tail chunk, which
ends every sequence, and the last ``K`` pre-conv tokens from the chunks they lie in) and every attention layer's
keys and values recorded (this rank's tokens, after RoPE, gathered into true order after the forward). It returns
the logits of each prompt's last token and the model's own generation cache (transformers' ``DynamicCache`` with
``LinearAttentionLayer`` s for the Mamba layers and ``DynamicLayer`` s for attention, filled through its public
``update_conv_state`` / ``update_recurrent_state`` / ``update``), equal to what the plain model's forward with
``use_cache=True`` returns for the whole prompt.

Decoding: a parallelized model refuses a cache under CP, so generation runs inside :func:`decoding`, which
turns CP off for the block (local strategies, the layers' own attention implementation, no CP pre-hooks) and
restores it after; :func:`generate` does that around the model's own ``generate``.

Collectives (beyond the forward's own): one all-gather per Mamba layer (its final states: ``S * (H*P*N + C*K)``
values per rank for hidden-parallel over ``cp``, ``cp`` times ``S * (H*P*N + 2*K*C)`` for state passing), one per
attention layer (its keys and values: every rank ends with all of them, as the cache needs), one of the
last-token logits and one of the prompt ids. Activations per rank fall as ``1/cp`` as in training (no graph is
kept); what does not shrink is the cache itself.
"""

from __future__ import annotations

import copy
import inspect
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
import torch.nn as nn

from .collectives import all_gather
from .context import batch_context
from .groups import CPGroup, resolve_cp_group
from .parallelize import find_mixers
from .plan_cache import PlanCache
from .sharding import unshard
from .strategies.base import FinalStates, SSMParams
from .strategies.local import LocalStrategy
from .validation import as_cu_seqlens, check_cu_seqlens

if TYPE_CHECKING:
    from transformers import Cache, PretrainedConfig

# --------------------------------------------------------------------------------------------------
# Recording the states during the CP forward
# --------------------------------------------------------------------------------------------------


class _RecordingStrategy:
    """A mixer's strategy for one prefill forward: the same layer, run through ``scan_with_states``, whose final
    states are kept in ``sink[key]``. Everything else is the wrapped strategy's."""

    def __init__(self, inner, sink: dict[str, FinalStates], key: str) -> None:
        self.inner, self.sink, self.key = inner, sink, key
        self.name, self.group = inner.name, inner.group

    def plan_for(self, hidden_states: torch.Tensor, cu_seqlens: torch.Tensor | None):
        return self.inner.plan_for(hidden_states, cu_seqlens)

    def scan(self, h_BLD: torch.Tensor, in_proj: nn.Module, params: SSMParams, plan) -> tuple[torch.Tensor, ...]:
        y, z, states = self.inner.scan_with_states(h_BLD, in_proj, params, plan)
        self.sink[self.key] = states
        return y, z

    def scan_with_states(self, h_BLD: torch.Tensor, in_proj: nn.Module, params: SSMParams, plan):
        return self.inner.scan_with_states(h_BLD, in_proj, params, plan)

    def __getattr__(self, name: str):
        return getattr(self.inner, name)


@contextmanager
def capture_states(module: nn.Module) -> Iterator[dict[str, FinalStates]]:
    """For the ``with`` block, every :class:`~mamba_cp.Mamba2Mixer` in ``module`` (parallelized or not) keeps
    the :class:`~mamba_cp.strategies.base.FinalStates` of the last batch it ran, by qualified name.

    What :func:`prefill` uses; on its own, for stacks of our mixers with no generation cache of their own::

        with torch.no_grad(), mamba_cp.capture_states(stack) as states:
            stack(x_local)                          # each rank its shard, as in training
        states["layers.0"].ssm                      # [S, H, P, N], the same on every rank

    Every call inside the block runs ``scan_with_states`` (one more small all-gather per layer under CP).
    """
    mixers = find_mixers(module)
    sink: dict[str, FinalStates] = {}
    saved = [(mixer, mixer.strategy) for _, mixer in mixers]
    try:
        for name, mixer in mixers:
            mixer.strategy = _RecordingStrategy(mixer.strategy, sink, name)
        yield sink
    finally:
        for mixer, strategy in saved:
            mixer.strategy = strategy


def _recording_attention(module: nn.Module, sink: list) -> list[tuple[nn.Module, object]]:
    """Swap every CP attention layer's state for a copy that records ``(module, key, value)`` of each call;
    returns what to restore."""
    from .integrations.transformers import AttentionContextParallel

    class _Recording(AttentionContextParallel):
        def __call__(self, module, query, key, value, attention_mask, **kwargs):
            sink.append((module, key, value))
            return super().__call__(module, query, key, value, attention_mask, **kwargs)

    saved = []
    for sub in module.modules():
        state = getattr(sub, "context_parallel", None)
        if isinstance(state, AttentionContextParallel):
            recording = copy.copy(state)
            recording.__class__ = _Recording
            saved.append((sub, state))
            sub.context_parallel = recording
    return saved


# --------------------------------------------------------------------------------------------------
# The result
# --------------------------------------------------------------------------------------------------


@dataclass(eq=False)
class PrefillResult:
    """What :func:`prefill` returns, the same on every rank of the CP group."""

    logits: torch.Tensor
    """``[S, V]`` the logits of each prompt's last token (the model's logits dtype)."""
    prompts: tuple[torch.Tensor, ...]
    """The ``S`` whole prompts ``[L_s]`` in true order (gathered from the ranks' shards)."""
    cache: Cache | None
    """The model's generation cache, row ``s`` = prompt ``s``: what the plain model's forward with ``use_cache=True``
    returns for the prompts. None only for a pack of prompts of different lengths on a model with attention layers
    (one cache holds one length per attention layer): then :attr:`row_caches`. Generation advances it in place."""
    row_caches: tuple[Cache, ...] | None
    """One cache per prompt (batch 1), when :attr:`cache` is None."""
    config: PretrainedConfig
    """The model's config (new caches of its kind are built from it)."""

    @property
    def num_prompts(self) -> int:
        return len(self.prompts)

    def split(self) -> tuple[PrefillResult, ...]:
        """One result per prompt, each with its own batch-1 cache (copies of the rows: split before generating)."""
        if self.cache is None:
            caches = self.row_caches
        else:
            caches = tuple(_select_row(self.cache, s, self.config) for s in range(self.num_prompts))
        return tuple(
            PrefillResult(self.logits[s : s + 1], (self.prompts[s],), cache, None, self.config)
            for s, cache in enumerate(caches)
        )


def _new_cache(config):
    from transformers import DynamicCache

    return DynamicCache(config=config)


def _is_attention_layer(layer) -> bool:
    from transformers.cache_utils import CacheLayerMixin

    return isinstance(layer, CacheLayerMixin)


def _is_linear_layer(layer) -> bool:
    from transformers.cache_utils import LinearAttentionCacheLayerMixin

    return isinstance(layer, LinearAttentionCacheLayerMixin)


def _select_row(cache, row: int, config):
    """A batch-1 copy of row ``row`` of a filled cache, through the cache's public API."""
    out = _new_cache(config)
    for i, layer in enumerate(cache.layers):
        if _is_linear_layer(layer) and layer.has_previous_state[0]:
            conv = cache.get_conv_state(i)
            out.update_conv_state(conv[row : row + 1].clone(), i, conv_kernel_size=conv.shape[-1])
            out.update_recurrent_state(cache.get_recurrent_state(i)[row : row + 1].clone(), i)
        if _is_attention_layer(layer) and getattr(layer, "keys", None) is not None and layer.keys.numel():
            out.update(layer.keys[row : row + 1].clone(), layer.values[row : row + 1].clone(), i)
    return out


# --------------------------------------------------------------------------------------------------
# prefill
# --------------------------------------------------------------------------------------------------


def _check_model(model: nn.Module, group: CPGroup) -> list:
    """``ValueError`` unless ``model`` is a transformers causal LM prepared by ``parallelize`` over a group of
    ``group``'s size; returns its mixers. Local checks only (every rank decides alike)."""
    mixers = find_mixers(model)
    if not mixers:
        raise ValueError(
            f"{type(model).__name__} was not prepared by mamba_cp.parallelize (it holds no mamba_cp Mamba2Mixer): "
            "call mamba_cp.parallelize(model, cp_group) before mamba_cp.prefill"
        )
    sizes = sorted({mixer.strategy.group.size for _, mixer in mixers})
    if sizes != [group.size] or any(mixer.strategy.group.rank != group.rank for _, mixer in mixers):
        raise ValueError(
            f"{type(model).__name__} was parallelized over CP group size(s) {sizes} (rank "
            f"{mixers[0][1].strategy.group.rank}), but prefill got a cp_group of size {group.size} (rank "
            f"{group.rank}): pass the group the model was parallelized with"
        )
    transformers = sys.modules.get("transformers")
    if transformers is None or not isinstance(model, transformers.PreTrainedModel):
        raise ValueError(
            f"mamba_cp.prefill needs a transformers causal LM (it returns the model's generation cache); "
            f"{type(model).__name__} is not one: for a stack of mamba_cp.Mamba2Mixer layers use "
            "mamba_cp.capture_states"
        )
    if _cache_argument(model) is None:
        raise ValueError(f"{type(model).__name__}.forward takes no generation cache (past_key_values / cache_params)")
    return mixers


def _cache_argument(model: nn.Module) -> str | None:
    params = inspect.signature(model.forward).parameters
    return next((name for name in ("past_key_values", "cache_params") if name in params), None)


def _check_prompt(
    input_ids: object, cu_seqlens: object, group: CPGroup
) -> tuple[torch.Tensor, torch.Tensor | None, list[int]]:
    """``(ids [B, L_local], cu_seqlens, global prompt lengths)``; ``ValueError`` for a prompt the layout cannot
    split. Local (every rank passes the same shapes and boundaries)."""
    if not isinstance(input_ids, torch.Tensor) or input_ids.is_floating_point() or input_ids.is_complex():
        raise ValueError(f"input_ids must be an integer tensor, got {type(input_ids).__name__}")
    cu = as_cu_seqlens(cu_seqlens)
    cp = group.size
    if cu is None:
        if input_ids.dim() != 2 or input_ids.shape[1] == 0:
            raise ValueError(f"input_ids must be this rank's [B, L_local] shard, got shape {tuple(input_ids.shape)}")
        local = input_ids.shape[1]
        if cp > 1 and (local * cp) % (2 * cp):
            raise ValueError(
                f"prompt length L (local length x cp_size = {local} x {cp} = {local * cp}) must be divisible by "
                f"2*cp_size ({2 * cp}): each rank holds two equal chunks of every prompt"
            )
        return input_ids, None, [local * cp] * input_ids.shape[0]
    ids = input_ids[None] if input_ids.dim() == 1 else input_ids
    if ids.dim() != 2 or ids.shape[0] != 1:
        raise ValueError(f"a packed prompt must be [T_local] or [1, T_local], got shape {tuple(input_ids.shape)}")
    bounds = check_cu_seqlens(cu, ids.shape[1] * cp, multiple_of=2 * cp if cp > 1 else 1)
    return ids, cu, [b - a for a, b in zip(bounds[:-1], bounds[1:], strict=True)]


def _check_cache(cache, template, model: nn.Module) -> None:
    """``ValueError`` unless ``cache`` is an empty cache of the kind the model's forward makes."""
    want = [type(layer).__name__ for layer in template.layers]
    got = [type(layer).__name__ for layer in getattr(cache, "layers", [])]
    if type(cache) is not type(template) or got != want:
        raise ValueError(
            f"{type(model).__name__} uses a {type(template).__name__} with layers {want} (what its forward makes with "
            f"use_cache=True: DynamicCache(config=model.config)); got a {type(cache).__name__} with layers {got}"
        )
    for i, layer in enumerate(cache.layers):
        filled = (_is_linear_layer(layer) and any(layer.has_previous_state.values())) or (
            _is_attention_layer(layer) and getattr(layer, "keys", None) is not None and layer.keys.numel() > 0
        )
        if filled:
            raise ValueError(f"the cache passed to prefill must be empty; its layer {i} already holds states")


def _gather_rows(t: torch.Tensor, group: CPGroup) -> list[torch.Tensor]:
    """``t`` from every rank, in rank order (one all-gather; ``[t]`` without CP)."""
    if group.size == 1:
        return [t]
    rows = all_gather(t, group.group)
    return [row.view(t.shape) for row in rows]


def prefill(
    model: nn.Module,
    input_ids: torch.Tensor,
    cp_group,
    cu_seqlens: torch.Tensor | None = None,
    *,
    cache: Cache | None = None,
) -> PrefillResult:
    """Prefill a prompt over the CP group; every rank gets the last-token logits and the generation cache.

    Args:
        model: a transformers causal LM with Mamba2 mixers (Mamba2, NemotronH, Bamba, GraniteMoeHybrid, Zamba2)
            prepared by :func:`mamba_cp.parallelize` over ``cp_group`` (any strategy).
        input_ids: this rank's head-tail shard of the prompts, as in training (:func:`mamba_cp.shard`): ``[B,
            L_local]``, or a pack ``[1, T_local]`` / ``[T_local]`` with ``cu_seqlens``.
        cp_group: the group the model was parallelized with (``1``: no CP).
        cu_seqlens: ``[S + 1]`` global boundaries of a pack of prompts (each a multiple of ``2 * cp`` tokens).
        cache: an empty cache of the kind the model uses, to fill (default: a new ``DynamicCache(config=
            model.config)``, what the model's forward makes with ``use_cache=True``).

    Returns a :class:`PrefillResult`: ``logits`` ``[S, V]``, ``prompts``, and the cache whose row ``s`` is prompt
    ``s`` (a pack: one row per prompt; prompts of different lengths on a model with attention layers: one cache
    per prompt in ``row_caches``). Every check (a model not prepared by ``parallelize`` or over another group, a
    prompt length the layout cannot split, a cache of another kind) raises ``ValueError`` on every rank before
    any collective. Runs under ``torch.no_grad()``; activations per rank are ``1/cp`` of the plain forward's.
    """
    group = resolve_cp_group(cp_group)
    mixers = _check_model(model, group)
    layouts = {mixer.strategy.plans.packed_layout for _, mixer in mixers}
    # Checked before the prompt, whose checks are the per-sequence layout's; local, so every rank decides alike.
    if cu_seqlens is not None and group.size > 1 and layouts != {"sequences"}:
        raise ValueError(
            f"prefill of a packed prompt needs the model parallelized with packed_layout='sequences' (each prompt "
            f"cut in 2*cp chunks), got {sorted(layouts)}; packed_layout='stream' is for training"
        )
    ids, cu, lengths = _check_prompt(input_ids, cu_seqlens, group)
    template = _new_cache(model.config)
    if cache is not None:
        _check_cache(cache, template, model)
    for _, mixer in find_mixers(model):
        idx = mixer.layer_idx
        if not (isinstance(idx, int) and 0 <= idx < len(template.layers) and _is_linear_layer(template.layers[idx])):
            raise ValueError(f"mixer {idx} of {type(model).__name__} has no Mamba layer in the model's cache")
    attention_layers = [i for i, layer in enumerate(template.layers) if _is_attention_layer(layer)]
    one_cache = not attention_layers or len(set(lengths)) == 1
    if cache is not None and not one_cache:
        raise ValueError(
            f"the pack's prompts have different lengths ({lengths}) and {type(model).__name__} has attention layers, "
            "so one cache cannot hold them; leave cache=None to get one cache per prompt (PrefillResult.row_caches)"
        )

    bounds = None if cu is None else [0, *torch.tensor(lengths).cumsum(0).tolist()]
    keep: int | torch.Tensor = 1
    if cu is not None:  # every prompt's last local token: the end of each of this rank's prompt pieces
        local_ends = torch.tensor(lengths).div(group.size, rounding_mode="floor").cumsum(0) - 1
        keep = local_ends.to(ids.device)
    takes_keep = "logits_to_keep" in inspect.signature(model.forward).parameters
    attention: list = []
    saved = []
    with torch.no_grad():
        try:
            saved = _recording_attention(model, attention)
            context = batch_context(cu_seqlens=cu, cp_group=group, seq_len=None if cu is not None else lengths[0])
            with context, capture_states(model) as states:
                kwargs = {"logits_to_keep": keep} if takes_keep else {}
                logits = model(input_ids=ids, use_cache=False, return_dict=True, **kwargs).logits
        finally:
            for sub, state in saved:
                sub.context_parallel = state
        if not takes_keep:
            logits = logits[:, -1:] if cu is None else logits[:, keep]
        logits = logits.reshape(-1, logits.shape[-1])  # [S, V] on every rank; rank 0's hold the prompts' ends
        logits = _gather_rows(logits, group)[0].clone()
        prompts = _gather_prompts(ids, cu, bounds, group)
        mamba = {mixer.layer_idx: states[name] for name, mixer in find_mixers(model)}
        filled = template if cache is None else cache
        caches = [filled] if one_cache else [_new_cache(model.config) for _ in lengths]
        for row, target in enumerate(caches):
            _fill_mamba(target, mamba, None if one_cache else row)
        for idx, key, value in _gathered_attention(attention, attention_layers, cu, group):
            for row, target in enumerate(caches):  # one layer at a time: the gathered keys are freed as we go
                _fill_attention(target, idx, key, value, bounds, None if one_cache else row)
        if one_cache:
            return PrefillResult(logits, prompts, caches[0], None, model.config)
        return PrefillResult(logits, prompts, None, tuple(caches), model.config)


def _gather_prompts(
    ids: torch.Tensor, cu: torch.Tensor | None, bounds: list[int] | None, group: CPGroup
) -> tuple[torch.Tensor, ...]:
    whole = unshard(_gather_rows(ids.to(torch.int64), group), seq_dim=1, cu_seqlens=cu)  # [B, L] / [1, T]
    if bounds is None:
        return tuple(whole)
    return tuple(whole[0, a:b] for a, b in zip(bounds[:-1], bounds[1:], strict=True))


def _gathered_attention(
    records: list, attention_layers: list[int], cu: torch.Tensor | None, group: CPGroup
) -> Iterator[tuple[int, torch.Tensor, torch.Tensor]]:
    """Each recorded attention call's keys and values ``[B, H_kv, L_local, d]`` of this rank -> ``(cache layer
    index, keys, values)`` of the whole prompts ``[B, H_kv, L, d]`` (packed ``[1, H_kv, T, d]``) in true order,
    one layer at a time (one all-gather each). Layers are matched by the module's ``layer_idx`` where every call
    has a distinct valid one, else by call order (Zamba2's shared attention block runs once per hybrid layer)."""
    if len(records) != len(attention_layers):
        raise RuntimeError(
            f"prefill recorded {len(records)} attention calls for the cache's {len(attention_layers)} attention "
            "layers; this model's attention is not supported by mamba_cp.prefill"
        )
    ids = [getattr(module, "layer_idx", None) for module, _, _ in records]
    by_index = all(isinstance(i, int) and i in attention_layers for i in ids) and len(set(ids)) == len(ids)
    for n in range(len(records)):
        _, key, value = records[n]
        records[n] = None  # this rank's shard is not needed once gathered
        shards = _gather_rows(torch.stack([key, value]), group)  # [2, B, H_kv, L_local, d] per rank
        del key, value
        whole = unshard(shards, seq_dim=3, cu_seqlens=cu)
        del shards
        yield (ids[n] if by_index else attention_layers[n]), whole[0], whole[1]


def _fill_mamba(cache: Cache, mamba: dict[int, FinalStates], row: int | None) -> None:
    """Every Mamba layer's states into ``cache`` through its public API: all prompts (``row=None``) or one."""
    for idx, states in sorted(mamba.items()):
        conv, ssm = states.conv, states.ssm
        if row is not None:
            conv, ssm = conv[row : row + 1], ssm[row : row + 1]
        cache.update_conv_state(conv, idx, conv_kernel_size=conv.shape[-1])
        cache.update_recurrent_state(ssm, idx)


def _fill_attention(
    cache: Cache, idx: int, key: torch.Tensor, value: torch.Tensor, bounds: list[int] | None, row: int | None
) -> None:
    """One attention layer's keys and values ``[B, H_kv, L, d]`` (a pack: ``[1, H_kv, T, d]``, cut per prompt
    by ``bounds``) into ``cache`` (``cache.update``): all prompts (``row=None``) or prompt ``row``."""
    if bounds is not None:
        pieces = [(key[:, :, a:b], value[:, :, a:b]) for a, b in zip(bounds[:-1], bounds[1:], strict=True)]
        if row is not None:
            key, value = pieces[row]
        else:  # prompts of one length: one row each
            key, value = torch.cat([k for k, _ in pieces]), torch.cat([v for _, v in pieces])
    elif row is not None:
        key, value = key[row : row + 1], value[row : row + 1]
    cache.update(key.contiguous(), value.contiguous(), idx)


# --------------------------------------------------------------------------------------------------
# Decoding
# --------------------------------------------------------------------------------------------------


@contextmanager
def decoding(model: nn.Module) -> Iterator[nn.Module]:
    """For the ``with`` block, run a parallelized model without CP, as the plain model (generation with a
    cache on any rank); CP is restored on exit.

    Every mixer gets a local strategy (a mixer given a cache then runs the transformers forward); a transformers
    model also gets its attention layers' own implementation back and its CP pre-hooks off
    (:class:`~mamba_cp.integrations.transformers.ContextParallelOff`). Not re-entrant; not thread-safe (it
    switches the model for the block).
    """
    mixers = find_mixers(model)
    saved = [(mixer, mixer.strategy) for _, mixer in mixers]
    transformers = sys.modules.get("transformers")
    plans = PlanCache()
    try:
        for mixer, _ in saved:
            mixer.strategy = LocalStrategy(plans)
        if transformers is not None and isinstance(model, transformers.PreTrainedModel):
            from .integrations.transformers import ContextParallelOff

            with ContextParallelOff(model):
                yield model
        else:
            yield model
    finally:
        for mixer, strategy in saved:
            mixer.strategy = strategy


def generate(model: nn.Module, result: PrefillResult, max_new_tokens: int, **generate_kwargs) -> torch.Tensor:
    """Greedy generation after :func:`prefill`: ``[S, n]`` new tokens (``n <= max_new_tokens``), on this rank.

    The first token is the argmax of ``result.logits``; the others come from the model's own ``generate``
    (``do_sample=False``) on ``result``'s cache, inside :func:`decoding`. As transformers' greedy ``generate``
    does, a row that emits an end-of-sequence token is padded after it, and generation stops when every row has.
    The cache is advanced in place. Prompts of a pack with different lengths on a model with attention layers run
    one after the other (:attr:`PrefillResult.row_caches`). ``generate_kwargs`` go to ``model.generate``
    (``eos_token_id``, ``pad_token_id``, ...); sampling and beam search are refused (``ValueError``): for those, call
    ``model.generate`` inside ``mamba_cp.decoding(model)`` with the prompt and your first token (see the README).
    The first token ignores the model's logits processors (``repetition_penalty``, ...), which apply from the
    second on.
    """
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be an int >= 1, got {max_new_tokens!r}")
    if generate_kwargs.get("do_sample") or generate_kwargs.get("num_beams", 1) != 1:
        raise ValueError(
            "mamba_cp.generate is greedy (do_sample=False, num_beams=1); for sampling, call model.generate inside "
            "mamba_cp.decoding(model) with the prompt, your first token and past_key_values=result.cache"
        )
    for name in ("input_ids", "attention_mask", "past_key_values", "cache_params", "max_new_tokens"):
        if name in generate_kwargs:
            raise ValueError(f"mamba_cp.generate sets {name!r} itself (from the PrefillResult)")
    parts = [result] if result.cache is not None else list(result.split())
    config = getattr(model, "generation_config", None)
    eos = generate_kwargs.get("eos_token_id", getattr(config, "eos_token_id", None))
    eos_ids = [] if eos is None else [eos] if isinstance(eos, int) else list(eos)
    pad = generate_kwargs.get("pad_token_id", getattr(config, "pad_token_id", None))
    pad = pad if pad is not None else (eos_ids[0] if eos_ids else 0)
    outs = [_generate_part(model, part, max_new_tokens, eos_ids, generate_kwargs) for part in parts]
    width = max(o.shape[1] for o in outs)
    tokens = torch.cat([torch.nn.functional.pad(o, (0, width - o.shape[1]), value=pad) for o in outs])
    return _finish(tokens, eos_ids, pad)


def _generate_part(model: nn.Module, part: PrefillResult, max_new_tokens: int, eos_ids: list[int], kwargs: dict):
    device = part.prompts[0].device
    first = part.logits.argmax(-1, keepdim=True).to(device)  # [S, 1]
    if max_new_tokens == 1 or (eos_ids and bool(torch.isin(first, torch.tensor(eos_ids, device=device)).all())):
        return first
    with_attention = any(_is_attention_layer(layer) for layer in part.cache.layers)
    # transformers slices the inputs by the cache's length where it has attention layers; a Mamba-only cache has
    # no length, and the model is given the new token alone.
    inputs = torch.cat([torch.stack(part.prompts), first], dim=1) if with_attention else first
    with decoding(model):
        out = model.generate(
            inputs,
            attention_mask=torch.ones_like(inputs),
            max_new_tokens=max_new_tokens - 1,
            do_sample=False,
            use_cache=True,
            **{_cache_argument(model): part.cache},
            **kwargs,
        )
    return torch.cat([first, out[:, inputs.shape[1] :]], dim=1)


def _finish(tokens: torch.Tensor, eos_ids: list[int], pad: int) -> torch.Tensor:
    """Pad every row after its first end-of-sequence token and drop the columns after every row has ended."""
    if not eos_ids:
        return tokens
    is_eos = torch.isin(tokens, torch.tensor(eos_ids, device=tokens.device)).long()
    ended = is_eos.cumsum(1)
    tokens = tokens.masked_fill(ended - is_eos > 0, pad)  # strictly after the first eos
    done = (ended > 0).all(0)  # every row has ended by this column
    if bool(done.any()):
        tokens = tokens[:, : int(done.nonzero()[0]) + 1]
    return tokens


__all__ = ["PrefillResult", "capture_states", "decoding", "generate", "prefill"]
