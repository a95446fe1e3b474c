"""Kernel calls cut to fit their kernels' index width: SSD scan, causal conv1d, gated RMSNorm.

mamba_ssm 2.3.2's Triton SSD and gated-norm kernels and the ``causal_conv1d`` package compute element
offsets in 32 bits; past that width they touch the wrong memory (an illegal access or silently wrong
values, upstream state-spaces/mamba#1015). The functions here cut one call into calls that each fit and
join the results, so the caller sees one call: the same outputs, final states and gradients (bitwise where
the arithmetic is the same, else to rounding). A call that fits is passed through untouched. Limits are
arguments (the dispatcher in :mod:`mamba_cp.kernels` passes each CUDA kernel its own), never module state.
Plans are computed from Python ints (shapes, strides); the per-call path has no host sync.

Findings per kernel (from the sources of mamba_ssm 2.3.2, causal-conv1d and our Triton conv)
-------------------------------------------------------------------------------------------
**mamba_ssm SSD** (``mamba_chunk_scan_combined``). Offsets are sums such as ``pid_b * stride_batch +
pid_c * chunk_size * stride_seqlen + pid_h * stride_head`` of int32 program ids and strides that Triton
types int32 whenever their value fits (int64 only for an argument of 2**31 or more). So offsets within a
batch row are int32, and across rows as well unless the batch stride itself reaches 2**31 (why
``[2, 256K, 128, 64]``, batch stride exactly 2**31, ran). Rule used here: every tensor of one call, all its
rows together, has at most ``limit`` elements (a view: its span). One call over ``b`` rows, ``c =
ceil(l / Q)`` chunks of ``Q`` tokens (``Lq = c * Q``), ``h`` heads in ``g`` groups receives or allocates::

    tensor                                             shape               elements       key
    x, z, y, y before the gate, dy, dx, dz             [b, l, h, P]        b*Lq*h*P       "x"
    processed dt, dA cumsum, ddt, ddA (fp32)           [b, h, c, Q](, T)   b*Lq*h*T       "dt"
    B, C, dB, dC                                       [b, l, g, N]        b*Lq*g*N       "bc"
    chunk states, passed states, dstates               [b, c, h, P, N]     b*c*h*P*N      "states"
    CB (C B^T per chunk), dCB (fp32)                   [b, c, g, Q, Q]     b*c*g*Q*Q      "cb"
    initial / final states                             [b, h, P, N]        b*h*P*N        "init"
    D partial sums (fp32), seq_idx                     [Q/32, b, c, h, P]  at most "x"

``T`` is 1, or ``ceil(max(P, N) / 16)`` per-tile copies in mamba_ssm's deterministic mode. dB, dC and dCB
carry a head-split factor above 1 only for calls with ``b * c * g`` below the SM count, where they stay
under ``SMs * Q * (h/g) * max(N, Q)`` elements (1.1e9 at 132 SMs, Q = N = 256, 128 heads per group), so it is
not modelled. What binds: "x" when N <= Q ("states" equals it at N = Q = 128), "states" when N > Q, "bc" and
"cb" only when g*N or g*Q exceeds h*P. Sequence pieces shrink every term but "init"; batch blocks shrink all;
head blocks shrink "x", "dt", "states"; group blocks "bc", "cb". CUDA's grid axis y holds ``b * c`` programs
(at most 65535: 8.4M tokens per row at chunk 128), also a limit per call.

**mamba_ssm gated RMSNorm** (``rmsnorm_fn``): offsets ``row * stride_row + group * N`` in int32, ``rstd``
of ``ngroups * rows`` entries; the backward walks rows by pointer increments from ``row_start *
stride_row`` (int32). The adapter this replaces was right (it copied views past the limit, then cut
``limit // D`` rows); :func:`rmsnorm_gated_split` cuts ``rows`` so that ``rows * D <= limit`` and, for a
view of row stride ``S``, ``(rows - 1) * S + D <= limit``: a strided ``z`` is read in place, not copied.

**causal_conv1d package** (its channel-last kernels, the layout our adapter passes): strides are stored
as ``uint32_t`` and offsets are ``int * uint32_t`` products added one by one to the pointer: unsigned
32-bit, so ``batch * batch_stride`` and ``token * token_stride`` must each stay below 2**32. Grid axis y
holds ``ceil(L / 64)`` forward programs: 4,194,240 tokens per call at most. Split by
:func:`causal_conv1d_split`: batch blocks, else one-row sequence pieces each read with a halo of ``K - 1``
tokens in front (with its ``seq_idx``, so the halo contributes nothing across a sequence start); the halo
outputs are dropped. Channels are not split: a channel slice of a long row spans the whole row (a copy).

**Our Triton conv** (:mod:`mamba_cp.kernels.triton_conv`): row offsets are ``pos.to(int64) * stride``,
batch offsets use an int64 program id, the partial-sum index ``b * n_t + pid_t`` is int64 (``b`` is),
channel offsets (``offs_c``, ``offs_c * 4`` into the weights) stay below ``4 * C`` and seq_idx loads are
``SEQ + b * stride + pos`` with int64 ``b``, and the history (``[B, 3, C]``) is read at
``b * stride + (pos + 3).to(int64) * stride``: no index limit. Its backward puts ``ceil(L / 256)`` programs
on grid axis y (16,776,960 tokens per call), so it runs through the conv splitter with ``limit=None``.

Cutting the SSD (:func:`ssd_chunk_scan_split`)
---------------------------------------------
Heads are independent: a block inside one B/C group passes that group's B/C slice, a block of whole groups
those groups. Along the sequence, pieces start at multiples of ``chunk_size`` (the chunks are the unsplit
call's) and the kernel's own final state of a piece is the next piece's ``initial_states``. mamba_ssm
attaches an initial state to sequence *id 0*, not to the first sequence of its call (its state passing
starts from id 0, ``where(seq_idx == 0)`` gates dinitial_states, the chunk scan compares chunk 0 with
``other=0``); the reference attaches it to the first sequence. So a later piece gets ``seq_idx`` minus the
id of the token before it (the continuing sequence is id 0 for both kernels) and the carried state times
``seq_idx[l0] == seq_idx[l0 - 1]`` (dropped where a sequence starts at the piece boundary): device-side.
The first piece gets the caller's ``seq_idx`` and ``initial_states`` as they are. ``seq_idx`` must be
non-decreasing along L, as for packed batches. Batch blocks are independent calls.

Memory: outputs are joined by one copy into ``y`` ``[B, L, H, P]`` (and the final states). The pieces live
on while the kernel saves them for backward (mamba_ssm keeps ``y`` when ``z`` is None), so a cut call holds
one more ``y`` until backward. Each input's gradient is written from the pieces into one tensor (one copy);
the pieces get views of the output's gradient, copied only where a view is past the limit. Inputs go in as
views, a view past the limit as a contiguous copy that the kernel saves for backward; so among the plans
that fit, the planner takes the one copying the fewest elements, then the fewest calls. A head block of a
row past the limit is such a view (its span is the whole row), so where a cut is needed the planner cuts
the sequence (free) rather than the heads (a copy of x and z); head blocks are used where they copy nothing.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

__all__ = [
    "GRID_YZ_LIMIT",
    "INT32_LIMIT",
    "UINT32_LIMIT",
    "ConvSplit",
    "SsdSplit",
    "causal_conv1d_split",
    "fit",
    "plan_conv_split",
    "plan_ssd_split",
    "rmsnorm_gated_split",
    "rmsnorm_rows_per_call",
    "span",
    "ssd_call_elements",
    "ssd_chunk_scan_split",
]

INT32_LIMIT = 2**31 - 1
"""Largest element offset of int32 indexing (mamba_ssm's Triton kernels)."""
UINT32_LIMIT = 2**32 - 1
"""Largest element offset of uint32 indexing (the causal_conv1d package)."""
GRID_YZ_LIMIT = 65535
"""CUDA's largest grid along axes y and z."""

Window = tuple[slice, ...]


def span(t: Tensor) -> int:
    """Elements from ``t``'s first to its last addressed element, inclusive (``numel`` when contiguous)."""
    return _span_of(t.shape, t.stride())


def _span_of(shape: Sequence[int], strides: Sequence[int]) -> int:
    if any(s == 0 for s in shape):
        return 0
    return 1 + sum((s - 1) * st for s, st in zip(shape, strides, strict=True))


def fit(t: Tensor | None, limit: int | None) -> Tensor | None:
    """``t``, or a contiguous copy when its span is past ``limit`` (``None`` passes through)."""
    if t is None or limit is None or span(t) <= limit:
        return t
    return t.contiguous()


def _check_limit(limit: int | None) -> None:
    if limit is not None and limit < 1:
        raise ValueError(f"limit must be a positive number of elements (or None), got {limit}")


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def _balanced(total: int, parts: int) -> list[int]:
    """``total`` cut into ``parts`` sizes differing by at most one, largest first."""
    q, rem = divmod(total, parts)
    return [q + 1] * rem + [q] * (parts - rem)


def _ranges(sizes: Sequence[int], start: int = 0) -> tuple[tuple[int, int], ...]:
    out, pos = [], start
    for s in sizes:
        out.append((pos, pos + s))
        pos += s
    return tuple(out)


# ------------------------------------------------------------------------------------------------ autograd


class _Windows(torch.autograd.Function):
    """Windows of one tensor, as views (a contiguous copy where a view's span is past ``limit``).

    Backward writes the windows' gradients into one tensor of the input's shape: one copy whatever the number
    of windows (slicing by hand gives each window's gradient a zero-filled tensor of the full shape).
    ``disjoint``: the windows partition the tensor (gradients are copied in, else added into zeros).
    """

    @staticmethod
    def forward(ctx, t: Tensor, windows: tuple[Window, ...], limit: int | None, disjoint: bool):
        ctx.set_materialize_grads(False)
        ctx.shape, ctx.windows, ctx.disjoint = t.shape, windows, disjoint
        return tuple(fit(t[w], limit) for w in windows)

    @staticmethod
    def backward(ctx, *grads):
        ref = next((g for g in grads if g is not None), None)
        if ref is None:
            return None, None, None, None
        full = ref.new_empty(ctx.shape) if ctx.disjoint else ref.new_zeros(ctx.shape)
        for w, g in zip(ctx.windows, grads, strict=True):
            if g is None:
                if ctx.disjoint:
                    full[w].zero_()
            elif ctx.disjoint:
                full[w].copy_(g)
            else:
                full[w].add_(g)
        return full, None, None, None


class _Assemble(torch.autograd.Function):
    """Blocks copied into one new tensor: ``out[dst[i]] = blocks[i][src[i]]`` (``src`` None: the whole block).

    Backward hands each block a view of the gradient, copied only where the view's span is past ``limit``
    or where the block has rows the output drops (a conv halo).
    """

    @staticmethod
    def forward(ctx, shape, dst: tuple[Window, ...], src: tuple[Window | None, ...], limit: int | None, *blocks):
        out = blocks[0].new_empty(shape)
        for d, s, blk in zip(dst, src, blocks, strict=True):
            out[d].copy_(blk if s is None else blk[s])
        ctx.dst, ctx.src, ctx.limit = dst, src, limit
        ctx.block_shapes = [blk.shape for blk in blocks]
        return out

    @staticmethod
    def backward(ctx, g: Tensor):
        grads = []
        for d, s, shape in zip(ctx.dst, ctx.src, ctx.block_shapes, strict=True):
            if s is None:
                grads.append(fit(g[d], ctx.limit))
            else:
                full = g.new_zeros(shape)
                full[s].copy_(g[d])
                grads.append(full)
        return (None, None, None, None, *grads)


def _assemble(shape, dst, blocks, limit, src=None) -> Tensor:
    if len(blocks) == 1 and src is None and tuple(blocks[0].shape) == tuple(shape):
        return blocks[0]
    return _Assemble.apply(tuple(shape), tuple(dst), tuple(src or (None,) * len(dst)), limit, *blocks)


# ------------------------------------------------------------------------------------------------ SSD


@dataclass(frozen=True, slots=True)
class SsdSplit:
    """How one SSD call is cut: ``[start, stop)`` ranges of batch rows, heads and tokens.

    Calls run for every (batch block, head block), over the token pieces in order.
    """

    batch: tuple[tuple[int, int], ...]
    heads: tuple[tuple[int, int], ...]
    pieces: tuple[tuple[int, int], ...]

    @property
    def calls(self) -> int:
        return len(self.batch) * len(self.heads) * len(self.pieces)


def ssd_call_elements(
    batch: int, seqlen: int, nheads: int, headdim: int, ngroups: int, dstate: int, chunk_size: int
) -> dict[str, int]:
    """Elements of the largest tensor of each kind one mamba_ssm SSD call receives or allocates (see the module
    docstring's table; keys ``x, dt, bc, states, cb, init``). ``seqlen`` tokens, rounded up to chunks."""
    nchunks = _cdiv(seqlen, chunk_size)
    tokens = nchunks * chunk_size
    tiles = _cdiv(max(headdim, dstate), 16)
    return {
        "x": batch * tokens * nheads * headdim,
        "dt": batch * tokens * nheads * tiles,
        "bc": batch * tokens * ngroups * dstate,
        "states": batch * nchunks * nheads * headdim * dstate,
        "cb": batch * nchunks * ngroups * chunk_size * chunk_size,
        "init": batch * nheads * headdim * dstate,
    }


def _ssd_call_fits(b, c, h, g, P, N, Q, limit) -> bool:
    return max(ssd_call_elements(b, c * Q, h, P, g, N, Q).values()) <= limit and b * c <= GRID_YZ_LIMIT


def _head_layouts(nheads: int, ngroups: int):
    """Candidate head blocks: ``(ranges, heads per block at most, groups per block at most)``."""
    per = nheads // ngroups
    seen = set()
    for n in range(1, ngroups + 1):  # blocks of whole groups
        sizes = _balanced(ngroups, n)
        if sizes[0] not in seen:
            seen.add(sizes[0])
            yield tuple((g0 * per, g1 * per) for g0, g1 in _ranges(sizes)), sizes[0] * per, sizes[0]
    seen = set()
    for m in range(2, per + 1):  # m blocks inside every group
        sizes = _balanced(per, m)
        if sizes[0] not in seen:
            seen.add(sizes[0])
            yield tuple((g * per + a, g * per + b) for g in range(ngroups) for a, b in _ranges(sizes)), sizes[0], 1


def _token_pieces(seqlen: int, chunk_size: int, n: int) -> tuple[tuple[int, int], ...]:
    """``n`` token ranges of whole chunks (the last ends at ``seqlen``), balanced by chunk count."""
    bounds = [min(e * chunk_size, seqlen) for _, e in _ranges(_balanced(_cdiv(seqlen, chunk_size), n))]
    return tuple(zip([0, *bounds[:-1]], bounds, strict=True))


@functools.lru_cache(maxsize=256)
def _plan_ssd(batch, seqlen, nheads, headdim, ngroups, dstate, chunk, limit, views) -> SsdSplit:
    nchunks = _cdiv(seqlen, chunk)
    whole = ((0, batch),), ((0, nheads),), ((0, seqlen),)
    if _ssd_call_fits(batch, nchunks, nheads, ngroups, headdim, dstate, chunk, limit):
        return SsdSplit(*whole)  # fits: one call, views past the limit copied as before
    best = None
    for heads, hmax, gmax in _head_layouts(nheads, ngroups):
        for nb in range(1, batch + 1):
            bmax = _cdiv(batch, nb)
            if (nb > 1 and _cdiv(batch, nb - 1) == bmax) or not _ssd_call_fits(
                bmax, 1, hmax, gmax, headdim, dstate, chunk, limit
            ):
                continue
            one_chunk = ssd_call_elements(bmax, chunk, hmax, headdim, gmax, dstate, chunk)
            per_chunk = max(v for k, v in one_chunk.items() if k != "init")  # the others grow with the chunks
            cmax = min(limit // per_chunk, GRID_YZ_LIMIT // bmax)
            n = _cdiv(nchunks, cmax)
            lmax = min(_cdiv(nchunks, n) * chunk, seqlen)
            window = {"x": (bmax, lmax, hmax, headdim), "dt": (bmax, lmax, hmax), "bc": (bmax, lmax, gmax, dstate)}
            copies = sum(numel for kind, strides, numel in views if _span_of(window[kind], strides) > limit)
            key = (copies, nb * len(heads) * n, n, len(heads))
            if best is None or key < best[0]:
                best = key, SsdSplit(_ranges(_balanced(batch, nb)), heads, _token_pieces(seqlen, chunk, n))
    if best is None:
        raise ValueError(
            f"no cut of the SSD call (B={batch}, L={seqlen}, H={nheads}, P={headdim}, G={ngroups}, N={dstate}, "
            f"chunk={chunk}) fits in limit={limit} elements: one chunk of one head of one row is already too large"
        )
    return best[1]


def plan_ssd_split(
    x: Tensor, dt: Tensor, B: Tensor, C: Tensor, chunk_size: int, z: Tensor | None = None, *, limit: int = INT32_LIMIT
) -> SsdSplit:
    """The cut of one SSD call (shapes as :func:`ssd_chunk_scan_split`) that fits ``limit`` with the fewest
    copied elements, then the fewest calls; one call when it fits. Strides count (meta tensors do)."""
    _check_ssd_args(x, B, chunk_size, limit)
    batch, seqlen, nheads, headdim = x.shape
    views = (("x", x.stride(), x.numel()), ("dt", dt.stride(), dt.numel()))
    views += (("bc", B.stride(), B.numel()), ("bc", C.stride(), C.numel()))
    if z is not None:
        views += (("x", z.stride(), z.numel()),)
    return _plan_ssd(batch, seqlen, nheads, headdim, B.shape[2], B.shape[3], chunk_size, limit, views)


def _check_ssd_args(x: Tensor, B: Tensor, chunk_size: int, limit: int | None) -> None:
    _check_limit(limit)
    if x.dim() != 4 or B.dim() != 4 or B.shape[:2] != x.shape[:2]:
        raise ValueError(f"x must be [B, L, H, P] and B [B, L, G, N], got {tuple(x.shape)} and {tuple(B.shape)}")
    if x.shape[2] % B.shape[2] != 0:
        raise ValueError(f"H={x.shape[2]} must be a multiple of G={B.shape[2]}")
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")


def _check_cover(ranges, total: int, what: str) -> None:
    if not ranges or ranges[0][0] != 0 or ranges[-1][1] != total:
        raise ValueError(f"{what} ranges {ranges} must cover [0, {total})")
    for (_, a1), (b0, _) in zip(ranges, ranges[1:], strict=False):
        if a1 != b0:
            raise ValueError(f"{what} ranges {ranges} must be contiguous")
    if any(a >= b for a, b in ranges):
        raise ValueError(f"{what} ranges {ranges} must be non-empty")


def _check_ssd_split(split: SsdSplit, shape, ngroups: int, chunk_size: int) -> None:
    batch, seqlen, nheads, _ = shape
    per = nheads // ngroups
    _check_cover(split.batch, batch, "batch")
    _check_cover(split.heads, nheads, "head")
    _check_cover(split.pieces, seqlen, "token")
    for h0, h1 in split.heads:
        if h0 // per != (h1 - 1) // per and (h0 % per or h1 % per):
            raise ValueError(f"head block [{h0}, {h1}) must lie inside one group of {per} heads or be whole groups")
    for l0, _ in split.pieces[1:]:
        if l0 % chunk_size:
            raise ValueError(f"token pieces must start at multiples of chunk_size={chunk_size}, got {l0}")


def _groups_of(h0: int, h1: int, per: int) -> tuple[int, int]:
    """The B/C groups a head block ``[h0, h1)`` reads (``per`` heads per group)."""
    return h0 // per, _cdiv(h1, per)


def _piece_seq_idx(seq_idx: Tensor | None, rows: slice, l0: int, l1: int) -> Tensor | None:
    """``seq_idx`` of a piece, relative to the id of the token before it: the sequence a carried state belongs
    to becomes id 0, the id both kernels attach an initial state to."""
    if seq_idx is None:
        return None
    piece = seq_idx[rows, l0:l1]
    return piece if l0 == 0 else piece - seq_idx[rows, l0 - 1 : l0]


def _carried_state(state: Tensor, seq_idx: Tensor | None, rows: slice, l0: int) -> Tensor:
    """A piece's final state as the next piece's initial state, zero in rows where a sequence starts at ``l0``."""
    if seq_idx is None:
        return state
    keep = seq_idx[rows, l0] == seq_idx[rows, l0 - 1]  # [b], on device
    return state * keep.to(state.dtype)[:, None, None, None]


def ssd_chunk_scan_split(
    kernel: Callable,
    x: Tensor,
    dt: Tensor,
    A: Tensor,
    B: Tensor,
    C: Tensor,
    chunk_size: int,
    D: Tensor | None = None,
    z: Tensor | None = None,
    dt_bias: Tensor | None = None,
    initial_states: Tensor | None = None,
    seq_idx: Tensor | None = None,
    dt_softplus: bool = False,
    dt_limit: tuple[float, float] = (0.0, math.inf),
    return_final_states: bool = False,
    *,
    limit: int = INT32_LIMIT,
    split: SsdSplit | None = None,
):
    """``kernel`` (signature of :func:`mamba_cp.kernels.ssd_chunk_scan`) run in calls whose tensors fit ``limit``.

    ``x`` ``[B, L, H, P]``, ``dt`` ``[B, L, H]``, ``A`` ``[H]``, ``B``/``C`` ``[B, L, G, N]``, ``D`` ``[H]`` or
    ``[H, P]``, ``z`` ``[B, L, H, P]``, ``dt_bias`` ``[H]``, ``initial_states`` ``[B, H, P, N]``, ``seq_idx``
    ``[B, L]`` (non-decreasing) -> ``y`` ``[B, L, H, P]`` (and the final states ``[B, H, P, N]``). ``split``
    overrides the plan of :func:`plan_ssd_split`. One call that fits is ``kernel``'s own call, untouched.
    """
    if split is None:
        split = plan_ssd_split(x, dt, B, C, chunk_size, z, limit=limit)
    else:
        _check_ssd_args(x, B, chunk_size, limit)
        _check_ssd_split(split, x.shape, B.shape[2], chunk_size)
    opts = {"dt_softplus": dt_softplus, "dt_limit": dt_limit}
    if split.calls == 1:
        return kernel(
            x, dt, A, B, C, chunk_size, D=D, z=z, dt_bias=dt_bias, initial_states=initial_states, seq_idx=seq_idx,
            return_final_states=return_final_states, **opts,
        )  # fmt: skip

    per = x.shape[2] // B.shape[2]
    calls = [(rows, heads, piece) for rows in split.batch for heads in split.heads for piece in split.pieces]
    windows = tuple((slice(*r), slice(*p), slice(*h)) for r, h, p in calls)
    group_windows = {(r, p, _groups_of(*h, per)): None for r, h, p in calls}  # distinct, in call order
    group_index = {key: i for i, key in enumerate(group_windows)}
    bc_windows = tuple((slice(*r), slice(*p), slice(*g)) for r, p, g in group_windows)
    xs = _Windows.apply(x, windows, limit, True)
    dts = _Windows.apply(dt, windows, limit, True)
    zs = _Windows.apply(z, windows, limit, True) if z is not None else (None,) * len(calls)
    Bs = _Windows.apply(B, bc_windows, limit, True)
    Cs = _Windows.apply(C, bc_windows, limit, True)

    ys, finals = [], []
    i = 0
    for r in split.batch:
        rows = slice(*r)
        for h0, h1 in split.heads:
            heads = slice(h0, h1)
            state = initial_states[rows, heads] if initial_states is not None else None
            for k, (l0, l1) in enumerate(split.pieces):
                last = k == len(split.pieces) - 1
                if k > 0:
                    state = _carried_state(state, seq_idx, rows, l0)
                j = group_index[(r, (l0, l1), _groups_of(h0, h1, per))]
                out = kernel(
                    xs[i], dts[i], A[heads], Bs[j], Cs[j], chunk_size,
                    D=D[heads] if D is not None else None, z=zs[i],
                    dt_bias=dt_bias[heads] if dt_bias is not None else None, initial_states=state,
                    seq_idx=_piece_seq_idx(seq_idx, rows, l0, l1),
                    return_final_states=return_final_states or not last, **opts,
                )  # fmt: skip
                y, state = out if (return_final_states or not last) else (out, None)
                ys.append(y)
                i += 1
            if return_final_states:
                finals.append(state)
    y = _assemble(x.shape, windows, ys, limit)
    if not return_final_states:
        return y
    state_windows = [(slice(*r), slice(*h)) for r in split.batch for h in split.heads]
    final_shape = (x.shape[0], x.shape[2], x.shape[3], B.shape[3])
    return y, _assemble(final_shape, state_windows, finals, limit)


# ------------------------------------------------------------------------------------------------ conv


@dataclass(frozen=True, slots=True)
class ConvSplit:
    """How one conv call is cut: ``[start, stop)`` ranges of batch rows and of tokens (each read with a halo)."""

    batch: tuple[tuple[int, int], ...]
    pieces: tuple[tuple[int, int], ...]

    @property
    def calls(self) -> int:
        return len(self.batch) * len(self.pieces)


def plan_conv_split(
    batch: int,
    seqlen: int,
    channels: int,
    width: int,
    *,
    limit: int | None = INT32_LIMIT,
    max_tokens: int | None = None,
    max_batch: int = GRID_YZ_LIMIT,
    strides: tuple[int, int] | None = None,
) -> ConvSplit:
    """Fewest conv calls of at most ``limit`` elements per tensor (``None``: no index limit), ``max_tokens``
    tokens (halo included) and ``max_batch`` rows each: whole rows in batch blocks when a row fits, else one row
    per call in token pieces. ``strides``: ``x``'s (batch, token) strides, so that its windows fit as views."""
    _check_limit(limit)
    halo = width - 1
    cap = max_tokens if max_tokens is not None else seqlen + halo
    token_stride = max(channels, strides[1] if strides else channels)  # elements a window spans per token
    row = max(seqlen * token_stride, strides[0] if strides else 0)
    if seqlen <= cap and (limit is None or row <= limit):
        per = min(batch, max_batch, limit // max(row, 1) if limit is not None else batch)
        return ConvSplit(_ranges(_balanced(batch, _cdiv(batch, per))), ((0, seqlen),))
    tokens = min(cap, limit // token_stride if limit is not None else cap) - halo
    if tokens < 1:
        raise ValueError(f"a conv piece of {channels} channels and a {halo}-token halo does not fit limit={limit}")
    return ConvSplit(_ranges([1] * batch), _ranges(_balanced(seqlen, _cdiv(seqlen, tokens))))


def _window_start(l0: int, halo: int) -> int:
    """First token a piece starting at ``l0`` reads: ``halo`` tokens before it (none before token 0)."""
    return max(l0 - halo, 0)


def causal_conv1d_split(
    conv: Callable,
    x: Tensor,
    weight: Tensor,
    bias: Tensor | None = None,
    seq_idx: Tensor | None = None,
    activation: str | None = "silu",
    *,
    limit: int | None = INT32_LIMIT,
    max_tokens: int | None = None,
    max_batch: int = GRID_YZ_LIMIT,
    split: ConvSplit | None = None,
    history: Tensor | None = None,
    history_seq_idx: Tensor | None = None,
) -> Tensor:
    """``conv`` (signature of :func:`mamba_cp.kernels.causal_conv1d`) in calls that fit (see :func:`plan_conv_split`).

    ``x`` ``[B, L, C]``, ``weight`` ``[C, K]``, ``bias`` ``[C]``, ``seq_idx`` ``[B, L]`` -> ``[B, L, C]``. A token
    piece reads its ``K - 1`` tokens before it and drops their outputs; ``seq_idx`` goes along, so the halo is
    masked where a sequence starts inside it. ``history`` ``[B, K-1, C]`` (and its ids ``[B, K-1]``) goes to the
    pieces whose window starts at token 0, cut by the same row blocks. One call that fits is ``conv``'s own call,
    untouched.
    """
    if x.dim() != 3 or weight.dim() != 2:
        raise ValueError(f"x must be [B, L, C] and weight [C, K], got {tuple(x.shape)} and {tuple(weight.shape)}")
    batch, seqlen, channels = x.shape
    if split is None:
        split = plan_conv_split(
            batch, seqlen, channels, weight.shape[1], limit=limit, max_tokens=max_tokens, max_batch=max_batch,
            strides=(x.stride(0), x.stride(1)),
        )  # fmt: skip
    else:
        _check_cover(split.batch, batch, "batch")
        _check_cover(split.pieces, seqlen, "token")
    hist = {} if history is None else {"history": history, "history_seq_idx": history_seq_idx}
    if split.calls == 1:
        return conv(x, weight, bias, seq_idx=seq_idx, activation=activation, **hist)
    halo = weight.shape[1] - 1
    windows, dst, src, hists = [], [], [], []
    for r in split.batch:
        for l0, l1 in split.pieces:
            s0 = _window_start(l0, halo)
            windows.append((slice(*r), slice(s0, l1)))
            dst.append((slice(*r), slice(l0, l1)))
            src.append(None if s0 == l0 else (slice(None), slice(l0 - s0, None)))
            # A window that starts at token 0 reads the history (also for a piece starting inside the first K-1).
            hists.append({k: None if v is None else v[slice(*r)] for k, v in hist.items()} if s0 == 0 else {})
    disjoint = all(s is None for s in src)
    xs = _Windows.apply(x, tuple(windows), limit, disjoint)
    outs = [
        conv(xw, weight, bias, seq_idx=seq_idx[w] if seq_idx is not None else None, activation=activation, **h)
        for xw, w, h in zip(xs, windows, hists, strict=True)
    ]
    return _assemble(x.shape, dst, outs, limit, src=src)


# ------------------------------------------------------------------------------------------------ norm


def rmsnorm_rows_per_call(dim: int, row_strides: Sequence[int], limit: int) -> int:
    """Rows of ``dim`` channels one norm call may take: ``rows * dim <= limit`` (outputs, gradients) and
    ``(rows - 1) * S + dim <= limit`` for every input read in place with row stride ``S``."""
    rows = limit // dim
    for stride in row_strides:
        rows = min(rows, (limit - dim) // max(stride, 1) + 1)
    if rows < 1:
        raise ValueError(f"one row of {dim} channels does not fit limit={limit}")
    return rows


def rmsnorm_gated_split(
    norm: Callable,
    x: Tensor,
    z: Tensor | None,
    weight: Tensor,
    eps: float = 1e-5,
    group_size: int | None = None,
    norm_before_gate: bool = False,
    *,
    limit: int = INT32_LIMIT,
) -> Tensor:
    """``norm`` (signature of :func:`mamba_cp.kernels.norm_reference.rmsnorm_gated_ref`) over ``x``/``z``
    ``[..., D]`` in row blocks that fit ``limit``; rows are independent, so the blocks are exact. When all rows
    fit one call, views past the limit are copied and the call is ``norm``'s own."""
    _check_limit(limit)
    dim = x.shape[-1]
    rows = x.numel() // dim if dim else 0
    if rows * dim <= limit:
        return norm(fit(x, limit), fit(z, limit), weight, eps, group_size, norm_before_gate)
    x2 = x.reshape(rows, dim)
    z2 = z.reshape(rows, dim) if z is not None else None
    strides = [x2.stride(0)] + ([z2.stride(0)] if z2 is not None else [])
    step = rmsnorm_rows_per_call(dim, strides, limit)
    windows = tuple((slice(i, min(i + step, rows)),) for i in range(0, rows, step))
    xs = _Windows.apply(x2, windows, limit, True)
    zs = _Windows.apply(z2, windows, limit, True) if z2 is not None else (None,) * len(windows)
    outs = [norm(xb, zb, weight, eps, group_size, norm_before_gate) for xb, zb in zip(xs, zs, strict=True)]
    return _assemble((rows, dim), windows, outs, limit).reshape(x.shape)
