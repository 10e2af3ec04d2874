"""torch.compile: Pruner takes the compiled model, estimates through it, and it runs after pruning."""

import pytest
import torch
from torch import nn

from prunable import Pruner, TaylorActivation, TaylorWeight

counters = pytest.importorskip("torch._dynamo.utils").counters


def net():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                         nn.Conv2d(8, 6, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(6 * 6 * 6, 4))


torch.manual_seed(1)
X, Y = torch.randn(4, 3, 6, 6), torch.randint(0, 4, (4,))


def _frames() -> int:
    return sum(counters["frames"].values())


def _compiled(inplace: bool):
    model = net()
    if inplace:
        model.compile(backend="eager")
        compiled = model
    else:
        compiled = torch.compile(model, backend="eager")
    nn.functional.cross_entropy(compiled(X), Y).backward()  # compiled before any hook exists
    model.zero_grad()
    return model, compiled


def _estimated_scores(model, run, criterion):
    pruner = Pruner(model, X, criterion=criterion)
    with pruner.estimate():
        nn.functional.cross_entropy(run(X), Y).backward()
    return pruner, pruner.scores()


@pytest.mark.parametrize("inplace", [False, True], ids=["torch.compile", "module.compile"])
@pytest.mark.parametrize("criterion", [TaylorActivation, TaylorWeight])
def test_estimate_through_a_compiled_model(inplace, criterion):
    torch._dynamo.reset()
    model, compiled = _compiled(inplace)
    frames = _frames()
    pruner, scores = _estimated_scores(compiled, compiled, criterion())
    assert pruner.model is model
    assert _frames() == frames  # neither the tracer nor the estimate compiled anything
    plain = net()
    _, eager = _estimated_scores(plain, plain, criterion())  # the same model and data, never compiled
    assert scores.keys() == eager.keys()
    for gid in scores:
        torch.testing.assert_close(scores[gid], eager[gid])
    pruner.step(4)
    model.eval()
    out = compiled(X)  # recompiled for the new shapes
    assert _frames() > frames
    torch.testing.assert_close(out, model._call_impl(X) if inplace else model(X))
    assert pruner.model[0].out_channels + pruner.model[3].out_channels == 14 - 4
