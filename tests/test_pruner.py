import copy
import json

import pytest
import torch
import torchvision
from torch import nn

from prunable import (
    Plan, Pruner, PruningValueError, Scope, SurgeryError, TaylorActivation, WeightNorm, count_flops,
    count_params,
)
from conftest import assert_state_equal, state_copy


def small_cnn():
    return nn.Sequential(
        nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
        nn.Conv2d(16, 24, 3, padding=1, stride=2), nn.BatchNorm2d(24), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(24, 5),
    )


X = torch.randn(4, 3, 8, 8)
Y = torch.randint(0, 5, (4,))


@pytest.mark.parametrize("make_opt", [
    lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9),
    lambda p: torch.optim.Adam(p, lr=1e-3),
])
def test_optimizer_state_sliced_and_training_continues(make_opt):
    model = small_cnn()
    opt = make_opt(model.parameters())
    for _ in range(2):
        nn.functional.cross_entropy(model(X), Y).backward()
        opt.step()
        opt.zero_grad()
    weight = model[0].weight
    state = {k: v.clone() for k, v in opt.state[weight].items() if torch.is_tensor(v) and v.dim()}
    pruner = Pruner(model, X, criterion=WeightNorm(), optimizer=opt)
    pruner.prune({"0": [2, 5]})
    keep = [i for i in range(16) if i not in (2, 5)]
    assert model[0].weight is weight
    for k, v in state.items():
        torch.testing.assert_close(opt.state[weight][k], v[keep])
    nn.functional.cross_entropy(model(X), Y).backward()
    opt.step()
    assert model[0].weight.shape == (14, 3, 3, 3)


def test_step_global_and_layer_scope():
    model = small_cnn()
    pruner = Pruner(model, X, criterion=WeightNorm())
    plan = pruner.step(5)
    assert len(plan) == 5
    assert model[0].out_channels + model[3].out_channels == 40 - 5
    plan = pruner.step(2, scope=Scope.LAYER)
    assert plan.removals.keys() == {"0", "3"} and all(len(v) == 2 for v in plan.removals.values())


def test_step_removes_the_lowest_scores():
    model = small_cnn()
    with torch.no_grad():
        model[0].weight[7] *= 1e-3
    pruner = Pruner(model, X, criterion=WeightNorm())
    assert pruner.plan(1) == Plan({"0": (7,)})


def test_min_channels_and_round_to():
    model = small_cnn()
    pruner = Pruner(model, X, criterion=WeightNorm(), min_channels=4)
    for _ in range(40):
        try:
            pruner.step(1)
        except PruningValueError as exc:
            assert "exceeds the 0 channels" in str(exc)
            break
    assert model[0].out_channels == 4 and model[3].out_channels == 4
    model = small_cnn()
    pruner = Pruner(model, X, criterion=WeightNorm(), round_to=8)
    pruner.step(3)
    assert model[0].out_channels % 8 == 0 and model[3].out_channels % 8 == 0


def test_ignored_layers():
    model = small_cnn()
    pruner = Pruner(model, X, criterion=WeightNorm(), ignored_layers=[model[3]])
    assert "ignored layer 3" in pruner.skipped["3"]
    pruner.step(6)
    assert model[3].out_channels == 24 and model[0].out_channels == 10


@pytest.mark.parametrize("plan, message", [
    ({"nope": [0]}, "unknown group 'nope'"),
    ({"0": [16]}, "channel index 16 out of range"),
    ({"0": list(range(16))}, "min_channels"),
    ({"8": [0]}, "model output"),
])
def test_bad_plans_raise_and_leave_model_unchanged(plan, message):
    model = small_cnn()
    before = state_copy(model)
    pruner = Pruner(model, X, criterion=WeightNorm())
    with pytest.raises(PruningValueError, match=message):
        pruner.prune(plan)
    assert_state_equal(model, before)


class Fragile(nn.Module):
    """Its forward hard-codes a channel count: pruning `a` breaks it."""

    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(3, 8, 1)
        self.b = nn.Conv2d(3, 6, 1)
        self.c = nn.Conv2d(8, 2, 1)
        self.d = nn.Conv2d(6, 2, 1)

    def forward(self, x):
        y = self.a(x)
        return self.c(y.reshape(y.shape[0], 8, y.shape[2], y.shape[3])) + self.d(self.b(x))


