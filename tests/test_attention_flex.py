"""Document-causal attention in O(T) memory (FlexAttention block masks) equals the dense-mask path.

* The tile lists built from ``cu_seqlens`` are torch's own ``create_block_mask`` of the document-causal mask.
* :func:`~mamba_cp.document_attention.block_sparse_attention` (the CPU path: the kernel's tile schedule in torch
  ops) equals dense attention with a token-by-token reference mask, outputs and every gradient, float64; planted
  mask bugs (a document seeing another, a tile boundary off by one, a tile lost or counted twice) are caught.
* The real FlexAttention kernel (compiled for the CPU, inference only, float32) reads the same ``BlockMask`` and
  gives the dense result; the planted off-by-one tile changes its output too.
* No ``T x T`` tensor is allocated while the mask is built and attention runs forward and backward.
* In real gloo runs (cp 1, 2, 4) Ulysses attention on the document path and transformers hybrids (NemotronH with
  two attention layers, sdpa / eager / flex_attention; Bamba with RoPE) equal the dense-mask path, BSHD and packed;
  the mask is built once per batch for both attention layers.
"""

from __future__ import annotations

import shutil

import pytest
import torch
import torch.distributed as dist
from torch.utils._python_dispatch import TorchDispatchMode

import mamba_cp
import mamba_cp.document_attention as da
from mamba_cp import UlyssesAttention
from mamba_cp.attention import MaskCache, causal_mask
from mamba_cp.document_attention import block_sparse_attention, document_attention, document_mask
from mamba_cp.layout import build_token_plan
from mamba_cp.testing import run_on_ranks

TOL = 1e-12  # float64, relative to the largest reference value; observed ~1e-16


# --------------------------------------------------------------------------------------------------
# References, built here independently of the library
# --------------------------------------------------------------------------------------------------


def reference_allowed(length: int, cu_seqlens: list[int] | None) -> torch.Tensor:
    """``[L, L]`` bool: query i may see key j iff j <= i in the same sequence (built token by token)."""
    bounds = cu_seqlens or [0, length]
    allowed = torch.zeros(length, length, dtype=torch.bool)
    for start, end in zip(bounds[:-1], bounds[1:], strict=True):
        for i in range(start, end):
            allowed[i, start : i + 1] = True
    return allowed


def dense_attention(q, k, v, allowed, scale: float, softcap: float | None = None) -> torch.Tensor:
    """``[B, H, L, d]`` queries over ``[B, H_kv, L, d]`` keys (kv head ``h // (H / H_kv)``) -> ``[B, H, L, d_v]``."""
    groups = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)
    scores = (q @ k.transpose(-1, -2)) * scale
    if softcap is not None:
        scores = softcap * torch.tanh(scores / softcap)
    return scores.masked_fill(~allowed, float("-inf")).softmax(-1) @ v


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    """``max |a - b| / max |b|`` (NaN in ``a`` gives NaN, which fails every ``<=``)."""
    return float((a.detach() - b.detach()).abs().max() / b.detach().abs().max())


def random_inputs(batch, heads, kv_heads, length, d, dtype=torch.float64, seed=0):
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(batch, heads, length, d, generator=gen, dtype=dtype)
    k = torch.randn(batch, kv_heads, length, d, generator=gen, dtype=dtype)
    v = torch.randn(batch, kv_heads, length, d + 1, generator=gen, dtype=dtype)  # d_v != d
    w = torch.randn(batch, heads, length, d + 1, generator=gen, dtype=dtype)
    return q, k, v, w


def plan_of(cu: list[int] | None, batch: int = 1, length: int | None = None):
    if cu is None:
        return build_token_plan(1, batch, length)
    return build_token_plan(1, 1, cu[-1], torch.tensor(cu))


# Packings: documents shorter than a tile, spanning several, starting on and off tile edges, T not a multiple.
PACKINGS = {
    "short-and-long": [0, 5, 9, 40, 41, 64],
    "edges": [0, 8, 16, 24, 56],
    "one-doc-ragged": [0, 37],
    "many-tiny": [0, 1, 2, 3, 4, 5, 6, 30, 31],
}


# --------------------------------------------------------------------------------------------------
# The tiles are torch's own block mask of the document-causal mask
# --------------------------------------------------------------------------------------------------


