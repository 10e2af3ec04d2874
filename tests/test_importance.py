import math

import pytest
import torch
from torch import nn

from prunable import (
    APoZ, Aggregation, BNScale, EstimationError, MeanActivation, Pruner, Random, TaylorActivation,
    TaylorBN, TaylorWeight, WeightNorm,
)
from prunable.importance import ScoreAccumulator, l2_normalize, taylor_per_example


def net():
    return nn.Sequential(
        nn.Conv2d(3, 6, 3, padding=1), nn.BatchNorm2d(6), nn.ReLU(),
        nn.Conv2d(6, 4, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 5 * 5, 3),
    )


X = torch.randn(8, 3, 5, 5)
Y = torch.randint(0, 3, (8,))


def _run(pruner, model, batches=2):
    with pruner.estimate():
        for i in range(batches):
            nn.functional.cross_entropy(model(X[i::batches]), Y[i::batches]).backward()


def test_taylor_activation_measures_bn_output_exactly():
    model = net()
    pruner = Pruner(model, X)
    captured = []

    def keep(module, inputs, output):
        output.retain_grad()
        captured.append(output)

    model[1].register_forward_hook(keep)
    with pruner.estimate():
        nn.functional.cross_entropy(model(X), Y).backward()
    a, g = captured[0].detach(), captured[0].grad
    expected = (a * g).mean((2, 3)).abs().mean(0)
    scores = pruner.criterion.scores(pruner._points["1"])
    torch.testing.assert_close(scores, expected)
    assert pruner.groups[0].measure[0][0] == "1"


def test_accumulator_two_batches_equal_combined():
    a, g = torch.randn(6, 3, 4, 4), torch.randn(6, 3, 4, 4)
    split, whole = ScoreAccumulator(), ScoreAccumulator()
    split.add(taylor_per_example(a[:2], g[:2]))
    split.add(taylor_per_example(a[2:], g[2:]))
    whole.add(taylor_per_example(a, g))
    torch.testing.assert_close(split.value(), whole.value())
    seed = ScoreAccumulator(abs_after_batch_mean=True)
    seed.add(taylor_per_example(a, g))
    torch.testing.assert_close(seed.value(), (a * g).mean((2, 3)).mean(0).abs())


def test_l2_normalize_guards_zero():
    assert torch.equal(l2_normalize(torch.zeros(3)), torch.zeros(3))
    assert math.isclose(float(torch.linalg.vector_norm(l2_normalize(torch.tensor([3.0, 4.0])))), 1.0)


@pytest.mark.parametrize("criterion", [
    TaylorActivation(), TaylorActivation(abs_after_batch_mean=True), TaylorBN(), TaylorWeight(),
    WeightNorm(1), WeightNorm(2), BNScale(), MeanActivation(), APoZ(), Random(seed=3),
])
def test_every_criterion_scores_and_prunes(criterion):
    model = net()
    pruner = Pruner(model, X, criterion=criterion)
    _run(pruner, model)
    scores = pruner.scores()
    assert set(scores) == {"0", "3"}
    assert all(torch.isfinite(s).all() and s.shape == (g.channels,) for g, s in zip(pruner.groups, scores.values()))
    pruner.step(2)
    assert model(X).shape == (8, 3)
    assert not any(m._forward_hooks for m in model.modules())


def test_weight_norm_and_bn_scale_values():
    model = net()
    pruner = Pruner(model, X, criterion=WeightNorm(2))
    point = pruner._points["1"]
    torch.testing.assert_close(pruner.criterion.scores(point), model[0].weight.detach().flatten(1).norm(dim=1))
    with torch.no_grad():
        model[1].weight.copy_(torch.tensor([1.0, -5.0, 0.1, 2.0, 3.0, 4.0]))
    assert Pruner(model, X, criterion=BNScale()).plan(1).removals == {"0": (2,)}


