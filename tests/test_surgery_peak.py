"""Surgery stages one module at a time: a bounded peak, and a failure mid-way rolls back."""

import pytest
import torch
from torch import nn

import prunable.staging as staging
from prunable import Pruner, SurgeryError, WeightNorm
from prunable.staging import SurgeryStats, slice_with_undo, unslice
from prunable.surgery import apply_cuts


def _net():
    torch.manual_seed(0)
    layers, c = [], 3
    for width in (16, 24, 32, 32, 32, 32, 24, 16):
        layers += [nn.Conv2d(c, width, 3, padding=1), nn.BatchNorm2d(width), nn.ReLU()]
        c = width
    return nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(c, 5))


X = torch.randn(2, 3, 8, 8)


def _trained(optimizer_cls=torch.optim.AdamW):
    """A model after one optimizer step: gradients and Adam moments for every parameter."""
    model = _net()
    opt = optimizer_cls(model.parameters(), lr=1e-3)
    model(X).square().mean().backward()
    opt.step()
    model(X).square().mean().backward()  # fresh gradients, kept
    return model, opt


def _snapshot(model, opt):
    state = {n: t.detach().clone() for n, t in model.state_dict().items()}
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    moments = {n: {k: v.clone() for k, v in opt.state[p].items()} for n, p in model.named_parameters()}
    sizes = {n: {k: v for k, v in vars(m).items() if type(v) in (int, tuple)} for n, m in model.named_modules()}
    return state, grads, moments, sizes


def _assert_same(model, opt, snap):
    state, grads, moments, sizes = snap
    now = _snapshot(model, opt)
    for before, after in zip((state, grads), now[:2]):
        assert before.keys() == after.keys()
        for k in before:
            assert before[k].shape == after[k].shape and torch.equal(before[k], after[k]), k
    for name in moments:
        for k, v in moments[name].items():
            assert torch.equal(v, now[2][name][k]), (name, k)
    assert sizes == now[3]


def _removals(pruner):
    return {g.id: list(range(0, g.channels, 4)) for g in pruner.groups}  # a quarter of every group


def _module_share(module, opt):
    """Bytes a module holds after the cut: parameters, gradients, optimizer tensors, buffers."""
    total = 0
    for p in module.parameters(recurse=False):
        tensors = [p, p.grad] + [v for v in opt.state[p].values() if v.shape == p.shape]
        total += sum(t.numel() * t.element_size() for t in tensors if t is not None)
    return total + sum(b.numel() * b.element_size() for b in module.buffers(recurse=False))


def test_staged_peak_is_the_largest_module_share_not_the_model():
    model, opt = _trained()
    pruner = Pruner(model, X, criterion=WeightNorm(), optimizer=opt)
    stats = SurgeryStats()
    apply_cuts(pruner.graph.cuts(_removals(pruner)), opt, stats=stats)
    largest = max(_module_share(m, opt) for m in model.modules())
    touched = sum(_module_share(m, opt) for m in model.modules())
    assert stats.total_bytes == pytest.approx(touched, rel=0.02)  # every touched tensor staged once
    assert stats.peak_bytes <= largest
    assert stats.peak_bytes < touched / 4  # all at once would hold `touched`
    model(X).sum().backward()
    opt.step()


@pytest.mark.parametrize("where", ["slice", "swap"])
@pytest.mark.parametrize("fail_at", [1, 9, 25])
def test_failure_mid_way_rolls_back_every_module(monkeypatch, where, fail_at):
    model, opt = _trained()
    pruner = Pruner(model, X, criterion=WeightNorm(), optimizer=opt)
    cuts = pruner.graph.cuts(_removals(pruner))
    snap = _snapshot(model, opt)
    calls = {"n": 0}
    target = "slice_with_undo" if where == "slice" else "swap_parameter"
    real = getattr(staging, target)

    def flaky(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == fail_at:
            raise RuntimeError("CUDA out of memory (simulated)")
        return real(*args, **kwargs)

    monkeypatch.setattr(staging, target, flaky)
    with pytest.raises(SurgeryError, match="out of memory"):
        apply_cuts(cuts, opt)
    monkeypatch.setattr(staging, target, real)
    assert calls["n"] >= fail_at  # the failure happened, after fail_at - 1 tensors were sliced or swapped
    _assert_same(model, opt, snap)
    pruner.prune(_removals(pruner))  # the model still prunes and trains
    model(X).sum().backward()
    opt.step()


@pytest.mark.parametrize("axes", [{0: [1, 3]}, {1: [0, 2, 3]}, {0: [0, 2], 1: [1]}, {1: [2], 0: [1, 2]}])
def test_unslice_rebuilds_the_tensor(axes):
    t = torch.randn(4, 5, 3)
    axes = {a: torch.tensor(k) for a, k in axes.items()}
    new, removed = slice_with_undo(t, axes)
    expected = t
    for a, k in axes.items():
        expected = expected.index_select(a, k)
    assert torch.equal(new, expected)
    assert sum(r.numel() for r in removed) == t.numel() - new.numel()
    assert torch.equal(unslice(new, axes, removed, t.shape), t)


def test_a_host_tensor_is_its_own_undo_record_without_a_copy():
    t = torch.randn(4, 5)
    axes = {0: torch.tensor([0, 3]), 1: torch.tensor([1, 2, 4])}
    new, removed = slice_with_undo(t, axes, whole=True)
    assert torch.equal(new, t[[0, 3]][:, [1, 2, 4]])
    assert len(removed) == 1 and removed[0].data_ptr() == t.data_ptr()  # the tensor itself, not a copy
    assert unslice(new, axes, removed, t.shape, whole=True) is t
