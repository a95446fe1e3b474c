"""Training steps under context parallelism that are correct by construction: batches, labels, loss, gradients.

Shape legend: ``B`` batch, ``L`` global tokens per row, ``L_local = L / cp``; packed batches have ``B = 1`` and
``T`` / ``T_local`` tokens in ``S`` documents (global ``cu_seqlens`` ``[S + 1]``).

Under CP a rank holds only its head-tail shard of every sequence, so three things a plain training step does
locally need the whole batch: shifting ``labels`` by one token (the target of a rank's last token lives on
another rank), counting the target tokens the mean loss divides by, and the tokens' positions. Two ways in give
the loss and the gradients of the plain model on the whole batch:

* :func:`shard_batch` (recommended): the global batch, as a collator returns it, becomes what this rank passes
  to the model, with labels shifted in true order (per document), the global target count and a batch context::

      with mamba_cp.shard_batch({"input_ids": ids, "labels": ids}, cp_group) as batch:
          loss = model(**batch.inputs).loss          # this rank's sum over the global target count
          loss.backward()
      mamba_cp.all_reduce_gradients(model, cp_group)  # or FSDP2: set_fsdp_gradient_divide_factor
      log(batch.global_loss(loss))                   # the mean over every target token (one all-reduce)

* ``model(input_ids=batch.shard(ids), labels=batch.shard(labels))`` on a model prepared by
  :func:`mamba_cp.parallelize`: the model's forward pre-hook (:class:`InputGuard`) all-gathers the local labels
  (``B * L_local`` int64 per rank, one all-gather per step), shifts them in true order and passes this rank's
  shard as ``shift_labels`` with ``num_items_in_batch`` (transformers' ``ForCausalLMLoss`` takes both), so the
  per-rank loss is the rank's sum over the global count and the ranks' losses sum to the global mean.

The guard also owns positions (``position_ids`` that are not the tokens' true ones raise ``ValueError`` on every
rank, through one tiny all-gather per step when ``position_ids`` are passed), refuses a local length that
contradicts the batch context, and warns once when a ``[1, T]`` batch with document separators is run outside a
batch context under CP.
"""

from __future__ import annotations

import inspect
import warnings
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist
import torch.nn as nn

from .context import BatchContext, activate, current_batch, local_positions
from .groups import CPGroup, resolve_cp_group
from .sharding import shard, unshard
from .validation import check_packed_batch, check_packed_layout

IGNORE_INDEX = -100
"""transformers' label value for tokens without a target (``ForCausalLMLoss``'s default ``ignore_index``)."""

_TAG = "_mamba_cp_layout"
"""Attribute set on tensors this module made or verified for one layout (see :func:`_mark`)."""

_FLATTENING_KEYS = ("cu_seq_lens_q", "cu_seq_lens_k", "max_length_q", "max_length_k", "seq_idx")
"""Keys ``DataCollatorWithFlattening`` may add; :func:`shard_batch` checks the boundaries and drops them."""


# --------------------------------------------------------------------------------------------------
# Labels and positions of a global batch (pure functions, no process group)
# --------------------------------------------------------------------------------------------------


def shift_labels(
    labels: torch.Tensor, cu_seqlens: torch.Tensor | None = None, ignore_index: int = IGNORE_INDEX
) -> torch.Tensor:
    """Next-token targets in true order: ``out[..., t] = labels[..., t + 1]``, ``ignore_index`` where none.

    ``labels`` ``[B, L]`` (transformers' convention: unshifted, usually ``input_ids``) -> ``[B, L]``, the last
    token of every row ignored; packed ``[1, T]`` with global ``cu_seqlens`` ``[S + 1]``: the last token of every
    document ignored (a document's last token does not predict the next document's first). This is what
    ``ForCausalLMLoss`` computes inside the model, done on the *global* batch before sharding.
    """
    out = nn.functional.pad(labels[..., 1:], (0, 1), value=ignore_index)
    if cu_seqlens is not None:
        ends = cu_seqlens[1:].to(device=labels.device, dtype=torch.int64) - 1
        out[..., ends] = ignore_index
    return out


def positions_from_cu_seqlens(cu_seqlens: torch.Tensor, total: int) -> torch.Tensor:
    """``[T]`` int64: every token's offset inside its document (global ``cu_seqlens`` ``[S + 1]``, on its device)."""
    cu = cu_seqlens.to(torch.int64)
    tokens = torch.arange(total, device=cu.device)
    return tokens - cu[torch.bucketize(tokens, cu[1:], right=True)]


