"""Training transformers hybrids under CP the way users write it: the plain model's loss and every gradient.

A training step written with ``mamba_cp.shard_batch`` or with ``labels=`` on a parallelized model, BSHD, packed by
``cu_seqlens`` and packed by restarting ``position_ids`` (transformers' ``DataCollatorWithFlattening``), reduced by
``all_reduce_gradients`` or by FSDP2 over ``dp x cp``, gives the loss and the gradients of the plain model on the
whole batch (float64, :class:`KeepFloat64`, real gloo ranks). Then one test per silent mistake a new user made
(issue 15): each is now correct, a ``ValueError`` on every rank, a warning, or a documented mistake (README).
Planted bugs (labels shifted inside each shard, FSDP2's default averaging, a rank that thinks it is another)
show that each comparison can fail.
"""

from __future__ import annotations

import copy
import re
import warnings
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F

pytest.importorskip("transformers")

import mamba_cp  # noqa: E402
from mamba_cp import CPGroup  # noqa: E402
from mamba_cp.integrations.transformers import KeepFloat64  # noqa: E402
from mamba_cp.testing import run_on_ranks  # noqa: E402
from mamba_cp.testing.dispatch import OpRecorder  # noqa: E402
from test_hf_models import VOCAB, build  # noqa: E402

TOL = 1e-12
"""Relative to the largest reference value of each tensor; observed <= 2e-14."""
README = Path(__file__).resolve().parents[1] / "README.md"
MODELS = ("mamba2", "nemotron_h", "bamba")
LAYOUTS = ("bshd", "thd-cu", "thd-pos")
STREAM = "thd-stream"
"""A pack of documents whose lengths are not multiples of ``2*cp``, cut as one stream (``packed_layout``)."""


def packed_layout(layout: str) -> str:
    return "stream" if layout == STREAM else "sequences"


# --------------------------------------------------------------------------------------------------
# Batches and the plain reference
# --------------------------------------------------------------------------------------------------


def global_batch(layout: str, cp: int, seed: int = 7) -> tuple[dict, torch.Tensor | None]:
    """The global batch as a collator returns it, and its ``cu_seqlens`` (None for BSHD).

    ``bshd``: two rows, prompt tokens masked with -100. ``thd-cu``: one row of four documents (boundaries given
    separately). ``thd-pos``: the same pack as ``DataCollatorWithFlattening`` returns it (``position_ids``
    restarting per document, -100 on each document's first label)."""
    gen = torch.Generator().manual_seed(seed)
    if layout == "bshd":
        ids = torch.randint(0, VOCAB, (2, 8 * cp), generator=gen)
        labels = ids.clone()
        labels[0, :3] = -100  # a masked prompt: fewer targets on some ranks
        return {"input_ids": ids, "labels": labels}, None
    lengths = [4 * cp - 1, 2 * cp + 3, 6 * cp - 3, 2 * cp + 1] if layout == STREAM else [4 * cp, 2 * cp, 6 * cp, 2 * cp]
    cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32)
    ids = torch.randint(0, VOCAB, (1, sum(lengths)), generator=gen)
    if layout in ("thd-cu", STREAM):
        return {"input_ids": ids, "labels": ids.clone()}, cu
    labels = ids.clone()
    labels[0, cu[:-1].long()] = -100
    positions = torch.cat([torch.arange(n) for n in lengths])[None]
    return {"input_ids": ids, "labels": labels, "position_ids": positions}, cu


def next_tokens(labels: torch.Tensor, cu: torch.Tensor | None) -> torch.Tensor:
    """The plain model's targets, by a loop over documents (independent of ``mamba_cp.shift_labels``)."""
    out = torch.full_like(labels, -100)
    bounds = [0, labels.shape[1]] if cu is None else cu.tolist()
    for a, b in zip(bounds[:-1], bounds[1:], strict=True):
        out[:, a : b - 1] = labels[:, a + 1 : b]
    return out


def plain_loss(model, batch: dict, cu: torch.Tensor | None) -> torch.Tensor:
    """The plain model on the whole batch: transformers' mean next-token loss, documents kept apart."""
    with mamba_cp.batch_context(cu_seqlens=cu, cp_group=1):
        logits = model(input_ids=batch["input_ids"]).logits
    targets = next_tokens(batch["labels"], cu)
    return F.cross_entropy(logits.flatten(0, 1), targets.flatten(), ignore_index=-100)