def test_group_breaking_the_forward_is_skipped_and_plan_refused():
    model = Fragile()
    with pytest.warns(UserWarning, match="trial prune failed"):
        pruner = Pruner(model, X, criterion=WeightNorm())
    assert "trial prune failed" in pruner.skipped["a"] and "b" in {g.id for g in pruner.groups}
    before = state_copy(model)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    model(X).sum().backward()
    opt.step()
    momentum = opt.state[model.a.weight]["momentum_buffer"].clone()
    pruner.skipped.pop("a")  # force the bad plan through validation
    pruner.optimizer = opt
    before = state_copy(model)
    with pytest.raises(SurgeryError, match="group a"):
        pruner.prune({"a": [0]})
    assert_state_equal(model, before)
    assert torch.equal(opt.state[model.a.weight]["momentum_buffer"], momentum)


class NarrowLimit(nn.Module):
    """Its forward refuses fewer than 6 channels of `a`: the build's probe (8 → 7) passes,
    a later cut below 6 fails."""

    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Conv2d(3, 8, 1), nn.Conv2d(3, 6, 1)
        self.c, self.d = nn.Conv2d(8, 2, 1), nn.Conv2d(6, 2, 1)

    def forward(self, x):
        y = self.a(x)
        if y.shape[1] < 6:
            raise ValueError(f"a has {y.shape[1]} channels, at least 6 needed")
        return self.c(y) + self.d(self.b(x))


def test_a_group_that_breaks_after_a_prune_is_found_by_the_next_plans_trial():
    torch.manual_seed(0)
    model = NarrowLimit()
    with torch.no_grad():
        model.a.weight *= 1e-3  # a's channels rank first
    pruner = Pruner(model, X, criterion=WeightNorm())
    pruner.prune({"a": [0, 1]})  # 6 left: no probe trial after a prune, so a is still a group
    assert model.a.out_channels == 6 and "a" in {g.id for g in pruner.groups}
    before = state_copy(model)
    with pytest.raises(SurgeryError, match="group a"):
        pruner.prune({"a": [0]})  # the plan's own trial refuses the cut
    assert_state_equal(model, before)
    with pytest.warns(UserWarning, match="group a is not pruned: trial prune failed"):
        plan = pruner.step(1)  # a's channels still rank first: its trial fails, b loses one
    assert set(plan.removals) == {"b"} and model.a.out_channels == 6 and model.b.out_channels == 5
    assert pruner.skipped["a"].kind.value == "trial prune failed"
    assert model(X).shape == (4, 2, 8, 8)


def test_plan_json_replays_on_fresh_copy():
    torch.manual_seed(0)
    model = torchvision.models.resnet18(num_classes=10)
    fresh = copy.deepcopy(model)
    x = torch.randn(1, 3, 64, 64)
    pruner = Pruner(model, x, criterion=WeightNorm())
    pruner.step(40)
    pruner.step(40)
    texts = [p.to_json() for p in pruner.history]
    replay = Pruner(fresh, x, criterion=WeightNorm())
    for text in texts:
        json.loads(text)
        replay.prune(Plan.from_json(text))
    model.eval(), fresh.eval()
    torch.testing.assert_close(model(x), fresh(x))
    assert count_params(fresh) == count_params(model)


def test_prune_to_reaches_flops_target_with_taylor():
    model = small_cnn()
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    calls = []

    def fine_tune():
        calls.append(1)
        nn.functional.cross_entropy(model(X), Y).backward()
        opt.step()
        opt.zero_grad()

    pruner = Pruner(model, X, criterion=TaylorActivation(), optimizer=opt)
    start = count_flops(model, X)
    log = pruner.prune_to(flops=0.5, fine_tune=fine_tune, channels_per_step=4, progress=False)
    assert count_flops(model, X) <= 0.5 * start
    assert log[-1]["flops"] <= 0.5 and len(calls) == len(log)
    assert all(a["flops"] >= b["flops"] for a, b in zip(log, log[1:]))


