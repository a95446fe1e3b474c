"""mamba-cp: exact context parallelism for Mamba2 / SSD layers.

``parallelize(model, cp_group)`` makes every :class:`Mamba2Mixer` in a model context-parallel (transformers'
Mamba2 models and Mamba2 / attention hybrids too, attention layers included; :func:`batch_context` carries a
packed batch's ``cu_seqlens`` to every layer);
:mod:`mamba_cp.sharding` cuts batches into the head-tail layout; :class:`MambaContextParallel` and the
transport / layout functions are NeMo AutoModel's ``mamba_cp`` API (the underscore names too).
"""

from .attention import UlyssesAttention
from .context import BatchContext, batch_context, current_batch
from .gradients import all_reduce_gradients
from .groups import CPGroup, resolve_cp_group
from .hidden_parallel import MambaContextParallel
from .layout import (
    TokenPlan,
    TokenPlanCache,
    _deinterleave_packed_seqs,
    _redo_attention_load_balancing,
    _reinterleave_packed_seqs,
    _reorder_chunks,
    _undo_attention_load_balancing,
    build_token_plan,
    deinterleave_packed_seqs,
    redo_attention_load_balancing,
    reinterleave_packed_seqs,
    reorder_chunks,
    undo_attention_load_balancing,
)
from .mixer import GatedRMSNorm, Mamba2Mixer
from .parallelize import auto_strategy, find_mixers, parallelize
from .segments import SegmentPlan, SegmentPlanCache, build_segment_plan
from .sharding import gather_sequence, shard, unshard
from .state_passing import StatePassingContextParallel
from .transport import (
    AllToAll,
    _all_to_all,
    _all_to_all_cp2hp,
    _all_to_all_hp2cp,
    _AllToAll,
    all_to_all,
    all_to_all_cp2hp,
    all_to_all_hp2cp,
    heads_to_seq,
    seq_to_heads,
)

__version__ = "0.1.0"

__all__ = [
    "AllToAll",
    "BatchContext",
    "CPGroup",
    "GatedRMSNorm",
    "Mamba2Mixer",
    "MambaContextParallel",
    "SegmentPlan",
    "SegmentPlanCache",
    "StatePassingContextParallel",
    "TokenPlan",
    "TokenPlanCache",
    "UlyssesAttention",
    "all_reduce_gradients",
    "all_to_all",
    "all_to_all_cp2hp",
    "all_to_all_hp2cp",
    "auto_strategy",
    "batch_context",
    "build_segment_plan",
    "build_token_plan",
    "current_batch",
    "deinterleave_packed_seqs",
    "find_mixers",
    "gather_sequence",
    "heads_to_seq",
    "parallelize",
    "redo_attention_load_balancing",
    "reinterleave_packed_seqs",
    "reorder_chunks",
    "resolve_cp_group",
    "seq_to_heads",
    "shard",
    "undo_attention_load_balancing",
    "unshard",
    "_AllToAll",
    "_all_to_all",
    "_all_to_all_cp2hp",
    "_all_to_all_hp2cp",
    "_deinterleave_packed_seqs",
    "_redo_attention_load_balancing",
    "_reinterleave_packed_seqs",
    "_reorder_chunks",
    "_undo_attention_load_balancing",
]
