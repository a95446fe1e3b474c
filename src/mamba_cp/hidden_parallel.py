"""NeMo AutoModel's ``mamba_cp`` module, as one module: the spec's class and functions, for ported code and tests.

Shape legend: ``B`` batch, ``L`` global tokens per row, ``L_local = L / cp``, ``W`` a full width, ``W_local = W /
cp``; packed batches are ``[T, W]`` with global ``cu_seqlens``.

Code written against ``nemo_automodel.components.distributed.context_parallel.mamba`` (``...distributed.mamba_cp``
before NeMo 0.7) works after changing the import to ``mamba_cp.hidden_parallel``: every name of the spec is
here, and the functions look each other up in this module's namespace at call time, so a test that patches
``hidden_parallel._all_to_all`` reaches the code ``hidden_parallel._all_to_all_cp2hp`` runs, and one that patches
``_all_to_all_cp2hp`` reaches :meth:`MambaContextParallel.pre_conv_ssm`.

Differences from NeMo's module, on purpose:

* :meth:`MambaContextParallel.pre_conv_ssm` sends ``z | x | B | C | dt`` in **one** ``_all_to_all_cp2hp`` (NeMo
  makes five), each rank's columns packed side by side; :meth:`~MambaContextParallel.post_conv_ssm` makes one
  ``_all_to_all_hp2cp``. The result is NeMo's (this rank's ``z | x | B | C | dt`` over whole sequences, in true
  order); a test that counts five calls, or indexes a list of five captured calls, cannot pass.
* Configuration errors raise :class:`~mamba_cp.validation.ConfigError`, which is both a ``ValueError`` and
  the ``AssertionError`` NeMo raises, with messages that name the value and the rule; they are raised on every
  rank before any collective.
* ``cp_group`` may also be a 1-D ``DeviceMesh``; a stand-in with only ``size()`` and ``rank()`` is enough for
  construction and slicing, and a collective on it raises a ``TypeError`` that says so.
* A 2-D input without ``cu_seqlens`` is one sequence ``[L_local, W]``; packed input may also be ``[1, T, W]``.

As in NeMo: ``_all_to_all`` receives ``[cp*B*L_local, W_local]``; ``_all_to_all_cp2hp`` / ``_all_to_all_hp2cp``
ignore ``batch_size`` (NeMo's own ``pre_conv_ssm`` passes the token count for 2-D input): the batch is the
input's; ``get_dt_bias`` / ``get_A_log`` / ``get_D`` (and here ``get_conv1d_weight`` / ``get_conv1d_bias``) take
an optional tensor to slice instead of the mixer's.

The mixers of this library do not use this module: they run :class:`~mamba_cp.strategies.hidden.HiddenParallel`
(the same single all-to-all, fused with in_proj, with the head-tail undo and the packed deinterleave as one
gather by the batch's :class:`~mamba_cp.layout.TokenPlan`); here they are separate calls so that patches reach
them. The public twins of the underscore names (``all_to_all_cp2hp``, ...) are the same functions.
"""

from __future__ import annotations

import torch

from . import layout
from .collectives import AllToAll
from .groups import GroupRef, resolve_cp_group
from .strategies.hidden import HeadShard
from .validation import ConfigError, as_cu_seqlens, check_cu_seqlens, check_divisible

_AllToAll = AllToAll
"""Autograd-aware equal-split ``all_to_all_single`` along dim 0 (backward: the same all-to-all)."""

_reorder_chunks = layout.reorder_chunks
_deinterleave_packed_seqs = layout.deinterleave_packed_seqs
_reinterleave_packed_seqs = layout.reinterleave_packed_seqs


