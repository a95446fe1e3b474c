"""Document-causal attention in O(T) memory: FlexAttention block masks built from a batch's layout.

Shape legend: ``B`` batch (1 for packed batches), ``T`` tokens per row in true order (``L`` for BSHD), ``H`` /
``H_kv`` query / key-value heads, ``d`` / ``d_v`` head dims; ``b`` the block size, ``N = ceil(T / b)`` blocks,
``M`` the most kv tiles any query block visits.

A packed batch attends causally inside each document and not at all across documents. Cut the ``T x T`` score
matrix into ``b x b`` tiles: query block ``i`` needs only the kv blocks ``[lo_i, i]``, ``lo_i`` the block of the
start of the document holding the block's first query. Of those, the tiles strictly below the diagonal that lie
wholly inside the document of the block's last query are *full* (every score allowed, no mask evaluated); the
others (the diagonal, tiles cut by a document start) are *partial* and apply the mask function
``seq[q] == seq[k] and k <= q``. :func:`document_mask` computes both lists by arithmetic on ``cu_seqlens``: int32
``[N]`` counts and ``[N, N]`` index rows (FlexAttention's ``BlockMask`` layout), never a ``T x T`` tensor and no
mask function evaluated over all pairs. A BSHD row is one document.

Two ways to run it, :func:`document_attention`:

* ``"flex"``: ``torch.nn.attention.flex_attention`` compiled (once per process, :func:`compiled_flex_attention`)
  with the ``BlockMask`` made from those lists. Used on CUDA (and XPU). Uncompiled, flex falls back to a dense
  reference that materializes the ``[B, H, T, T]`` scores.
* ``"blocks"``: the same tile schedule in plain torch ops (:func:`block_sparse_attention`): each query block
  gathers its kv tiles, full tiles skip the mask function, partial ones apply it. Used on the CPU, where
  torch's FlexAttention cannot train: ``flex_attention`` raises for inputs that require grad on CPU (compiled
  or not, torch 2.5 to 2.13), its CPU kernel is inference-only and takes no float64, and its eager reference
  ignores the block lists (it evaluates the mask function over the dense ``T x T`` grid). Memory
  ``O(H * T * M * b)``: linear in ``T`` for a fixed longest document. Exact in float64, with autograd.

Both read the same lists, so the CPU tests check the tiles the GPU kernel gets.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from .layout import TokenPlan

DEFAULT_BLOCK_SIZE = 128
"""FlexAttention's tile edge (its kernels' sparse block size)."""

BACKENDS = ("auto", "flex", "blocks")
"""``"auto"``: ``"flex"`` on devices where FlexAttention trains (:data:`FLEX_DEVICES`), else ``"blocks"``."""

FLEX_DEVICES = ("cuda", "xpu")
"""Device types on which torch's FlexAttention has a compiled forward and backward."""


# --------------------------------------------------------------------------------------------------
# The mask
# --------------------------------------------------------------------------------------------------


def causal(b, h, q_idx: torch.Tensor, kv_idx: torch.Tensor) -> torch.Tensor:
    """FlexAttention mask function of one causal sequence: key ``kv_idx`` visible from query ``q_idx``."""
    return kv_idx <= q_idx


def document_causal(seq_idx_T: torch.Tensor) -> Callable:
    """The mask function of a packed batch: causal inside a document, nothing across documents.

    ``seq_idx_T`` ``[T]`` int32 is each token's document. The returned ``mask_mod(b, h, q_idx, kv_idx)`` takes
    index tensors of any (broadcastable) shape, as FlexAttention and :func:`block_sparse_attention` pass them.
    """

    def mask_mod(b, h, q_idx: torch.Tensor, kv_idx: torch.Tensor) -> torch.Tensor:
        return (seq_idx_T[q_idx] == seq_idx_T[kv_idx]) & (kv_idx <= q_idx)

    return mask_mod


@dataclass(eq=False)
class DocumentMask:
    """One batch's document-causal tiles, in FlexAttention's ``BlockMask`` layout (see the module docstring).

    Built by :func:`document_mask` once per batch and shared by every attention layer.
    """

    length: int
    """``T``: tokens per row."""
    block_size: int
    """``b``: the tile edge."""
    kv_num_blocks: torch.Tensor
    """``[N]`` int32: partial tiles of each query block."""
    kv_indices: torch.Tensor
    """``[N, N]`` int32: their kv blocks, first ``kv_num_blocks[i]`` entries of row ``i`` (the rest unused)."""
    full_kv_num_blocks: torch.Tensor
    """``[N]`` int32: full tiles of each query block."""
    full_kv_indices: torch.Tensor
    """``[N, N]`` int32: their kv blocks."""
    mask_mod: Callable = field(repr=False)
    """The mask function of partial tiles (:func:`document_causal` or :func:`causal`)."""
    max_tiles: int | None = None
    """``M``: the most tiles (partial + full) of any query block; read on the host when built for ``"blocks"``."""
    block_mask: object | None = field(default=None, repr=False)
    """FlexAttention's ``BlockMask`` of these tiles (built for ``"flex"``; None otherwise)."""

    @property
    def num_blocks(self) -> int:
        """``N = ceil(T / b)``."""
        return self.kv_num_blocks.shape[0]


