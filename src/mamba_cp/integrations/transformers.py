"""Context parallelism for Hugging Face transformers' Mamba2 models and Mamba2 / attention hybrids.

Shape legend: ``B`` batch, ``L_local`` tokens per row on this rank, ``D`` hidden size; packed batches are
``[1, T_local]`` with global ``cu_seqlens`` from :func:`mamba_cp.batch_context`.

:func:`mamba_cp.parallelize` uses this module through :mod:`mamba_cp.integrations`; three things happen:

* **Mamba2 mixers** (:data:`SUPPORTED_MIXERS`: ``Mamba2Mixer``, ``NemotronHMamba2Mixer``, ``BambaMixer``,
  ``GraniteMoeHybridMambaLayer``, ``Zamba2MambaMixer``; their torch paths are the same code) become
  :class:`mamba_cp.Mamba2Mixer` s *in place*: the module object is kept and its class is swapped for a
  subclass of both (as FSDP2's ``fully_shard`` does). Every submodule and parameter is the same object under
  the same name, so state dicts, checkpoints, optimizers and ``isinstance`` checks are unchanged. The new
  forward takes the HF call signature and runs the mixer's own math (the torch path, in the input's
  precision: float64 stays float64, where transformers computes the scan and the gated norm in float32)
  through the CP strategy; with a generation cache or a padding mask and CP off it calls the HF forward.
* **Attention layers** (any transformers attention module that dispatches through
  ``ALL_ATTENTION_FUNCTIONS``) run head-parallel: the model's ``config._attn_implementation`` is switched to
  ``"mamba_cp"``, a function registered with transformers' ``AttentionInterface``, which wraps the layer's
  own implementation (``eager``, ``sdpa``, ``flex_attention`` or ``flash_attention_*``) in
  :class:`~mamba_cp.attention.UlyssesAttention` and gives it a causal mask over true positions.
  transformers then builds no mask of its own (its mask helpers skip unknown implementations).
* **The model's forward** (a pre-hook on every ``PreTrainedModel`` in the tree) gets the true
  ``position_ids`` of this rank's tokens when none are passed (rotary embeddings need them), ``use_cache``
  defaults to False, and an all-ones 2-D ``attention_mask`` is dropped (padding is refused: pack instead).

``FalconH1Mixer`` is refused: it scales the in_proj input and output by μP multipliers and has an optional,
differently grouped norm, so it is not the same computation.

Packed batches with ``sdpa``, ``eager`` or ``flex_attention`` layers run document-causal attention in O(T) memory
(:mod:`mamba_cp.document_attention`): one FlexAttention ``BlockMask`` per batch, built from the batch's
``cu_seqlens`` as int32 tile lists (never a ``[T, T]`` tensor) and shared by every attention layer; compiled
FlexAttention on GPU, the same tile schedule in torch ops on CPU (torch's FlexAttention has no CPU backward). It
takes the layer's ``scaling`` and ``softcap`` and refuses attention dropout in training (``packed_attention =
"dense"`` on a layer's ``context_parallel`` restores the dense ``[T, T]`` mask, O(T^2), which allows it).
BSHD batches keep ``sdpa`` with ``is_causal`` and ``eager`` with its dense causal mask (eager's own scores are
``[L, L]`` anyway). ``flash_attention_2`` takes ``cu_seqlens`` (varlen) instead; its path here is written to
transformers' varlen interface but has only run where flash-attn exists.

On GPU, torch's experimental ``context_parallel`` (ring attention over SDPA, the same head-tail layout) does
the attention part of this job for BSHD batches; it is not used here because its SDPA path has no CPU kernel
(as of torch 2.11), it shards the buffers itself, and it takes no packed sequences. Ulysses sends each token's
q/k/v once (three tensors, one all-to-all) where the ring passes every rank's k/v around the ring.
"""

from __future__ import annotations

import copy
import functools
import importlib
import inspect
import sys
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.nn as nn
from torch.overrides import TorchFunctionMode
from transformers import AttentionInterface, PreTrainedModel
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

