"""mamba-cp: exact context parallelism for Mamba2 / SSD layers.

``parallelize(model, cp_group)`` makes every :class:`Mamba2Mixer` in a model context-parallel (transformers'
Mamba2 models and Mamba2 / attention hybrids too, attention layers included; :func:`batch_context` carries a
packed batch's ``cu_seqlens`` to every layer); :mod:`mamba_cp.sharding` cuts batches into the head-tail layout;
:func:`shard_batch` cuts a global training batch (labels shifted in true order, the global target count, packs by
``cu_seqlens`` or restarting ``position_ids``) into what each rank passes to a parallelized transformers model;
:mod:`mamba_cp.hidden_parallel` is NeMo AutoModel's ``mamba_cp`` module (``MambaContextParallel`` and the
transport / layout functions, the underscore names too), also re-exported here.
"""

from .attention import UlyssesAttention
from .batch_plans import prepare_batch
from .context import BatchContext, batch_context, current_batch
from .gradients import all_reduce_gradients
from .groups import CPGroup, resolve_cp_group
from .hidden_parallel import (
    AllToAll,
    MambaContextParallel,
    _all_to_all,
    _all_to_all_cp2hp,
    _all_to_all_hp2cp,
    _AllToAll,
    _deinterleave_packed_seqs,
    _redo_attention_load_balancing,
    _reinterleave_packed_seqs,
    _reorder_chunks,
    _undo_attention_load_balancing,
    all_to_all,
    all_to_all_cp2hp,
    all_to_all_hp2cp,
    deinterleave_packed_seqs,
    redo_attention_load_balancing,
    reinterleave_packed_seqs,
    reorder_chunks,
    undo_attention_load_balancing,
)
from .layout import TokenPlan, build_token_plan
from .mixer import GatedRMSNorm, Mamba2Mixer
from .parallelize import find_mixers, parallelize
from .plan_cache import PlanCache
from .prefill import PrefillResult, capture_states, decoding, generate, prefill
from .segments import SegmentPlan, build_segment_plan
from .sharding import gather_sequence, shard, unshard
from .strategies import HiddenParallel, LocalStrategy, StatePassing, Strategy, Workload
from .training import (
    ShardedBatch,
    count_targets,
    cu_seqlens_from_position_ids,
    global_loss,
    set_fsdp_gradient_divide_factor,
    shard_batch,
    shift_labels,
)
from .transport import heads_to_seq, seq_to_heads
from .validation import ConfigError

__version__ = "0.1.0"

__all__ = [
    "AllToAll",
    "BatchContext",
    "CPGroup",
    "ConfigError",
    "GatedRMSNorm",
    "HiddenParallel",
    "LocalStrategy",
    "Mamba2Mixer",
    "MambaContextParallel",
    "PlanCache",
    "PrefillResult",
    "SegmentPlan",
    "ShardedBatch",
    "StatePassing",
    "Strategy",
    "TokenPlan",
    "UlyssesAttention",
    "Workload",
    "all_reduce_gradients",
    "all_to_all",
    "all_to_all_cp2hp",
    "all_to_all_hp2cp",
    "batch_context",
    "build_segment_plan",
    "build_token_plan",
    "capture_states",
    "count_targets",
    "cu_seqlens_from_position_ids",
    "current_batch",
    "decoding",
    "deinterleave_packed_seqs",
    "find_mixers",
    "gather_sequence",
    "generate",
    "global_loss",
    "heads_to_seq",
    "parallelize",
    "prefill",
    "prepare_batch",
    "redo_attention_load_balancing",
    "reinterleave_packed_seqs",
    "reorder_chunks",
    "resolve_cp_group",
    "seq_to_heads",
    "set_fsdp_gradient_divide_factor",
    "shard",
    "shard_batch",
    "shift_labels",
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
