"""How :mod:`prunable.staging` swaps a cut tensor in, and puts sizes back when a cut fails late."""

import pytest
import torch
from torch import nn

from prunable import SurgeryError
from prunable.handlers import ModuleHandler, register_handler, unregister_handler
from prunable.surgery import Cut, Role, apply_cuts, keep_indices


@pytest.fixture
def swaps(monkeypatch):
    """The parameters ``torch.utils.swap_tensors`` is called on, by their shape before the swap."""
    calls = []
    real = torch.utils.swap_tensors

    def counting(t1, t2):
        calls.append(tuple(t1.shape))
        return real(t1, t2)

    monkeypatch.setattr(torch.utils, "swap_tensors", counting)
    return calls


def _step(conv: nn.Conv2d, opt: torch.optim.Optimizer) -> torch.Tensor:
    loss = conv(torch.randn(2, 3, 5, 5)).square().mean()
    loss.backward()
    opt.step()
    return loss


def test_a_parameter_nothing_else_holds_takes_its_new_data_without_a_swap(swaps):
    torch.manual_seed(0)
    conv = nn.Conv2d(3, 6, 3)
    opt = torch.optim.AdamW(conv.parameters(), lr=1e-2)
    _step(conv, opt)  # the loss and its graph are gone: nothing refers to the weight but the module
    weight, kept = conv.weight, conv.weight.detach()[[0, 2, 3, 5]].clone()
    apply_cuts([Cut(conv, Role.OUT, keep_indices(6, [1, 4]))], opt)
    assert swaps == []
    assert conv.weight is weight and torch.equal(conv.weight.detach(), kept)
    assert conv.weight.grad.shape == (4, 3, 3, 3) and opt.state[weight]["exp_avg"].shape == (4, 3, 3, 3)
    fired = []
    conv.weight.register_hook(lambda g: fired.append(g.shape))  # a hook registered after the cut fires
    _step(conv, opt)
    assert fired == [(4, 3, 3, 3)]


@pytest.mark.parametrize("holder", ["graph", "view", "hook"])
def test_a_parameter_something_else_holds_is_swapped(swaps, holder):
    """An alive graph (its AccumulateGrad node), a view or a tensor hook refers to the old
    tensor: ``swap_tensors`` gives the parameter a new one, and the next backward works."""
    torch.manual_seed(0)
    conv = nn.Conv2d(3, 6, 3)
    opt = torch.optim.SGD(conv.parameters(), lr=0.1, momentum=0.9)
    held = {"graph": lambda: _step(conv, opt), "view": lambda: _no_grad_view(conv.weight),
            "hook": lambda: conv.weight.register_hook(lambda g: None)}[holder]()
    apply_cuts([Cut(conv, Role.OUT, keep_indices(6, [1, 4]))], opt)
    assert (6, 3, 3, 3) in swaps
    assert held is not None
    _step(conv, opt)
    assert conv.weight.grad.shape == (4, 3, 3, 3)


def test_a_differentiable_view_alive_across_the_cut_does_not_break_the_next_backward(swaps):
    """``v = conv.weight[0]`` keeps the weight's gradient accumulator (and makes the swap
    impossible): the data is replaced, the accumulator forgotten, and the pruned layer's
    next backward gives gradients of the new shape."""
    torch.manual_seed(0)
    conv = nn.Conv2d(3, 6, 3)
    opt = torch.optim.SGD(conv.parameters(), lr=0.1, momentum=0.9)
    _step(conv, opt)  # a gradient and a momentum buffer to cut too
    view = conv.weight[0]
    kept, grad = conv.weight.detach()[[0, 2, 3, 5]].clone(), conv.weight.grad[[0, 2, 3, 5]].clone()
    apply_cuts([Cut(conv, Role.OUT, keep_indices(6, [1, 4]))], opt)
    assert (6, 3, 3, 3) in swaps and view.grad_fn is not None  # the swap was tried, and refused
    assert torch.equal(conv.weight.detach(), kept) and conv.weight.dtype == torch.float32
    assert torch.equal(conv.weight.grad, grad) and opt.state[conv.weight]["momentum_buffer"].shape == (4, 3, 3, 3)
    _step(conv, opt)
    assert conv.weight.grad.shape == (4, 3, 3, 3)


def _no_grad_view(t: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return t[0]


class _Scaled(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.gain = nn.Parameter(torch.arange(4.0))
        self.width, self.label = 4, (4, "wide")


class _FailingResize(ModuleHandler):
    def params(self, module, role):
        return {"gain": 0}

    def resize(self, module, role, n):
        module.width, module.label = n, (n, "narrow")
        raise RuntimeError("resize failed half-way (simulated)")


def test_a_resize_failing_half_way_puts_back_every_size_and_tensor():
    register_handler(_Scaled)(_FailingResize)
    try:
        first, second = _Scaled(), _Scaled()
        with pytest.raises(SurgeryError, match="resize failed"):
            apply_cuts([Cut(first, Role.OUT, torch.tensor([0, 2])), Cut(second, Role.OUT, torch.tensor([1]))])
    finally:
        unregister_handler(_Scaled)
    for module in (first, second):
        assert (module.width, module.label) == (4, (4, "wide"))
        assert torch.equal(module.gain.detach(), torch.arange(4.0))