def test_prune_to_calls_on_step_outside_the_hooks_and_merges_its_result():
    model = small_cnn()
    pruner = Pruner(model, X, criterion=TaylorActivation())
    seen = []

    def fine_tune():
        nn.functional.cross_entropy(model(X), Y).backward()
        return 0.5

    def on_step(record):
        seen.append(record["step"])
        with torch.no_grad():  # a validation pass: must not feed the estimates
            model(X)
        return {"val": float(record["step"]) * 10}

    log = pruner.prune_to(flops=0.6, fine_tune=fine_tune, channels_per_step=4, progress=False, on_step=on_step)
    assert seen == [r["step"] for r in log] and seen
    assert all(r["val"] == r["step"] * 10 and r["metric"] == 0.5 for r in log)


def test_report_lists_start_and_now_and_every_pruned_layer():
    model = small_cnn()
    pruner = Pruner(model, X, criterion=WeightNorm())
    before = pruner.report()  # measures the start
    assert "| flops |" in before and "0 plan(s)" in before
    flops, params = count_flops(model, X), count_params(model)
    pruner.step(5)
    pruner.step(3)
    text = pruner.report()
    assert f"| flops | {flops:,} | {count_flops(model, X):,} |" in text
    assert f"| params | {params:,} | {count_params(model):,} |" in text
    assert "2 plan(s) applied, 8 channels removed" in text
    widths = {line.split(" | ")[0][2:]: line for line in text.splitlines()[7:]}
    changed = [n for n, m in model.named_modules() if isinstance(m, nn.Conv2d) and m.out_channels < 16]
    assert changed and all(name in widths for name in changed)


def test_report_after_a_bare_step_measures_the_start():
    model = small_cnn()
    flops, params = count_flops(model, X), count_params(model)
    pruner = Pruner(model, X, criterion=WeightNorm())
    pruner.step(2)
    text = pruner.report()
    assert f"| flops | {flops:,} | {count_flops(model, X):,} |" in text
    assert f"| params | {params:,} | {count_params(model):,} |" in text


def test_prune_to_rejects_bad_targets():
    pruner = Pruner(small_cnn(), X, criterion=WeightNorm())
    with pytest.raises(PruningValueError, match="1.5"):
        pruner.prune_to(flops=1.5)
    with pytest.raises(PruningValueError, match="needs data"):
        Pruner(small_cnn(), X).prune_to(flops=0.5)


def test_group_norm_groups_each_lose_the_same_number_of_channels():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 12, 3), nn.GroupNorm(4, 12), nn.ReLU(), nn.Conv2d(12, 5, 3))
    x = torch.randn(2, 3, 10, 10)
    pruner = Pruner(model, x, criterion="l1")
    group = pruner.groups[0]
    assert group.blocks.tolist() == [[0, 1, 2], [3, 4, 5], [6, 7, 8], [9, 10, 11]]
    assert "GroupNorm 1" in group.blocks_of
    with pytest.raises(PruningValueError, match="same number"):
        pruner.prune({group.id: [0, 1]})
    assert model[1].num_channels == 12 and model[0].out_channels == 12
    plan = pruner.plan(0.4, Scope.LAYER)  # round(0.4 * 12) = 5 → 1 per group of 3, rounded
    assert sorted(len(set(plan.removals[group.id]) & set(row)) for row in group.blocks.tolist()) == [1, 1, 1, 1]
    pruner.prune(plan)
    assert (model[1].num_groups, model[1].num_channels, model[0].out_channels) == (4, 8, 8)
    assert model(x).shape == (2, 5, 6, 6)


def test_measure_of_a_plan_equals_the_pruned_model_and_touches_nothing():
    model = small_cnn()
    pruner = Pruner(model, X, criterion=WeightNorm())
    before = state_copy(model)
    plan = pruner.plan(7)
    predicted = pruner.measure(plan)
    assert_state_equal(model, before)
    assert predicted["flops"] < count_flops(model, X)
    pruner.prune(plan)
    assert predicted == {"flops": count_flops(model, X), "params": count_params(model)} == pruner.measure()


class _ReadsWidth(nn.Module):
    """Reads its input's channel count (which makes the trace fragile: the build runs its probe trial)."""

    def forward(self, x):
        return x * (x.size(1) > 0)