def cu_seqlens_from_position_ids(position_ids: torch.Tensor) -> torch.Tensor | None:
    """Document boundaries of a packed row described by ``position_ids`` that restart at 0 per document.

    ``position_ids`` ``[1, T]`` (transformers' ``DataCollatorWithFlattening``) -> ``[S + 1]`` int32 CPU
    ``cu_seqlens``, or None for a single sequence (``0 .. T-1``) and for ``[B, L]`` rows that each count
    ``0 .. L-1``. Raises ``ValueError`` unless every document counts ``0, 1, 2, ...``. One host read.
    """
    pos = position_ids.detach().to("cpu", torch.int64)
    if pos.dim() == 1:
        pos = pos[None]
    if pos.dim() != 2:
        raise ValueError(f"position_ids must be [B, L] (packed: [1, T]), got shape {tuple(position_ids.shape)}")
    rows, length = pos.shape
    if rows > 1:
        if not torch.equal(pos, torch.arange(length).expand(rows, length)):
            raise ValueError(
                f"position_ids of a batch of {rows} rows must count 0 .. {length - 1} in every row; to pack "
                "documents put them in one row ([1, T]) with position_ids restarting at 0 per document"
            )
        return None
    row = pos[0]
    starts = (row == 0).nonzero().flatten()
    if starts.numel() == 0 or int(starts[0]) != 0:
        raise ValueError(f"position_ids must start at 0, got position_ids[0, 0] = {int(row[0])}")
    cu = torch.cat([starts, torch.tensor([length])])
    expected = positions_from_cu_seqlens(cu, length)
    if not torch.equal(row, expected):
        i = int((row != expected).nonzero()[0])
        raise ValueError(
            "position_ids of a packed row must count 0, 1, 2, ... from the start of each document (restarting at "
            f"0, as DataCollatorWithFlattening makes them), got position_ids[0, {i}] = {int(row[i])} after "
            f"{int(row[i - 1])}"
        )
    return None if starts.numel() == 1 else cu.to(torch.int32)


def count_targets(shifted: torch.Tensor, ignore_index: int = IGNORE_INDEX) -> torch.Tensor:
    """0-d int64 tensor: the tokens of ``shifted`` labels that have a target (no host read)."""
    return (shifted != ignore_index).sum()


# --------------------------------------------------------------------------------------------------
# Tags: tensors made or verified for one layout
# --------------------------------------------------------------------------------------------------


def _layout_key(group: CPGroup, ctx: BatchContext | None) -> tuple:
    if ctx is None or not ctx.packed:
        return (group.size, group.rank, None, None)
    return (group.size, group.rank, ctx.cu_seqlens, ctx.packed_layout)


def _mark(t: torch.Tensor, key: tuple) -> None:
    """Record that ``t`` holds what the layout ``key`` needs (positions, shifted labels), at its current version."""
    setattr(t, _TAG, (key, t._version))


def _tag(t: torch.Tensor) -> tuple | None:
    tag = getattr(t, _TAG, None)
    return None if tag is None or tag[1] != t._version else tag[0]


def _same_layout(a: tuple | None, b: tuple) -> bool:
    return a is not None and a[0] == b[0] and a[1] == b[1] and a[2] is b[2] and a[3] == b[3]


# --------------------------------------------------------------------------------------------------
# shard_batch: the global batch -> what this rank passes to the model
# --------------------------------------------------------------------------------------------------


