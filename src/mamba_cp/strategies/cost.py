"""The cost model behind ``strategy="auto"``: per-rank compute of each strategy plus the bytes it moves.

Per mixer and per step (forward + backward), for a workload of ``L`` tokens per row, ``S`` documents per row
(1 for BSHD), ``cp`` ranks and a per-GPU bandwidth ``bw``:

* compute: ``t_c = TOKEN_HEAD_MS * L * H / cp + FIXED_MS`` for either strategy (both run ``L * H / cp``
  token-heads per rank); hidden-parallel pays ``HIDDEN_FEW_HEADS`` more per head below ``FEW_HEADS`` heads
  per rank (few heads underuse the GPU);
* state passing on packed rows cut per document (``packed_layout="sequences"``) adds
  ``PACKED_MS * S**0.85 * cp**-0.15 * (H*P*N / 2**20)``: every document has a segment on every rank, whose state
  is summarised, exchanged, scanned and broadcast back over its tokens (the per-document part the fused kernels
  cannot remove; it shrinks a little with cp as the chains are dealt out over more ranks). A pack cut as one
  stream (``"stream"``) costs what a BSHD row does: measured within 3% of BSHD at 128K for 64 and 512
  documents, cp 2 to 8 (``h200_stream*``);
* communication: the bytes of :mod:`mamba_cp.traffic` (what ``mamba-cp plan`` prints) forward and backward,
  over ``bw``. Hidden-parallel hides up to ``HIDEABLE * t_c`` of it behind the projection of ``z``; state
  passing's exchanges are exposed.

The constants were fitted on one NVIDIA H200 (bf16, the NemotronH-8B-like mixer: H 128, P 64, G 8, N 128, chunk
128; rank 0 of cp = 2..16 under the fake process group, L 128K to 2M, BSHD and 64 / 512-document packs;
``benchmarks/results/h200_simulate_mixer*.json``, ``h200_sp_a2a*``, ``h200_profile_thd_cp2*``): compute within
about 10% of the measured per-rank time on BSHD, packs within about 15%. Other cards and widths scale the whole
estimate, not the choice between two strategies on the same card, which is all the model decides.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch
import torch.distributed as dist

from ..ssm_block import SSMShape
from ..traffic import hidden_parallel_bytes, state_passing_bytes

TOKEN_HEAD_MS = 206.2 / (131072 * 128)
"""fwd+bwd ms per token and head: the plain NemotronH-8B-like mixer took 206.2 ms at 128K tokens on the H200."""
FIXED_MS = 1.5
"""Per-step overhead of either strategy that does not shrink with the rank's share (launches, small ops)."""
FEW_HEADS, HIDDEN_FEW_HEADS = 16, 0.3
"""Hidden-parallel below 16 heads per rank: up to 30% slower per head (8 heads: 1.15x; measured 1.15-1.27x)."""
PACKED_MS = 0.74
"""State passing on packed rows: ``PACKED_MS * S**0.85 * cp**-0.15`` ms per 2**20 state elements (H*P*N) of the
mixer (measured over hidden-parallel at 128K: 23 ms at cp 2 and 14 ms at cp 16 for 64 documents, 117 / 105 /
104 ms at cp 2 / 8 / 16 for 512)."""
HIDEABLE = 0.16
"""Share of the compute that the fused projection's ``z`` GEMMs offer to hide hidden-parallel's all-to-alls
behind (16.8 ms of 103 ms at 128K, cp=2)."""


@dataclass(frozen=True, slots=True, kw_only=True)
class Workload:
    """What ``strategy="auto"`` chooses for (``parallelize(..., workload=...)``)."""

    tokens: int = 131072
    """Global tokens per row (``L``, or ``T`` for a pack)."""
    documents: int = 1
    """Documents per row: 1 for BSHD, the usual count of a packed batch otherwise."""
    bandwidth_gbps: float | None = None
    """Per-GPU bandwidth of the CP group in GB/s; None: measured once with a small timed all-to-all."""
    dtype_bytes: int = 2
    """Bytes per activation (2 for bf16)."""
    packed_layout: str = "sequences"
    """How packs are cut over the ranks (``parallelize`` sets the model's)."""


