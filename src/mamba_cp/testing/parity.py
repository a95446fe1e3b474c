"""Parity of a context-parallel mixer with the same mixer run without CP: outputs and every gradient.

Each rank builds the same seeded mixer and global batch, runs the plain mixer on the whole batch (the
reference) and the parallelized copy on its head-tail shard, sums the CP gradients over the group, and
compares: its output shard, its input-gradient shard, and every parameter gradient. Used by the tests,
``mamba-cp demo`` and ``mamba-cp verify``.
"""

from __future__ import annotations

import copy
from dataclasses import asdict, dataclass, field

import torch
import torch.distributed as dist

from ..gradients import all_reduce_gradients
from ..mixer import Mamba2Mixer
from ..parallelize import parallelize
from ..sharding import shard


@dataclass(kw_only=True)
class ParityCase:
    """One configuration to check."""

    layout: str = "bshd"
    """``"bshd"`` (``[B, L, D]``) or ``"thd"`` (packed ``[T, D]`` with ``cu_seqlens``)."""
    batch: int = 2
    """``B`` for BSHD (packed batches have one row)."""
    seqlen: int = 32
    """``L`` for BSHD."""
    seqlens: list[int] = field(default_factory=lambda: [16, 8, 24])
    """Packed sequence lengths for THD (each a multiple of ``2 * cp`` for ``packed_layout="sequences"``; their sum
    for ``"stream"``)."""
    packed_layout: str = "sequences"
    """How THD batches are cut over the ranks (``"sequences"`` or ``"stream"``)."""
    hidden_size: int = 16
    num_heads: int = 4
    head_dim: int = 4
    n_groups: int = 2
    state_size: int = 8
    conv_kernel: int = 4
    chunk_size: int = 8
    time_step_limit: tuple[float, float] = (0.0, float("inf"))
    use_bias: bool = False
    dtype: str = "float64"
    seed: int = 0
    strategy: str = "hidden"
    fuse_projection: bool = True
    """Hidden-parallel only: in_proj fused with the first all-to-all (the default) or the plain in_proj."""

    def describe(self) -> str:
        shape = f"B={self.batch} L={self.seqlen}"
        if self.layout != "bshd":
            shape = f"seqlens={self.seqlens} {self.packed_layout}"
        return (
            f"{self.layout} {shape} H={self.num_heads} P={self.head_dim} G={self.n_groups} N={self.state_size} "
            f"K={self.conv_kernel} chunk={self.chunk_size} {self.dtype}"
        )


def build_mixer(case: ParityCase, device: torch.device) -> Mamba2Mixer:
    """The case's mixer, seeded, with non-trivial norm weight and D so that their gradients are tested."""
    torch.manual_seed(case.seed)
    dtype = getattr(torch, case.dtype)
    mixer = Mamba2Mixer(
        hidden_size=case.hidden_size,
        num_heads=case.num_heads,
        head_dim=case.head_dim,
        n_groups=case.n_groups,
        state_size=case.state_size,
        conv_kernel=case.conv_kernel,
        chunk_size=case.chunk_size,
        time_step_limit=case.time_step_limit,
        use_bias=case.use_bias,
        device=device,
        dtype=dtype,
    )
    with torch.no_grad():
        mixer.norm.weight.uniform_(0.5, 1.5)
        mixer.D.uniform_(0.5, 1.5)
    return mixer