@dataclass(eq=False)
class ShardedBatch:
    """One rank's share of a global batch (see :func:`shard_batch`); a context manager for the step.

    ``with batch:`` opens the batch's :func:`mamba_cp.batch_context` (keep forward *and* backward inside).
    """

    inputs: dict[str, Any]
    """What this rank passes to the model: ``model(**batch.inputs)``. ``input_ids`` (or ``inputs_embeds``)
    ``[B, L_local]``; with labels, ``labels`` and ``shift_labels`` (this rank's shard of the next-token targets,
    shifted in true order) and ``num_items_in_batch`` (the global target count); ``position_ids`` ``[B, L_local]``
    (true positions) when the batch had them; every non-tensor entry of the batch unchanged."""
    context: BatchContext
    """The batch's layout (``cu_seqlens``, CP group, global length) every layer reads inside ``with batch:``."""
    num_items_in_batch: torch.Tensor | None
    """0-d int64: the target tokens of the whole batch (over every CP rank); None without labels."""
    _active: list = field(default_factory=list, repr=False)

    @property
    def cu_seqlens(self) -> torch.Tensor | None:
        """``[S + 1]`` global document boundaries of a packed batch (None for BSHD)."""
        return self.context.cu_seqlens

    @property
    def cp_group(self) -> CPGroup:
        return self.context.cp_group

    def shard(self, x: torch.Tensor, seq_dim: int = 1) -> torch.Tensor:
        """This rank's head-tail shard of another global tensor of the batch (see :meth:`BatchContext.shard`)."""
        return self.context.shard(x, seq_dim)

    def global_loss(self, loss: torch.Tensor) -> torch.Tensor:
        """The loss of the whole batch, for logging: :func:`global_loss` over this batch's CP group."""
        return global_loss(loss, self.context.cp_group)

    def __enter__(self) -> ShardedBatch:
        manager = activate(self.context)
        manager.__enter__()
        self._active.append(manager)
        return self

    def __exit__(self, *exc) -> None:
        self._active.pop().__exit__(*exc)


def shard_batch(
    batch: Mapping[str, Any],
    cp_group,
    cu_seqlens: torch.Tensor | None = None,
    *,
    num_items_in_batch: torch.Tensor | int | None = None,
    ignore_index: int = IGNORE_INDEX,
    packed_layout: str = "sequences",
) -> ShardedBatch:
    """Cut a *global* batch into what this CP rank passes to a parallelized model, correct by construction.

    Every rank of the CP group passes the same global batch. Accepted keys:

    * ``input_ids`` ``[B, L]`` (or ``inputs_embeds`` ``[B, L, D]``); packed: ``[1, T]``;
    * ``labels`` ``[B, L]`` in transformers' convention (unshifted, usually ``input_ids``; ``-100`` ignored):
      shifted here in true order (per document for packs, each document's last token ignored), then sharded;
      or ``shift_labels`` already shifted in true order;
    * ``position_ids`` ``[B, L]``: must be the true positions; a ``[1, T]`` row restarting at 0 per document
      (``DataCollatorWithFlattening``) *describes* a pack and becomes its ``cu_seqlens``;
    * ``attention_mask``: all ones (dropped; padding is refused: pack instead);
    * ``cu_seq_lens_q`` / ``cu_seq_lens_k`` / ``max_length_q`` / ``max_length_k`` / ``seq_idx`` (the collator's
      flash-attention extras): checked against the boundaries, then dropped;
    * any non-tensor value (``use_cache``, ...) is passed through; any other tensor raises ``ValueError``.

    Args:
        batch: the global batch.
        cp_group: the CP ``ProcessGroup`` / 1-D ``DeviceMesh`` / ``1`` (no CP).
        cu_seqlens: ``[S + 1]`` global boundaries of a packed batch (or derived from ``position_ids``).
        num_items_in_batch: the target count the loss divides by; default: the target tokens of this batch
            over every CP rank. Pass the count over every micro-batch when accumulating gradients.
        ignore_index: the label value without a target.
        packed_layout: how a packed batch is cut over the ranks, as the model was parallelized (``"sequences"``:
            every document in ``2*cp`` chunks; ``"stream"``: the whole pack in ``2*cp`` chunks).

    Returns a :class:`ShardedBatch`: ``with shard_batch(...) as batch: model(**batch.inputs).loss.backward()``.
    Every check happens here on the global batch, identically on every rank, before any collective; nothing is
    padded or dropped. Host reads: the boundaries (as :func:`mamba_cp.batch_context`), ``position_ids`` when
    given, and ``attention_mask`` when given.
    """
    group = resolve_cp_group(cp_group)
    items = dict(batch)
    ids, embeds = items.pop("input_ids", None), items.pop("inputs_embeds", None)
    if (ids is None) == (embeds is None):
        raise ValueError("shard_batch needs exactly one of 'input_ids' and 'inputs_embeds' in the batch")
    token_key, tokens = ("input_ids", ids) if ids is not None else ("inputs_embeds", embeds)
    if not isinstance(tokens, torch.Tensor) or tokens.dim() < 2:
        raise ValueError(f"{token_key} must be a [B, L] tensor (packed: [1, T]), got {_describe(tokens)}")
    rows, length = tokens.shape[:2]
    labels, shifted = items.pop("labels", None), items.pop("shift_labels", None)
    position_ids, mask = items.pop("position_ids", None), items.pop("attention_mask", None)
    extras = {k: items.pop(k) for k in _FLATTENING_KEYS if k in items}
    for key, value in items.items():
        if isinstance(value, torch.Tensor):
            raise ValueError(
                f"shard_batch does not know how to shard the batch's {key!r}: shard it with batch.shard(x, seq_dim) "
                "and pass it yourself, or leave it out"
            )
    for key, value in (("labels", labels), ("shift_labels", shifted), ("position_ids", position_ids)):
        if value is not None and (not isinstance(value, torch.Tensor) or tuple(value.shape) != (rows, length)):
            raise ValueError(
                f"{key} must have the shape of {token_key}'s first two dims {(rows, length)}, got {_describe(value)}"
            )
    if mask is not None:
        if not isinstance(mask, torch.Tensor) or tuple(mask.shape) != (rows, length):
            raise ValueError(f"attention_mask must be [B, L] = {(rows, length)}, got {_describe(mask)}")
        if not bool(mask.all()):
            raise ValueError(
                "padded batches are not supported under mamba_cp (attention_mask has zeros): concatenate the "
                "sequences into one row and pass their cu_seqlens (or restarting position_ids) instead"
            )

    check_packed_layout(packed_layout)
    cu = _boundaries(cu_seqlens, extras, position_ids, length)
    if cu is not None:
        if rows != 1:
            raise ValueError(f"a packed batch must be one row [1, T], got {token_key} of shape {tuple(tokens.shape)}")
        check_packed_batch(cu, length, group.size, packed_layout)
        seq_idx = extras.get("seq_idx")
        if seq_idx is not None:
            cu64 = cu.to(torch.int64)
            doc = torch.bucketize(torch.arange(length, device=cu64.device), cu64[1:], right=True)
            if not torch.equal(seq_idx.detach().to("cpu", torch.int64).reshape(-1), doc.cpu()):
                raise ValueError("seq_idx does not match the batch's document boundaries (cu_seqlens)")
    context = BatchContext(cu_seqlens=cu, cp_group=group, seq_len=length, packed_layout=packed_layout)
    key = _layout_key(group, context)

    inputs: dict[str, Any] = {token_key: context.shard(tokens)}
    count = None
    if labels is not None or shifted is not None:
        if shifted is None:
            shifted = shift_labels(labels, cu, ignore_index)
        count = count_targets(shifted, ignore_index) if num_items_in_batch is None else num_items_in_batch
        local = context.shard(shifted)
        _mark(local, key)
        inputs.update(labels=local, shift_labels=local, num_items_in_batch=count)
    if position_ids is not None:
        local_positions_ = context.shard(position_ids)
        _mark(local_positions_, key)
        inputs["position_ids"] = local_positions_
    inputs.update(items)
    return ShardedBatch(inputs=inputs, context=context, num_items_in_batch=count)


