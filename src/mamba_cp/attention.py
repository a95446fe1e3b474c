"""Head-parallel ("Ulysses") attention under context parallelism, on the library's own transport.

Shape legend: ``B`` batch (1 for packed batches), ``L`` global tokens per row (``T`` when packed),
``L_local = L / cp``; ``H`` query heads, ``H_kv`` key/value heads, ``d`` / ``d_v`` head dims; ``H_local = H / cp``
and ``H_kv_local = max(H_kv / cp, 1)`` are one rank's share.

Each rank holds ``L_local`` tokens of every sequence (the head-tail layout) for all heads. One all-to-all
(:func:`~mamba_cp.transport.seq_to_heads`, the same one the Mamba mixers use) turns ``q | k | v`` into whole
sequences, in true token order, for ``H / cp`` heads; attention runs on them, causal over true positions and,
for packed batches, inside each sequence only (sequences never see each other); one all-to-all
(:func:`~mamba_cp.transport.heads_to_seq`) brings the output back. When ``H_kv < cp`` each key/value head is
repeated ``cp / H_kv`` times before the exchange so that every rank receives the head its queries read. The
reorders are the batch's :class:`~mamba_cp.layout.TokenPlan`, shared with the Mamba layers.

Masks are built from the plan once per batch (:class:`MaskCache`) and reused by every attention layer. Packed
batches get a :class:`~mamba_cp.document_attention.DocumentMask`: FlexAttention's block-sparse layout of the
document-causal mask (int32 tile lists, ``[T / block]`` rows; never a ``T x T`` tensor), run by FlexAttention on
GPU and by the same tile schedule in torch ops on CPU. The dense ``[1, 1, L, L]`` masks (:func:`causal_mask`)
remain for BSHD eager attention and for callers that ask for them (O(L^2) memory).
"""

from __future__ import annotations

import torch

from .document_attention import DEFAULT_BLOCK_SIZE, document_mask
from .groups import GroupRef, resolve_cp_group
from .layout import TokenPlan, token_plan
from .plan_cache import PlanCache
from .transport import heads_to_seq, seq_to_heads
from .validation import check_divisible