from .. import kernels
from ..attention import MaskCache, UlyssesAttention
from ..batch_plans import prepare_batch
from ..context import current_cu_seqlens
from ..document_attention import DEFAULT_BLOCK_SIZE, document_attention, resolve_backend
from ..groups import CPGroup
from ..mixer import Mamba2Mixer
from ..plan_cache import PlanCache
from ..strategies.local import LocalStrategy
from ..training import InputGuard

SUPPORTED_MIXERS: dict[str, tuple[str, ...]] = {
    "transformers.models.mamba2.modeling_mamba2": ("Mamba2Mixer",),
    "transformers.models.nemotron_h.modeling_nemotron_h": ("NemotronHMamba2Mixer",),
    "transformers.models.bamba.modeling_bamba": ("BambaMixer",),
    "transformers.models.granitemoehybrid.modeling_granitemoehybrid": ("GraniteMoeHybridMambaLayer",),
    "transformers.models.zamba2.modeling_zamba2": ("Zamba2MambaMixer",),
}
"""transformers module -> Mamba2 mixer classes converted (their subclasses too)."""

UNSUPPORTED_MIXERS: dict[str, str] = {
    "FalconH1Mixer": "it scales the in_proj input and output by μP multipliers (ssm_in_multiplier, mup_vector) "
    "and its gated norm is optional and may normalise before gating",
}
"""Mamba2-like transformers mixers that are not the same computation, with the reason."""

_REQUIRED = ("in_proj", "conv1d", "dt_bias", "A_log", "D", "norm", "out_proj")
_ATTENTION_NAME = "mamba_cp"


def _supported(cls: type) -> bool:
    return any(c.__name__ in SUPPORTED_MIXERS.get(c.__module__, ()) for c in cls.__mro__)


# --------------------------------------------------------------------------------------------------
# Mamba2 mixers
# --------------------------------------------------------------------------------------------------


class TransformersMamba2Mixer(Mamba2Mixer):
    """A transformers Mamba2 mixer run by mamba_cp (mixed into the HF class; never constructed directly).

    Forward takes the HF mixer's arguments: ``hidden_states`` ``[B, L_local, D]`` (packed: ``[1, T_local, D]``
    with ``cu_seqlens`` from the batch context or the keyword), ``cache_params``, ``attention_mask``; returns
    ``[B, L_local, D]``.
    """

    _hf_class: type[nn.Module]

    def forward(
        self,
        hidden_states: torch.Tensor,
        cache_params=None,
        attention_mask: torch.Tensor | None = None,
        cu_seqlens: torch.Tensor | None = None,
        **kwargs,
    ) -> torch.Tensor:
        cu_seqlens = current_cu_seqlens(cu_seqlens)
        if cache_params is not None or attention_mask is not None:
            if self.strategy.group.size > 1 or cu_seqlens is not None:
                raise ValueError(
                    f"mixer {self.layer_idx}: a generation cache (cache_params) or a padding attention_mask cannot be "
                    "used with context parallelism or packed sequences; call the model with use_cache=False and "
                    "pack sequences (cu_seqlens via mamba_cp.batch_context) instead of padding them"
                )
            return self._hf_class.forward(
                self, hidden_states, cache_params=cache_params, attention_mask=attention_mask, **kwargs
            )
        y, z = self.mix(hidden_states, cu_seqlens)
        # The HF gated norm (gate first, groups of norm.group_size), in float32 or float64 for float64 input.
        y = kernels.rmsnorm_gated(
            y, z, self.norm.weight, eps=self.norm.variance_epsilon, group_size=self.norm.group_size
        )
        return self.out_proj(y.to(hidden_states.dtype))


@functools.cache
def _cp_class(hf_class: type) -> type:
    """The class a converted ``hf_class`` instance takes: ``TransformersMamba2Mixer`` first, then ``hf_class``
    (made once per class, so ``isinstance`` and pickling see one class)."""
    return type(
        f"ContextParallel{hf_class.__name__}",
        (TransformersMamba2Mixer, hf_class),
        {"_hf_class": hf_class, "__module__": __name__},
    )