def _describe(value: object) -> str:
    return f"shape {tuple(value.shape)}" if isinstance(value, torch.Tensor) else type(value).__name__


def _boundaries(
    cu_seqlens: torch.Tensor | None, extras: dict, position_ids: torch.Tensor | None, length: int
) -> torch.Tensor | None:
    """The batch's ``cu_seqlens`` from the argument, the collator's ``cu_seq_lens_*`` or restarting
    ``position_ids``; ``ValueError`` when two of them disagree."""
    sources = [("cu_seqlens", cu_seqlens)] + [(k, extras.get(k)) for k in ("cu_seq_lens_q", "cu_seq_lens_k")]
    given = [(name, value) for name, value in sources if value is not None]
    for name, value in given:
        if not isinstance(value, torch.Tensor):
            raise ValueError(f"{name} must be a torch.Tensor, got {type(value).__name__}")
    cu = given[0][1] if given else None
    for name, value in given[1:]:
        if value.tolist() != cu.tolist():
            raise ValueError(f"{name} {value.tolist()} differs from {given[0][0]} {cu.tolist()}")
    if position_ids is not None:
        from_positions = cu_seqlens_from_position_ids(position_ids)
        if cu is None:
            return from_positions
        bounds = cu.tolist()
        implied = [0, length] if from_positions is None else from_positions.tolist()
        if bounds != implied:
            raise ValueError(
                f"position_ids restart at {implied[:-1]} but {given[0][0]} is {bounds}: position_ids must be the "
                "tokens' positions inside their documents"
            )
    return cu


