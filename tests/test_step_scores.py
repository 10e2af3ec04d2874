"""StepScores (a step's CPU Taylor sums scored in one flush) accumulates what per-point adds accumulate."""

import pytest
import torch
import torchvision
from torch import nn

from prunable import Pruner, TaylorActivation
from prunable.accumulate import ScoreAccumulator, StepScores, taylor_per_example
from prunable.importance import Criterion

POINTS = {"a": (1, 4), "b": (-1, 6), "c": (1, 3)}  # name: (channel dim, channels)


def _batch(name, n, size, gen):
    dim, c = POINTS[name]
    shape = (n, c, size, size) if dim == 1 else (n, size * size, c)
    return torch.randn(shape, generator=gen), torch.randn(shape, generator=gen), dim


def _steps():
    """Steps of (point, batch size, input size, a non-finite gradient?): sizes change, points are
    skipped (a dynamic path), one point's batch overflows, a point is run backward twice."""
    return [
        [("a", 5, 3, False), ("b", 5, 3, False), ("c", 5, 3, False)],
        [("a", 5, 4, False), ("b", 5, 4, True), ("c", 5, 4, False)],
        [("a", 2, 3, False), ("c", 2, 3, False)],
        [("a", 2, 3, False), ("b", 2, 3, False), ("c", 2, 3, False), ("b", 2, 3, False)],
        [("c", 7, 2, False), ("b", 7, 2, False), ("a", 7, 2, False)],
        [("a", 7, 2, False), ("b", 3, 2, False), ("c", 7, 2, False)],  # another first dim in a step
        [("a", 7, 2, False), ("b", 3, 2, False), ("c", 7, 2, False)],
    ]


@pytest.mark.parametrize("abs_after_batch_mean", [False, True])
def test_step_scores_accumulate_what_per_point_adds_accumulate(monkeypatch, abs_after_batch_mean):
    gen = torch.Generator().manual_seed(0)
    steps, layouts = StepScores(abs_after_batch_mean), []
    layout = steps._layout
    monkeypatch.setattr(steps, "_layout", lambda *args: layouts.append(args[2]) or layout(*args))
    ours = {k: ScoreAccumulator(abs_after_batch_mean) for k in POINTS}
    plain = {k: ScoreAccumulator(abs_after_batch_mean) for k in POINTS}
    for step in _steps():
        for name, n, size, bad in step:
            a, g, dim = _batch(name, n, size, gen)
            if bad:
                g[0, 0] = float("inf")
            steps.add(name, ours[name], a, g, dim)
            plain[name].add(taylor_per_example(a, g, dim))
    steps.remove()
    for name in POINTS:
        assert (ours[name].count, ours[name].skipped) == (plain[name].count, plain[name].skipped)
        torch.testing.assert_close(ours[name].value(), plain[name].value(), rtol=1e-6, atol=0)
    assert ours["b"].skipped == 1 and ours["a"].skipped == 0
    assert layouts == [5, 5, 5, 2, 7]  # three new points, two new batch sizes; none for another first dim


def test_a_read_flushes_the_pending_step_and_a_new_layout_keeps_the_totals():
    gen = torch.Generator().manual_seed(1)
    steps, acc, other = StepScores(), ScoreAccumulator(), ScoreAccumulator()
    a, g, dim = _batch("a", 3, 2, gen)
    steps.add("a", acc, a, g, dim)
    assert acc.count == 3  # read before any flush: the batch is in
    first = acc.value().clone()
    steps.add("x", other, a, g, dim)  # a new point: new columns, the old total kept
    steps.add("a", acc, a[:1], g[:1], dim)  # a new batch size
    steps.remove()
    expected = (first * 3 + taylor_per_example(a[:1], g[:1]).abs().sum(0)) / 4
    torch.testing.assert_close(acc.value(), expected, rtol=1e-6, atol=0)
    assert (acc.count, other.count) == (4, 3)


def _scores(model, x, y, dtype, per_point):
    model = model.to(dtype)
    criterion = TaylorActivation()
    if per_point:  # the per-point path every criterion has
        criterion.accumulate = lambda *args: Criterion.accumulate(criterion, *args)
    pruner = Pruner(model, x[:1].to(dtype), criterion=criterion)
    with pruner.estimate():
        for n in (len(x), len(x) - 3):
            model.zero_grad()
            nn.functional.cross_entropy(model(x[:n].to(dtype)).float(), y[:n]).backward()
    return {k: (acc.value(), acc.count) for k, acc in criterion.accumulators.items()}


@pytest.mark.slow
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_resnet_scores_equal_the_per_point_scores(dtype):
    gen = torch.Generator().manual_seed(2)
    x, y = torch.randn(6, 3, 32, 32, generator=gen), torch.randint(0, 10, (6,), generator=gen)
    got = []
    for per_point in (False, True):
        torch.manual_seed(0)
        got.append(_scores(torchvision.models.resnet18(num_classes=10), x, y, dtype, per_point))
    assert got[0].keys() == got[1].keys() and len(got[0]) == 20
    for k in got[0]:
        assert got[0][k][1] == got[1][k][1]
        torch.testing.assert_close(got[0][k][0], got[1][k][0], rtol=1e-6, atol=0)


def test_a_criterion_with_step_scores_copies_and_pickles():
    import copy
    import pickle

    from prunable.importance import MeasurePoint, estimating

    conv, gen = nn.Conv2d(2, 3, 1), torch.Generator().manual_seed(3)
    batches = [torch.randn(4, 2, 3, 3, generator=gen) for _ in range(3)]
    criterion, point = TaylorActivation(), MeasurePoint("conv", conv, 1, conv)
    with estimating(criterion, [point]):
        for x in batches[:2]:
            conv(x).square().sum().backward()
        copies = [copy.deepcopy(criterion), pickle.loads(pickle.dumps(criterion))]  # a batch pending in the buffer
    for other in [criterion, *copies]:  # each goes on with one more batch
        with estimating(other, [point]):
            conv(batches[2]).square().sum().backward()
    for other in copies:
        assert other.accumulators["conv"].count == 12
        torch.testing.assert_close(other.accumulators["conv"].value(), criterion.accumulators["conv"].value(),
                                   rtol=0, atol=0)