def __getattr__(name: str) -> type:
    """``ContextParallel<Mixer>`` for pickle: a converted model saved whole (``torch.save(model)``) is loaded in a
    process that has not converted anything yet, and pickle looks its mixers' class up here by name."""
    prefix = "ContextParallel"
    if name.startswith(prefix):
        for module_name, classes in SUPPORTED_MIXERS.items():
            if name[len(prefix) :] in classes:
                return _cp_class(getattr(importlib.import_module(module_name), name[len(prefix) :]))
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def _check_mixer(name: str, mixer: nn.Module) -> None:
    """``ValueError`` unless a supported mixer has the parameters and settings mamba_cp computes with."""
    missing = [attr for attr in _REQUIRED if not hasattr(mixer, attr)]
    if missing:
        raise ValueError(f"{name} ({type(mixer).__name__}) lacks {missing}; a Mamba2 mixer has {list(_REQUIRED)}")
    if getattr(mixer, "activation", "silu") not in ("silu", "swish"):
        raise ValueError(f"{name}: conv activation {mixer.activation!r} is not supported (only 'silu')")
    if mixer.num_heads * mixer.head_dim != mixer.intermediate_size:
        raise ValueError(
            f"{name}: num_heads * head_dim ({mixer.num_heads} * {mixer.head_dim}) must equal the mixer's "
            f"intermediate_size ({mixer.intermediate_size})"
        )
    group_size = getattr(mixer.norm, "group_size", None)
    if group_size is None or mixer.intermediate_size % group_size:
        raise ValueError(f"{name}: gated norm group_size {group_size} must divide {mixer.intermediate_size}")


def convert_mixers(module: nn.Module) -> list[str]:
    """Convert every supported transformers Mamba2 mixer in ``module`` in place; returns their names.

    Raises ``ValueError`` for a mixer that is Mamba2-like but not the same computation (``FalconH1Mixer``),
    and for a transformers model that contains no Mamba2 mixer at all.
    """
    converted = []
    for name, sub in module.named_modules():
        cls = type(sub)
        if isinstance(sub, TransformersMamba2Mixer):
            converted.append(name)
            continue
        if cls.__name__ in UNSUPPORTED_MIXERS:
            raise ValueError(f"cannot parallelize {name} ({cls.__name__}): {UNSUPPORTED_MIXERS[cls.__name__]}")
        if not _supported(cls):
            continue
        _check_mixer(name or cls.__name__, sub)
        sub.time_step_limit = (float(sub.time_step_limit[0]), float(sub.time_step_limit[1]))
        sub.strategy = LocalStrategy()  # the HF __init__ ran, not Mamba2Mixer's
        sub.__class__ = _cp_class(cls)
        converted.append(name)
    if isinstance(module, PreTrainedModel) and not any(isinstance(m, Mamba2Mixer) for m in module.modules()):
        supported = sorted(c for classes in SUPPORTED_MIXERS.values() for c in classes)
        raise ValueError(
            f"{type(module).__name__} contains no Mamba2 mixer to parallelize; mamba_cp supports transformers "
            f"models built from {supported}"
        )
    return converted


# --------------------------------------------------------------------------------------------------
# Attention layers
# --------------------------------------------------------------------------------------------------

_LOCAL_KWARGS = ("position_ids", "cu_seq_lens_q", "cu_seq_lens_k", "max_length_q", "max_length_k")
"""Attention kwargs that describe the local shard; dropped, the whole-sequence ones are rebuilt."""


class _LocalHeads:
    """The attention module as its attention function sees it on one rank: the same attributes except
    ``num_key_value_groups``, the query heads per kv head of this rank's slice (differs when ``H_kv < cp``)."""

    def __init__(self, module: nn.Module, num_key_value_groups: int) -> None:
        self.__dict__["_module"] = module
        self.num_key_value_groups = num_key_value_groups

    def __getattr__(self, name: str):
        return getattr(self._module, name)