# --------------------------------------------------------------------------------------------------
# Loss and gradients over the group
# --------------------------------------------------------------------------------------------------


def global_loss(loss: torch.Tensor, cp_group) -> torch.Tensor:
    """For logging: the detached sum of every CP rank's ``loss`` (one all-reduce of a scalar).

    With ``num_items_in_batch`` semantics (:func:`shard_batch`, or ``labels=`` on a parallelized model) each
    rank's loss is its tokens' summed loss over the *global* target count, so the sum is the mean over every
    target token of the batch: the plain model's loss. With data parallelism on top, average this over dp.
    """
    group = resolve_cp_group(cp_group)
    total = loss.detach().clone()
    if group.size > 1:
        dist.all_reduce(total, group=group.group)
    return total


def set_fsdp_gradient_divide_factor(module: nn.Module, cp_group) -> float:
    """Make FSDP2 (``fully_shard``) over a mesh that folds CP into its shard axis give the true gradients.

    Under CP each rank's gradient is a partial sum (its tokens' share of the loss): a data-parallel replica's
    gradient is the *sum* over its CP ranks. FSDP2 reduces over every rank of its mesh (``dp * cp`` when CP is
    folded into the shard axis, as torchtitan does) and by default divides by the mesh size: the gradients come
    out ``cp`` times too small. This sets, on every FSDP module in ``module``, the divide factor ``mesh size /
    cp`` (``= dp``; ``set_gradient_divide_factor``), so the result is the mean over data-parallel replicas of
    each replica's gradient, as FSDP without CP gives. A factor of 1 also forces plain sum reductions (no
    division at all), as do meshes on devices other than CUDA (gloo has no pre-multiplied sum). Call it after
    ``fully_shard``; returns the factor. Raises ``ValueError`` when no FSDP module has sharded parameters, when
    ``cp`` does not divide the mesh size, or when FSDP modules use meshes of different sizes.
    """
    from torch.distributed.fsdp import FSDPModule
    from torch.distributed.tensor import DTensor

    group = resolve_cp_group(cp_group)
    factors: dict[str, float] = {}
    for name, sub in module.named_modules():
        if not isinstance(sub, FSDPModule):
            continue
        mesh = next((p.device_mesh for p in sub.parameters() if isinstance(p, DTensor)), None)
        if mesh is None:
            continue
        if mesh.size() % group.size:
            raise ValueError(
                f"{name or type(sub).__name__}: FSDP mesh size ({mesh.size()}) must be a multiple of cp_size "
                f"({group.size}): fold the CP ranks into FSDP's shard axis (e.g. mesh['dp', 'cp']._flatten())"
            )
        factor = float(mesh.size() // group.size)
        sub.set_gradient_divide_factor(factor)
        if (factor == 1 or mesh.device_type != "cuda") and hasattr(sub, "set_force_sum_reduction_for_comms"):
            sub.set_force_sum_reduction_for_comms(True)
        factors[name] = factor
    if not factors:
        raise ValueError(f"{type(module).__name__} has no FSDP2 module with sharded parameters: call fully_shard first")
    if len(set(factors.values())) > 1:
        raise ValueError(f"FSDP modules use meshes of different sizes (divide factors {factors})")
    return next(iter(factors.values()))


# --------------------------------------------------------------------------------------------------
# The model's pre-hook: what users pass to a parallelized transformers model
# --------------------------------------------------------------------------------------------------

_HEADER = 8
"""Ints each rank contributes to the per-step check: ``[mismatch, positions hash, rows, local length, local target
count, *mismatch detail]`` (see :func:`_position_mismatch`)."""


def _positions_hash(positions: torch.Tensor) -> torch.Tensor:
    """0-d int64 hash of one row of positions ``[..., L_local]`` (int64 arithmetic wraps; no host read)."""
    row = positions.reshape(-1, positions.shape[-1])[0].to(torch.int64)
    weights = torch.arange(1, row.numel() + 1, device=row.device, dtype=torch.int64) * 1_000_003 + 7
    return ((row + 1) * weights).sum()


def _loss_takes_shift_labels(module: nn.Module) -> bool:
    fn = getattr(module, "loss_function", None)
    if fn is None:
        return False
    params = inspect.signature(fn).parameters
    return "shift_labels" in params and "num_items_in_batch" in params


@dataclass(eq=False)
class InputGuard:
    """What the forward pre-hook of a parallelized transformers model does with the call's inputs.

    Called with the model, its forward signature and the hook's ``get(name)`` / ``put(name, value)`` accessors
    (``put`` writes a name the signature lacks into ``**kwargs``). Under CP, or inside a batch context:

    1. the local length must fit the batch context's global length (``ValueError``; local);
    2. ``position_ids``: filled with the tokens' true positions when None; given ones must equal them;
    3. ``labels`` (transformers' convention, this rank's shard): all-gathered, shifted in true order (per
       document), resharded and passed as ``shift_labels`` with ``num_items_in_batch`` = the global target count
       (unless given; ``shift_labels`` given without a count gets the global count);
    4. checks that depend on one rank's data (given ``position_ids``; debug mode's check that every rank's
       positions are its head-tail shard) travel in *one* all-gather per step with the labels, so every rank
       raises the same ``ValueError`` before the model's first collective.

    Per step this costs at most one all-gather of ``8 + B * L_local`` int64 per rank, and one host read when
    ``position_ids`` are passed or in debug mode. With CP off and no batch context it does nothing (transformers'
    own behaviour, generation included). Its only state is the warn-once flag of the packing check.
    """

    group: CPGroup
    packed_layout: str = "sequences"
    """How the model's packed batches are cut over the ranks (``parallelize(..., packed_layout=)``): a batch context
    in another layout is refused."""
    packing_checked: bool = False
    """Whether the first call outside a batch context was checked for document separators (warn once)."""
    debug: bool | None = None
    """Debug mode (resolved at the first call from the model's mixers: ``parallelize(..., debug=True)`` or
    ``MAMBA_CP_DEBUG=1``)."""

    def __call__(self, module: nn.Module, signature: inspect.Signature, get, put) -> None:
        params = signature.parameters
        tokens = get("input_ids") if "input_ids" in params else None
        if tokens is None and "inputs_embeds" in params:
            tokens = get("inputs_embeds")
        ctx = current_batch()
        cp, rank = self.group.size, self.group.rank
        if not isinstance(tokens, torch.Tensor) or tokens.dim() < 2 or (cp == 1 and ctx is None):
            return
        rows, local_len = tokens.shape[:2]
        cu = None if ctx is None else ctx.cu_seqlens
        key = _layout_key(self.group, ctx)
        if ctx is not None:
            ctx.check_local_length(local_len, cp)
            if cp > 1 and ctx.packed and ctx.packed_layout != self.packed_layout:  # the same on every rank
                raise ValueError(
                    f"{type(module).__name__} was parallelized with packed_layout={self.packed_layout!r}, but the "
                    f"batch was sharded with packed_layout={ctx.packed_layout!r}: shard it as the model expects "
                    "(mamba_cp.shard_batch / batch_context take packed_layout)"
                )
        elif not self.packing_checked:
            self._check_packing(module, tokens)
        debug = self._debug(module)
        layout = self.packed_layout

        # Positions: the library's, or checked against them.
        given, expected = None, None
        if "position_ids" in params:
            given = get("position_ids")
            if given is None or not _same_layout(_tag(given), key) or debug:
                expected = local_positions(cp, rank, local_len, cu, tokens.device, layout)
            if given is None:
                _mark(expected, key)
                put("position_ids", expected)
            elif not isinstance(given, torch.Tensor):
                raise ValueError(f"position_ids must be a tensor, got {type(given).__name__}")
            elif _same_layout(_tag(given), key) and not debug:
                given = None  # made or checked for this layout already (shard_batch, an outer model's hook)
        if debug and expected is None:  # a model without position_ids: its tokens' positions all the same
            expected = local_positions(cp, rank, local_len, cu, tokens.device, layout)
        mismatch = None if given is None else _position_mismatch(given, expected, rows)  # [4] int64, no host read

        # Labels: shifted in true order over the whole batch, counted over the whole batch.
        labels = get("labels") if "labels" in params else None
        shifted, items = get("shift_labels"), get("num_items_in_batch")
        if labels is not None:
            self._check_loss(module, signature)
        if shifted is not None and _tag(shifted) is not None and not _same_layout(_tag(shifted), key):
            raise ValueError(
                "shift_labels were made by mamba_cp.shard_batch for another batch layout (another CP group or "
                "cu_seqlens, or outside their batch context): run the model inside `with batch:` of the "
                "ShardedBatch they came from"
            )
        if labels is not None and shifted is None and tuple(labels.shape) != (rows, local_len):
            raise ValueError(f"labels must have the shape of the tokens {(rows, local_len)}, got {tuple(labels.shape)}")
        gather = labels is not None and shifted is None
        count = labels is not None and shifted is not None and items is None
        check = given is not None or debug

        if cp > 1 and (gather or count or check):
            header = torch.zeros(_HEADER, dtype=torch.int64, device=tokens.device)
            header[2], header[3] = rows, local_len
            if given is not None:
                header[0], header[5:8] = mismatch[0], mismatch[1:]
            if debug:
                header[1] = _positions_hash(given if given is not None else expected)
            if count:
                header[4] = (shifted != IGNORE_INDEX).sum()
            payload = labels.reshape(-1).to(device=tokens.device, dtype=torch.int64) if gather else header[:0]
            mine = torch.cat([header, payload])
            rows_of = [torch.empty_like(mine) for _ in range(cp)]
            dist.all_gather(rows_of, mine, group=self.group.group)
            if check:  # the one host read of the step
                self._raise_on_every_rank([r[:_HEADER].tolist() for r in rows_of], local_len, cu, debug, layout)
            if given is not None:
                _mark(given, key)
            if gather:
                shards = [r[_HEADER:].view(rows, local_len) for r in rows_of]
                whole = shift_labels(unshard(shards, seq_dim=1, cu_seqlens=cu, packed_layout=layout), cu)
                local = shard(whole, cp, rank, seq_dim=1, cu_seqlens=cu, packed_layout=layout)
                put("shift_labels", local)
                if items is None:
                    put("num_items_in_batch", count_targets(whole))
            elif count:
                put("num_items_in_batch", torch.stack([r[4] for r in rows_of]).sum())
        elif cp == 1:  # a batch context without CP: nothing to exchange
            if given is not None:
                detail = mismatch.tolist()
                if detail[0]:
                    raise ValueError(_mismatch_message([0], detail, local_len, cp, cu, layout))
                _mark(given, key)
            if gather:
                local = shift_labels(labels, cu)
                put("shift_labels", local)
                if items is None:
                    put("num_items_in_batch", count_targets(local))
            elif count:
                put("num_items_in_batch", count_targets(shifted))

    def _debug(self, module: nn.Module) -> bool:
        if self.debug is None:
            strategies = (getattr(m, "strategy", None) for m in module.modules())
            self.debug = any(getattr(s, "debug", False) for s in strategies)
        return self.debug

    @staticmethod
    def _check_loss(module: nn.Module, signature: inspect.Signature) -> None:
        takes_kwargs = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in signature.parameters.values())
        if not takes_kwargs or not _loss_takes_shift_labels(module):
            raise ValueError(
                f"{type(module).__name__}: labels under mamba_cp need a causal-LM loss that takes shift_labels and "
                "num_items_in_batch (transformers' ForCausalLMLoss) and a forward that passes **kwargs to it; compute "
                "the loss yourself from the logits (labels shifted in true order with mamba_cp.shift_labels before "
                "sharding, summed, over the global target count)"
            )

    def _check_packing(self, module: nn.Module, tokens: torch.Tensor) -> None:
        """Warn once when a ``[1, T_local]`` batch outside any batch context holds document separators."""
        self.packing_checked = True
        if tokens.shape[0] != 1 or tokens.is_floating_point() or getattr(tokens, "_mamba_cp_packing_checked", False):
            return
        tokens._mamba_cp_packing_checked = True  # the inner model of this call need not look again
        config = getattr(module, "config", None)
        separators = []
        for name in ("eos_token_id", "bos_token_id"):
            value = getattr(config, name, None)
            separators += [value] if isinstance(value, int) else list(value or [])
        if not separators:
            return
        row = tokens[0]
        marks = torch.tensor(separators, device=row.device, dtype=row.dtype)
        if bool(torch.isin(row[1:-1], marks).any()):  # one host read, on the first call only
            warnings.warn(
                f"mamba_cp: {type(module).__name__} got a [1, {row.numel()}] batch under context parallelism outside "
                f"any batch context, and its tokens hold a document separator ({separators}) inside the row. A "
                "pack of documents needs its boundaries or it is run as one sequence (attention and the Mamba "
                "scans cross documents): use mamba_cp.shard_batch(batch, cp_group) (cu_seqlens or position_ids "
                "restarting per document) or mamba_cp.batch_context(cu_seqlens=...). For one sequence, run the "
                "step inside mamba_cp.batch_context(cp_group=...) to silence this. (Warned once.)",
                UserWarning,
                stacklevel=4,
            )

    @staticmethod
    def _raise_on_every_rank(headers: list[list[int]], local_len: int, cu, debug: bool, layout: str) -> None:
        """The decision of the per-step check, from every rank's header: the same on every rank."""
        cp = len(headers)
        bad = [r for r, h in enumerate(headers) if h[0]]
        if bad:
            first = headers[bad[0]]
            raise ValueError(_mismatch_message(bad, [first[0], *first[5:8]], local_len, cp, cu, layout))
        if not debug:
            return
        problems = []
        shapes = [(h[2], h[3]) for h in headers]
        if len(set(shapes)) > 1:
            listed = ", ".join(f"rank {r}: {s}" for r, s in enumerate(shapes))
            problems.append(f"local (batch, length) differs across CP ranks ({listed})")
        else:
            for r, h in enumerate(headers):
                want = int(_positions_hash(local_positions(cp, r, local_len, cu, packed_layout=layout)))
                if h[1] != want:
                    problems.append(
                        f"CP rank {r}'s tokens are not its head-tail shard (the hash of its positions is {h[1]}, "
                        f"the layout's rank-{r} positions hash to {want})"
                    )
        if problems:
            raise ValueError("mamba_cp debug check failed: " + "; ".join(problems))