def _tiles(
    cu_seqlens: torch.Tensor | None, seq_idx_T: torch.Tensor | None, length: int, block: int, device
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(partial count [N], partial kv blocks [N, N], full count [N], full kv blocks [N, N])``, int32.

    Query block ``i`` covers queries ``[i*b, min((i+1)*b, T))``. Its kv blocks are ``[lo, i]`` with ``lo`` the
    block of the start of its first query's document. Full: ``[i - n_full, i)`` with ``i - n_full`` the first kv
    block that starts at or after the start of its last query's document (such a block ends before query block
    ``i`` starts, so all its keys lie in that document, before every query of the block, which that document
    also holds). Partial: ``[lo, i - n_full)`` and the diagonal ``i``. A last block shorter than ``b`` gets no
    full tiles (as ``create_block_mask`` decides, evaluating its padded rows); with ``b = 1`` the diagonal is full.
    """
    n = -(-length // block)
    i = torch.arange(n, device=device, dtype=torch.int64)
    first = i * block
    last = torch.clamp(first + block, max=length) - 1
    if seq_idx_T is None:  # one document: the whole row
        doc_first = doc_last = torch.zeros_like(i)
    else:
        starts = cu_seqlens.to(device=device, dtype=torch.int64)
        doc_first = starts[seq_idx_T[first].long()]
        doc_last = starts[seq_idx_T[last].long()]
    lo = doc_first // block
    full_lo = -(-doc_last // block)  # first kv block starting at or after the last query's document start
    end = i + 1 if block == 1 else i  # full tiles end before the diagonal, which is full only for 1 x 1 tiles
    n_full = torch.clamp(end - full_lo, min=0)
    if length % block:
        n_full[-1] = 0
    n_part = i + 1 - lo - n_full
    # [N, N] rows in int32 (at T = 1M and b = 128 each is 268 MB; int64 would double it)
    i32, lo32, n_part32, n_full32, end32 = (t.to(torch.int32)[:, None] for t in (i, lo, n_part, n_full, end))
    j = torch.arange(n, device=device, dtype=torch.int32)[None]
    zero = torch.zeros((), device=device, dtype=torch.int32)
    part = torch.where(j < n_part32 - 1, lo32 + j, i32)  # [lo, end - n_full), then the diagonal
    part = torch.where(j < n_part32, part, zero)
    full = torch.where(j < n_full32, end32 - n_full32 + j, zero)
    return n_part.to(torch.int32), part, n_full.to(torch.int32), full


def flex_block_mask_class():
    """torch's ``BlockMask``, or ``RuntimeError`` naming what is missing and the fix."""
    try:
        from torch.nn.attention.flex_attention import BlockMask
    except ImportError as err:
        raise RuntimeError(
            f"mamba_cp's packed attention on GPU runs FlexAttention, which this torch ({torch.__version__}) does "
            "not have (torch.nn.attention.flex_attention). Install torch >= 2.6, or load the model with "
            "attn_implementation='flash_attention_2' (varlen attention takes cu_seqlens)"
        ) from err
    if "seq_lengths" not in inspect.signature(BlockMask.from_kv_blocks).parameters:
        raise RuntimeError(
            f"mamba_cp's packed attention needs BlockMask.from_kv_blocks(seq_lengths=...) (torch >= 2.6); this is "
            f"torch {torch.__version__}. Upgrade torch, or load the model with attn_implementation='flash_attention_2'"
        )
    return BlockMask