PACKED_ATTENTION = ("auto", "flex", "blocks", "dense")
"""How packed batches attend (:attr:`AttentionContextParallel.packed_attention`)."""

_SCORE_KWARGS = ("s_aux", "sinks", "position_bias")
"""Attention kwargs that change the scores in ways the document-causal path does not implement."""


@dataclass(eq=False)
class AttentionContextParallel:
    """Head-parallel CP for one transformers attention layer (``module.context_parallel``).

    Which attention runs, per batch layout and the layer's own implementation:

    ============================  ===================================  =====================================
    implementation                BSHD                                 packed (``cu_seqlens``)
    ============================  ===================================  =====================================
    ``sdpa``                      sdpa, ``is_causal`` (no mask)        document-causal (below)
    ``eager``                     eager, dense ``[1, 1, L, L]`` mask   document-causal
    ``flex_attention``            document-causal (one document)       document-causal
    ``flash_attention_*``         flash, causal                        flash varlen (``cu_seqlens``)
    ============================  ===================================  =====================================

    Document-causal is :func:`mamba_cp.document_attention.document_attention` with the batch's
    :class:`~mamba_cp.document_attention.DocumentMask`, built once per batch and shared by every attention layer
    (``masks``): compiled FlexAttention on GPU, the same tile schedule in torch ops on CPU; O(T) memory, never a
    ``T x T`` tensor. It takes the layer's ``scaling`` and ``softcap`` and refuses attention dropout.
    """

    ulysses: UlyssesAttention
    inner: str
    """The layer's own attention implementation (``"eager"``, ``"sdpa"``, ``"flex_attention"``,
    ``"flash_attention_2"``, ...)."""
    inner_fn: Callable
    masks: MaskCache = field(default_factory=MaskCache)
    """Per-batch masks, shared by all attention layers of a model."""
    packed_attention: str = "auto"
    """Packed batches (and every batch of a ``flex_attention`` layer): ``"auto"`` (FlexAttention on CUDA/XPU, the
    tile schedule in torch ops elsewhere), ``"flex"``, ``"blocks"``, or ``"dense"``: the layer's own ``sdpa`` /
    ``eager`` with a dense ``[1, 1, T, T]`` mask (O(T^2) memory; supports dropout)."""
    block_size: int = DEFAULT_BLOCK_SIZE
    """Tile edge of the document-causal mask (FlexAttention's kernels use 128)."""

    def _mode(self, packed: bool) -> str:
        """``"document"``, ``"varlen"``, ``"flash"``, ``"causal"`` (sdpa ``is_causal``) or ``"dense"``."""
        if self.packed_attention not in PACKED_ATTENTION:
            raise ValueError(f"packed_attention must be one of {PACKED_ATTENTION}, got {self.packed_attention!r}")
        if self.inner.startswith("flash_attention"):
            return "varlen" if packed else "flash"
        if self.inner == "flex_attention":
            if self.packed_attention == "dense":
                raise ValueError(
                    "packed_attention='dense' needs an 'sdpa' or 'eager' layer; this one is 'flex_attention'"
                )
            return "document"
        if packed and self.packed_attention != "dense":
            return "document"
        if self.inner == "sdpa":
            return "dense" if packed else "causal"
        return "dense"

    def _document_options(self, module: nn.Module, kwargs: dict) -> tuple[float | None, float | None]:
        """``(scale, softcap)`` of the layer; ``ValueError`` for what the document-causal path cannot do."""
        name = type(module).__name__
        dropout = kwargs.get("dropout") or 0.0
        if dropout > 0:
            raise ValueError(
                f"{name}: attention dropout ({dropout}) is not supported by mamba_cp's document-causal attention "
                "(FlexAttention has no dropout): set the config's attention_dropout to 0 or call model.eval(), or "
                "set layer.context_parallel.packed_attention = 'dense' (a [T, T] mask: O(T^2) memory)"
            )
        for name_ in _SCORE_KWARGS:
            if kwargs.get(name_) is not None:
                raise ValueError(f"{name}: attention with {name_!r} is not supported under mamba_cp")
        scale = kwargs.get("scaling")
        if scale is None:
            scale = getattr(module, "scaling", None)
        return scale, kwargs.get("softcap")

    def prepare(self, batch: int, local_len: int, cu_seqlens: torch.Tensor | None, device) -> None:
        """Build and pin this batch's plan and, where the layer needs one built on the host, its mask (for
        compiled layers: :func:`mamba_cp.prepare_batch`)."""
        plan = self.ulysses.plan_for(batch, local_len, cu_seqlens, device)
        mode = self._mode(plan.seq_idx is not None)
        if mode == "document":
            backend = resolve_backend(self.packed_attention, torch.device(device))
            kind = "document" if backend == "flex" else "document-blocks"
            self.masks.get(plan, kind, device=device, block_size=self.block_size)
        elif mode == "varlen":
            self.masks.get(plan, "varlen")

    def __call__(self, module: nn.Module, query, key, value, attention_mask, **kwargs):
        """``query`` ``[B, H, L_local, d]``, ``key``/``value`` ``[B, H_kv, L_local, d]`` -> ``[B, L_local, H, d]``."""
        if attention_mask is not None:
            raise ValueError(
                f"{type(module).__name__}: under mamba_cp the causal mask is built from the batch layout "
                f"(cu_seqlens); a custom attention mask of shape {tuple(attention_mask.shape)} is not supported"
            )
        cu_seqlens = current_cu_seqlens(kwargs.pop("cu_seqlens", None))
        for name in _LOCAL_KWARGS:
            kwargs.pop(name, None)
        u = self.ulysses
        if key.shape[2] != query.shape[2]:  # keys from a generation cache
            if u.cp_size > 1 or cu_seqlens is not None or query.shape[2] != 1:
                raise ValueError(
                    f"{type(module).__name__}: attention over cached keys ({key.shape[2]} keys for {query.shape[2]} "
                    "queries) runs only without CP, unpacked, one token at a time; call the model with use_cache=False"
                )
            return self.inner_fn(module, query, key, value, None, **kwargs)  # one query sees every cached key
        plan = u.plan_for(query.shape[0], query.shape[2], cu_seqlens, query.device)
        mode = self._mode(plan.seq_idx is not None)
        if mode == "document":  # options and the batch's mask first: errors come before any collective
            scale, softcap = self._document_options(module, kwargs)
            backend = resolve_backend(self.packed_attention, query.device)
            kind = "document" if backend == "flex" else "document-blocks"
            mask = self.masks.get(plan, kind, device=query.device, block_size=self.block_size)
        q, k, v = u.scatter(query, key, value, plan)
        if mode == "document":
            out = document_attention(q, k, v, mask, scale=scale, softcap=softcap, backend=backend)
            return u.gather(out.transpose(1, 2), plan), None
        if mode in ("flash", "varlen"):
            mask = None  # causal from module.is_causal; packed batches go through the varlen path
            if mode == "varlen":
                kwargs.update(self.masks.get(plan, "varlen"))
        elif mode == "causal":
            mask = None
        elif self.inner == "sdpa":
            mask = self.masks.get(plan, "bool", device=q.device)
        else:
            mask = self.masks.get(plan, "additive", q.dtype, q.device)
        groups = getattr(module, "num_key_value_groups", 1)
        target = module if u.kv_groups_local == groups else _LocalHeads(module, u.kv_groups_local)
        out, _ = self.inner_fn(target, q, k, v, mask, **kwargs)
        return u.gather(out, plan), None


