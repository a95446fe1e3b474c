"""A mixer forward written only against the spec's API (as NeMo AutoModel's models use it) is exact."""

import copy

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F

import mamba_cp
from mamba_cp import MambaContextParallel, kernels
from mamba_cp.testing import run_on_ranks
from mamba_cp.testing.parity import ParityCase, build_mixer


def spec_style_forward(mixer, cpx: MambaContextParallel, hidden_states, cu_seqlens=None):
    """in_proj -> pre_conv_ssm -> conv (sliced weights) -> SSD (sliced params) -> gate -> post_conv_ssm -> norm."""
    squeeze = hidden_states.dim() == 2
    h = hidden_states.unsqueeze(0) if squeeze else hidden_states
    local = cpx.pre_conv_ssm(mixer.in_proj(h), cu_seqlens)  # [B, L, z|x|B|C|dt of this rank]
    d, gn, heads = cpx.d_inner_local, cpx.n_groups_local * cpx.d_state, cpx.num_heads_local
    z, xBC, dt = torch.split(local, [d, d + 2 * gn, heads], dim=-1)
    seq_idx = None
    if cu_seqlens is not None:
        seq_idx = torch.bucketize(torch.arange(local.shape[1]), cu_seqlens[1:].long(), right=True)[None]
    xBC = kernels.causal_conv1d(xBC, cpx.get_conv1d_weight(), cpx.get_conv1d_bias(), seq_idx, "silu")
    x, B, C = torch.split(xBC, [d, gn, gn], dim=-1)
    b, length = x.shape[:2]
    y = kernels.ssd_chunk_scan(
        x.reshape(b, length, heads, cpx.head_dim),
        dt,
        -torch.exp(cpx.get_A_log()),
        B.reshape(b, length, cpx.n_groups_local, cpx.d_state),
        C.reshape(b, length, cpx.n_groups_local, cpx.d_state),
        mixer.chunk_size,
        D=cpx.get_D(),
        dt_bias=cpx.get_dt_bias(),
        seq_idx=seq_idx,
        dt_softplus=True,
    ).reshape(b, length, d)
    y = cpx.post_conv_ssm(y * F.silu(z), cu_seqlens)  # gate on the head-sharded side, then come back
    out = mixer.out_proj(mixer.norm(y))  # grouped RMSNorm over the full width
    return out.squeeze(0) if squeeze else out


def _spec_worker(rank, world, layout):
    case = ParityCase(layout=layout, num_heads=4, n_groups=1 if world == 4 else 2)
    mixer = build_mixer(case, torch.device("cpu"))
    reference = copy.deepcopy(mixer)
    cpx = MambaContextParallel(dist.group.WORLD, mixer.num_heads, mixer.head_dim, mixer.n_groups, 8, mixer)
    gen = torch.Generator().manual_seed(3)
    if layout == "bshd":
        x, cu, seq_dim = torch.randn(2, 32, 16, generator=gen, dtype=torch.float64), None, 1
    else:
        cu = torch.tensor([0, 16, 24, 48], dtype=torch.int32)
        x, seq_dim = torch.randn(48, 16, generator=gen, dtype=torch.float64), 0
    x_local = mamba_cp.shard(x, world, rank, seq_dim, cu).requires_grad_(True)
    out = spec_style_forward(mixer, cpx, x_local, cu)
    out.pow(2).sum().backward()
    mamba_cp.all_reduce_gradients(mixer, dist.group.WORLD)
    x_ref = x.clone().requires_grad_(True)
    ref_out = reference(x_ref, cu)
    ref_out.pow(2).sum().backward()
    errors = [(out - mamba_cp.shard(ref_out, world, rank, seq_dim, cu)).abs().max()]
    errors.append((x_local.grad - mamba_cp.shard(x_ref.grad, world, rank, seq_dim, cu)).abs().max())
    errors += [(p.grad - q.grad).abs().max() for p, q in zip(mixer.parameters(), reference.parameters(), strict=True)]
    return max(float(e) for e in errors)


@pytest.mark.parametrize("cp", [2, 4])
@pytest.mark.parametrize("layout", ["bshd", "thd"])
def test_spec_style_forward_is_exact(cp, layout):
    assert max(run_on_ranks(_spec_worker, cp, layout)) < 1e-12