def _all_to_all(input_: torch.Tensor, group) -> torch.Tensor:
    """All-to-all of ``input_`` (``[cp * n, ...]``, block ``r`` goes to rank ``r``), differentiable.

    ``group`` may be a ``ProcessGroup``, a 1-D ``DeviceMesh`` or a :class:`~mamba_cp.groups.CPGroup`; over one
    rank with no group the all-to-all is the identity. A stand-in with only ``size()`` and ``rank()`` raises a
    ``TypeError`` that says a real process group is needed (:func:`~mamba_cp.collectives.require_process_group`).
    """
    resolved = resolve_cp_group(group)
    check_divisible(input_.shape[0], resolved.size, "all_to_all input's dim 0", "the group size")
    if resolved.group is None:  # one rank, no group: nothing to exchange
        return input_
    # The group check (require_process_group) runs inside _AllToAll, so a test may patch _AllToAll too.
    return _AllToAll.apply(input_, resolved.group)


def _batch_first(input_: torch.Tensor) -> tuple[torch.Tensor, bool]:
    """``[B, L, W]`` as it is, or packed ``[T, W]`` as ``[1, T, W]``; the flag says to squeeze back."""
    if input_.dim() == 2:
        return input_.unsqueeze(0), True
    if input_.dim() != 3:
        raise ConfigError(f"expected [B, L, W] or packed [T, W], got shape {tuple(input_.shape)}")
    return input_, False


def _all_to_all_cp2hp(input_: torch.Tensor, cp_group, batch_size: int | None = None) -> torch.Tensor:
    """Sequence-sharded ``[B, L_local, W]`` (or ``[T_local, W]``) to hidden-sharded ``[B, cp*L_local, W/cp]``
    (or ``[cp*T_local, W/cp]``).

    Column block ``r`` of the width goes to rank ``r``; the result's sequence dim is rank-major (rank 0's local
    tokens, then rank 1's, ...), no reorder. ``_all_to_all`` receives ``[cp*B*L_local, W/cp]``, as in NeMo.
    ``batch_size`` is accepted for the spec's signature and ignored, as NeMo ignores it (its own
    ``pre_conv_ssm`` passes the token count for 2-D input): the batch is the input's.
    """
    del batch_size
    x, squeeze = _batch_first(input_)
    cp = resolve_cp_group(cp_group).size
    b, l_local, width = x.shape
    check_divisible(width, cp, "hidden width", "cp_size")
    w_local = width // cp
    # Rank-major send buffer: block r (rows r*B*L_local ...) holds column block r of every local token.
    send = x.reshape(b * l_local, cp, w_local).transpose(0, 1).reshape(cp * b * l_local, w_local)
    recv = _all_to_all(send, cp_group)
    out = recv.reshape(cp, b, l_local, w_local).transpose(0, 1).reshape(b, cp * l_local, w_local)
    return out.squeeze(0) if squeeze else out


def _all_to_all_hp2cp(input_: torch.Tensor, cp_group, batch_size: int | None = None) -> torch.Tensor:
    """Hidden-sharded ``[B, L, W_local]`` (rank-major sequence) to sequence-sharded ``[B, L/cp, cp*W_local]``
    (packed: ``[T, W_local]`` -> ``[T/cp, cp*W_local]``).

    Inverse of :func:`_all_to_all_cp2hp`; ``_all_to_all`` receives ``[cp*B*(L/cp), W_local]``. ``batch_size`` is
    ignored, as in :func:`_all_to_all_cp2hp`.
    """
    del batch_size
    x, squeeze = _batch_first(input_)
    cp = resolve_cp_group(cp_group).size
    b, length, w_local = x.shape
    check_divisible(length, cp, "sequence length", "cp_size")
    l_local = length // cp
    # Sequence block r of every row goes to rank r.
    send = x.reshape(b, cp, l_local, w_local).transpose(0, 1).reshape(cp * b * l_local, w_local)
    recv = _all_to_all(send, cp_group)
    out = recv.reshape(cp, b * l_local, w_local).transpose(0, 1).reshape(b, l_local, cp * w_local)
    return out.squeeze(0) if squeeze else out