def parity_worker(rank: int, world_size: int, case_dict: dict, device: str = "cpu") -> dict[str, tuple[float, float]]:
    """Run one case on this rank; returns ``{name: (max |cp - ref|, max |ref|)}`` for every compared tensor."""
    case = ParityCase(**case_dict)
    dev = torch.device(device)
    dtype = getattr(torch, case.dtype)
    group = dist.group.WORLD if world_size > 1 else None
    ref = build_mixer(case, dev)
    cp_mixer = parallelize(
        copy.deepcopy(ref),
        group,
        strategy=case.strategy,
        fuse_projection=case.fuse_projection,
        packed_layout=case.packed_layout,
    )

    gen = torch.Generator(device="cpu").manual_seed(case.seed + 1)
    if case.layout == "bshd":
        shape, cu, seq_dim = (case.batch, case.seqlen, case.hidden_size), None, 1
    elif case.layout == "thd":
        total = sum(case.seqlens)
        shape, seq_dim = (total, case.hidden_size), 0
        cu = torch.tensor([0, *torch.tensor(case.seqlens).cumsum(0).tolist()], dtype=torch.int32)
    else:
        raise ValueError(f"layout must be 'bshd' or 'thd', got {case.layout!r}")
    x = torch.randn(shape, generator=gen, dtype=torch.float64).to(dev, dtype)
    weight = torch.randn(shape, generator=gen, dtype=torch.float64).to(dev, dtype)
    cu_dev = cu.to(dev) if cu is not None else None

    x_ref = x.clone().requires_grad_(True)
    out_ref = ref(x_ref, cu_seqlens=cu_dev)
    (out_ref * weight).sum().backward()

    def mine(t: torch.Tensor) -> torch.Tensor:  # this rank's shard
        return shard(t, world_size, rank, seq_dim, cu, packed_layout=case.packed_layout)

    x_local = mine(x).detach().requires_grad_(True)
    out_local = cp_mixer(x_local, cu_seqlens=cu_dev)
    (out_local * mine(weight)).sum().backward()
    all_reduce_gradients(cp_mixer, group)

    def diff(a: torch.Tensor, b: torch.Tensor) -> tuple[float, float]:
        a, b = a.detach().double(), b.detach().double()
        return float((a - b).abs().max()), float(b.abs().max())

    result = {
        "output": diff(out_local, mine(out_ref.detach())),
        "input.grad": diff(x_local.grad, mine(x_ref.grad)),
    }
    ref_params = dict(ref.named_parameters())
    for name, p in cp_mixer.named_parameters():
        if p.grad is None or ref_params[name].grad is None:
            raise AssertionError(f"parameter {name} got no gradient")
        result[f"{name}.grad"] = diff(p.grad, ref_params[name].grad)
    return result


def worst_relative(results: list[dict[str, tuple[float, float]]]) -> dict[str, float]:
    """Per tensor, the largest ``max|cp - ref| / max|ref|`` over ranks."""
    worst: dict[str, float] = {}
    for per_rank in results:
        for name, (err, scale) in per_rank.items():
            worst[name] = max(worst.get(name, 0.0), err / scale if scale > 0 else err)
    return worst


def case_dict(case: ParityCase) -> dict:
    """A picklable dict of the case, for sending to worker processes."""
    return asdict(case)


def parity_cases_worker(rank: int, world_size: int, cases: list[dict]) -> list[dict[str, tuple[float, float]]]:
    """:func:`parity_worker` for each of several cases, in one launch."""
    return [parity_worker(rank, world_size, case) for case in cases]


def run_parity_cases(world_size: int, cases: list[ParityCase], timeout: float = 180.0) -> list[dict[str, float]]:
    """Every case on ``world_size`` forked gloo ranks in one launch; per case, :func:`worst_relative` errors."""
    from .multiprocess import run_on_ranks

    per_rank = run_on_ranks(parity_cases_worker, world_size, [case_dict(c) for c in cases], timeout=timeout)
    return [worst_relative([r[i] for r in per_rank]) for i in range(len(cases))]


def run_named_parity_cases(world_size: int, named: list[tuple[object, ParityCase]]) -> dict[object, dict[str, float]]:
    """:func:`run_parity_cases` for ``(key, case)`` pairs: ``{key: {tensor: worst relative error}}``."""
    return dict(zip([key for key, _ in named], run_parity_cases(world_size, [case for _, case in named]), strict=True))