def context_parallel_attention(module: nn.Module, query, key, value, attention_mask, **kwargs):
    """The ``"mamba_cp"`` entry of transformers' ``AttentionInterface``: dispatch to ``module.context_parallel``."""
    cp = getattr(module, "context_parallel", None)
    if not isinstance(cp, AttentionContextParallel):
        raise RuntimeError(
            f"{type(module).__name__} dispatches to mamba_cp attention but was not prepared by mamba_cp.parallelize"
        )
    return cp(module, query, key, value, attention_mask, **kwargs)


AttentionInterface.register(_ATTENTION_NAME, context_parallel_attention)


def _attention_layers(module: nn.Module) -> list[tuple[str, nn.Module]]:
    """transformers attention layers: q/k/v projections, a head_dim, and dispatch via ALL_ATTENTION_FUNCTIONS."""
    found = []
    for name, sub in module.named_modules():
        config = getattr(sub, "config", None)
        if not all(hasattr(sub, a) for a in ("q_proj", "k_proj", "v_proj", "head_dim")):
            continue
        if config is None or not hasattr(config, "_attn_implementation"):
            continue
        if "ALL_ATTENTION_FUNCTIONS" not in vars(sys.modules.get(type(sub).__module__, object)):
            continue
        found.append((name, sub))
    return found


