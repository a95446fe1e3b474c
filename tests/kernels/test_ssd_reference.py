"""Chunked SSD reference vs the token-by-token recurrence (float64) plus composition properties.

Float64 comparisons use the bound ``max|got - want| <= 1e-10 * max|want| + 1e-14`` (fp64 rounding of
sums over ~40 tokens is ~1e-15 relative, so this leaves a wide margin while still catching any real
mistake, which shows up at >= 1e-3).
"""

from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch

from mamba_cp.kernels.ssd_naive import ssd_sequential_ref
from mamba_cp.kernels.ssd_reference import ssd_chunk_scan_ref

F64 = torch.float64
RTOL = 1e-10
ATOL = 1e-14


def assert_close_f64(got: torch.Tensor, want: torch.Tensor, what: str) -> None:
    assert got.shape == want.shape, f"{what}: shape {tuple(got.shape)} != {tuple(want.shape)}"
    err = (got - want).abs().max().item()
    bound = RTOL * want.abs().max().item() + ATOL
    assert err <= bound, f"{what}: max abs err {err:.3e} > bound {bound:.3e}"


def seq_idx_from_lengths(rows: list[list[int]], first_id: int = 0) -> torch.Tensor:
    """``[B, L]`` int32 sequence ids from per-row lists of packed sequence lengths."""
    out = []
    for lengths in rows:
        ids = [first_id + i for i, n in enumerate(lengths) for _ in range(n)]
        out.append(ids)
    assert len({len(r) for r in out}) == 1, "rows must have equal total length"
    return torch.tensor(out, dtype=torch.int32)


@dataclass
class Case:
    L: int = 37
    chunk: int = 8
    G: int = 2
    D: str | None = None  # None, "h" ([H]) or "hp" ([H, P])
    z: bool = False
    dt_bias: bool = False
    softplus: bool = False
    dt_limit: tuple[float, float] = (0.0, float("inf"))
    init: bool = False
    seq_rows: list[list[int]] | None = None  # packed sequence lengths per batch row
    seq_ids: list[list[int]] | None = None  # explicit ids (overrides seq_rows)
    first_id: int = 0
    B: int = 2
    H: int = 4
    P: int = 3
    N: int = 5


def make_inputs(case: Case, seed: int = 0, dtype: torch.dtype = F64) -> dict:
    gen = torch.Generator().manual_seed(seed)

    def randn(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=gen, dtype=F64)

    def rand(*shape: int) -> torch.Tensor:
        return torch.rand(*shape, generator=gen, dtype=F64)

    b, L, H, P, G, N = case.B, case.L, case.H, case.P, case.G, case.N
    # Raw dt: softplus of N(-1, 1.5) lands in ~(0.05, 1.5); otherwise dt is used as is.
    dt = randn(b, L, H) * 1.5 - 1.0 if case.softplus else rand(b, L, H) * 0.6 + 0.02
    inputs: dict = {
        "x": randn(b, L, H, P),
        "dt": dt,
        "A": -(rand(H) * 1.5 + 0.2),
        "B": randn(b, L, G, N),
        "C": randn(b, L, G, N),
    }
    if case.D == "h":
        inputs["D"] = randn(H)
    elif case.D == "hp":
        inputs["D"] = randn(H, P)
    if case.z:
        inputs["z"] = randn(b, L, H, P)
    if case.dt_bias:
        inputs["dt_bias"] = randn(H) * 0.3
    if case.init:
        inputs["initial_states"] = randn(b, H, P, N)
    inputs = {k: v.to(dtype) for k, v in inputs.items()}
    if case.seq_ids is not None:
        inputs["seq_idx"] = torch.tensor(case.seq_ids, dtype=torch.int64)
    elif case.seq_rows is not None:
        inputs["seq_idx"] = seq_idx_from_lengths(case.seq_rows, case.first_id)
    return inputs


def flags(case: Case) -> dict:
    return {"dt_softplus": case.softplus, "dt_limit": case.dt_limit}