def document_mask(
    plan: TokenPlan,
    device: torch.device | str | None = None,
    block_size: int = DEFAULT_BLOCK_SIZE,
    backend: str = "flex",
) -> DocumentMask:
    """The :class:`DocumentMask` of a batch over its true token order (packed: per document; BSHD: causal).

    ``backend`` ``"flex"`` also builds torch's ``BlockMask`` (its kv-to-q transpose is ``[N, N]`` int32 too);
    ``"blocks"`` reads ``M`` on the host instead (one read per batch). Raises ``ValueError`` for a block size
    below 1 and ``RuntimeError`` when ``"flex"`` is asked of a torch without FlexAttention.
    """
    if not isinstance(block_size, int) or block_size < 1:
        raise ValueError(f"block_size must be a positive int, got {block_size!r}")
    if backend not in ("flex", "blocks"):
        raise ValueError(f"document mask backend must be 'flex' or 'blocks', got {backend!r}")
    dev = torch.device(device) if device is not None else (plan.seq_idx.device if plan.seq_idx is not None else None)
    length = plan.global_len
    seq = None if plan.seq_idx is None else plan.seq_idx[0].to(dev)
    counts, indices, full_counts, full_indices = _tiles(plan.cu_seqlens, seq, length, block_size, dev)
    mask_mod = causal if seq is None else document_causal(seq)
    mask = DocumentMask(length, block_size, counts, indices, full_counts, full_indices, mask_mod)
    if backend == "flex":
        block_mask_cls = flex_block_mask_class()
        mask.block_mask = block_mask_cls.from_kv_blocks(
            counts[None, None],
            indices[None, None],
            full_counts[None, None],
            full_indices[None, None],
            BLOCK_SIZE=block_size,
            mask_mod=mask_mod,
            seq_lengths=(length, length),
        )
    else:
        mask.max_tiles = int((counts + full_counts).max())  # the one host read of this mask
    return mask


# --------------------------------------------------------------------------------------------------
# Attention over it
# --------------------------------------------------------------------------------------------------


def resolve_backend(backend: str, device: torch.device) -> str:
    """``"auto"`` -> ``"flex"`` on :data:`FLEX_DEVICES`, ``"blocks"`` elsewhere; ``ValueError`` for unknown names."""
    if backend not in BACKENDS:
        raise ValueError(f"packed attention backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "auto":
        return "flex" if torch.device(device).type in FLEX_DEVICES else "blocks"
    return backend


@functools.cache
def compiled_flex_attention() -> Callable:
    """``torch.compile(flex_attention)``, made once per process (compiling happens on its first calls)."""
    from torch.nn.attention.flex_attention import flex_attention

    return torch.compile(flex_attention)


@functools.cache
def softcap_score_mod(softcap: float) -> Callable:
    """FlexAttention score function ``softcap * tanh(score / softcap)`` (one object per value: no recompiles)."""

    def score_mod(score, b, h, q_idx, kv_idx):
        return softcap * torch.tanh(score / softcap)

    return score_mod


def _check_inputs(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: DocumentMask) -> None:
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        raise ValueError(f"query/key/value must be [B, H, T, d], got shapes {tuple(q.shape)}, {tuple(k.shape)}")
    if k.shape[:3] != v.shape[:3] or q.shape[0] != k.shape[0] or q.shape[2] != k.shape[2]:
        raise ValueError(
            f"key/value must be [B, H_kv, T, d] with the query's B and T, got {tuple(q.shape)}, {tuple(k.shape)}, "
            f"{tuple(v.shape)}"
        )
    if q.shape[1] % k.shape[1]:
        raise ValueError(f"query heads ({q.shape[1]}) must be a multiple of key/value heads ({k.shape[1]})")
    if q.shape[2] != mask.length:
        raise ValueError(f"the mask was built for {mask.length} tokens, the query has {q.shape[2]}")


def document_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    mask: DocumentMask,
    scale: float | None = None,
    softcap: float | None = None,
    backend: str = "auto",
) -> torch.Tensor:
    """Attention of ``query`` ``[B, H, T, d]`` over ``key`` ``[B, H_kv, T, d]`` / ``value`` ``[B, H_kv, T, d_v]``
    under ``mask`` -> ``[B, H, T, d_v]``.

    Query head ``h`` reads kv head ``h // (H / H_kv)`` (transformers' ``repeat_kv``). ``scale`` defaults to
    ``1 / sqrt(d)``; ``softcap`` caps the scaled scores as ``softcap * tanh(s / softcap)``. ``backend``: see
    :func:`resolve_backend`; ``"flex"`` needs ``mask.block_mask``.
    """
    _check_inputs(query, key, value, mask)
    backend = resolve_backend(backend, query.device)
    if scale is None:
        scale = query.shape[-1] ** -0.5
    if backend == "blocks":
        return block_sparse_attention(query, key, value, mask, scale, softcap)
    if mask.block_mask is None:
        raise ValueError("this DocumentMask was built for the 'blocks' backend; build it with backend='flex'")
    needs_grad = torch.is_grad_enabled() and any(t.requires_grad for t in (query, key, value))
    if query.device.type not in FLEX_DEVICES and needs_grad:
        raise ValueError(
            f"FlexAttention has no backward on {query.device.type} (torch refuses inputs that require grad "
            "there); use backend 'auto' or 'blocks'"
        )
    from torch.nn.attention.flex_attention import flex_attention

    # Inside an outer torch.compile, call flex_attention itself: the outer graph compiles it.
    fn = flex_attention if torch.compiler.is_compiling() else compiled_flex_attention()
    groups = query.shape[1] // key.shape[1]
    gqa = groups > 1
    if gqa and groups & (groups - 1):  # a group count that is not a power of 2: repeat (as transformers does)
        key, value = key.repeat_interleave(groups, dim=1), value.repeat_interleave(groups, dim=1)
        gqa = False
    score_mod = None if softcap is None else softcap_score_mod(float(softcap))
    return fn(query, key, value, score_mod=score_mod, block_mask=mask.block_mask, scale=scale, enable_gqa=gqa)