def _undo_attention_load_balancing(
    input_: torch.Tensor, cp_size: int, cu_seqlens: torch.Tensor | None = None
) -> torch.Tensor:
    """Head-tail layout (ranks' chunk pairs back to back) to true order: ``[B, L, W]`` or, with global
    ``cu_seqlens``, packed ``[T, W]`` in sequence-major order."""
    return _reorder_chunks(input_, layout.undo_order(cp_size), cu_seqlens)


def _redo_attention_load_balancing(
    input_: torch.Tensor, cp_size: int, cu_seqlens: torch.Tensor | None = None
) -> torch.Tensor:
    """True order back to the head-tail layout. Inverse of :func:`_undo_attention_load_balancing`."""
    return _reorder_chunks(input_, layout.redo_order(cp_size), cu_seqlens)


class MambaContextParallel:
    """Hidden-parallel CP for one Mamba2 mixer, as NeMo AutoModel's module defines it.

    Args:
        cp_group: the CP ``ProcessGroup``, a 1-D ``DeviceMesh``, or any object with ``size()`` and ``rank()``
            (enough for construction and parameter slicing; :meth:`pre_conv_ssm` / :meth:`post_conv_ssm` need
            a real group unless ``_all_to_all`` is patched).
        num_heads: total SSM heads ``H``.
        head_dim: ``P``.
        n_groups: B/C groups ``G``.
        d_state: ``N``.
        mixer: the module (or any object) that owns ``conv1d``, ``dt_bias``, ``A_log`` and ``D``; read on every
            call, so gradients reach the full parameters and FSDP's replacements are picked up.

    Raises :class:`~mamba_cp.validation.ConfigError` (``ValueError`` and ``AssertionError``) when ``H % cp != 0``
    or the groups do not split: ``cp % G`` when ``G < cp``, ``G % cp`` when ``G >= cp``.
    """

    @property
    def cp_group(self):
        """The CP process group (held weakly: see :class:`~mamba_cp.groups.GroupRef`)."""
        return self._cp_group()

    @cp_group.setter
    def cp_group(self, group) -> None:
        self._cp_group = GroupRef(group)

    def __init__(self, cp_group, num_heads: int, head_dim: int, n_groups: int, d_state: int, mixer) -> None:
        group = resolve_cp_group(cp_group)
        self._cp_group = group.ref  # weakly (see GroupRef)
        self.cp_size = group.size
        self.cp_rank = group.rank
        self.num_heads = num_heads
        self.head_dim = head_dim
        self.n_groups = n_groups
        self.d_state = d_state
        self._mixer = mixer
        self._shard = HeadShard(group.size, group.rank, num_heads, head_dim, n_groups, d_state)
        self.d_inner = self._shard.d_inner
        self.num_heads_local = self._shard.num_heads_local
        self.d_inner_local = self._shard.d_inner_local
        self.group_repeat_count = self._shard.group_repeat_count
        self.n_groups_local = self._shard.n_groups_local

    # ------------------------------------------------------------------ parameter slices

    def _slice_vector_param(self, param: torch.Tensor) -> torch.Tensor:
        """This rank's heads of a per-head parameter: ``[H, ...]`` -> ``[H_local, ...]`` (a view)."""
        return self._shard.slice_vector(param)

    def _slice_conv_param(self, param: torch.Tensor) -> torch.Tensor:
        """This rank's channels of a conv1d weight ``[conv_dim, ...]`` or bias ``[conv_dim]``: its ``x``
        channels, then its group(s) of ``B``, then of ``C``."""
        return self._shard.slice_conv(param)

    def _repeat_group_state(self, state: torch.Tensor) -> torch.Tensor:
        """Repeat each group ``cp / G`` times: ``[B, L, G*N]`` (or ``[T, G*N]``) -> ``[B, L, G*repeat*N]``."""
        return self._shard.repeat_groups(state)

    def get_conv1d_weight(self, weight: torch.Tensor | None = None) -> torch.Tensor:
        """``conv1d.weight`` ``[conv_dim, 1, K]`` (or the given tensor) sliced and squeezed to
        ``[conv_dim_local, K]``."""
        return self._slice_conv_param(self._mixer.conv1d.weight if weight is None else weight).squeeze(1)

    def get_conv1d_bias(self, bias: torch.Tensor | None = None) -> torch.Tensor | None:
        """``conv1d.bias`` ``[conv_dim]`` (or the given tensor) sliced to ``[conv_dim_local]``; None without
        a bias."""
        bias = self._mixer.conv1d.bias if bias is None else bias
        return None if bias is None else self._slice_conv_param(bias)

    def get_dt_bias(self, dt_bias: torch.Tensor | None = None) -> torch.Tensor:
        """``dt_bias`` ``[H]`` (or the given tensor, e.g. an fp32 copy) -> ``[H_local]``."""
        return self._slice_vector_param(self._mixer.dt_bias if dt_bias is None else dt_bias)

    def get_A_log(self, A_log: torch.Tensor | None = None) -> torch.Tensor:
        """``A_log`` ``[H]`` (or the given tensor) -> ``[H_local]``."""
        return self._slice_vector_param(self._mixer.A_log if A_log is None else A_log)

    def get_D(self, D: torch.Tensor | None = None) -> torch.Tensor:
        """``D`` ``[H]`` or ``[H, P]`` (or the given tensor) -> ``[H_local]`` or ``[H_local, P]``."""
        return self._slice_vector_param(self._mixer.D if D is None else D)

    # ------------------------------------------------------------------ the spec's transforms

    def _check_layout(self, length: int, cu_seqlens: torch.Tensor | None) -> None:
        """The layout checks, on every rank before the collective: ``length`` global tokens per row."""
        if cu_seqlens is None:
            check_divisible(length, 2 * self.cp_size, "global sequence length L (local length x cp_size)", "2*cp_size")
        else:
            check_cu_seqlens(cu_seqlens, length, multiple_of=2 * self.cp_size)

    def pre_conv_ssm(self, projected_states: torch.Tensor, cu_seqlens: torch.Tensor | None = None) -> torch.Tensor:
        """Sequence-sharded in_proj output to this rank's heads over whole sequences in true order.

        ``[B, L_local, 2*H*P + 2*G*N + H]`` (or packed ``[T_local, ...]`` with global ``cu_seqlens``) holding
        ``z | x | B | C | dt`` -> ``[B, L, 2*H_local*P + 2*G_local*N + H_local]`` (or ``[T, ...]``) holding this
        rank's ``z | x | B | C | dt``. The head-tail layout is undone. One ``_all_to_all_cp2hp`` for all five.
        """
        if self.cp_size == 1:
            return projected_states
        cu_seqlens = as_cu_seqlens(cu_seqlens)
        s = self._shard
        gn = self.n_groups * self.d_state
        width = 2 * self.d_inner + 2 * gn + self.num_heads
        if projected_states.shape[-1] != width:
            raise ConfigError(
                f"projected_states width ({projected_states.shape[-1]}) must be 2*num_heads*head_dim + "
                f"2*n_groups*d_state + num_heads ({width})"
            )
        local, squeeze = _batch_first(projected_states)
        if cu_seqlens is not None and local.shape[0] != 1:
            raise ConfigError(f"a packed batch must be [T, W] or [1, T, W], got shape {tuple(projected_states.shape)}")
        self._check_layout(local.shape[1] * self.cp_size, cu_seqlens)
        z, x, B, C, dt = torch.split(local, [self.d_inner, self.d_inner, gn, gn, self.num_heads], dim=-1)
        parts = [
            s.columns_per_rank(z, per_group=False),
            s.columns_per_rank(x, per_group=False),
            s.columns_per_rank(B, per_group=True),
            s.columns_per_rank(C, per_group=True),
            s.columns_per_rank(dt, per_group=False),
        ]
        packed = torch.cat(parts, dim=-1).flatten(2)  # [B, L_local, cp * W_local]: block r holds rank r's columns
        if cu_seqlens is None:
            # The transport sees the caller's rank (a 2-D [T_local, W] stays 2-D, as in NeMo); the chunk reorder
            # always runs on [B, L, W], where dim 1 is the sequence.
            out = _all_to_all_cp2hp(packed[0] if squeeze else packed, self.cp_group, local.shape[0])
            out = _undo_attention_load_balancing(out.unsqueeze(0) if squeeze else out, self.cp_size)
            return out.squeeze(0) if squeeze else out
        # Packed: [T_local, W] -> [T, W_local] rank-major -> sequence-major -> true order.
        out = _all_to_all_cp2hp(packed[0], self.cp_group, 1)
        out = _deinterleave_packed_seqs(out, cu_seqlens // self.cp_size, self.cp_size)
        out = _undo_attention_load_balancing(out, self.cp_size, cu_seqlens)
        return out if squeeze else out.unsqueeze(0)

    def post_conv_ssm(self, output: torch.Tensor, cu_seqlens: torch.Tensor | None = None) -> torch.Tensor:
        """Head-sharded ``[B, L, W_local]`` (true order) back to ``[B, L_local, cp*W_local]`` in the head-tail
        layout (packed: ``[T, W_local]`` -> ``[T_local, cp*W_local]``). Inverse of the transport in
        :meth:`pre_conv_ssm`. One ``_all_to_all_hp2cp``."""
        if self.cp_size == 1:
            return output
        cu_seqlens = as_cu_seqlens(cu_seqlens)
        full, squeeze = _batch_first(output)
        self._check_layout(full.shape[1], cu_seqlens)
        if cu_seqlens is None:
            out = _redo_attention_load_balancing(full, self.cp_size)  # on [B, L, W]: dim 1 is the sequence
            return _all_to_all_hp2cp(out[0] if squeeze else out, self.cp_group, full.shape[0])
        if full.shape[0] != 1:
            raise ConfigError(f"a packed output must be [T, W] or [1, T, W], got shape {tuple(output.shape)}")
        out = _redo_attention_load_balancing(full[0], self.cp_size, cu_seqlens)
        out = _reinterleave_packed_seqs(out, cu_seqlens // self.cp_size, self.cp_size)
        out = _all_to_all_hp2cp(out, self.cp_group, 1)
        return out if squeeze else out.unsqueeze(0)

    def __repr__(self) -> str:
        s = self._shard
        return (
            f"MambaContextParallel(cp_size={s.cp_size}, cp_rank={s.cp_rank}, heads={s.num_heads_local}/{s.num_heads}, "
            f"groups={s.n_groups_local}/{s.n_groups}, group_repeat={s.group_repeat_count})"
        )


# Public twins of the spec's underscore names (the same objects).
AllToAll = _AllToAll
all_to_all = _all_to_all
all_to_all_cp2hp = _all_to_all_cp2hp
all_to_all_hp2cp = _all_to_all_hp2cp
reorder_chunks = _reorder_chunks
undo_attention_load_balancing = _undo_attention_load_balancing
redo_attention_load_balancing = _redo_attention_load_balancing
deinterleave_packed_seqs = _deinterleave_packed_seqs
reinterleave_packed_seqs = _reinterleave_packed_seqs

__all__ = [
    "AllToAll",
    "MambaContextParallel",
    "_AllToAll",
    "_all_to_all",
    "_all_to_all_cp2hp",
    "_all_to_all_hp2cp",
    "_deinterleave_packed_seqs",
    "_redo_attention_load_balancing",
    "_reinterleave_packed_seqs",
    "_reorder_chunks",
    "_undo_attention_load_balancing",
    "all_to_all",
    "all_to_all_cp2hp",
    "all_to_all_hp2cp",
    "deinterleave_packed_seqs",
    "redo_attention_load_balancing",
    "reinterleave_packed_seqs",
    "reorder_chunks",
    "undo_attention_load_balancing",
]
