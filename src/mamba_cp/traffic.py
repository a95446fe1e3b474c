"""Bytes each CP strategy moves between ranks per layer: pure arithmetic, checked against recorded runs.

Counts are *off-rank* bytes sent by one rank in one mixer forward (the backward moves the same amounts the
other way). An all-to-all keeps ``1/cp`` of its buffer on the rank, so the off-rank share is ``(cp-1)/cp``.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class MixerDims:
    """The sizes that set a Mamba2 mixer's CP traffic."""

    num_heads: int
    head_dim: int
    n_groups: int
    d_state: int

    @property
    def d_inner(self) -> int:
        return self.num_heads * self.head_dim


def _bc_width(dims: MixerDims, cp: int) -> int:
    """Width of B (or C) in the send buffer: groups are repeated when there are fewer groups than ranks."""
    return max(dims.n_groups, cp) * dims.d_state


def hidden_parallel_bytes(dims: MixerDims, tokens: int, cp: int, dtype_bytes: int = 2) -> dict[str, int]:
    """Ours: ``x | B | C | dt`` out in one all-to-all, ``y`` back in one; ``z`` stays home.

    ``tokens`` is the global ``B * L`` (or ``T``). Returns per-rank forward bytes: the buffers handed to the
    collectives (``send_buffers``) and the off-rank part of them (``off_rank``).
    """
    local = tokens // cp
    there = local * (dims.d_inner + 2 * _bc_width(dims, cp) + dims.num_heads)
    back = local * dims.d_inner
    send = (there + back) * dtype_bytes
    return {"send_buffers": send, "off_rank": send * (cp - 1) // cp}


def nemo_hidden_parallel_bytes(dims: MixerDims, tokens: int, cp: int, dtype_bytes: int = 2) -> dict[str, int]:
    """NeMo AutoModel 0.7's module: ``z, x, B, C, dt`` in five all-to-alls (``z`` travels too), ``y`` back."""
    local = tokens // cp
    there = local * (2 * dims.d_inner + 2 * _bc_width(dims, cp) + dims.num_heads)
    back = local * dims.d_inner
    send = (there + back) * dtype_bytes
    return {"send_buffers": send, "off_rank": send * (cp - 1) // cp}