def takes_positions(model) -> bool:
    return "position_ids" in model.forward.__code__.co_varnames


def cp_step(model, way: str, batch: dict, cu: torch.Tensor | None, layout: str, group) -> torch.Tensor:
    """One forward + backward as a user writes it; returns the logged (global) loss.

    ``helper``: ``mamba_cp.shard_batch``. ``labels``: ``model(input_ids=b.shard(ids), labels=b.shard(labels))``
    in a batch context (and the collator's ``position_ids``, sharded, where the model takes them). ``per-shard``:
    the planted bug: labels shifted inside each rank's shard (what transformers does on a shard), a per-rank mean.
    """
    size = mamba_cp.resolve_cp_group(group).size
    if way == "helper":
        cu_arg = None if layout == "thd-pos" else cu
        with mamba_cp.shard_batch(batch, group, cu_arg, packed_layout=packed_layout(layout)) as b:
            loss = model(**b.inputs).loss
            loss.backward()
        return b.global_loss(loss)
    with mamba_cp.batch_context(cu_seqlens=cu, cp_group=group, packed_layout=packed_layout(layout)) as b:
        ids, labels = b.shard(batch["input_ids"]), b.shard(batch["labels"])
        if way == "labels":
            kwargs = {}
            if "position_ids" in batch and takes_positions(model):
                kwargs["position_ids"] = b.shard(batch["position_ids"])
            loss = model(input_ids=ids, labels=labels, **kwargs).loss
        else:
            logits = model(input_ids=ids).logits
            loss = F.cross_entropy(logits[:, :-1].flatten(0, 1), labels[:, 1:].flatten(), ignore_index=-100) / size
        loss.backward()
    return mamba_cp.global_loss(loss, group)


def grad_error(model, ref) -> tuple[float, int]:
    """``(worst relative gradient difference, number of parameters)``; every parameter must have a gradient."""
    ref_params = dict(ref.named_parameters())
    worst = 0.0
    for name, p in model.named_parameters():
        if p.grad is None or ref_params[name].grad is None:
            raise AssertionError(f"parameter {name} got no gradient")
        g = p.grad.full_tensor() if hasattr(p.grad, "full_tensor") else p.grad
        want = ref_params[name].grad
        worst = max(worst, float((g - want).abs().max() / want.abs().max().clamp_min(1e-300)))
    return worst, len(ref_params)


def layers_of(model) -> torch.nn.ModuleList:
    return next(m for n, m in model.named_modules() if n.endswith("layers") and isinstance(m, torch.nn.ModuleList))


# --------------------------------------------------------------------------------------------------
# Parity: every way in, every layout, all_reduce_gradients and FSDP2
# --------------------------------------------------------------------------------------------------


def parity(name: str, layout: str, ways: tuple[str, ...], group) -> dict[str, dict]:
    cp = mamba_cp.resolve_cp_group(group).size
    batch, cu = global_batch(layout, cp)
    model = build(name)
    ref = mamba_cp.parallelize(copy.deepcopy(model), 1)
    mamba_cp.parallelize(model, group, packed_layout=packed_layout(layout))
    ref_loss = plain_loss(ref, batch, cu)
    ref_loss.backward()
    ref_loss = ref_loss.detach()
    out = {}
    for way in ways:
        model.zero_grad(set_to_none=True)
        logged = cp_step(model, way, batch, cu, layout, group)
        mamba_cp.all_reduce_gradients(model, group)
        err, n = grad_error(model, ref)
        out[f"{name}-{layout}-{way}"] = {"loss": (logged.item(), ref_loss.item()), "grad": err, "params": n}
    return out


