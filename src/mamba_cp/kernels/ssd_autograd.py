"""mamba_ssm's Triton SSD under an autograd Function that saves only what its backward reads.

mamba_ssm 2.3.2's ``MambaChunkScanCombinedFn`` saves its output ``out`` ``[B, L, H, P]`` for the backward pass,
which reads it only when a gate ``z`` is given (for ``dz``; otherwise just its shape), and its chunk cumsum
``[B, H, L/Q, Q]``, which the backward recomputes. Where the library passes the output on (hidden-parallel sends
it through an all-to-all; state passing's packs cut per document add the incoming states' part in another kernel),
the saved ``out`` is a second ``[B, L, H, P]`` activation per layer that nothing reads: 16 KB per token in bfloat16
for 128 heads of 64. Where the norm takes it directly, saving it only keeps it alive past the norm's backward.

:class:`ChunkScan` runs the package's own forward and backward functions (``_mamba_chunk_scan_combined_fwd`` /
``_bwd``: the same kernels, the same arithmetic, the same gradients) and saves the gated output only when ``z`` is
given. :func:`chunk_scan` has the public ``mamba_chunk_scan_combined`` signature (without the varlen states), so
it drops in behind :func:`mamba_cp.kernels.cuda.ssd_chunk_scan_cuda` and the index-width splitter.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

__all__ = ["ChunkScan", "chunk_scan", "load"]


def load() -> tuple[Callable, Callable] | None:
    """mamba_ssm's SSD forward and backward functions, or None when they do not import (another version)."""
    try:
        from mamba_ssm.ops.triton.ssd_combined import _mamba_chunk_scan_combined_bwd, _mamba_chunk_scan_combined_fwd
    except Exception:  # noqa: BLE001 - any failure to import means "not available"
        return None
    return _mamba_chunk_scan_combined_fwd, _mamba_chunk_scan_combined_bwd


class ChunkScan(torch.autograd.Function):
    """``y`` (and the final states) of mamba_ssm's SSD; saves ``x, dt, A, B, C, D, z, dt_bias, initial_states,
    seq_idx`` and, with ``z`` only, the pre-gate output."""

    @staticmethod
    def forward(ctx, x, dt, A, B, C, chunk_size, D, z, dt_bias, initial_states, seq_idx, dt_softplus, dt_limit, final):
        fwd, _ = load()  # an import already made (the caller checked that it works): a dictionary lookup
        out, out_x, *_, final_states = fwd(
            x, dt, A, B, C, chunk_size, D=D, z=z, dt_bias=dt_bias, initial_states=initial_states, seq_idx=seq_idx,
            dt_softplus=dt_softplus, dt_limit=dt_limit,
        )  # fmt: skip
        ctx.save_for_backward(out_x if z is not None else None, x, dt, A, B, C, D, z, dt_bias, initial_states, seq_idx)
        ctx.chunk_size, ctx.dt_softplus, ctx.dt_limit, ctx.final = chunk_size, dt_softplus, dt_limit, final
        return (out, final_states) if final else out

    @staticmethod
    def backward(ctx, dout, *dfinal):
        out_x, x, dt, A, B, C, D, z, dt_bias, initial_states, seq_idx = ctx.saved_tensors
        # Without z the backward reads ``out`` for its shape only: ``x`` has that shape.
        dx, ddt, dA, dB, dC, dD, dz, ddt_bias, dinit = load()[1](
            dout, x, dt, A, B, C, out_x if z is not None else x, ctx.chunk_size, D=D, z=z, dt_bias=dt_bias,
            initial_states=initial_states, dfinal_states=dfinal[0] if ctx.final else None, seq_idx=seq_idx,
            dt_softplus=ctx.dt_softplus, dt_limit=ctx.dt_limit,
        )  # fmt: skip
        return dx, ddt, dA, dB, dC, None, dD, dz, ddt_bias, dinit, None, None, None, None


def chunk_scan(
    x: torch.Tensor,
    dt: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    chunk_size: int,
    D: torch.Tensor | None = None,
    z: torch.Tensor | None = None,
    dt_bias: torch.Tensor | None = None,
    initial_states: torch.Tensor | None = None,
    seq_idx: torch.Tensor | None = None,
    dt_softplus: bool = False,
    dt_limit: tuple[float, float] = (0.0, float("inf")),
    return_final_states: bool = False,
):
    """``mamba_chunk_scan_combined`` through :class:`ChunkScan` (where :func:`load` finds the functions): ``x``
    ``[B, L, H, P]``, ``dt`` ``[B, L, H]``, ``A`` ``[H]``, ``B``/``C`` ``[B, L, G, N]`` -> ``y`` ``[B, L, H, P]``
    (and the final states ``[B, H, P, N]`` float32)."""
    return ChunkScan.apply(
        x, dt, A, B, C, chunk_size, D, z, dt_bias, initial_states, seq_idx, dt_softplus, tuple(dt_limit),
        return_final_states,
    )  # fmt: skip