def test_random_is_seeded():
    a = Pruner(net(), X, criterion=Random(seed=1)).plan(3)
    b = Pruner(net(), X, criterion=Random(seed=1)).plan(3)
    assert a == b


def test_step_without_backward_is_a_clear_error():
    model = net()
    pruner = Pruner(model, X)
    with pruner.estimate():
        model(X)  # forward only
    with pytest.raises(EstimationError, match="backward"):
        pruner.step(1)


def test_nan_scores_name_the_group():
    model = net()
    pruner = Pruner(model, X, criterion=TaylorActivation())
    _run(pruner, model)
    pruner.criterion.accumulators["4" if "4" in pruner.criterion.accumulators else "3"].total[0] = float("nan")
    with pytest.raises(EstimationError, match="group 3"):
        pruner.scores()


def test_hooks_removed_on_exception():
    model = net()
    pruner = Pruner(model, X)
    with pytest.raises(RuntimeError, match="boom"):
        with pruner.estimate():
            raise RuntimeError("boom")
    assert not any(m._forward_hooks for m in model.modules())


class Residual(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(3, 4, 1)
        self.b = nn.Conv2d(3, 4, 1)
        self.head = nn.Conv2d(4, 2, 1)

    def forward(self, x):
        return self.head(self.a(x) + self.b(x))


@pytest.mark.parametrize("how", list(Aggregation))
def test_group_aggregation(how):
    model = Residual()
    with torch.no_grad():
        model.a.weight.copy_(torch.tensor([1.0, 2.0, 3.0, 4.0]).view(4, 1, 1, 1).expand(4, 3, 1, 1))
        model.b.weight.copy_(torch.tensor([4.0, 3.0, 2.0, 1.0]).view(4, 1, 1, 1).expand(4, 3, 1, 1))
    pruner = Pruner(model, X, criterion=WeightNorm(), aggregation=how)
    a = l2_normalize(torch.tensor([1.0, 2.0, 3.0, 4.0]))
    b = a.flip(0)
    expected = {Aggregation.SUM: a + b, Aggregation.MEAN: (a + b) / 2, Aggregation.MAX: torch.maximum(a, b)}[how]
    torch.testing.assert_close(pruner.scores()["a"], expected)


def test_flops_regularization_subtracts_lambda_times_mflops():
    model = nn.Sequential(nn.Conv2d(3, 4, 1), nn.ReLU(), nn.Conv2d(4, 4, 5, padding=2), nn.ReLU(), nn.Conv2d(4, 2, 1))
    plain = Pruner(model, X, criterion=WeightNorm()).scores()
    reg = Pruner(model, X, criterion=WeightNorm(), flops_regularization=1e-3).scores()
    n, hw = X.shape[0], 25
    conv0_out = 2 * n * hw * 3  # FLOPs per output channel of the 1x1 conv
    conv2_io = 2 * n * hw * 4 * 25  # per input (or output) channel of the 5x5 conv
    conv4_in = 2 * n * hw * 2
    torch.testing.assert_close(plain["0"] - reg["0"], torch.full((4,), 1e-3 * (conv0_out + conv2_io) / 1e6 / n))
    torch.testing.assert_close(plain["2"] - reg["2"], torch.full((4,), 1e-3 * (conv2_io + conv4_in) / 1e6 / n))
    on = Pruner(model, X, criterion=WeightNorm(), flops_regularization=True)
    assert on.flops_regularization == 1e-3


@pytest.mark.parametrize("criterion", [TaylorBN, TaylorWeight])
def test_parameter_criteria_keep_estimating_after_each_prune(criterion):
    """Regression: gradient hooks on pruned parameters used to stay silent after the first prune."""
    torch.manual_seed(0)
    model = net()
    pruner = Pruner(model, X, criterion=criterion())
    for _ in range(3):
        _run(pruner, model)
        scores = pruner.scores()
        assert all(s.abs().sum() > 0 for s in scores.values())
        pruner.step(1)