def _dense_tiles(counts: torch.Tensor, indices: torch.Tensor, n: int) -> torch.Tensor:
    """``[N, N]`` bool from a ``(count [N], indices [N, W])`` tile list (each listed tile once)."""
    dense = torch.zeros(n, n, dtype=torch.int64)
    for i in range(n):
        for j in indices[i, : counts[i]].tolist():
            dense[i, j] += 1
    assert dense.max() <= 1, "a tile is listed twice"
    return dense.bool()


def _random_packings(count: int) -> list[tuple[list[int], int]]:
    gen = torch.Generator().manual_seed(11)
    out = []
    for _ in range(count):
        lengths = torch.randint(1, 30, (int(torch.randint(1, 6, (1,), generator=gen)),), generator=gen).tolist()
        block = [1, 2, 3, 4, 8, 16][int(torch.randint(0, 6, (1,), generator=gen))]
        out.append(([0, *torch.tensor(lengths).cumsum(0).tolist()], block))
    return out


TILE_CASES = [(cu, b) for cu in PACKINGS.values() for b in (4, 8, 128)] + _random_packings(12) + [(None, 4)]


@pytest.mark.parametrize("cu,block", TILE_CASES, ids=[f"{cu}-b{b}" for cu, b in TILE_CASES])
def test_tiles_are_torchs_block_mask(cu, block):
    """Partial and full tiles (kv and q side) equal ``create_block_mask`` of the mask function over all pairs."""
    from torch.nn.attention.flex_attention import create_block_mask

    length = 24 if cu is None else cu[-1]
    plan = plan_of(cu, length=length)
    ours = document_mask(plan, block_size=block, backend="flex").block_mask
    allowed = reference_allowed(length, cu)
    theirs = create_block_mask(lambda b, h, q, k: allowed[q, k], None, None, length, length, BLOCK_SIZE=block)
    n = -(-length // block)
    for counts, indices in (
        ("kv_num_blocks", "kv_indices"),
        ("full_kv_num_blocks", "full_kv_indices"),
        ("q_num_blocks", "q_indices"),
        ("full_q_num_blocks", "full_q_indices"),
    ):
        a = _dense_tiles(getattr(ours, counts)[0, 0], getattr(ours, indices)[0, 0], n)
        b = _dense_tiles(getattr(theirs, counts)[0, 0], getattr(theirs, indices)[0, 0], n)
        assert torch.equal(a, b), f"{counts}: ours\n{a.int()}\ntorch's\n{b.int()}"
    assert ours.shape[-2:] == (length, length)


# --------------------------------------------------------------------------------------------------
# The CPU path (the tile schedule in torch ops) equals dense attention
# --------------------------------------------------------------------------------------------------

ATTENTION_CASES = {
    # name: (packing or None for BSHD, heads, kv_heads, block, softcap)
    "mha-packed": ("short-and-long", 4, 4, 4, None),
    "gqa2-packed": ("edges", 4, 2, 8, None),
    "kv1-packed": ("many-tiny", 4, 1, 4, None),
    "groups3-packed": ("one-doc-ragged", 6, 2, 8, None),  # a group count that is not a power of 2
    "softcap-packed": ("short-and-long", 4, 2, 3, 1.5),
    "one-tile": ("short-and-long", 4, 2, 128, None),
    "bshd-causal": (None, 4, 2, 4, None),
}


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
@pytest.mark.parametrize("case", list(ATTENTION_CASES))
def test_block_sparse_attention_matches_dense(case, dtype):
    packing, heads, kv_heads, block, softcap = ATTENTION_CASES[case]
    cu = None if packing is None else PACKINGS[packing]
    batch, length = (2, 22) if cu is None else (1, cu[-1])
    q, k, v, w = random_inputs(batch, heads, kv_heads, length, 6, dtype)
    scale = 0.37
    ref_in = [t.clone().requires_grad_(True) for t in (q, k, v)]
    ref = dense_attention(*ref_in, reference_allowed(length, cu), scale, softcap)
    (ref * w).sum().backward()
    ours_in = [t.clone().requires_grad_(True) for t in (q, k, v)]
    mask = document_mask(plan_of(cu, batch, length), block_size=block, backend="blocks")
    out = document_attention(*ours_in, mask, scale=scale, softcap=softcap)
    (out * w).sum().backward()
    tol = TOL if dtype == torch.float64 else 1e-5
    grads = {f"{n}.grad": rel(a.grad, b.grad) for n, a, b in zip("qkv", ours_in, ref_in, strict=True)}
    errors = {"output": rel(out, ref), **grads}
    assert all(e <= tol for e in errors.values()), errors


# --------------------------------------------------------------------------------------------------
# Planted bugs are caught
# --------------------------------------------------------------------------------------------------


def _full_tile_one_early(tiles):
    """Off by one tile: each row's last off-diagonal partial tile (one that a document start cuts) counted as full."""
    counts, indices, full_counts, full_indices = (t.clone() for t in tiles)
    for i in range(counts.shape[0]):
        if counts[i] > 1:  # partial tiles [lo, i - n_full) and i: move tile i - n_full - 1 to the full list
            start = i - int(full_counts[i]) - 1
            full_indices[i, : full_counts[i] + 1] = torch.arange(start, i, dtype=torch.int32)
            full_counts[i] += 1
            indices[i, counts[i] - 2] = i
            counts[i] -= 1
    return counts, indices, full_counts, full_indices


def _diagonal_lost(tiles):
    counts, indices, full_counts, full_indices = (t.clone() for t in tiles)
    return counts - 1, indices, full_counts, full_indices


def _tile_twice(tiles):
    """A full tile listed as partial too (its scores counted twice)."""
    counts, indices, full_counts, full_indices = (t.clone() for t in tiles)
    for i in range(counts.shape[0]):
        if full_counts[i] > 0:
            indices[i, counts[i]] = full_indices[i, 0]
            counts[i] += 1
    return counts, indices, full_counts, full_indices


PLANTED = {
    "full-tile-one-early": _full_tile_one_early,
    "diagonal-lost": _diagonal_lost,
    "tile-twice": _tile_twice,
}


def plant(bug: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """Make every mask built from now on (in this process) carry ``bug``."""
    if bug == "documents-see-each-other":  # the mask function of partial tiles forgets the documents
        monkeypatch.setattr(da, "document_causal", lambda seq_idx_T: da.causal)
        return
    real = da._tiles
    monkeypatch.setattr(da, "_tiles", lambda *args: PLANTED[bug](real(*args)))


@pytest.mark.parametrize("bug", ["documents-see-each-other", *PLANTED])
def test_planted_mask_bugs_are_caught(bug, monkeypatch):
    cu, block = PACKINGS["short-and-long"], 4
    length = cu[-1]
    q, k, v, w = random_inputs(1, 4, 2, length, 6)
    ref = dense_attention(q, k, v, reference_allowed(length, cu), 0.4)
    clean = document_attention(q, k, v, document_mask(plan_of(cu), block_size=block, backend="blocks"), scale=0.4)
    assert rel(clean, ref) <= TOL
    plant(bug, monkeypatch)
    bad = document_attention(q, k, v, document_mask(plan_of(cu), block_size=block, backend="blocks"), scale=0.4)
    assert not rel(bad, ref) <= 1e-3, f"planted bug {bug} was not caught"


# --------------------------------------------------------------------------------------------------
# The real FlexAttention kernel reads the same BlockMask (CPU: compiled, inference only, float32)
# --------------------------------------------------------------------------------------------------


def _flex_kernel_worker(rank: int, world: int) -> dict[str, float]:
    """In a forked process, so that the test process never starts inductor's compile workers (it forks ranks)."""
    import pytest as _pytest

    cu, block = [0, 5, 9, 40, 41, 64, 90, 100], 16
    length = cu[-1]
    q, k, v, _ = random_inputs(1, 4, 2, length, 8, torch.float32)
    v = v[..., :8].contiguous()  # the CPU kernel wants d_v == d
    ref = dense_attention(q, k, v, reference_allowed(length, cu), 0.3)
    with torch.no_grad():
        out = document_attention(q, k, v, document_mask(plan_of(cu), block_size=block), scale=0.3, backend="flex")
        with _pytest.MonkeyPatch.context() as monkeypatch:
            plant("full-tile-one-early", monkeypatch)
            bad = document_attention(q, k, v, document_mask(plan_of(cu), block_size=block), scale=0.3, backend="flex")
    return {"clean": rel(out, ref), "planted": rel(bad, ref)}


@pytest.mark.skipif(shutil.which("g++") is None and shutil.which("c++") is None, reason="no C++ compiler")
@pytest.mark.skipif(not torch.cpu._is_avx2_supported(), reason="torch's CPU FlexAttention kernel needs AVX2")
def test_flex_kernel_reads_our_block_mask():
    """torch.compile(flex_attention) on CPU (inference only, float32; its kernel skips the mask function on full
    tiles) with our BlockMask gives the dense result; the off-by-one full tile changes it (same shapes, no
    recompile)."""
    (result,) = run_on_ranks(_flex_kernel_worker, 1, timeout=300)
    assert result["clean"] <= 1e-5, result
    assert not result["planted"] <= 1e-3, result


def test_flex_refuses_cpu_training_with_the_reason():
    cu = PACKINGS["edges"]
    q, k, v, _ = random_inputs(1, 2, 2, cu[-1], 4)
    mask = document_mask(plan_of(cu), block_size=8, backend="flex")
    with pytest.raises(ValueError, match="FlexAttention has no backward on cpu"):
        document_attention(q.requires_grad_(True), k, v, mask, backend="flex")
    with pytest.raises(ValueError, match="built for the 'flex' backend"):
        block_sparse_attention(q, k, v, mask, 0.5)


# --------------------------------------------------------------------------------------------------
# No T x T tensor
# --------------------------------------------------------------------------------------------------


class LargestTensor(TorchDispatchMode):
    """Records the most elements of any tensor an op returns inside the ``with`` block (autograd included)."""

    def __init__(self) -> None:
        super().__init__()
        self.numel = 0
        self.op = ""

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, tuple | list) else (out,):
            if isinstance(t, torch.Tensor) and t.numel() > self.numel:
                self.numel, self.op = t.numel(), str(func)
        return out


def test_no_t_by_t_tensor():
    """T = 32768 tokens in documents of 20 to 100: building the masks of both paths and running attention forward
    and backward allocate no tensor of more than T * T / 64 elements (the dense mask path allocates T * T: the
    recorder sees it at a smaller T)."""
    length = 32768
    gen = torch.Generator().manual_seed(5)
    starts = torch.randint(20, 100, (length // 20,), generator=gen).cumsum(0)
    cu = torch.tensor([0, *starts[starts < length].tolist(), length])
    q, k, v = (t.float().requires_grad_(True) for t in random_inputs(1, 2, 1, length, 4)[:3])
    with LargestTensor() as largest:
        plan = build_token_plan(1, 1, length, cu)
        masks = MaskCache()
        masks.get(plan, "document", block_size=128)  # the GPU path's BlockMask, built on the CPU here
        mask = masks.get(plan, "document-blocks", block_size=16)
        out = document_attention(q, k, v, mask, scale=0.5)
        out.square().sum().backward()
    assert q.grad is not None and largest.numel > 0
    assert largest.numel <= length * length // 64, (largest.numel, largest.op)

    small = 2048  # the recorder sees a dense mask where one is built
    with LargestTensor() as dense:
        causal_mask(build_token_plan(1, 1, small, torch.tensor([0, 1000, small])))
    assert dense.numel >= small * small


# --------------------------------------------------------------------------------------------------
# Bad input and missing pieces
# --------------------------------------------------------------------------------------------------


def test_errors_name_the_value_and_the_fix(monkeypatch):
    plan = plan_of(PACKINGS["edges"])
    with pytest.raises(ValueError, match=r"block_size must be a positive int, got 0"):
        document_mask(plan, block_size=0)
    with pytest.raises(ValueError, match=r"packed attention backend must be one of .*got 'ring'"):
        da.resolve_backend("ring", torch.device("cpu"))
    assert da.resolve_backend("auto", torch.device("cuda")) == "flex"
    assert da.resolve_backend("auto", torch.device("cpu")) == "blocks"
    q, k, v, _ = random_inputs(1, 4, 3, 56, 4)
    with pytest.raises(ValueError, match=r"query heads \(4\) must be a multiple of key/value heads \(3\)"):
        document_attention(q, k, v, document_mask(plan, block_size=8, backend="blocks"))
    monkeypatch.setitem(__import__("sys").modules, "torch.nn.attention.flex_attention", None)  # a torch without it
    with pytest.raises(RuntimeError, match=r"FlexAttention, which this torch .* does not have.*flash_attention_2"):
        document_mask(plan, block_size=8, backend="flex")
    document_mask(plan, block_size=8, backend="blocks")  # the CPU path needs no FlexAttention


# --------------------------------------------------------------------------------------------------
# Ulysses attention on the document path, real gloo ranks
# --------------------------------------------------------------------------------------------------

ULYSSES_CASES = {
    # name: (heads, kv_heads, lengths as multiples of 2*cp or None for BSHD, block)
    "kv<cp-packed": (4, 1, [1, 3, 2, 5], 4),
    "gqa-packed": (8, 2, [4, 1, 3], 8),
    "bshd": (4, 2, None, 4),
}


def _ulysses_case(rank: int, world: int, heads: int, kv_heads: int, lengths, block: int) -> dict[str, float]:
    unit = 2 * world
    if lengths is None:
        batch, length, cu = 2, 6 * unit, None
    else:
        batch, length = 1, sum(lengths) * unit
        cu = torch.tensor([0, *(torch.tensor(lengths) * unit).cumsum(0).tolist()])
    q, k, v, w = random_inputs(batch, heads, kv_heads, length, 4, seed=heads + kv_heads)
    ref_in = [t.clone().requires_grad_(True) for t in (q, k, v)]
    ref = dense_attention(*ref_in, reference_allowed(length, None if cu is None else cu.tolist()), 0.5)
    (ref * w).sum().backward()

    def local(t: torch.Tensor) -> torch.Tensor:
        return mamba_cp.shard(t, world, rank, seq_dim=2, cu_seqlens=cu)

    ulysses = UlyssesAttention(dist.group.WORLD, heads, kv_heads)
    loc_in = [local(t).detach().requires_grad_(True) for t in (q, k, v)]
    plan = ulysses.plan_for(batch, length // world, cu, q.device)
    mask = MaskCache().get(plan, "document-blocks", block_size=block)
    qs, ks, vs = ulysses.scatter(*loc_in, plan)
    out = ulysses.gather(document_attention(qs, ks, vs, mask, scale=0.5).transpose(1, 2), plan)  # [B, L_local, H, d]
    (out * local(w).transpose(1, 2)).sum().backward()
    return {
        "output": rel(out, local(ref).transpose(1, 2)),
        **{f"{n}.grad": rel(t.grad, local(r.grad)) for n, t, r in zip("qkv", loc_in, ref_in, strict=True)},
    }


def ulysses_worker(rank: int, world: int) -> dict[str, dict[str, float]]:
    return {name: _ulysses_case(rank, world, *case) for name, case in ULYSSES_CASES.items()}


@pytest.fixture(scope="module")
def ulysses_results() -> dict[int, list[dict]]:
    return {cp: run_on_ranks(ulysses_worker, cp) for cp in (1, 2, 4)}


@pytest.mark.parametrize("cp", [1, 2, 4])
@pytest.mark.parametrize("case", list(ULYSSES_CASES))
def test_ulysses_document_attention_matches_dense(ulysses_results, cp, case):
    worst = {k: max(r[case][k] for r in ulysses_results[cp]) for k in ulysses_results[cp][0][case]}
    assert set(worst) == {"output", "q.grad", "k.grad", "v.grad"}
    assert all(e <= TOL for e in worst.values()), f"cp={cp} {case}: {worst}"


# --------------------------------------------------------------------------------------------------
# transformers hybrids: the document path equals the dense-mask path
# --------------------------------------------------------------------------------------------------

VOCAB = 64


def hybrid(name: str, attn: str, **overrides):
    """A small seeded float64 model. NemotronH: Mamba2, attention, MLP, Mamba2, attention (two attention
    layers, 4 query / 2 kv heads, no RoPE). Bamba: Mamba2, attention with RoPE, Mamba2."""
    import transformers

    torch.manual_seed(0)
    if name == "nemotron_h":
        config = transformers.NemotronHConfig(
            vocab_size=VOCAB, hidden_size=32, num_attention_heads=4, num_key_value_heads=2, head_dim=8,
            intermediate_size=48, mamba_num_heads=8, mamba_head_dim=8, n_groups=2, ssm_state_size=8, chunk_size=8,
            layers_block_type=["linear_attention", "full_attention", "mlp", "linear_attention", "full_attention"],
            attn_implementation=attn, **overrides,
        )  # fmt: skip
        return transformers.NemotronHForCausalLM(config).double()
    config = transformers.BambaConfig(
        vocab_size=VOCAB, hidden_size=32, num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2,
        intermediate_size=48, mamba_n_heads=8, mamba_d_head=8, mamba_n_groups=2, mamba_d_state=8, mamba_d_conv=4,
        mamba_chunk_size=8, mamba_expand=2, attn_layer_indices=[1], attn_implementation=attn, **overrides,
    )  # fmt: skip
    return transformers.BambaForCausalLM(config).double()


def attention_states(model) -> list:
    return [m.context_parallel for m in model.modules() if hasattr(m, "context_parallel") and hasattr(m, "q_proj")]


HF_CASES = [
    # (model, attn implementation, layout, block size)
    ("nemotron_h", "sdpa", "thd", 3),  # document starts mostly inside tiles
    ("nemotron_h", "sdpa", "bshd", 3),
    ("nemotron_h", "eager", "thd", 8),
    ("nemotron_h", "flex_attention", "thd", 4),
    ("nemotron_h", "flex_attention", "bshd", 3),
    ("bamba", "sdpa", "thd", 3),
]


def _hf_case(rank: int, world: int, name: str, attn: str, layout: str, block: int) -> dict:
    group = dist.group.WORLD
    model = hybrid(name, attn)
    reference = hybrid(name, "sdpa" if attn == "flex_attention" else attn)
    reference.load_state_dict(model.state_dict())
    mamba_cp.parallelize(reference, 1)
    for state in attention_states(reference):
        state.packed_attention = "dense"  # the [T, T] mask through the layer's own sdpa / eager
    mamba_cp.parallelize(model, group)
    for state in attention_states(model):
        state.block_size = block
    gen = torch.Generator().manual_seed(7)
    if layout == "bshd":
        ids, cu = torch.randint(0, VOCAB, (2, 8 * world), generator=gen), None
    else:
        lengths = [4 * world, 2 * world, 6 * world, 2 * world]  # cut across ranks and tiles, short ones
        cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32)
        ids = torch.randint(0, VOCAB, (1, sum(lengths)), generator=gen)
    weight = torch.randn(*ids.shape, VOCAB, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    with mamba_cp.batch_context(cu_seqlens=cu):
        ref_logits = reference(input_ids=ids).logits
    (ref_logits * weight).sum().backward()
    with mamba_cp.batch_context(cu_seqlens=cu, cp_group=group) as ctx:
        logits = model(input_ids=ctx.shard(ids)).logits
        (logits * ctx.shard(weight)).sum().backward()
        ref_local = ctx.shard(ref_logits.detach())
    mamba_cp.all_reduce_gradients(model, group)
    errors = {"logits": rel(logits, ref_local)}
    ref_params = dict(reference.named_parameters())
    for pname, p in model.named_parameters():
        errors[f"{pname}.grad"] = rel(p.grad, ref_params[pname].grad)
    states = attention_states(model)
    return {
        "errors": errors,
        "attention_layers": len(states),
        "shared_cache": all(s.masks is states[0].masks for s in states),
        "mask_builds": states[0].masks.builds,
        "kinds": sorted({key[0] for key in states[0].masks.plans.keys("mask")}),
    }


def hf_worker(rank: int, world: int, planted: bool) -> dict:
    from mamba_cp.integrations.transformers import KeepFloat64

    torch.set_num_threads(1)
    out = {}
    with KeepFloat64():
        for case in HF_CASES:
            out["-".join(map(str, case))] = _hf_case(rank, world, *case)
        if planted:  # a tile boundary off by one, in every rank's masks: the comparison must fail
            real = da._tiles
            da._tiles = lambda *args: _full_tile_one_early(real(*args))
            try:
                out["planted"] = _hf_case(rank, world, "nemotron_h", "sdpa", "thd", 3)
            finally:
                da._tiles = real
    return out


@pytest.fixture(scope="module")
def hf_results() -> dict[int, dict[str, list[dict]]]:
    pytest.importorskip("transformers")
    out = {}
    for cp in (1, 2, 4):
        per_rank = run_on_ranks(hf_worker, cp, cp == 2)
        out[cp] = {case: [r[case] for r in per_rank] for case in per_rank[0]}
    return out


HF_IDS = [(cp, "-".join(map(str, case))) for cp in (1, 2, 4) for case in HF_CASES]


@pytest.mark.parametrize("cp,case", HF_IDS, ids=[f"cp{cp}-{case}" for cp, case in HF_IDS])
def test_hybrid_document_attention_matches_dense_mask(hf_results, cp, case):
    """Logits and every gradient equal the dense-mask path; one mask per batch for every attention layer."""
    runs = hf_results[cp][case]
    worst: dict[str, float] = {}
    for run in runs:
        for tensor, err in run["errors"].items():
            worst[tensor] = max(worst.get(tensor, 0.0), err)
    assert len(worst) > 10 and "logits" in worst
    bad = {k: v for k, v in worst.items() if not v <= 1e-10}
    assert not bad, f"cp={cp} {case}: {bad}"
    document = "thd" in case or "flex_attention" in case
    run = runs[0]
    assert run["shared_cache"] and run["attention_layers"] == (2 if case.startswith("nemotron_h") else 1)
    assert run["mask_builds"] == (1 if document else 0), run  # one mask per batch, shared by both layers
    if document:
        assert run["kinds"] == ["document-blocks"]


def test_planted_tile_bug_is_caught_in_a_hybrid(hf_results):
    worst = max(max(run["errors"].values()) for run in hf_results[2]["planted"])
    assert not worst <= 1e-3, f"the off-by-one tile went unnoticed (largest error {worst})"


def test_attention_dropout_is_refused_for_packed_batches():
    pytest.importorskip("transformers")
    model = mamba_cp.parallelize(hybrid("nemotron_h", "sdpa", attention_dropout=0.1), 1)
    ids, cu = torch.randint(0, VOCAB, (1, 16)), torch.tensor([0, 6, 16])
    model.train()
    with mamba_cp.batch_context(cu_seqlens=cu, cp_group=1):
        with pytest.raises(ValueError, match=r"attention dropout \(0.1\) is not supported .*packed_attention"):
            model(input_ids=ids)
        model.eval()
        model(input_ids=ids)  # no dropout in eval
        model.train()
        for state in attention_states(model):
            state.packed_attention = "dense"
        model(input_ids=ids)  # the dense mask allows it
        for state in attention_states(model):
            state.packed_attention = "ring"
        with pytest.raises(ValueError, match=r"packed_attention must be one of .*got 'ring'"):
            model(input_ids=ids)


def test_no_host_sync_per_layer_once_the_mask_exists():
    """A packed batch's first attention call builds the mask (host reads allowed there); later calls, forward and
    backward, read nothing back from the device."""
    pytest.importorskip("transformers")
    from mamba_cp.testing.dispatch import OpRecorder

    model = mamba_cp.parallelize(hybrid("nemotron_h", "sdpa"), 1)
    layer = model.model.layers[1].mixer  # NemotronHAttention
    x = torch.randn(1, 16, 32, dtype=torch.float64, requires_grad=True)
    counts = []
    cu = torch.tensor([0, 6, 16])  # in host memory, as a collator's: reading it waits for no device
    with mamba_cp.batch_context(cu_seqlens=cu, cp_group=1):
        for _ in range(2):
            with OpRecorder(host_tensors=[cu]) as rec:
                out = layer(x)
                (out[0] if isinstance(out, tuple) else out).sum().backward()
            counts.append(rec.host_syncs)
    assert counts[0] > 0 and counts[1] == 0, counts  # the first call's mask build is seen, then nothing
    assert attention_states(model)[0].masks.builds == 1


# --------------------------------------------------------------------------------------------------
# The GPU benchmark's CPU side
# --------------------------------------------------------------------------------------------------


def _load_bench():
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_attention.py"
    spec = importlib.util.spec_from_file_location("bench_attention", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_bench_attention_without_cuda_exits_cleanly(capsys, monkeypatch, tmp_path):
    bench = _load_bench()
    assert bench.parse_lengths("64K, 128k,1M,4096") == [65536, 131072, 1048576, 4096]
    cu = bench.document_bounds(65536, 64, 16, seed=3)
    lengths = cu[1:] - cu[:-1]
    assert cu[0] == 0 and cu[-1] == 65536 and len(lengths) == 64 and bool((lengths > 0).all())
    assert bool((lengths % 16 == 0).all()) and len(set(lengths.tolist())) > 8
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setenv("OUT", str(tmp_path))
    assert bench.main(["--lengths", "64K", "--budget-s", "1"]) == 0
    assert "CUDA is not available" in capsys.readouterr().out
    assert not (tmp_path / "bench_attention.jsonl").exists()