CASES = [
    pytest.param(Case(L=32, G=1), id="L32_multiple_of_chunk_G1"),
    pytest.param(Case(G=1), id="L37_ragged_G1"),
    pytest.param(Case(G=4), id="G_eq_H"),
    pytest.param(Case(G=2, D="h"), id="G2_D_h"),
    pytest.param(Case(D="hp", z=True), id="D_hp_z"),
    pytest.param(Case(softplus=True, dt_bias=True), id="softplus_dt_bias"),
    pytest.param(Case(softplus=True, dt_bias=True, dt_limit=(0.1, 0.6)), id="softplus_dt_limit"),
    pytest.param(Case(dt_limit=(0.15, 0.4)), id="dt_limit_no_softplus"),
    pytest.param(Case(init=True, D="h", z=True), id="init_states"),
    pytest.param(Case(L=5, init=True), id="L_shorter_than_chunk"),
    pytest.param(Case(chunk=1, init=True, seq_rows=[[4, 1, 32], [37]]), id="chunk1_seq"),
    pytest.param(Case(chunk=64, init=True, seq_rows=[[10, 1, 26], [36, 1]]), id="single_chunk_seq"),
    # Boundaries exactly at chunk edges (8, 16, 32) and a sequence spanning two whole chunks.
    pytest.param(Case(seq_rows=[[8, 8, 16, 5], [16, 16, 5]]), id="seq_chunk_edges"),
    # Length-1 sequences, boundaries mid-chunk, last token its own sequence.
    pytest.param(Case(seq_rows=[[3, 1, 10, 1, 21, 1], [1, 1, 1, 34]]), id="seq_len1_mid_chunk"),
    pytest.param(Case(init=True, seq_rows=[[5, 20, 12], [8, 29]]), id="seq_with_init"),
    pytest.param(Case(init=True, seq_rows=[[1, 36], [1, 7, 29]]), id="seq_init_first_len1"),
    pytest.param(Case(init=True, seq_rows=[[37], [36, 1]], first_id=7), id="seq_ids_offset"),
    pytest.param(
        Case(
            G=2,
            D="hp",
            z=True,
            dt_bias=True,
            softplus=True,
            dt_limit=(0.05, 0.9),
            init=True,
            seq_rows=[[8, 1, 7, 13, 8], [2, 30, 5]],
        ),
        id="all_features",
    ),
    # Ids that return to an earlier value: resets happen at every change (recurrence semantics).
    pytest.param(Case(L=20, init=True, seq_ids=[[0] * 6 + [1] * 5 + [0] * 9, [3] * 4 + [2] * 16]), id="seq_nonmono"),
]


@pytest.mark.parametrize("case", CASES)
def test_chunked_matches_sequential(case: Case) -> None:
    inputs = make_inputs(case)
    seq_idx = inputs.pop("seq_idx", None)
    leaves = {k: v.clone().requires_grad_(True) for k, v in inputs.items()}

    def run(fn, **kw):
        return fn(**leaves, seq_idx=seq_idx, **flags(case), return_final_states=True, **kw)

    y_c, s_c = run(ssd_chunk_scan_ref, chunk_size=case.chunk)
    y_s, s_s = run(ssd_sequential_ref)
    assert y_c.dtype == F64 and s_c.dtype == F64
    assert_close_f64(y_c, y_s, "y")
    assert_close_f64(s_c, s_s, "final_states")

    gen = torch.Generator().manual_seed(1)
    w_y = torch.randn(y_s.shape, generator=gen, dtype=F64)
    w_s = torch.randn(s_s.shape, generator=gen, dtype=F64)
    names = list(leaves)
    g_c = torch.autograd.grad((y_c * w_y).sum() + (s_c * w_s).sum(), [leaves[k] for k in names])
    g_s = torch.autograd.grad((y_s * w_y).sum() + (s_s * w_s).sum(), [leaves[k] for k in names])
    for name, a, b in zip(names, g_c, g_s, strict=True):
        assert torch.isfinite(a).all(), f"non-finite grad for {name}"
        assert_close_f64(a, b, f"grad {name}")


@pytest.mark.parametrize("chunk", [4, 8, 16], ids=lambda c: f"chunk{c}")
def test_packed_equals_separate_sequences(chunk: int) -> None:
    lengths = [5, 12, 1, 19]
    case = Case(B=1, L=sum(lengths), D="hp", z=True, dt_bias=True, softplus=True, init=True)
    inp = make_inputs(case, seed=3)
    seq_idx = seq_idx_from_lengths([lengths])
    y, final = ssd_chunk_scan_ref(**inp, chunk_size=chunk, seq_idx=seq_idx, dt_softplus=True, return_final_states=True)

    ys, start = [], 0
    for i, n in enumerate(lengths):
        sl = slice(start, start + n)
        part = {k: (v[:, sl] if k in ("x", "dt", "B", "C", "z") else v) for k, v in inp.items()}
        if i > 0:  # initial_states belongs to the first sequence only
            part.pop("initial_states")
        y_part, final_part = ssd_sequential_ref(**part, dt_softplus=True, return_final_states=True)
        ys.append(y_part)
        start += n
    assert_close_f64(y, torch.cat(ys, dim=1), "packed y")
    assert_close_f64(final, final_part, "packed final_states (last sequence)")