def fsdp(name: str, layout: str, way: str, mesh, shard_mesh, divide: bool = True) -> dict[str, dict]:
    """FSDP2 over ``dp x cp`` (CP folded into the shard axis); each dp replica trains on its own batch."""
    from torch.distributed.fsdp import fully_shard

    dp, cp = mesh.size(0), mesh.size(1)
    batches = [global_batch(layout, cp, seed=7 + i) for i in range(dp)]
    model = build(name)
    ref = mamba_cp.parallelize(copy.deepcopy(model), 1)
    mamba_cp.parallelize(model, mesh["cp"])
    for layer in layers_of(model):
        fully_shard(layer, mesh=shard_mesh)
    fully_shard(model, mesh=shard_mesh)
    factor = mamba_cp.set_fsdp_gradient_divide_factor(model, mesh["cp"]) if divide else None
    ref_loss = sum(plain_loss(ref, *batches[i]) for i in range(dp)) / dp  # the mean over dp replicas
    ref_loss.backward()
    ref_loss = ref_loss.detach()
    batch, cu = batches[mesh.get_local_rank("dp")]
    logged = cp_step(model, way, batch, cu, layout, mesh["cp"])
    total = logged.clone()
    dist.all_reduce(total, group=mesh["dp"].get_group())
    err, n = grad_error(model, ref)
    tag = f"fsdp-dp{dp}xcp{cp}-{name}-{layout}-{way}" + ("" if divide else "-nodivide")
    return {tag: {"loss": (float(total) / dp, float(ref_loss)), "grad": err, "params": n, "factor": factor}}


PARITY = {
    2: [(m, layout, ("helper", "labels")) for m in MODELS for layout in LAYOUTS]
    + [("zamba2", "thd-pos", ("helper", "labels"))]  # the fourth model of the trial
    + [("nemotron_h", "bshd", ("per-shard",)), ("bamba", "thd-pos", ("per-shard",))]
    + [("nemotron_h", STREAM, ("helper", "labels")), ("bamba", STREAM, ("helper",))],
    4: [(m, layout, ("helper",)) for m in ("nemotron_h", "bamba") for layout in LAYOUTS]
    + [("bamba", "thd-pos", ("labels",)), ("nemotron_h", STREAM, ("helper",)), ("bamba", STREAM, ("labels",))],
}
FSDP = {
    2: [("mamba2", "thd-cu", "helper", True), ("nemotron_h", "thd-pos", "labels", True)],
    4: [("nemotron_h", "thd-pos", "helper", True), ("bamba", "bshd", "labels", True)]
    + [("nemotron_h", "bshd", "helper", False)],  # planted: FSDP2's default averaging over dp * cp
}


# --------------------------------------------------------------------------------------------------
# The silent mistakes of issue 15, now errors (checked on every rank, with the collectives counted)
# --------------------------------------------------------------------------------------------------


def attempt(fn) -> dict:
    """Run ``fn``; the ``ValueError`` it raised (or None) and the collectives it issued first."""
    recorder = OpRecorder()
    try:
        with recorder:
            fn()
    except ValueError as err:
        return {"error": str(err), "collectives": dict(recorder.collectives)}
    return {"error": None, "collectives": dict(recorder.collectives)}