def _position_mismatch(given: torch.Tensor, expected: torch.Tensor, rows: int) -> torch.Tensor:
    """``[4]`` int64 on ``expected``'s device, without a host read: ``[0, ...]`` when ``given`` position_ids equal
    ``expected`` ``[1, L_local]`` (broadcast over ``rows``); ``[1, t, given, true]`` at the first differing token
    ``t``; ``[2, given.shape[-1], given.dim(), rows]`` for a shape that cannot be this rank's positions."""
    device = expected.device
    fits = given.dim() in (1, 2) and given.shape[-1] == expected.shape[-1]
    if not fits or (given.dim() == 2 and given.shape[0] not in (1, rows)):
        return torch.tensor([2, given.shape[-1], given.dim(), rows], dtype=torch.int64, device=device)
    given_row = given.reshape(-1, given.shape[-1]).to(device=device, dtype=torch.int64)
    differs = given_row != expected
    flat = differs.reshape(-1).to(torch.int32)
    index = flat.argmax()  # the first differing token (0 when none)
    token = index % expected.shape[-1]
    return torch.stack([flat.amax().to(torch.int64), token, given_row.reshape(-1)[index], expected[0, token]])


def _mismatch_message(bad: list[int], detail: list[int], local_len: int, cp: int, cu, packed_layout: str) -> str:
    """The same message on every rank: which ranks, what the first of them got (``detail``), and the fix."""
    if cu is not None:
        layout = "a packed batch: positions restart at 0 in every document"
    else:
        layout = f"a row of {local_len * cp} tokens"
    if detail[0] == 2:
        got = f"position_ids of {detail[2]} dims ending in {detail[1]} for {detail[3]} row(s) of {local_len} tokens"
    else:
        first = local_positions(cp, bad[0], local_len, cu, None, packed_layout)[0, :4].tolist()
        got = (
            f"position_ids[..., {detail[1]}] = {detail[2]} where that token's position is {detail[3]} "
            f"(its positions start {first}...)"
        )
    return (
        f"position_ids on CP rank(s) {bad} of {cp} are not the true positions of their tokens ({layout}; rank "
        f"{bad[0]} holds its head-tail shard and got {got}). Leave position_ids out (mamba_cp computes them), or "
        "build the step with mamba_cp.shard_batch, which takes the global position_ids, checks them, and turns "
        "position_ids that restart per packed document (DataCollatorWithFlattening) into cu_seqlens. Local "
        "0..L_local-1 positions, or a plain contiguous split of the sequence, are not this rank's head-tail shard"
    )