@pytest.mark.parametrize("reader", [nn.Identity, _ReadsWidth], ids=["build-copy", "copy-at-first-prune"])
def test_baseline_after_prunes_is_the_model_before_the_first_one(reader):
    """The baseline is counted lazily, on a meta copy (the build's traced copy when no probe trial used
    it, else one made at the first prune): asked only after two prunes, it still gives the unpruned
    model's FLOPs and params, and the model runs."""
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU6(), nn.Conv2d(8, 6, 3), reader(),
                          nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(6, 2))
    x = torch.randn(1, 3, 9, 9)
    before = {"flops": count_flops(model, x), "params": sum(p.numel() for p in model.parameters())}
    pruner = Pruner(model, x, criterion=WeightNorm())
    pruner.prune({"0": [0, 1]})
    pruner.prune({"0": [0]})
    assert model[0].out_channels == 5
    assert pruner.baseline == before
    assert pruner.measure()["flops"] < before["flops"]


# -- the build's probe trial: run where the graph cannot vouch for a cut ----------------------------------
class _Fragile(nn.Module):
    """conv c1 (8 channels) → ``op`` → conv c2: ``op`` breaks when c1 loses a channel, unseen by the graph."""

    OPS = {
        "plain tensor attribute": lambda self, y: y * self.scale,
        "constant": lambda self, y: y + torch.zeros(1, 8, 1, 1),
        "new_zeros": lambda self, y: y + y.new_zeros(8)[None, :, None, None],
        "arange": lambda self, y: y + torch.arange(8.0).view(1, 8, 1, 1),
        "assert on the size": lambda self, y: _asserted(y, 8),
        "view with literal sizes": lambda self, y: y.view(1, 8, 36).view(1, 8, 6, 6),
        "channels split by literal sizes": lambda self, y: y.reshape(1, 2, 4, 6, 6).flatten(1, 2),
    }

    def __init__(self, op: str) -> None:
        super().__init__()
        self.c1, self.c2, self.op = nn.Conv2d(3, 8, 3), nn.Conv2d(8, 4, 3), op
        self.scale = torch.ones(8, 1, 1)

    def forward(self, x):
        return self.c2(self.OPS[self.op](self, self.c1(x)))


def _asserted(y, n):
    assert y.shape[1] == n
    return y


@pytest.mark.parametrize("op", list(_Fragile.OPS))
def test_build_probe_skips_a_group_whose_cut_breaks_the_forward_pass_unseen_by_the_graph(op):
    from prunable.graph import trace_model
    from prunable.reasons import SkipKind

    model, x = _Fragile(op), torch.randn(1, 3, 8, 8)
    assert trace_model(model, x).trace.fragile is not None
    with pytest.warns(UserWarning, match="trial prune failed"):
        pruner = Pruner(model, x, criterion=WeightNorm())
    assert pruner.skipped["c1"].kind is SkipKind.TRIAL_FAILED


def _count_trials(monkeypatch):
    import prunable.validation

    runs = []
    real = prunable.validation.trial

    def counted(*args, **kwargs):
        runs.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(prunable.validation, "trial", counted)
    return runs


def test_build_probes_only_a_fragile_trace_and_skips_the_same_groups(monkeypatch):
    import prunable.pruner
    from prunable.graph import trace_model

    model, x = torchvision.models.mobilenet_v2(num_classes=10).eval(), torch.randn(1, 3, 32, 32)
    assert trace_model(model, x).trace.fragile is None  # convs, norms, activations, adds, pooling
    runs = _count_trials(monkeypatch)
    pruner = Pruner(model, x, criterion=WeightNorm())
    assert runs == []

    def fragile(*args, **kwargs):  # the same trace, called fragile: the probe runs
        traced = trace_model(*args, **kwargs)
        traced.trace.mark_fragile("forced")
        return traced

    monkeypatch.setattr(prunable.pruner, "trace_model", fragile)
    probed = Pruner(model, x, criterion=WeightNorm())
    assert runs and probed.skipped == pruner.skipped and probed.caps == pruner.caps


def test_grouped_convolution_that_is_not_depthwise_makes_the_trace_fragile():
    from prunable.graph import trace_model

    x = torch.randn(1, 4, 8, 8)
    depthwise = nn.Sequential(nn.Conv2d(4, 8, 1), nn.Conv2d(8, 8, 3, groups=8), nn.Conv2d(8, 2, 1))
    grouped = nn.Sequential(nn.Conv2d(4, 8, 1), nn.Conv2d(8, 8, 3, groups=2), nn.Conv2d(8, 2, 1))
    assert trace_model(depthwise, x).trace.fragile is None
    assert "conv2d" in trace_model(grouped, x).trace.fragile