def mistakes(rank: int, world: int) -> dict[str, dict]:
    group = dist.group.WORLD
    bamba = mamba_cp.parallelize(build("bamba"), group)
    nemotron = mamba_cp.parallelize(build("nemotron_h"), group)
    batch, _ = global_batch("bshd", world)
    ids, labels = batch["input_ids"], batch["labels"]
    local = ids.shape[1] // world
    pack, cu = global_batch("thd-pos", world)
    out = {}

    # position_ids as each rank's local 0 .. L_local-1 (Bamba has RoPE): refused, inside a context or not.
    def local_positions_in_context():
        with mamba_cp.batch_context(cp_group=group) as b:
            bamba(input_ids=b.shard(ids), position_ids=torch.arange(local)[None])

    out["local positions"] = attempt(local_positions_in_context)

    def local_positions_no_context():
        bamba(input_ids=mamba_cp.shard(ids, world, rank), position_ids=torch.arange(local)[None])

    out["local positions, no context"] = attempt(local_positions_no_context)

    # Only rank 1 is wrong: the decision still comes out the same on every rank (one tiny all-gather).
    def one_rank_wrong():
        true = mamba_cp.shard(torch.arange(ids.shape[1])[None], world, rank)
        bamba(input_ids=mamba_cp.shard(ids, world, rank), position_ids=true if rank == 0 else torch.arange(local)[None])

    out["only rank 1 wrong"] = attempt(one_rank_wrong)
    # A plain contiguous split: detected when the positions travel with the tokens.
    split = ids.chunk(world, dim=1)[rank]
    positions = torch.arange(ids.shape[1])[None].chunk(world, dim=1)[rank]
    out["contiguous split with positions"] = attempt(lambda: bamba(input_ids=split, position_ids=positions))
    # A pack by position_ids restarts passed without a batch context (the collator's output sharded by hand).
    pos_local = mamba_cp.shard(pack["position_ids"], world, rank, cu_seqlens=cu)
    ids_local = mamba_cp.shard(pack["input_ids"], world, rank, cu_seqlens=cu)
    out["pack by positions, no context"] = attempt(lambda: bamba(input_ids=ids_local, position_ids=pos_local))

    # The whole tensor where the shard belongs, inside a batch context.
    def whole_in_context():
        with mamba_cp.batch_context(cp_group=group) as b:
            nemotron(input_ids=ids, labels=b.shard(labels))

    def whole_in_sharded_batch():
        with mamba_cp.shard_batch(batch, group):
            nemotron(input_ids=ids)

    out["whole tensor, batch context"] = attempt(whole_in_context)
    out["whole tensor, shard_batch"] = attempt(whole_in_sharded_batch)
    # shard_batch's packed inputs used outside their batch context.
    sharded_pack = mamba_cp.shard_batch(pack, group)
    out["shard_batch inputs outside their context"] = attempt(lambda: nemotron(**sharded_pack.inputs))

    # The right positions are accepted, with one tiny all-gather per step.
    def true_positions():
        with mamba_cp.batch_context(cu_seqlens=cu, cp_group=group):
            bamba(input_ids=ids_local, position_ids=pos_local)

    out["true positions"] = attempt(true_positions)
    # A packed-looking [1, T] batch outside any batch context: one warning, however often it is called.
    row = mamba_cp.shard(pack["input_ids"].clone(), world, rank, cu_seqlens=cu)
    row[0, 3] = nemotron.config.eos_token_id
    fresh = mamba_cp.parallelize(build("nemotron_h"), group)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for _ in range(2):
            fresh(input_ids=row)
    out["packed without context"] = {"warnings": [str(w.message) for w in caught if "mamba_cp" in str(w.message)]}
    # Debug mode: a correct step passes; ranks that disagree on who holds which chunk are caught.
    debug = mamba_cp.parallelize(build("nemotron_h"), group, debug=True)
    out["debug, correct"] = attempt(lambda: debug(**mamba_cp.shard_batch(batch, group).inputs))
    # A pack sharded as one stream for a model parallelized per sequence (the default): refused, not mixed up.
    stream_pack, stream_cu = global_batch(STREAM, world)

    def layout_mismatch():
        with mamba_cp.shard_batch(stream_pack, group, stream_cu, packed_layout="stream") as b:
            nemotron(**b.inputs)

    out["layout mismatch"] = attempt(layout_mismatch)

    # Local 0..T_local-1 positions for a pack cut as one stream (Bamba has RoPE): refused, with the true ones named.
    bamba_stream = mamba_cp.parallelize(build("bamba"), group, packed_layout="stream")

    def stream_local_positions():
        with mamba_cp.batch_context(cu_seqlens=stream_cu, cp_group=group, packed_layout="stream") as b:
            ids_local = b.shard(stream_pack["input_ids"])
            bamba_stream(input_ids=ids_local, position_ids=torch.arange(ids_local.shape[1])[None])

    out["stream pack, local positions"] = attempt(stream_local_positions)
    wrong = mamba_cp.parallelize(build("nemotron_h"), CPGroup(group=group, size=world, rank=0), debug=True)
    out["debug, every rank says rank 0"] = attempt(lambda: wrong(input_ids=mamba_cp.shard(ids, world, 0)))
    return out


