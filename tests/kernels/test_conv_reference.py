"""causal_conv1d_ref vs an independent F.conv1d formulation run on each packed sequence separately."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from mamba_cp.kernels.conv_reference import causal_conv1d_ref

F64 = torch.float64


def conv1d_per_sequence(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    seq_idx: torch.Tensor | None,
    activation: str | None,
) -> torch.Tensor:
    """Independent formula: grouped conv1d with K-1 left zero padding on each contiguous run of ids."""
    batch, seqlen, _ = x.shape
    width = weight.shape[1]
    rows = []
    for b in range(batch):
        ids = [0] * seqlen if seq_idx is None else seq_idx[b].tolist()
        starts = [t for t in range(seqlen) if t == 0 or ids[t] != ids[t - 1]] + [seqlen]
        pieces = []
        for s, e in zip(starts[:-1], starts[1:], strict=True):
            seg = F.pad(x[b, s:e].T, (width - 1, 0))  # [C, K-1 + len]
            pieces.append(F.conv1d(seg[None], weight[:, None, :], bias, groups=x.shape[2])[0].T)
        rows.append(torch.cat(pieces, dim=0))
    out = torch.stack(rows)
    return F.silu(out) if activation == "silu" else out


SEQ_ROWS = {
    "no_seq": None,
    # Lengths 1 and 2 (< K) sequences, a boundary at t=1, and the last token alone.
    "seq_short_and_len1": [[1, 2, 5, 3, 1, 6, 1], [9, 1, 4, 5]],
    "seq_one_per_row": [[19], [19]],
}


def make_seq_idx(rows: list[list[int]] | None) -> torch.Tensor | None:
    if rows is None:
        return None
    return torch.tensor([[i for i, n in enumerate(r) for _ in range(n)] for r in rows], dtype=torch.int32)


@pytest.mark.parametrize("seq", list(SEQ_ROWS), ids=list(SEQ_ROWS))
@pytest.mark.parametrize("activation", [None, "silu"], ids=["act_none", "act_silu"])
@pytest.mark.parametrize("with_bias", [False, True], ids=["no_bias", "bias"])
@pytest.mark.parametrize("width", [2, 4], ids=["K2", "K4"])
def test_matches_conv1d(width: int, with_bias: bool, activation: str | None, seq: str) -> None:
    gen = torch.Generator().manual_seed(width * 10 + with_bias)
    batch, seqlen, channels = 2, 19, 6
    x = torch.randn(batch, seqlen, channels, generator=gen, dtype=F64, requires_grad=True)
    weight = torch.randn(channels, width, generator=gen, dtype=F64, requires_grad=True)
    bias = torch.randn(channels, generator=gen, dtype=F64, requires_grad=True) if with_bias else None
    seq_idx = make_seq_idx(SEQ_ROWS[seq])

    got = causal_conv1d_ref(x, weight, bias, seq_idx=seq_idx, activation=activation)
    want = conv1d_per_sequence(x, weight, bias, seq_idx, activation)
    assert got.dtype == F64
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)

    leaves = [t for t in (x, weight, bias) if t is not None]
    w = torch.randn(got.shape, generator=gen, dtype=F64)
    g_got = torch.autograd.grad((got * w).sum(), leaves)
    g_want = torch.autograd.grad((want * w).sum(), leaves)
    for a, b in zip(g_got, g_want, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


def test_kernel_wider_than_sequence() -> None:
    x = torch.randn(1, 3, 4, dtype=F64)
    weight = torch.randn(4, 4, dtype=F64)
    torch.testing.assert_close(
        causal_conv1d_ref(x, weight, activation=None), conv1d_per_sequence(x, weight, None, None, None)
    )


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=["bf16", "fp32"])
def test_low_precision_smoke(dtype: torch.dtype) -> None:
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(2, 16, 8, generator=gen).to(dtype)
    weight = torch.randn(8, 4, generator=gen).to(dtype)
    bias = torch.randn(8, generator=gen).to(dtype)
    seq_idx = make_seq_idx([[5, 11], [16]])
    out = causal_conv1d_ref(x, weight, bias, seq_idx=seq_idx)
    assert out.dtype == dtype
    want = conv1d_per_sequence(x.double(), weight.double(), bias.double(), seq_idx, "silu")
    torch.testing.assert_close(out.double(), want, rtol=1e-2, atol=1e-2)


def test_bad_activation() -> None:
    with pytest.raises(ValueError, match="activation"):
        causal_conv1d_ref(torch.zeros(1, 4, 2), torch.zeros(2, 3), activation="relu")


# ------------------------------------------------------------------------------------------------ history


def conv1d_with_history(x, weight, bias, seq_idx, history, history_ids, activation) -> torch.Tensor:
    """Independent formula: F.conv1d over each row's first run of ids with the history rows in front of it (rows of
    another sequence zeroed, positions kept), the later runs zero-padded as in :func:`conv1d_per_sequence`."""
    batch, seqlen, _ = x.shape
    rows = []
    for b in range(batch):
        ids = [0] * seqlen if seq_idx is None else seq_idx[b].tolist()
        first = next((t for t in range(seqlen) if ids[t] != ids[0]), seqlen)
        keep = torch.ones(history.shape[1], 1, dtype=x.dtype)
        if seq_idx is not None:
            keep = (history_ids[b] == ids[0]).to(x.dtype)[:, None]
        head = torch.cat([history[b] * keep, x[b, :first]]).T  # [C, K-1 + first]
        out = F.conv1d(head[None], weight[:, None, :], bias, groups=x.shape[2])[0].T
        if first < seqlen:
            rest_ids = None if seq_idx is None else seq_idx[b : b + 1, first:]
            out = torch.cat([out, conv1d_per_sequence(x[b : b + 1, first:], weight, bias, rest_ids, None)[0]])
        rows.append(out)
    out = torch.stack(rows)
    return F.silu(out) if activation == "silu" else out


HISTORY_CASES = {
    # (seq rows or None, history ids per row or None): the history continues the first sequence, starts one
    # inside it, or belongs wholly to other sequences.
    "no_seq": (None, None),
    "seq_continues_and_not": ([[3, 4, 1], [1, 7]], [[0, 0, 0, 0], [-2, -1, -1, 0]]),
    "seq_row_starts_fresh": ([[8], [2, 6]], [[-1, -1, -1, -1], [-3, -2, -1, -1]]),
}


@pytest.mark.parametrize("case", list(HISTORY_CASES), ids=list(HISTORY_CASES))
@pytest.mark.parametrize("width", [2, 3, 4, 5], ids=["K2", "K3", "K4", "K5"])
def test_history_matches_the_formula_and_the_window(case: str, width: int) -> None:
    """``history`` against an independent formula, and :func:`history_by_window` (a conv without history, then
    its first outputs recomputed from windows) against both, values and every gradient (float64)."""
    from mamba_cp.kernels.conv_reference import history_by_window

    gen = torch.Generator().manual_seed(width)
    rows, hist_ids = HISTORY_CASES[case]
    seq_idx = make_seq_idx(rows)
    seqlen = 8 if seq_idx is None else seq_idx.shape[1]
    x = torch.randn(2, seqlen, 5, generator=gen, dtype=F64, requires_grad=True)
    weight = torch.randn(5, width, generator=gen, dtype=F64, requires_grad=True)
    bias = torch.randn(5, generator=gen, dtype=F64, requires_grad=True)
    history = torch.randn(2, width - 1, 5, generator=gen, dtype=F64, requires_grad=True)
    ids = None if hist_ids is None else torch.tensor([r[4 - (width - 1) :] for r in hist_ids], dtype=torch.int32)
    kw = dict(seq_idx=seq_idx, activation="silu", history=history, history_seq_idx=ids)
    got = causal_conv1d_ref(x, weight, bias, **kw)
    want = conv1d_with_history(x, weight, bias, seq_idx, history, ids, "silu")
    window = history_by_window(causal_conv1d_ref, x, weight, bias, seq_idx, "silu", history, ids)
    gy = torch.randn(got.shape, generator=gen, dtype=F64)
    leaves = (x, weight, bias, history)
    grads = torch.autograd.grad(got, leaves, gy, retain_graph=True)
    fresh = case == "seq_row_starts_fresh"  # the history is of other sequences: read as zeros, no gradient
    assert (float(grads[3].abs().sum()) == 0) == fresh
    for other in (want, window):
        torch.testing.assert_close(got, other, rtol=1e-13, atol=1e-13)
        for a, b in zip(grads, torch.autograd.grad(other, leaves, gy), strict=True):
            torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


def test_history_shorter_sequence_than_the_filter_and_double_backward() -> None:
    """One token after a 3-token history (the window is longer than the row), gradcheck and gradgradcheck."""
    from mamba_cp.kernels.conv_reference import history_by_window

    gen = torch.Generator().manual_seed(1)
    args = [torch.randn(s, generator=gen, dtype=F64, requires_grad=True) for s in ((2, 1, 3), (3, 4), (3,), (2, 3, 3))]
    torch.autograd.gradcheck(lambda x, w, b, h: causal_conv1d_ref(x, w, b, history=h), args)
    torch.autograd.gradgradcheck(lambda x, w, b, h: causal_conv1d_ref(x, w, b, history=h), args)
    x, w, b, h = args
    torch.testing.assert_close(
        causal_conv1d_ref(x, w, b, history=h), history_by_window(causal_conv1d_ref, x, w, b, None, "silu", h, None)
    )


@pytest.mark.parametrize(
    "kw,match",
    [
        (dict(history=torch.zeros(2, 2, 3)), r"history must be \[B, K-1, C\]=\(2, 3, 3\)"),
        (dict(history=torch.zeros(2, 3, 3, dtype=F64)), "history must be torch.float32"),
        (dict(history_seq_idx=torch.zeros(2, 3)), "without history"),
        (dict(history=torch.zeros(2, 3, 3), history_seq_idx=torch.zeros(2, 3)), "needs seq_idx"),
        (
            dict(history=torch.zeros(2, 3, 3), history_seq_idx=torch.zeros(2, 2), seq_idx=torch.zeros(2, 5)),
            r"history_seq_idx must be \[B, K-1\]=\(2, 3\)",
        ),
        (
            dict(history=torch.zeros(2, 3, 3), history_seq_idx=torch.full((2, 3), 0.5), seq_idx=torch.zeros(2, 5)),
            "history_seq_idx must be int32 or int64",
        ),
    ],
)
def test_bad_history(kw: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        causal_conv1d_ref(torch.zeros(2, 5, 3), torch.zeros(3, 4), **kw)


def test_history_of_an_empty_row_and_bad_ranks() -> None:
    """``L = 0`` with a history and ``seq_idx``: an empty output, a zero history gradient; wrong ranks are a
    ValueError from the dispatcher before any kernel."""
    from mamba_cp import kernels

    h = torch.randn(2, 3, 4, dtype=F64, requires_grad=True)
    out = kernels.causal_conv1d(torch.zeros(2, 0, 4, dtype=F64), torch.ones(4, 4, dtype=F64), None,
                                torch.zeros(2, 0, dtype=torch.int32), history=h)  # fmt: skip
    assert out.shape == (2, 0, 4)
    assert torch.equal(torch.autograd.grad(out.sum(), h)[0], torch.zeros_like(h))
    with pytest.raises(ValueError, match=r"x must be \[B, L, C\] and weight \[C, K\]"):
        kernels.causal_conv1d(torch.zeros(5, 4), torch.zeros(4, 4), history=torch.zeros(5, 3, 4))