def _inner_function(name: str, layer: nn.Module, inner: str | None) -> Callable:
    """The layer's own attention function (run for BSHD sdpa/eager/flash batches and cached-key decoding)."""
    if inner in (None, "eager"):
        fn = getattr(sys.modules[type(layer).__module__], "eager_attention_forward", None)
        if fn is None:
            raise ValueError(f"{name}: no eager_attention_forward in {type(layer).__module__}")
        return fn
    if inner in ("sdpa", "flex_attention") or inner.startswith("flash_attention"):
        return ALL_ATTENTION_FUNCTIONS[inner]
    raise ValueError(
        f"{name}: attention implementation {inner!r} is not supported under mamba_cp; load the model with "
        "attn_implementation='sdpa', 'eager', 'flex_attention' or 'flash_attention_2'"
    )


def parallelize_attention(module: nn.Module, group: CPGroup, plans: PlanCache) -> list[str]:
    """Attach head-parallel CP to every attention layer in ``module`` and the position hook to its models.

    Every check (head divisibility, supported implementation, no sliding window) runs on every layer before
    anything is changed. Returns the attention layers' names.
    """
    layers = _attention_layers(module)
    masks = MaskCache(plans)
    states = []
    for name, layer in layers:
        previous = getattr(layer, "context_parallel", None)
        inner = previous.inner if isinstance(previous, AttentionContextParallel) else layer.config._attn_implementation
        if getattr(layer, "sliding_window", None) or getattr(layer.config, "sliding_window", None):
            raise ValueError(f"{name}: sliding-window attention is not supported under mamba_cp")
        heads = layer.q_proj.out_features // layer.head_dim
        kv_heads = layer.k_proj.out_features // layer.head_dim
        try:
            ulysses = UlyssesAttention(group, heads, kv_heads, plans)
        except ValueError as err:
            raise ValueError(f"cannot parallelize attention {name}: {err}") from err
        state = AttentionContextParallel(ulysses, inner, _inner_function(name, layer, inner), masks)
        if isinstance(previous, AttentionContextParallel):  # parallelized again: keep the layer's choices
            state.packed_attention, state.block_size = previous.packed_attention, previous.block_size
        states.append((layer, state))
    _install_model_hooks(module, group, plans.packed_layout)
    if not layers:
        return []
    configs = {id(layer.config): layer.config for layer, _ in states}
    for sub in module.modules():
        if isinstance(sub, PreTrainedModel):
            configs[id(sub.config)] = sub.config
    # The model gets its own copy of each config it switches: a config object is often shared with other models
    # built from it (a reference model, say), which must keep their attention implementation.
    copies = {key: copy.deepcopy(config) for key, config in configs.items()}
    for sub in module.modules():
        config = sub.__dict__.get("config")
        if config is not None and id(config) in copies:
            sub.config = copies[id(config)]
    for config in copies.values():
        config._attn_implementation = _ATTENTION_NAME
    for layer, state in states:
        layer.context_parallel = state
    return [name for name, _ in layers]


