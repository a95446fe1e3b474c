"""Summing gradients over the CP group, for users who do not fold CP into FSDP's shard axis."""

from __future__ import annotations

from collections import defaultdict

import torch
import torch.distributed as dist
import torch.nn as nn

from .groups import resolve_cp_group


def all_reduce_gradients(module: nn.Module, cp_group, bucket_bytes: int = 64 << 20) -> None:
    """Sum every parameter's ``.grad`` over ``cp_group`` in place (one collective per bucket).

    Under CP each rank holds the gradient of its own tokens' loss: the true gradient is the sum over the
    group (with the loss divided by the *global* target count, as :func:`mamba_cp.shard_batch` and ``labels=`` on a
    parallelized model arrange, the sum is the gradient of the whole batch's mean loss). Under FSDP2 over a mesh
    that includes the CP ranks, call :func:`mamba_cp.set_fsdp_gradient_divide_factor` instead. Gradients are
    flattened per dtype and device into buckets of at most ``bucket_bytes``.
    """
    group = resolve_cp_group(cp_group)
    if group.size == 1:
        return
    by_kind: dict[tuple, list[torch.Tensor]] = defaultdict(list)
    for p in module.parameters():
        if p.grad is not None:
            by_kind[(p.grad.dtype, p.grad.device)].append(p.grad)
    for grads in by_kind.values():
        bucket: list[torch.Tensor] = []
        size = 0
        for g in grads + [None]:
            if g is None or (bucket and size + g.numel() * g.element_size() > bucket_bytes):
                flat = torch.cat([b.reshape(-1) for b in bucket])
                dist.all_reduce(flat, group=group.group)
                offset = 0
                for b in bucket:
                    b.copy_(flat[offset : offset + b.numel()].view_as(b))
                    offset += b.numel()
                bucket, size = [], 0
            if g is not None:
                bucket.append(g)
                size += g.numel() * g.element_size()