class UlyssesAttention:
    """The all-to-all pair around one attention layer: heads sharded, whole sequences local.

    Args:
        cp_group: the CP ``ProcessGroup``, a 1-D ``DeviceMesh``, a :class:`~mamba_cp.CPGroup` or None.
        num_heads: query heads ``H``.
        num_kv_heads: key/value heads ``H_kv`` (``H % H_kv == 0``).
        plan_cache: per-batch plan cache shared with the model's other CP layers.

    Raises ``ValueError`` (before any collective) unless ``H % cp == 0`` and either ``H_kv % cp == 0`` or
    ``cp % H_kv == 0``.
    """

    @property
    def cp_group(self):
        """The CP process group (held weakly: see :class:`~mamba_cp.groups.GroupRef`)."""
        return self._cp_group()

    @cp_group.setter
    def cp_group(self, group) -> None:
        self._cp_group = GroupRef(group)

    def __init__(self, cp_group, num_heads: int, num_kv_heads: int, plan_cache: PlanCache | None = None) -> None:
        group = resolve_cp_group(cp_group)
        self.group = group
        self._cp_group = group.ref  # weakly (see GroupRef)
        self.cp_size = group.size
        self.cp_rank = group.rank
        self.num_heads = num_heads
        self.num_kv_heads = num_kv_heads
        self.plans = plan_cache if plan_cache is not None else PlanCache()
        check_divisible(num_heads, num_kv_heads, "attention num_heads", "num_key_value_heads")
        check_divisible(num_heads, self.cp_size, "attention num_heads", "cp_size")
        if num_kv_heads >= self.cp_size:
            check_divisible(num_kv_heads, self.cp_size, "num_key_value_heads", "cp_size when it is >= cp_size")
            self.kv_repeat = 1
        else:
            # Fewer kv heads than ranks: each one is sent to the cp / H_kv consecutive ranks whose queries read it.
            check_divisible(self.cp_size, num_kv_heads, "cp_size", "num_key_value_heads when it is < cp_size")
            self.kv_repeat = self.cp_size // num_kv_heads
        self.num_heads_local = num_heads // self.cp_size
        self.num_kv_heads_local = max(num_kv_heads // self.cp_size, 1)

    @property
    def kv_groups_local(self) -> int:
        """Query heads per key/value head on one rank (what ``repeat_kv`` must use there)."""
        return self.num_heads_local // self.num_kv_heads_local

    def plan_for(self, batch: int, local_len: int, cu_seqlens: torch.Tensor | None, device) -> TokenPlan:
        """The (cached, validated) plan of a batch whose rows hold ``local_len`` tokens on this rank."""
        if cu_seqlens is not None and batch != 1:
            raise ValueError(f"a packed batch (cu_seqlens given) must have batch size 1, got {batch}")
        return token_plan(self.plans, self.group, batch, local_len, cu_seqlens, device)

    def _columns(self, t_BHLd: torch.Tensor, repeat: int) -> torch.Tensor:
        """``[B, heads, L_local, d]`` -> ``[B, L_local, cp, heads*repeat/cp * d]`` (slot r goes to rank r)."""
        b, heads, l_local, d = t_BHLd.shape
        t = t_BHLd.transpose(1, 2)  # [B, L_local, heads, d]: a view when the projection was [B, L_local, heads*d]
        if repeat > 1:
            t = t.unsqueeze(3).expand(b, l_local, heads, repeat, d)
        return t.reshape(b, l_local, self.cp_size, -1)

    def scatter(
        self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, plan: TokenPlan
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """This rank's heads over whole sequences in true order. One all-to-all for all three.

        ``query`` ``[B, H, L_local, d]``, ``key`` ``[B, H_kv, L_local, d]``, ``value`` ``[B, H_kv, L_local, d_v]``
        -> ``[B, H_local, L, d]``, ``[B, H_kv_local, L, d]``, ``[B, H_kv_local, L, d_v]``.
        """
        if query.shape[1] != self.num_heads or key.shape[1] != self.num_kv_heads:
            raise ValueError(
                f"attention got {query.shape[1]} query / {key.shape[1]} key heads, but was parallelized for "
                f"{self.num_heads} / {self.num_kv_heads}"
            )
        if self.cp_size == 1:
            return query, key, value
        d, d_v = query.shape[-1], value.shape[-1]
        parts = [self._columns(query, 1), self._columns(key, self.kv_repeat), self._columns(value, self.kv_repeat)]
        full = seq_to_heads(parts, plan, self.cp_group)  # [B, L, (H_local + H_kv_local) * d + H_kv_local * d_v]
        b, length = full.shape[:2]
        q, k, v = torch.split(
            full,
            [self.num_heads_local * d, self.num_kv_heads_local * d, self.num_kv_heads_local * d_v],
            dim=-1,
        )
        return (
            q.view(b, length, self.num_heads_local, d).transpose(1, 2),
            k.view(b, length, self.num_kv_heads_local, d).transpose(1, 2),
            v.view(b, length, self.num_kv_heads_local, d_v).transpose(1, 2),
        )

    def gather(self, out_BLHd: torch.Tensor, plan: TokenPlan) -> torch.Tensor:
        """Attention output ``[B, L, H_local, d_v]`` (true order) back to ``[B, L_local, H, d_v]``. One all-to-all."""
        if self.cp_size == 1:
            return out_BLHd
        b, length, heads, d_v = out_BLHd.shape
        local = heads_to_seq(out_BLHd.reshape(b, length, heads * d_v), plan, self.cp_group)
        return local.view(b, length // self.cp_size, self.num_heads, d_v)

    def __repr__(self) -> str:
        return (
            f"UlyssesAttention(cp_size={self.cp_size}, cp_rank={self.cp_rank}, "
            f"heads={self.num_heads_local}/{self.num_heads}, kv_heads={self.num_kv_heads_local}/{self.num_kv_heads}, "
            f"kv_repeat={self.kv_repeat})"
        )


# --------------------------------------------------------------------------------------------------
# Masks over true positions
# --------------------------------------------------------------------------------------------------


def causal_mask(plan: TokenPlan, device: torch.device | str | None = None) -> torch.Tensor:
    """``[1, 1, L, L]`` bool, True where query ``i`` may attend key ``j`` (true order, whole sequences).

    BSHD: plain causal (``j <= i``). Packed: block-diagonal causal, ``j <= i`` inside the same sequence, so
    sequences never see each other.
    """
    length = plan.global_len
    idx = torch.arange(length, device=device)
    allowed = idx[None, :] <= idx[:, None]
    if plan.seq_idx is not None:
        seq = plan.seq_idx[0].to(device)
        allowed = allowed & (seq[None, :] == seq[:, None])
    return allowed[None, None]


def additive_mask(allowed: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """A bool mask as the additive float mask eager attention adds to its scores: 0 or ``finfo(dtype).min``."""
    return torch.zeros(allowed.shape, dtype=dtype, device=allowed.device).masked_fill_(~allowed, torch.finfo(dtype).min)


def varlen_kwargs(plan: TokenPlan) -> dict:
    """Flash-attention varlen arguments of a packed plan: ``cu_seq_lens_q/k`` (int32) and ``max_length_q/k``."""
    cu = plan.cu_seqlens.to(torch.int32)
    longest = int((cu[1:] - cu[:-1]).max())  # one host read per batch (the mask cache keeps the result)
    return {"cu_seq_lens_q": cu, "cu_seq_lens_k": cu, "max_length_q": longest, "max_length_k": longest}


class MaskCache:
    """The attention masks of recent batches, in the model's shared :class:`~mamba_cp.plan_cache.PlanCache` and
    keyed on the plan object (the plan cache hands every layer the same one), so they are built once per batch.

    ``get(plan, kind, dtype, device, block_size=128)`` with ``kind``:

    * ``"document"``: the :class:`~mamba_cp.document_attention.DocumentMask` for FlexAttention's kernel
      (``BlockMask`` included), ``"document-blocks"``: the same tiles for the torch-ops schedule
      (:func:`~mamba_cp.document_attention.block_sparse_attention`); packed or BSHD plans, ``block_size`` tiles;
    * ``"bool"`` (``[1, 1, L, L]`` bool), ``"additive"`` (``[1, 1, L, L]`` of ``dtype``): dense, O(L^2);
    * ``"varlen"``: flash-attention kwargs (packed plans only).

    Under ``torch.compile`` the dense masks are built inside the graph (tensor ops of the plan) and the others are
    the ones pinned for the batch (:func:`mamba_cp.prepare_batch`).
    """

    KINDS = ("document", "document-blocks", "bool", "additive", "varlen")

    def __init__(self, plans: PlanCache | None = None) -> None:
        self.plans = plans if plans is not None else PlanCache()

    @property
    def builds(self) -> int:
        """Number of masks built (tests use it to prove per-batch reuse)."""
        return self.plans.builds.get("mask", 0)

    def get(
        self,
        plan: TokenPlan,
        kind: str,
        dtype: torch.dtype | None = None,
        device=None,
        block_size: int = DEFAULT_BLOCK_SIZE,
    ):
        if kind not in self.KINDS:
            raise ValueError(f"mask kind must be one of {self.KINDS}, got {kind!r}")
        if kind in ("bool", "additive") and torch.compiler.is_compiling():  # tensor ops: traced into the graph
            return _build_mask(plan, kind, dtype, device, block_size)
        name = ("mask", kind, block_size if kind.startswith("document") else None)
        if torch.compiler.is_compiling():
            return self.plans.pinned(name)
        key = (kind, dtype, str(device), name[2], id(plan))

        def build() -> tuple[TokenPlan, object]:
            return plan, _build_mask(plan, kind, dtype, device, block_size)  # holding the plan keeps its id unique

        return self.plans.pin(name, self.plans.get("mask", key, None, build)[1])


def _build_mask(plan: TokenPlan, kind: str, dtype, device, block_size: int):
    if kind == "document":
        return document_mask(plan, device, block_size, backend="flex")
    if kind == "document-blocks":
        return document_mask(plan, device, block_size, backend="blocks")
    if kind == "bool":
        return causal_mask(plan, device)
    if kind == "additive":
        return additive_mask(causal_mask(plan, device), dtype)
    return varlen_kwargs(plan)