def prepare_attention(module: nn.Module, batch: int, local_len: int, cu_seqlens: torch.Tensor | None, device) -> None:
    """:meth:`AttentionContextParallel.prepare` for every CP attention layer in ``module``."""
    for sub in module.modules():
        state = sub.__dict__.get("context_parallel")
        if isinstance(state, AttentionContextParallel):
            state.prepare(batch, local_len, cu_seqlens, device)


# --------------------------------------------------------------------------------------------------
# The model's forward: true positions, no cache, no padding
# --------------------------------------------------------------------------------------------------


def _install_model_hooks(module: nn.Module, group: CPGroup, packed_layout: str) -> None:
    for sub in module.modules():
        if not isinstance(sub, PreTrainedModel):
            continue
        old = sub.__dict__.get("_mamba_cp_pre_hook")
        if old is not None:
            old.remove()
        hook = _ModelHook(group, inspect.signature(sub.forward), packed_layout)
        sub._mamba_cp_pre_hook = sub.register_forward_pre_hook(hook, with_kwargs=True)


@dataclass(eq=False)
class _ModelHook:
    """Forward pre-hook of a parallelized transformers model (see the module docstring)."""

    group: CPGroup
    signature: inspect.Signature
    packed_layout: str = "sequences"
    inputs: InputGuard = field(init=False)

    def __post_init__(self) -> None:
        self.inputs = InputGuard(self.group, self.packed_layout)

    def __call__(self, module: nn.Module, args: tuple, kwargs: dict):
        names = list(self.signature.parameters)
        args = list(args)

        def get(name: str):
            if name in kwargs or name not in names:
                return kwargs.get(name)
            i = names.index(name)
            return args[i] if i < len(args) else None

        def put(name: str, value) -> None:
            # Only touch the argument where the caller put it: transformers' decorators merge keywords.
            i = names.index(name) if name in names else len(args)
            if name not in kwargs and i < len(args):
                args[i] = value
            else:
                kwargs[name] = value

        if "use_cache" in names and get("use_cache") is None:
            put("use_cache", False)
        if self.group.size > 1 and "use_cache" in names and get("use_cache"):  # before any collective
            raise ValueError(
                f"{type(module).__name__}: a generation cache cannot be built under context parallelism; call the "
                "model with use_cache=False (for a prompt's cache use mamba_cp.prefill)"
            )
        mask = get("attention_mask") if "attention_mask" in names else None
        if isinstance(mask, torch.Tensor) and self.group.size > 1:
            # Decided from the argument alone, so every rank decides the same before any collective (its values
            # differ across ranks: a padded row may be padded on one rank's shard only).
            raise ValueError(
                f"{type(module).__name__}: under context parallelism the attention mask comes from the batch layout; "
                f"pass no attention_mask (got a {mask.dim()}-D tensor of shape {tuple(mask.shape)}). Pack sequences "
                "instead of padding them (cu_seqlens through mamba_cp.batch_context, or mamba_cp.shard_batch, which "
                "checks and drops an all-ones mask)"
            )
        if isinstance(mask, torch.Tensor) and mask.dim() == 2:
            if not bool(mask.all()):  # one host read per step, as transformers' own mask helpers do
                raise ValueError(
                    f"{type(module).__name__}: padded batches are not supported by mamba_cp-parallelized models; "
                    "concatenate the sequences and pass their cu_seqlens with mamba_cp.batch_context"
                )
            put("attention_mask", None)
        self.inputs(module, self.signature, get, put)  # positions, labels, layout checks: mamba_cp.training
        tokens = get("input_ids") if "input_ids" in names else None
        if tokens is None and "inputs_embeds" in names:
            tokens = get("inputs_embeds")
        batched = isinstance(tokens, torch.Tensor) and tokens.dim() >= 2 and get("past_key_values") is None
        if batched and (self.group.size > 1 or current_cu_seqlens() is not None):
            # Every layer's plan for this batch, built and pinned outside any compiled layer.
            prepare_batch(module, tokens.shape[0], tokens.shape[1], None, tokens.device)
        return tuple(args), kwargs