def worker(rank: int, world: int) -> dict[str, dict]:
    from torch.distributed.device_mesh import init_device_mesh

    torch.set_num_threads(1)
    results = {}
    with KeepFloat64():
        for name, layout, ways in PARITY[world]:
            results.update(parity(name, layout, ways, dist.group.WORLD))
        mesh = init_device_mesh("cpu", (world // 2, 2), mesh_dim_names=("dp", "cp"))
        shard_mesh = mesh["dp", "cp"]._flatten("dp_cp")
        for name, layout, way, divide in FSDP[world]:
            results.update(fsdp(name, layout, way, mesh, shard_mesh, divide))
        if world == 2:
            results.update(mistakes(rank, world))
    return results


@pytest.fixture(scope="module")
def results() -> dict[int, list[dict]]:
    """One launch of forked ranks per world size runs every case (forking once keeps the file fast)."""
    return {world: run_on_ranks(worker, world, timeout=300) for world in (2, 4)}


def _ids(world: int) -> list[str]:
    ids = [f"{m}-{layout}-{way}" for m, layout, ways in PARITY[world] for way in ways if way != "per-shard"]
    dp = world // 2
    ids += [f"fsdp-dp{dp}xcp2-{m}-{layout}-{way}" for m, layout, way, divide in FSDP[world] if divide]
    return ids


CASES = [(world, case) for world in (2, 4) for case in _ids(world)]


@pytest.mark.parametrize("world,case", CASES, ids=[f"world{w}-{c}" for w, c in CASES])
def test_training_step_matches_the_plain_model(results, world, case):
    for rank, per_rank in enumerate(results[world]):
        r = per_rank[case]
        cp_loss, ref_loss = r["loss"]
        assert abs(cp_loss - ref_loss) <= TOL * abs(ref_loss), f"rank {rank}: loss {cp_loss} vs {ref_loss}"
        assert r["grad"] <= TOL, f"rank {rank}: gradients differ by {r['grad']:.2e} (relative) over {r['params']}"
        assert r["params"] > 10


def test_planted_bugs_are_caught(results):
    """Labels shifted inside each shard (transformers on a shard) and FSDP2's default averaging fail the check."""
    for per_rank in results[2]:
        for case in ("nemotron_h-bshd-per-shard", "bamba-thd-pos-per-shard"):
            r = per_rank[case]
            assert abs(r["loss"][0] - r["loss"][1]) > 1e-3 * abs(r["loss"][1]), case
            assert r["grad"] > 1e-2, (case, r["grad"])
    for per_rank in results[4]:
        r = per_rank["fsdp-dp2xcp2-nemotron_h-bshd-helper-nodivide"]
        assert r["grad"] == pytest.approx(0.5, abs=1e-9)  # exactly 1/cp of the true gradients
        assert per_rank["fsdp-dp2xcp2-nemotron_h-thd-pos-helper"]["factor"] == 2.0  # = dp


def _same_error_everywhere(results, case: str) -> str:
    messages = {per_rank[case]["error"] for per_rank in results[2]}
    assert len(messages) == 1, f"{case}: ranks raised different errors: {messages}"
    message = messages.pop()
    assert message is not None, f"{case}: no error"
    return message


@pytest.mark.parametrize(
    "case",
    ["local positions", "local positions, no context", "only rank 1 wrong", "contiguous split with positions",
     "pack by positions, no context", "stream pack, local positions"],
)  # fmt: skip
def test_wrong_position_ids_raise_on_every_rank_after_one_tiny_all_gather(results, case):
    message = _same_error_everywhere(results, case)
    assert re.search(r"position_ids on CP rank\(s\) \[.*\] of 2 are not the true positions", message), message
    assert "mamba_cp.shard_batch" in message
    for per_rank in results[2]:
        assert per_rank[case]["collectives"] == {"c10d.allgather_": 1}, per_rank[case]["collectives"]


def test_one_wrong_rank_makes_every_rank_raise(results):
    message = _same_error_everywhere(results, "only rank 1 wrong")
    assert message.startswith("position_ids on CP rank(s) [1] of 2"), message
    assert (
        "rank 1 holds its head-tail shard and got position_ids[..., 0] = 0 where that token's position is 4" in message
    )


def test_true_positions_are_accepted(results):
    for per_rank in results[2]:
        assert per_rank["true positions"]["error"] is None
        assert per_rank["true positions"]["collectives"].get("c10d.allgather_", 0) >= 1  # the check, then the model


@pytest.mark.parametrize("case", ["whole tensor, batch context", "whole tensor, shard_batch"])
def test_whole_tensor_instead_of_the_shard_raises_before_any_collective(results, case):
    message = _same_error_everywhere(results, case)
    assert re.search(r"this rank's batch has 16 tokens per row.* but .* pass this rank's shard", message), message
    assert all(per_rank[case]["collectives"] == {} for per_rank in results[2])


def test_shard_batch_inputs_refused_outside_their_context(results):
    message = _same_error_everywhere(results, "shard_batch inputs outside their context")
    assert "run the model inside `with batch:`" in message
    assert all(r["shard_batch inputs outside their context"]["collectives"] == {} for r in results[2])


def test_packed_looking_batch_outside_a_context_warns_once(results):
    for per_rank in results[2]:
        caught = per_rank["packed without context"]["warnings"]
        assert len(caught) == 1, caught
        assert "mamba_cp.shard_batch" in caught[0] and "document separator" in caught[0]


def test_a_batch_in_another_packed_layout_is_refused(results):
    message = _same_error_everywhere(results, "layout mismatch")
    assert "parallelized with packed_layout='sequences', but the batch was sharded with packed_layout='stream'" in (
        message
    )
    assert all(r["layout mismatch"]["collectives"] == {} for r in results[2])  # before any collective


def test_debug_mode_checks_each_rank_holds_its_head_tail_shard(results):
    assert all(per_rank["debug, correct"]["error"] is None for per_rank in results[2])
    message = _same_error_everywhere(results, "debug, every rank says rank 0")
    assert "mamba_cp debug check failed: CP rank 1's tokens are not its head-tail shard" in message
    assert all(r["debug, every rank says rank 0"]["collectives"] == {"c10d.allgather_": 1} for r in results[2])


# --------------------------------------------------------------------------------------------------
# Single process: labels, boundaries, shard_batch's checks, precision, the README
# --------------------------------------------------------------------------------------------------

CP2 = CPGroup(group=None, size=2, rank=0)


def test_shift_labels_per_document_and_a_planted_shift_per_shard():
    labels = torch.arange(16)[None]
    cu = torch.tensor([0, 4, 12, 16])
    shifted = mamba_cp.shift_labels(labels, cu)
    assert torch.equal(shifted, next_tokens(labels, cu))
    assert shifted[0, [3, 11, 15]].tolist() == [-100, -100, -100]
    assert torch.equal(mamba_cp.shift_labels(labels), next_tokens(labels, None))
    # Shifting each rank's shard instead (what transformers does inside the model) is wrong: the check sees it.
    per_shard = torch.cat([mamba_cp.shift_labels(mamba_cp.shard(labels, 2, r, cu_seqlens=cu)) for r in range(2)], 1)
    in_order = torch.cat([mamba_cp.shard(shifted, 2, r, cu_seqlens=cu) for r in range(2)], 1)
    assert not torch.equal(per_shard, in_order)
    assert int(mamba_cp.count_targets(shifted)) == 13


def test_cu_seqlens_from_restarting_position_ids():
    positions = torch.tensor([[0, 1, 2, 3, 0, 1, 0, 1, 2, 3, 4, 5]])
    assert mamba_cp.cu_seqlens_from_position_ids(positions).tolist() == [0, 4, 6, 12]
    assert mamba_cp.cu_seqlens_from_position_ids(torch.arange(8)[None]) is None  # one sequence: BSHD
    assert mamba_cp.cu_seqlens_from_position_ids(torch.arange(8).expand(2, 8)) is None
    with pytest.raises(ValueError, match=r"count 0, 1, 2, \.\.\. .* got position_ids\[0, 3\] = 5 after 2"):
        mamba_cp.cu_seqlens_from_position_ids(torch.tensor([[0, 1, 2, 5]]))
    with pytest.raises(ValueError, match=r"must start at 0, got position_ids\[0, 0\] = 1"):
        mamba_cp.cu_seqlens_from_position_ids(torch.tensor([[1, 2, 3, 4]]))
    with pytest.raises(ValueError, match=r"batch of 2 rows must count 0 \.\. 3 in every row"):
        mamba_cp.cu_seqlens_from_position_ids(torch.tensor([[0, 1, 2, 3], [0, 1, 0, 1]]))


def test_shard_batch_output_and_checks():
    batch, cu = global_batch("thd-pos", 2)
    sharded = mamba_cp.shard_batch(batch, CP2)
    assert sharded.cu_seqlens.tolist() == cu.tolist()  # the pack described by position_ids
    inputs = sharded.inputs
    assert set(inputs) == {"input_ids", "labels", "shift_labels", "num_items_in_batch", "position_ids"}
    assert torch.equal(inputs["shift_labels"], mamba_cp.shard(next_tokens(batch["labels"], cu), 2, 0, cu_seqlens=cu))
    assert int(inputs["num_items_in_batch"]) == int((next_tokens(batch["labels"], cu) != -100).sum())
    assert torch.equal(inputs["position_ids"], mamba_cp.shard(batch["position_ids"], 2, 0, cu_seqlens=cu))
    ids = batch["input_ids"]
    with pytest.raises(ValueError, match="padded batches are not supported"):
        mamba_cp.shard_batch({"input_ids": ids, "attention_mask": torch.zeros_like(ids)}, CP2)
    with pytest.raises(ValueError, match=r"position_ids restart at \[0, 8, 12, 24\] but cu_seqlens is \[0, 16, 32\]"):
        mamba_cp.shard_batch(batch, CP2, cu_seqlens=torch.tensor([0, 16, 32]))
    with pytest.raises(ValueError, match="does not know how to shard the batch's 'token_type_ids'"):
        mamba_cp.shard_batch({"input_ids": ids, "token_type_ids": ids}, CP2)
    with pytest.raises(ValueError, match=r"a packed batch must be one row \[1, T\]"):
        mamba_cp.shard_batch({"input_ids": ids.expand(2, -1)}, CP2, cu_seqlens=cu)
    with pytest.raises(ValueError, match=r"sequence 1 has length 2, which is not a multiple of 2\*cp_size \(4\)"):
        mamba_cp.shard_batch({"input_ids": ids[:, :10]}, CP2, cu_seqlens=torch.tensor([0, 8, 10]))
    extras = {"cu_seq_lens_q": cu, "cu_seq_lens_k": cu, "max_length_q": 12, "max_length_k": 12}
    assert mamba_cp.shard_batch({**batch, **extras}, CP2).cu_seqlens.tolist() == cu.tolist()  # collator extras
    with pytest.raises(ValueError, match="seq_idx does not match"):
        mamba_cp.shard_batch({**batch, "seq_idx": torch.zeros_like(ids)}, CP2)


@pytest.mark.parametrize("cast", ["to", "half", "bfloat16"])
def test_casting_to_half_precision_keeps_the_decay_parameters_float32(cast):
    """Under parallelize (and for mamba_cp.Mamba2Mixer) A_log, D and dt_bias stay float32, the same objects."""
    low = torch.float16 if cast == "half" else torch.bfloat16
    ours = mamba_cp.Mamba2Mixer(hidden_size=8, num_heads=4, head_dim=2, n_groups=2, state_size=4)
    converted = mamba_cp.parallelize(build("bamba").float(), 1)
    plain = build("bamba").float()  # not parallelized: transformers' own cast, for contrast
    for model in (ours, converted, plain):
        before = {n: (p, p.detach().clone()) for n, p in model.named_parameters()}
        model.to(low) if cast == "to" else getattr(model, cast)()
        for n, p in model.named_parameters():
            kept = n.rsplit(".", 1)[-1] in ("A_log", "D", "dt_bias") and model is not plain
            assert p is before[n][0], f"{n}: the Parameter object changed"
            assert p.dtype == (torch.float32 if kept else low), (n, p.dtype)
            if kept:
                assert torch.equal(p, before[n][1]), f"{n}: values changed"
    assert converted.model.layers[0].mamba.A_log.dtype == torch.float32
    assert plain.model.layers[0].mamba.A_log.dtype == low  # what happened before: the contrast is real


def test_common_mistakes_are_documented():
    """What cannot be detected is named in the README's "Common mistakes", with the fix."""
    text = README.read_text()
    assert "## Common mistakes" in text and "## Installation" in text
    section = text.split("## Common mistakes", 1)[1].split("\n## ", 1)[0]
    for phrase in (
        "contiguous split",  # a plain split of the tokens without position_ids
        "whole (unsharded) tensor",  # outside a batch context, BSHD
        "different batches",  # ranks of one CP group fed different global batches
        "set_fsdp_gradient_divide_factor",  # FSDP2 averages over dp * cp
        "labels=",  # transformers' shift inside a shard
        "position_ids",
        "bfloat16",
    ):
        assert phrase in section, f"README 'Common mistakes' does not mention {phrase!r}"