def block_sparse_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    mask: DocumentMask,
    scale: float,
    softcap: float | None = None,
) -> torch.Tensor:
    """FlexAttention's tile schedule in torch ops (any device, any float dtype, with autograd).

    ``query`` ``[B, H, T, d]``, ``key`` ``[B, H_kv, T, d]``, ``value`` ``[B, H_kv, T, d_v]`` -> ``[B, H, T, d_v]``.
    Query block ``i`` gathers its ``M`` tile slots (partial tiles, then full tiles, then unused slots):
    scores ``[B, H_kv, H / H_kv, N, b, M * b]``. Full tiles take every key; partial tiles take the keys the mask
    function allows; unused slots and keys past ``T`` none. Half-precision inputs compute in float32 (as the
    flex kernel does), others in their own dtype. Needs ``mask.max_tiles`` (a mask built for ``"blocks"``).
    """
    _check_inputs(query, key, value, mask)
    if mask.max_tiles is None:
        raise ValueError("this DocumentMask was built for the 'flex' backend; build it with backend='blocks'")
    b_, heads, length, d = query.shape
    kv_heads, d_v = key.shape[1], value.shape[-1]
    groups = heads // kv_heads
    block, n, slots = mask.block_size, mask.num_blocks, mask.max_tiles
    dev = query.device
    work = torch.float32 if query.dtype in (torch.float16, torch.bfloat16) else query.dtype
    pad = n * block - length

    def blocks(t: torch.Tensor) -> torch.Tensor:  # [B, h, T, e] -> [B, h, N, b, e] (zero rows past T)
        t = torch.nn.functional.pad(t.to(work), (0, 0, 0, pad))
        return t.view(t.shape[0], t.shape[1], n, block, t.shape[-1])

    slot = torch.arange(slots, device=dev)[None]  # [1, M]
    n_part = mask.kv_num_blocks.to(dev).long()[:, None]
    n_full = mask.full_kv_num_blocks.to(dev).long()[:, None]
    is_part = slot < n_part  # [N, M]
    is_full = (slot >= n_part) & (slot < n_part + n_full)
    part_idx = mask.kv_indices.to(dev)[:, :slots].long()
    full_idx = mask.full_kv_indices.to(dev).long().gather(1, (slot - n_part).clamp(0, n - 1))
    tiles = torch.where(is_part, part_idx, torch.where(is_full, full_idx, 0))  # [N, M] kv block of each slot

    offsets = torch.arange(block, device=dev)
    k_pos = (tiles[:, :, None] * block + offsets).reshape(n, 1, slots * block)  # [N, 1, M*b]
    q_pos = (torch.arange(n, device=dev)[:, None] * block + offsets).view(n, block, 1)  # [N, b, 1]
    # Queries past T (padding) are evaluated as the last query: finite rows, dropped at the end.
    allowed_part = mask.mask_mod(None, None, q_pos.clamp(max=length - 1), k_pos.clamp(max=length - 1))
    slot_part = is_part.repeat_interleave(block, dim=1)[:, None]  # [N, 1, M*b]
    slot_full = is_full.repeat_interleave(block, dim=1)[:, None]
    allowed = (slot_full | (slot_part & allowed_part)) & (k_pos < length)  # [N, b, M*b]

    q6 = blocks(query).view(b_, kv_heads, groups, n, block, d)
    k_tiles = blocks(key)[:, :, tiles].reshape(b_, kv_heads, n, slots * block, d)
    v_tiles = blocks(value)[:, :, tiles].reshape(b_, kv_heads, n, slots * block, d_v)
    scores = torch.einsum("bkgnqd,bknsd->bkgnqs", q6, k_tiles) * scale
    if softcap is not None:
        scores = softcap * torch.tanh(scores / softcap)
    probs = scores.masked_fill(~allowed, float("-inf")).softmax(dim=-1)
    out = torch.einsum("bkgnqs,bknse->bkgnqe", probs, v_tiles)  # [B, H_kv, g, N, b, d_v]
    return out.reshape(b_, heads, n * block, d_v)[:, :, :length].to(query.dtype)