# --------------------------------------------------------------------------------------------------
# Generation on a parallelized model: CP off for a block (mamba_cp.decoding)
# --------------------------------------------------------------------------------------------------


class ContextParallelOff:
    """``with ContextParallelOff(model):`` runs a parallelized transformers model as the plain transformers model.

    For the block, every config switched to ``"mamba_cp"`` attention gets its layers' own implementation back
    (``sdpa``, ``eager``, ...: transformers builds its own masks and cached-key attention again) and the
    model's pre-hooks (true positions, ``use_cache=False``, no padding) are off; on exit both are restored (the
    same hook objects). The mixers' strategies are :func:`mamba_cp.decoding`'s business (it turns them local,
    so that a mixer given a cache runs the transformers forward). Not re-entrant; not thread-safe.
    """

    def __init__(self, module: nn.Module) -> None:
        self.module = module
        self._configs: list[object] = []
        self._hooks: list[tuple[nn.Module, Callable]] = []

    def __enter__(self) -> nn.Module:
        own: dict[int, str] = {}
        for sub in self.module.modules():
            state = getattr(sub, "context_parallel", None)
            if isinstance(state, AttentionContextParallel):
                own.setdefault(id(sub.config), state.inner or "eager")
        fallback = next(iter(own.values()), "eager")  # a model's configs share its layers' implementation
        seen: set[int] = set()
        for sub in self.module.modules():
            config = sub.__dict__.get("config")
            if config is None or id(config) in seen:
                continue
            seen.add(id(config))
            if getattr(config, "_attn_implementation", None) == _ATTENTION_NAME:
                config._attn_implementation = own.get(id(config), fallback)
                self._configs.append(config)
        for sub in self.module.modules():
            handle = sub.__dict__.get("_mamba_cp_pre_hook")
            if handle is not None and handle.id in sub._forward_pre_hooks:
                self._hooks.append((sub, sub._forward_pre_hooks[handle.id]))
                handle.remove()
        return self.module

    def __exit__(self, *exc) -> None:
        for config in self._configs:
            config._attn_implementation = _ATTENTION_NAME
        for sub, hook in self._hooks:
            sub._mamba_cp_pre_hook = sub.register_forward_pre_hook(hook, with_kwargs=True)
        self._configs, self._hooks = [], []


# --------------------------------------------------------------------------------------------------
# Exactness checks
# --------------------------------------------------------------------------------------------------


class KeepFloat64(TorchFunctionMode):
    """A function mode under which float64 tensors are never cast down to float32.

    transformers computes some layers in float32 whatever the model's dtype (RMSNorms such as
    ``NemotronHRMSNorm``, whose weight product and hence weight gradient are float32; eager attention's
    softmax; the ``.float()`` of the logits; the Mamba scan and gated norm of its torch path). Those casts
    are independent of CP but limit a float64 comparison to float32 rounding. Inside ``with KeepFloat64():``
    ``t.to(torch.float32)``, ``t.float()`` and ``dtype=torch.float32`` arguments leave float64 tensors in
    float64, so a float64 model is float64 end to end: use it to check CP against no CP to float64 rounding
    (tests, the CPU run of ``examples/train_long_context.py``). Tensors of other dtypes are untouched.
    """

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = dict(kwargs or {})
        tensors = [a for a in args if isinstance(a, torch.Tensor)]
        if any(t.dtype == torch.float64 for t in tensors):
            if func is torch.Tensor.float:
                return func(*args, **kwargs) if args[0].dtype != torch.float64 else args[0]
            if func is torch.Tensor.to and args[0].dtype == torch.float64:
                args = tuple(torch.float64 if a is torch.float32 else a for a in args)
            if kwargs.get("dtype") is torch.float32:
                kwargs["dtype"] = torch.float64
        return func(*args, **kwargs)