# With seq_idx, row 0 has boundaries at 10 and 24, row 1 at 25: splits 10 and 25 cut exactly at a boundary.
@pytest.mark.parametrize("split", [1, 10, 16, 19, 25], ids=lambda s: f"split{s}")
@pytest.mark.parametrize("with_seq", [False, True], ids=["no_seq", "seq"])
def test_split_with_carried_state(split: int, with_seq: bool) -> None:
    case = Case(D="h", z=True, init=True, seq_rows=[[10, 14, 13], [25, 12]] if with_seq else None)
    inp = make_inputs(case, seed=5)
    seq_idx = inp.pop("seq_idx", None)
    y, final = ssd_chunk_scan_ref(**inp, chunk_size=8, seq_idx=seq_idx, return_final_states=True)

    def half(sl: slice) -> dict:
        return {k: (v[:, sl] if k in ("x", "dt", "B", "C", "z") else v) for k, v in inp.items()}

    first, second = half(slice(0, split)), half(slice(split, None))
    seq1 = seq_idx[:, :split] if seq_idx is not None else None
    seq2 = seq_idx[:, split:] if seq_idx is not None else None
    y1, s1 = ssd_chunk_scan_ref(**first, chunk_size=8, seq_idx=seq1, return_final_states=True)
    if seq_idx is not None:
        # The carried state must not leak into the second half if a new sequence starts right at the split.
        s1 = s1 * (seq_idx[:, split - 1] == seq_idx[:, split]).to(F64)[:, None, None, None]
    second["initial_states"] = s1
    y2, s2 = ssd_chunk_scan_ref(**second, chunk_size=8, seq_idx=seq2, return_final_states=True)
    assert_close_f64(torch.cat([y1, y2], dim=1), y, "split y")
    assert_close_f64(s2, final, "split final_states")


@pytest.mark.parametrize(
    ("dtype", "rel_bound"),
    [(torch.bfloat16, 3e-2), (torch.float16, 5e-3), (torch.float32, 1e-5)],
    ids=["bf16", "fp16", "fp32"],
)
def test_low_precision_smoke(dtype: torch.dtype, rel_bound: float) -> None:
    case = Case(
        L=45,
        G=2,
        D="hp",
        z=True,
        dt_bias=True,
        softplus=True,
        init=True,
        seq_rows=[[20, 1, 24], [45]],
        chunk=16,
    )
    inp = make_inputs(case, seed=7, dtype=dtype)
    seq_idx = inp.pop("seq_idx")
    leaves = {k: v.clone().requires_grad_(True) for k, v in inp.items()}
    y, final = ssd_chunk_scan_ref(**leaves, chunk_size=16, seq_idx=seq_idx, dt_softplus=True, return_final_states=True)
    assert y.dtype == dtype
    assert final.dtype == torch.float32
    # Ground truth: the same (rounded) inputs, run token by token in float64.
    ref_in = {k: v.to(F64) for k, v in inp.items()}
    y_ref, final_ref = ssd_sequential_ref(**ref_in, seq_idx=seq_idx, dt_softplus=True, return_final_states=True)
    y_err = (y.double() - y_ref).abs().max().item()
    s_err = (final.double() - final_ref).abs().max().item()
    assert y_err <= rel_bound * y_ref.abs().max().item(), y_err
    assert s_err <= rel_bound * final_ref.abs().max().item(), s_err
    grads = torch.autograd.grad(y.float().sum() + final.sum(), list(leaves.values()))
    for name, g in zip(leaves, grads, strict=True):
        assert g.dtype == dtype and torch.isfinite(g).all(), name


def test_shape_validation() -> None:
    inp = make_inputs(Case(G=3, H=4))
    with pytest.raises(ValueError, match="multiple of G"):
        ssd_chunk_scan_ref(**inp, chunk_size=8)
    inp = make_inputs(Case())
    with pytest.raises(ValueError, match="chunk_size"):
        ssd_chunk_scan_ref(**inp, chunk_size=0)


def test_dt_processing_order() -> None:
    """bias -> softplus -> clamp, applied before the scan (checked against pre-processed raw dt)."""
    case = Case(L=12, dt_bias=True, softplus=True, init=True)
    inp = make_inputs(case, seed=11)
    limit = (0.2, 0.7)
    dt_bias = inp.pop("dt_bias")
    dt_done = torch.log1p(torch.exp(inp["dt"] + dt_bias)).clamp(*limit)
    assert ((dt_done == limit[0]) | (dt_done == limit[1])).any(), "test data should hit the clamp"
    want = ssd_sequential_ref(**{**inp, "dt": dt_done})
    got = ssd_chunk_scan_ref(**inp, chunk_size=4, dt_bias=dt_bias, dt_softplus=True, dt_limit=limit)
    assert_close_f64(got, want, "y")


@pytest.mark.parametrize("d_shape", ["h", "hp"])
def test_skip_and_gate_formula(d_shape: str) -> None:
    """With B = 0 the state stays zero, so y = D * x * silu(z) exactly."""
    inp = make_inputs(Case(L=10, D=d_shape, z=True), seed=13)
    inp["B"] = torch.zeros_like(inp["B"])
    d = inp["D"] if d_shape == "hp" else inp["D"][:, None]
    want = d * inp["x"] * inp["z"] * torch.sigmoid(inp["z"])
    assert_close_f64(ssd_chunk_scan_ref(**inp, chunk_size=4), want, "y")
