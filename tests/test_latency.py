"""Latency table and latency target: caching by signature, costs, rounding, the stop condition.

No test here times anything for real: a fake timer (:func:`fake_time`, parameters
of the module, optionally on a staircase) stands in for the clock, so every
assertion is about the mechanism, not about this machine's speed.
"""

import math

import pytest
import torch
from torch import nn

from prunable import Pruner, PruningValueError, count_params, latency
from prunable.latency import ALIGN, LatencyGoal, LatencyTable
from prunable.surgery import Role, handler_for
from conftest import assert_state_equal, state_copy


def fake_time(module, inputs):
    """Seconds = parameters of the module (µs): deterministic and monotone in every channel count."""
    return 1e-6 * count_params(module)


def staircase_time(module, inputs):
    """Seconds grow with the channel counts rounded up to multiples of ALIGN (a blocked kernel)."""
    def up(n):
        return ALIGN * math.ceil(n / ALIGN)
    h = handler_for(module)
    counts = [h.channels(module, Role.IN), h.channels(module, Role.OUT)] if h is not None else [None, None]
    if None in counts:
        return 1e-6 * count_params(module)
    return 1e-6 * up(counts[0]) * up(counts[1])


def cnn():
    """Two identical 16 → 16 convs (same input size): one signature."""
    return nn.Sequential(
        nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
        nn.Conv2d(16, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
        nn.Conv2d(16, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
        nn.Conv2d(16, 32, 3, padding=1, stride=2), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(32, 5),
    ).eval()


X = torch.randn(1, 3, 8, 8)


def table_of(model, timer=fake_time):
    pruner = Pruner(model, X, criterion="l1")
    return pruner, LatencyTable(model, pruner.example_inputs, pruner.groups, timer=timer)


def test_identical_layers_are_timed_once():
    calls = []
    _, table = table_of(cnn(), lambda m, x: calls.append(1) or fake_time(m, x))
    assert table.layers["3"].key == table.layers["6"].key and table.layers["0"].key != table.layers["3"].key
    assert len(calls) == len(table.cache)  # every (signature, in, out) timed once
    points = {(table.layers[n].key, i, o) for n in ("3", "6") for i in table.layers[n].ins
              for o in table.layers[n].outs}
    assert points <= set(table.cache) and len(points) == len(table.layers["3"].ins) * len(table.layers["3"].outs)
    assert table.untimed == {}


def test_a_shared_cache_times_nothing_twice():
    calls = []
    timer = lambda m, x: calls.append(1) or fake_time(m, x)  # noqa: E731
    model = cnn()
    pruner = Pruner(model, X, criterion="l1")
    cache = {}
    LatencyTable(model, pruner.example_inputs, pruner.groups, timer=timer, cache=cache)
    first = len(calls)
    LatencyTable(model, pruner.example_inputs, pruner.groups, timer=timer, cache=cache)
    assert first > 0 and len(calls) == first


def test_the_input_channel_axis_is_found_when_other_axes_have_its_size():
    model = nn.Sequential(nn.Conv2d(8, 8, 1), nn.ReLU(), nn.Conv2d(8, 8, 1), nn.Flatten(1), nn.Linear(512, 8),
                          nn.ReLU(), nn.Linear(8, 8))
    x = torch.randn(8, 8, 8, 8)
    pruner = Pruner(model, x, criterion="l1")
    table = LatencyTable(model, pruner.example_inputs, pruner.groups, timer=fake_time)
    assert table.layers["2"].axis == 1 and table.layers["6"].axis == 1


def test_predictions_fall_with_every_channel_and_match_the_timer_at_grid_points():
    pruner, table = table_of(cnn())
    drops = [table.predict(pruner.groups, {"3": k}) for k in range(0, 16)]
    assert all(a > b for a, b in zip(drops, drops[1:]))
    # 8 of 16 channels is a grid point: the predicted change is what the timer says for the resized layers
    layer3, layer6 = table.layers["3"], table.layers["6"]
    expected = (table.cache[(layer3.key, 16, 8)] - table.cache[(layer3.key, 16, 16)]
                + table.cache[(layer6.key, 8, 16)] - table.cache[(layer6.key, 16, 16)]
                + table.cache[(table.layers["4"].key, 8, 8)] - table.cache[(table.layers["4"].key, 16, 16)])
    assert table.predict(pruner.groups, {"3": 8}) == pytest.approx(expected)


def test_ranking_divides_importance_by_the_latency_cost():
    model = cnn()
    pruner, table = table_of(model)
    plain = pruner.scores()
    costs = table.costs(pruner.groups)
    assert all(c > 0 for c in costs.values()) and len(set(costs.values())) > 1
    pruner.ranking_cost = table.costs
    ranked = pruner.scores()
    for gid, s in plain.items():
        assert torch.allclose(ranked[gid], s / costs[gid])
    expected = min(ranked, key=lambda g: float(ranked[g].min()))
    assert list(pruner.plan(1).removals) == [expected]


def test_rounding_finds_staircases_only():
    pruner, stairs = table_of(cnn(), staircase_time)
    _, smooth = table_of(cnn(), fake_time)
    assert stairs.rounding(pruner.groups) == {"0": ALIGN, "3": ALIGN, "6": ALIGN, "9": ALIGN}
    assert smooth.rounding(pruner.groups) == {}


def test_a_snapped_plan_keeps_a_multiple_of_the_step(monkeypatch):
    monkeypatch.setattr(latency, "measure", staircase_time)
    pruner = Pruner(cnn(), X, criterion="l1")
    goal = LatencyGoal(pruner, 0.5)
    plan = goal.snap(pruner.plan(3, groups=["9"]))
    assert len(plan.removals["9"]) == 8  # 32 - 3 = 29 kept → 24
    assert set(pruner.plan(3, groups=["9"]).removals["9"]) <= set(plan.removals["9"])  # the least important first


def test_prune_to_latency_stops_at_the_first_step_under_the_target(monkeypatch):
    monkeypatch.setattr(latency, "measure", fake_time)
    model = cnn()
    start = count_params(model)
    pruner = Pruner(model, X, criterion="l1")
    log = pruner.prune_to(latency=0.5, channels_per_step=3, progress=False)
    assert log[-1]["latency"] == pytest.approx(count_params(model) / start)
    assert 0.45 <= log[-1]["latency"] <= 0.5
    assert all(r["latency"] > 0.5 for r in log[:-1])
    assert pruner.ranking_cost is None


def test_cost_latency_with_a_flops_target(monkeypatch):
    monkeypatch.setattr(latency, "measure", fake_time)
    pruner = Pruner(cnn(), X, criterion="l1")
    log = pruner.prune_to(flops=0.6, cost="latency", progress=False)
    assert 0.59 <= log[-1]["flops"] <= 0.6 and "latency" not in log[-1] and pruner.ranking_cost is None


@pytest.mark.parametrize("kwargs, match", [
    ({"latency": 0.0}, "latency=0.0"), ({"latency": 1.5}, "latency=1.5"), ({"latency": True}, "latency=True"),
    ({"latency": "half"}, "latency='half'"), ({"latency": 0.5, "flops": 0.5}, "cannot be combined"),
    ({"latency": 0.5, "params": 0.5}, "cannot be combined"), ({"flops": 0.5, "cost": "flops"}, "cost='flops'"),
])
def test_bad_arguments_are_refused_before_anything_runs(monkeypatch, kwargs, match):
    monkeypatch.setattr(latency, "measure", lambda m, x: pytest.fail("timed before the arguments were checked"))
    model = cnn()
    before = state_copy(model)
    pruner = Pruner(model, X, criterion="l1")
    with pytest.raises(PruningValueError, match=match):
        pruner.prune_to(**kwargs, progress=False)
    assert_state_equal(model, before)
    assert pruner.history == [] and pruner.ranking_cost is None


def test_a_failing_timer_leaves_the_model_as_it_was(monkeypatch):
    model = cnn().train()

    def timer(module, inputs):
        if module is model:
            raise RuntimeError("device lost")
        return fake_time(module, inputs)

    monkeypatch.setattr(latency, "measure", timer)
    before = state_copy(model)
    pruner = Pruner(model, X, criterion="l1")
    with pytest.raises(RuntimeError, match="device lost"):
        pruner.prune_to(latency=0.5, progress=False)
    assert_state_equal(model, before)
    assert model.training and pruner.history == [] and pruner.ranking_cost is None
    assert not any(m._forward_pre_hooks for m in model.modules())
