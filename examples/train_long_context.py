"""Train a small NemotronH hybrid (Mamba2 + attention) with and without context parallelism; compare the losses.

The model is built from a config (no download): Mamba2, attention, MLP, Mamba2, MLP layers. Every step hands one
global batch, as a collator returns it (BSHD rows, or with ``--packed`` one row of documents described by
``position_ids`` restarting per document, as transformers' ``DataCollatorWithFlattening`` makes it), to
``mamba_cp.shard_batch``, which cuts this rank's share (labels shifted in true order, the global target count),
runs forward and backward inside its batch context with the model's own ``labels=`` loss, sums the gradients over
the CP group and takes an AdamW step; the logged loss is ``batch.global_loss(loss)``. Rank 0 then trains an
identical copy without CP on the whole batches with the same code (``cp_group=1``), and prints both loss curves
side by side.

CPU (spawns its own gloo ranks, float64; the curves agree to float64 rounding)::

    python examples/train_long_context.py --cp 2 [--packed] [--fsdp] [--plot losses.png]

GPUs (one process per GPU, nccl, bf16; the curves agree within bf16 noise: at most 4e-4 relative on two H200s
at 8192 tokens, BSHD and packed)::

    torchrun --nproc-per-node 2 examples/train_long_context.py --dtype bfloat16 --seq-len 8192

Gradients are summed over the CP group by ``mamba_cp.all_reduce_gradients`` in :func:`sync_gradients`; with
``--fsdp`` the CP model is sharded by FSDP2 over the CP ranks instead (CP folded into the shard axis, as
torchtitan does), and FSDP's reduce-scatter does the sum once ``mamba_cp.set_fsdp_gradient_divide_factor`` has
told it to divide by the data-parallel size (1 here) instead of the mesh size.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import os
from dataclasses import asdict, dataclass

import torch
import torch.distributed as dist
from transformers import NemotronHConfig, NemotronHForCausalLM

import mamba_cp
from mamba_cp.integrations.transformers import KeepFloat64
from mamba_cp.testing import run_on_ranks


@dataclass(kw_only=True)
class TrainConfig:
    """What to train and how."""

    cp: int = 2
    """CP ranks (spawned on CPU; under torchrun the world size)."""
    steps: int = 12
    """Optimizer steps."""
    seq_len: int = 64
    """Tokens per row (BSHD) or in the whole pack; a multiple of 2*cp (and of 4*cp with --packed)."""
    batch: int = 2
    """Rows per step (BSHD)."""
    packed: bool = False
    """Pack documents of unequal lengths into one row (position_ids restarting per document) instead of BSHD rows."""
    dtype: str = "float64"
    """Parameter dtype: float64 (CPU exactness) or bfloat16 (GPU)."""
    lr: float = 1e-2
    seed: int = 0
    hidden_size: int = 64
    vocab_size: int = 96
    plot: str | None = None
    """Write the two loss curves to this PNG (needs matplotlib)."""
    fsdp: bool = False
    """Shard the CP model with FSDP2 over the CP ranks (CP folded into FSDP's shard axis, as torchtitan does)
    instead of summing gradients with ``mamba_cp.all_reduce_gradients``."""


def build_model(cfg: TrainConfig, device: torch.device) -> NemotronHForCausalLM:
    """A small NemotronH with two Mamba2 layers and one attention layer, seeded identically on every rank, in
    float32 (or float64): :func:`worker` casts it after ``parallelize``, which keeps ``A_log``, ``D`` and ``dt_bias``
    in float32 under a bf16 cast."""
    torch.manual_seed(cfg.seed)
    config = NemotronHConfig(
        vocab_size=cfg.vocab_size,
        hidden_size=cfg.hidden_size,
        layers_block_type=["linear_attention", "full_attention", "mlp", "linear_attention", "mlp"],
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        intermediate_size=2 * cfg.hidden_size,
        mamba_num_heads=8,
        mamba_head_dim=16,
        n_groups=2,
        ssm_state_size=16,
        conv_kernel=4,
        chunk_size=16,
        attn_implementation="sdpa",
        use_cache=False,
    )
    dtype = torch.float64 if cfg.dtype == "float64" else torch.float32
    return NemotronHForCausalLM(config).to(device=device, dtype=dtype)


def make_batch(cfg: TrainConfig, step: int, device: torch.device) -> dict[str, torch.Tensor]:
    """The global batch of a step, as a collator returns it, from sequences ``x_t = (start + t * stride) mod V``
    (learnable, so the loss falls).

    BSHD: ``input_ids`` and ``labels`` ``[B, L]`` (labels unshifted, transformers' convention). ``--packed``: one
    row ``[1, T]`` of two documents of unequal lengths with ``position_ids`` restarting at 0 per document and
    ``-100`` on each document's first label, as ``DataCollatorWithFlattening`` makes it.
    """
    gen = torch.Generator().manual_seed(1000 + step)
    if cfg.packed:
        unit = 4 * cfg.cp  # two documents of unequal lengths, each a multiple of 2*cp
        if cfg.seq_len % unit or cfg.seq_len < 2 * unit:
            raise ValueError(f"--packed needs --seq-len a multiple of 4*cp ({unit}), at least {2 * unit}")
        first = unit * int(torch.randint(1, cfg.seq_len // unit, (), generator=gen))
        lengths = [first, cfg.seq_len - first]
    else:
        lengths = [cfg.seq_len] * cfg.batch
    rows = []
    for n in lengths:
        start, stride = torch.randint(0, cfg.vocab_size, (2,), generator=gen).tolist()
        rows.append((start + torch.arange(n) * (stride % 7 + 1)) % cfg.vocab_size)
    if not cfg.packed:
        ids = torch.stack(rows).to(device)
        return {"input_ids": ids, "labels": ids.clone()}
    ids = torch.cat(rows)[None]
    labels = torch.cat([torch.cat([torch.tensor([-100]), r[1:]]) for r in rows])[None]
    positions = torch.cat([torch.arange(n) for n in lengths])[None]
    return {"input_ids": ids.to(device), "labels": labels.to(device), "position_ids": positions.to(device)}


def sync_gradients(model: torch.nn.Module, cp_group, fsdp: bool) -> None:
    """Sum every gradient over the CP group (each rank holds its own tokens' share); FSDP2 already did."""
    if not fsdp:
        mamba_cp.all_reduce_gradients(model, cp_group)


def shard_with_fsdp(model: NemotronHForCausalLM, cp_group, cp_size: int, device: torch.device) -> None:
    """FSDP2 over the CP ranks: each block and the root are ``fully_shard``-ed on a 1-D mesh of the CP group
    (with data parallelism too, this is the flattened ``dp x cp`` mesh). FSDP divides the reduced gradients by
    its mesh size by default; under CP they must be summed over the CP ranks, so the divide factor becomes
    ``mesh size / cp`` (the data-parallel size, 1 here)."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh(device.type, (cp_size,), mesh_dim_names=("dp_cp",))
    for block in model.model.layers:
        fully_shard(block, mesh=mesh)
    fully_shard(model, mesh=mesh)
    mamba_cp.set_fsdp_gradient_divide_factor(model, cp_group)


def train(model: torch.nn.Module, cfg: TrainConfig, cp_group, device: torch.device) -> list[float]:
    """``cfg.steps`` AdamW steps; returns the global mean next-token loss of every step."""
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.lr)
    losses = []
    for step in range(cfg.steps):
        # Every rank of the CP group reads the same global batch; shard_batch cuts this rank's share (labels
        # shifted in true order, the global target count, the pack's cu_seqlens from its position_ids).
        with mamba_cp.shard_batch(make_batch(cfg, step, device), cp_group) as batch:
            loss = model(**batch.inputs).loss  # this rank's summed loss over the global target count
            loss.backward()  # inside the block: activation checkpointing re-runs layers here
        sync_gradients(model, cp_group, cfg.fsdp)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(batch.global_loss(loss).item())  # the ranks' losses sum to the batch's mean loss
    return losses


def worker(rank: int, world_size: int, cfg_dict: dict) -> tuple[list[float], list[float]] | None:
    """One rank: train with CP; rank 0 then trains the same model without CP. Returns rank 0's two curves."""
    cfg = TrainConfig(**cfg_dict)
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", rank))) if torch.cuda.is_available() else None
    device = device or torch.device("cpu")
    # transformers computes RMSNorm products, softmax and logits in float32 even for float64 models; for the
    # exactness run keep them float64 so both curves are float64 end to end (does nothing for bf16).
    precision = KeepFloat64() if cfg.dtype == "float64" else contextlib.nullcontext()
    with precision:
        model = build_model(cfg, device)
        reference = copy.deepcopy(model)
        # Cast after parallelize: the converted mixers keep A_log, D and dt_bias in float32.
        mamba_cp.parallelize(model, dist.group.WORLD).to(getattr(torch, cfg.dtype))
        if cfg.fsdp:
            shard_with_fsdp(model, dist.group.WORLD, world_size, device)
        cp_losses = train(model, cfg, dist.group.WORLD, device)
        del model
        dist.barrier()
        if rank != 0:
            return None
        reference = mamba_cp.parallelize(reference, 1).to(getattr(torch, cfg.dtype))
        ref_losses = train(reference, TrainConfig(**{**cfg_dict, "fsdp": False}), 1, device)
    return cp_losses, ref_losses


def report(cfg: TrainConfig, cp_losses: list[float], ref_losses: list[float]) -> float:
    """Print both curves; returns the largest relative difference."""
    layout = "packed THD" if cfg.packed else f"BSHD B={cfg.batch}"
    print(f"NemotronH hybrid, {layout}, {cfg.seq_len} tokens, {cfg.dtype}, cp={cfg.cp}")
    print(f"{'step':>4}  {'loss (cp=' + str(cfg.cp) + ')':>22}  {'loss (no CP)':>22}  {'rel. diff':>9}")
    worst = 0.0
    for step, (a, b) in enumerate(zip(cp_losses, ref_losses, strict=True)):
        rel = abs(a - b) / abs(b)
        worst = max(worst, rel)
        print(f"{step:>4}  {a:>22.16f}  {b:>22.16f}  {rel:>9.1e}")
    print(f"largest relative difference: {worst:.1e}")
    return worst


def plot(path: str, cfg: TrainConfig, cp_losses: list[float], ref_losses: list[float]) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as err:
        raise SystemExit(f"--plot needs matplotlib ({err}); install it with `pip install matplotlib`") from err
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot(ref_losses, "o-", label="no CP")
    ax.plot(cp_losses, "x--", label=f"CP over {cfg.cp} ranks")
    ax.set_xlabel("step")
    ax.set_ylabel("next-token loss")
    ax.set_title(f"NemotronH hybrid, {'packed' if cfg.packed else 'BSHD'}, {cfg.dtype}")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path)
    print(f"wrote {path}")


def parse_args(argv: list[str] | None = None) -> TrainConfig:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    defaults = TrainConfig()
    parser.add_argument("--cp", type=int, default=defaults.cp, help="CP ranks to spawn on CPU (torchrun: ignored)")
    parser.add_argument("--steps", type=int, default=defaults.steps)
    parser.add_argument("--seq-len", type=int, default=defaults.seq_len)
    parser.add_argument("--batch", type=int, default=defaults.batch)
    parser.add_argument("--packed", action="store_true", help="pack two documents per step (restarting position_ids)")
    parser.add_argument("--dtype", choices=["float64", "float32", "bfloat16"], default=defaults.dtype)
    parser.add_argument("--lr", type=float, default=defaults.lr)
    parser.add_argument("--hidden-size", type=int, default=defaults.hidden_size)
    parser.add_argument("--plot", metavar="PNG", help="write both loss curves to this PNG (needs matplotlib)")
    parser.add_argument("--fsdp", action="store_true", help="shard the CP model with FSDP2 over the CP ranks")
    args = parser.parse_args(argv)
    return TrainConfig(
        cp=args.cp,
        steps=args.steps,
        seq_len=args.seq_len,
        batch=args.batch,
        packed=args.packed,
        dtype=args.dtype,
        lr=args.lr,
        hidden_size=args.hidden_size,
        plot=args.plot,
        fsdp=args.fsdp,
    )


def main(argv: list[str] | None = None) -> tuple[list[float], list[float]] | None:
    """Run the comparison; returns ``(cp_losses, reference_losses)`` on the reporting process."""
    cfg = parse_args(argv)
    if "RANK" in os.environ:  # launched by torchrun: this process is one rank
        if torch.cuda.is_available():
            device = torch.device("cuda", int(os.environ["LOCAL_RANK"]))
            torch.cuda.set_device(device)
            dist.init_process_group("nccl", device_id=device)
        else:
            dist.init_process_group("gloo")
        cfg.cp = dist.get_world_size()
        try:
            curves = worker(dist.get_rank(), cfg.cp, asdict(cfg))
        finally:
            dist.destroy_process_group()
    else:  # spawn cfg.cp gloo ranks on this machine
        curves = run_on_ranks(worker, cfg.cp, asdict(cfg), timeout=600)[0]
    if curves is None:
        return None
    report(cfg, *curves)
    if cfg.plot:
        plot(cfg.plot, cfg, *curves)
    return curves


if __name__ == "__main__":
    main()
