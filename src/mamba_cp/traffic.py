"""Bytes each CP strategy moves between ranks per layer: pure arithmetic, checked against recorded runs.

Counts are bytes sent by one rank in one mixer forward (the backward moves the same amounts the other way):
``send_buffers`` is what the rank hands to its collectives, ``off_rank`` what leaves it. An all-to-all keeps
``1/cp`` of its buffer on the rank (off-rank share ``(cp-1)/cp``); an all-gather sends its buffer to each of
the ``cp - 1`` peers.
"""

from __future__ import annotations

from .ssm_block import SSMShape
from .validation import FINGERPRINT_SIZE


def _bc_width(dims: SSMShape, cp: int) -> int:
    """Width of B (or C) in the send buffer: groups are repeated when there are fewer groups than ranks."""
    return max(dims.n_groups, cp) * dims.d_state


def hidden_parallel_bytes(dims: SSMShape, tokens: int, cp: int, dtype_bytes: int = 2) -> dict[str, int]:
    """Ours: ``x | B | C | dt`` out in one all-to-all, ``y`` back in one; ``z`` stays home.

    ``tokens`` is the global ``B * L`` (or ``T``). Returns per-rank forward bytes: the buffers handed to the
    collectives (``send_buffers``) and the off-rank part of them (``off_rank``).
    """
    local = tokens // cp
    there = local * (dims.d_inner + 2 * _bc_width(dims, cp) + dims.num_heads)
    back = local * dims.d_inner
    send = (there + back) * dtype_bytes
    return {"send_buffers": send, "off_rank": send * (cp - 1) // cp}


def nemo_hidden_parallel_bytes(dims: SSMShape, tokens: int, cp: int, dtype_bytes: int = 2) -> dict[str, int]:
    """NeMo AutoModel 0.7's module: ``z, x, B, C, dt`` in five all-to-alls (``z`` travels too), ``y`` back."""
    local = tokens // cp
    there = local * (2 * dims.d_inner + 2 * _bc_width(dims, cp) + dims.num_heads)
    back = local * dims.d_inner
    send = (there + back) * dtype_bytes
    return {"send_buffers": send, "off_rank": send * (cp - 1) // cp}


def state_passing_bytes(
    dims: SSMShape,
    tokens: int,
    cp: int,
    dtype_bytes: int = 2,
    *,
    conv_kernel: int = 4,
    num_seqs: int = 1,
    state_bytes: int = 4,
    stream: bool = False,
) -> dict[str, int]:
    """State passing: one all-gather and two all-to-alls per forward, independent of the sequence length
    (``tokens`` unused).

    The all-gather of the conv halos, ``2*S*(K-1)*conv_dim`` values in the activation dtype and the batch
    fingerprint (``F`` int64), reaches ``cp - 1`` peers. The segment summaries travel in ``state_bytes``
    (float32) as the chains ``S*H`` are dealt out over the ranks (:mod:`mamba_cp.strategies.state_chain`):
    ``n = ceil(S*H / cp)`` chains per rank, out with their decays (``cp * 2*n*(P*N + 1)`` values), the incoming
    states back (``cp * 2*n*P*N``); an all-to-all keeps ``1/cp`` of its buffer. ``S`` is ``num_seqs`` (``B`` for
    BSHD, the sequence count of a packed batch in the per-sequence layout). A pack in the stream layout
    (``stream``) is one row whatever its documents (``S = 1``), and each link carries a barrier flag beside its
    decay (``P*N + 2`` values out). The backward pass moves the same amounts the other way.
    """
    del tokens
    if cp < 1:
        raise ValueError(f"cp ({cp}) must be >= 1")
    if cp == 1:
        return {"send_buffers": 0, "off_rank": 0}
    if stream:
        num_seqs = 1
    halos = 2 * num_seqs * (conv_kernel - 1) * dims.conv_dim * dtype_bytes + FINGERPRINT_SIZE * 8
    per_rank = -(-num_seqs * dims.num_heads // cp)
    state = dims.head_dim * dims.d_state
    out = cp * 2 * per_rank * (state + 1 + int(stream)) * state_bytes
    back = cp * 2 * per_rank * state * state_bytes
    return {"send_buffers": halos + out + back, "off_rank": (cp - 1) * halos + (out + back) * (cp - 1) // cp}


STRATEGY_BYTES = {
    "hidden": hidden_parallel_bytes,
    "state_passing": state_passing_bytes,
    "nemo_automodel": nemo_hidden_parallel_bytes,
}
"""Strategy name -> ``(dims, tokens, cp, dtype_bytes) -> {"send_buffers", "off_rank"}`` per rank per layer."""