@dataclass(frozen=True, slots=True)
class Choice:
    """The strategy ``auto`` picked, with the estimates (ms per layer per step) it compared."""

    strategy: str
    hidden_ms: float | None
    """None where hidden-parallel cannot run (heads or groups do not split over the ranks)."""
    state_passing_ms: float

    @property
    def reason(self) -> str:
        if self.hidden_ms is None:
            return "auto: hidden-parallel cannot split these heads/groups"
        return (
            f"auto: est. {self.state_passing_ms:.1f} ms state passing vs {self.hidden_ms:.1f} ms hidden-parallel "
            "per layer step"
        )


def hidden_can_run(shape: SSMShape, cp: int) -> bool:
    """Whether hidden-parallel's divisibility holds: ``H % cp == 0`` and the groups split over the ranks."""
    groups_split = cp % shape.n_groups == 0 if shape.n_groups < cp else shape.n_groups % cp == 0
    return shape.num_heads % cp == 0 and groups_split


def estimate_ms(strategy: str, shape: SSMShape, cp: int, workload: Workload, bandwidth_gbps: float) -> float:
    """Estimated fwd+bwd ms of one mixer layer per rank for ``strategy`` (see the module docstring)."""
    tokens, docs = workload.tokens, workload.documents
    compute = TOKEN_HEAD_MS * tokens * shape.num_heads / cp + FIXED_MS
    per_gb = 1e3 / (bandwidth_gbps * 1e9)  # ms per byte
    if strategy == "hidden":
        heads_local = shape.num_heads // cp
        compute *= 1 + HIDDEN_FEW_HEADS * max(0.0, (FEW_HEADS - heads_local) / FEW_HEADS)
        comm = 2 * hidden_parallel_bytes(shape, tokens, cp, workload.dtype_bytes)["off_rank"] * per_gb
        return compute + max(0.0, comm - HIDEABLE * compute)
    stream = docs > 1 and workload.packed_layout == "stream"
    if docs > 1 and not stream:
        compute += PACKED_MS * docs**0.85 * cp**-0.15 * (shape.d_inner * shape.d_state) / 2**20
    sent = state_passing_bytes(shape, tokens, cp, workload.dtype_bytes, num_seqs=docs, stream=stream)["off_rank"]
    return compute + 2 * sent * per_gb


def choose_strategy(shape: SSMShape, cp: int, workload: Workload, bandwidth_gbps: float) -> Choice:
    """The faster strategy by :func:`estimate_ms`; state passing wherever hidden-parallel cannot run."""
    sp = estimate_ms("state_passing", shape, cp, workload, bandwidth_gbps)
    if not hidden_can_run(shape, cp):
        return Choice("state_passing", None, sp)
    hidden = estimate_ms("hidden", shape, cp, workload, bandwidth_gbps)
    return Choice("hidden" if hidden <= sp else "state_passing", hidden, sp)


def measure_bandwidth_gbps(group: dist.ProcessGroup, megabytes: int = 16) -> float:
    """Per-rank all-to-all bandwidth of ``group`` in GB/s: the median of three timed all-to-alls of
    ``megabytes`` after one warm-up (bytes that leave the rank over the time). The same value on every rank (the
    slowest rank's), so every rank makes the same choice."""
    from ..collectives import all_to_all

    size = dist.get_world_size(group)
    device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend(group) == "nccl" else "cpu"
    send = torch.zeros(size, megabytes * 2**20 // (4 * size), device=device)
    times = []
    for i in range(4):
        if device != "cpu":
            torch.cuda.synchronize()
        start = time.perf_counter()
        all_to_all(send, group, "bandwidth probe")
        if device != "cpu":
            torch.cuda.synchronize()
        if i:
            times.append(time.perf_counter() - start)
    seconds = torch.tensor([sorted(times)[1]], dtype=torch.float64, device=device)
    dist.all_reduce(seconds, op=dist.ReduceOp.MAX, group=group)
    return send.numel() * 4 * (size - 1) / size / float(seconds) / 1e9
