"""OpRecorder: every op that would make the host wait for the device is counted and named; others are not."""

import pytest
import torch

from mamba_cp.testing.dispatch import OpRecorder

x = torch.arange(6.0) - 2.0
mask = x > 0
idx = torch.tensor([0, 2, 5])
counts = torch.tensor([1, 2, 0, 1, 1, 3])

SYNCS = {  # call -> the event it must be recorded as
    "item": (lambda: x[1].item(), "aten._local_scalar_dense"),
    "int": (lambda: int(idx[0]), "aten._local_scalar_dense"),
    "bool": (lambda: bool(mask[0]), "aten._local_scalar_dense"),
    "bool of any": (lambda: bool(mask.any()), "aten._local_scalar_dense"),
    "tolist": (lambda: x.tolist(), "Tensor.tolist"),
    "numpy": (lambda: x.numpy(), "Tensor.numpy"),
    "nonzero": (lambda: x.nonzero(), "aten.nonzero"),
    "where(cond)": (lambda: torch.where(mask), "aten.nonzero"),
    "mask index": (lambda: x[mask], "aten.index (boolean mask)"),
    "mask assign": (lambda: x.clone().__setitem__(mask, 0.0), "aten.index_put_ (boolean mask)"),
    "masked_select": (lambda: torch.masked_select(x, mask), "aten.masked_select"),
    "unique": (lambda: torch.unique(idx), "aten._unique2"),
    "unique_consecutive": (lambda: torch.unique_consecutive(idx), "aten.unique_consecutive"),
    "repeat_interleave(counts)": (lambda: torch.repeat_interleave(counts), "aten.repeat_interleave (no output_size)"),
    "repeat_interleave(x, counts)": (
        lambda: torch.repeat_interleave(x, counts),
        "aten.repeat_interleave (no output_size)",
    ),
    "equal": (lambda: torch.equal(x, x), "aten.equal"),
    "allclose": (lambda: torch.allclose(x, x), "aten.allclose"),
    "bincount": (lambda: torch.bincount(idx), "aten.bincount"),
    ".cpu()": (lambda: x.cpu(), "to_cpu"),
    ".to('cpu')": (lambda: x.to("cpu"), "to_cpu"),
    ".to(device='cpu')": (lambda: x.to(device="cpu"), "to_cpu"),
}

NOT_SYNCS = {
    "index_select": lambda: x.index_select(0, idx),
    "integer index": lambda: x[idx],
    "index_put with integer index": lambda: x.clone().index_put_((idx,), torch.zeros(3)),
    "repeat_interleave with output_size": lambda: torch.repeat_interleave(x, counts, output_size=8),
    "repeat_interleave by an int": lambda: torch.repeat_interleave(x, 2),
    "arithmetic": lambda: (x * 2 + 1).exp().sum(),
    "reductions kept as tensors": lambda: (mask.any(), mask.all(), x.max()),
    "masked_fill": lambda: x.masked_fill(mask, 0.0),
    "nonzero_static": lambda: torch.nonzero_static(x, size=3),
    "where(cond, a, b)": lambda: torch.where(mask, x, -x),
    ".to(dtype)": lambda: x.to(torch.float64),
    ".to(x.device)": lambda: x.to(x.device),  # on a GPU run x.device is the GPU: no copy
    "cumsum + searchsorted": lambda: torch.searchsorted(x.cumsum(0), x),
}


@pytest.mark.parametrize("name", list(SYNCS))
def test_each_host_sync_is_caught_and_named(name):
    call, event = SYNCS[name]
    with OpRecorder() as rec:
        call()
    assert rec.syncs == {event: 1}, rec.sync_report()  # exactly once: tolist's own copy is not counted again
    assert rec.host_syncs == 1
    report = rec.sync_report()
    assert report.startswith(f"{event} x1 (first at ")
    assert "test_recorder.py:" in report and "in <lambda>" in report  # the caller's line, not torch's or ours


@pytest.mark.parametrize("name", list(NOT_SYNCS))
def test_ops_that_do_not_sync_are_not_counted(name):
    with OpRecorder() as rec:
        NOT_SYNCS[name]()
    assert rec.host_syncs == 0, rec.sync_report()
    assert rec.sync_report() == "no host sync"


class _ReadsInBackward(torch.autograd.Function):
    @staticmethod
    def forward(ctx, t):
        return t * 2

    @staticmethod
    def backward(ctx, grad):
        scale = grad.abs().max().item()  # a host read in backward
        return grad * 2 / max(scale, 1.0) * scale


def test_syncs_in_backward_are_counted_and_counts_add_up():
    t = torch.randn(4, requires_grad=True)
    with OpRecorder() as rec:
        out = _ReadsInBackward.apply(t)
        out.sum().backward()
        t.detach()[t.detach() > 0]
        t.detach()[t.detach() > 0]
    assert rec.syncs == {"aten._local_scalar_dense": 1, "aten.index (boolean mask)": 2}
    assert rec.host_syncs == 3
    assert rec.sync_report().startswith("aten.index (boolean mask) x2 (first at ")
    assert "in backward" in rec.sync_sites["aten._local_scalar_dense"]


def test_nothing_is_recorded_outside_the_block():
    rec = OpRecorder()
    with rec:
        pass
    x.tolist(), x[0].item(), x.cpu()
    assert rec.host_syncs == 0


@pytest.mark.parametrize(
    ("read", "event"),
    [
        (lambda g: g.tolist(), "Tensor.tolist"),
        (lambda g: g.cpu(), "to_cpu"),
        (lambda g: g.numpy(), "Tensor.numpy"),
        (lambda g: g.nonzero(), "aten.nonzero"),
    ],
)
def test_host_reads_in_backward_hooks_are_caught(read, event):
    """Autograd runs hooks and Function.backward without Python function modes: the method reads must still be
    seen there."""
    t = torch.randn(4, requires_grad=True)
    y = t * 2
    y.register_hook(lambda g: (read(g), None)[1])
    with OpRecorder() as rec:
        y.sum().backward()
    assert rec.syncs == {event: 1}, rec.sync_report()


def test_reads_of_declared_host_tensors_are_not_counted():
    cu = torch.tensor([0, 4, 10], dtype=torch.int32)
    with OpRecorder(host_tensors=[cu, None]) as rec:
        cu.tolist(), cu.detach().contiguous().numpy(), int(cu[1]), cu.cpu(), cu.to("cpu")
        x.tolist()  # not declared: counted
    assert rec.syncs == {"Tensor.tolist": 1}, rec.sync_report()


def test_nested_recorders_both_count_and_methods_are_restored():
    before = {name: torch.Tensor.__dict__.get(name) for name in ("tolist", "numpy", "__array__", "cpu", "to")}
    with pytest.raises(RuntimeError, match="raised inside"), OpRecorder() as outer:
        with OpRecorder() as inner:
            x.tolist()
        x.cpu()
        raise RuntimeError("raised inside the block")
    assert inner.syncs == {"Tensor.tolist": 1}
    assert outer.syncs == {"Tensor.tolist": 1, "to_cpu": 1}
    assert {name: torch.Tensor.__dict__.get(name) for name in before} == before
