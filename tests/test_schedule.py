"""prune_to lands on its target, max_ratio caps, arguments checked first, progress, failing cuts."""

import copy
import io
import logging
import sys
import warnings

import pytest
import torch
from torch import nn

from prunable import Pruner, PruningValueError, WeightNorm, count_flops, count_params
from conftest import assert_state_equal, state_copy


def cnn(dims):
    """Four conv layers (2-D or 3-D): a channel costs under 1 % of the FLOPs, 8 channels far more."""
    conv, norm, pool = {2: (nn.Conv2d, nn.BatchNorm2d, nn.AdaptiveAvgPool2d),
                        3: (nn.Conv3d, nn.BatchNorm3d, nn.AdaptiveAvgPool3d)}[dims]
    return nn.Sequential(
        conv(2, 32, 3, padding=1), norm(32), nn.ReLU(),
        conv(32, 48, 3, padding=1, stride=2), norm(48), nn.ReLU(),
        conv(48, 48, 3, padding=1), norm(48), nn.ReLU(),
        conv(48, 64, 3, padding=1), nn.ReLU(), pool(1), nn.Flatten(), nn.Linear(64, 5),
    ).eval()


INPUTS = {2: torch.randn(2, 2, 8, 8), 3: torch.randn(2, 2, 6, 6, 6)}


@pytest.mark.parametrize("dims", [2, 3])
@pytest.mark.parametrize("key, target", [("flops", 0.3), ("flops", 0.6), ("flops", 0.9), ("params", 0.5)])
def test_prune_to_ends_within_one_point_under_the_target(dims, key, target):
    model, x = cnn(dims), INPUTS[dims]
    start = {"flops": count_flops(model, x), "params": count_params(model)}
    log = Pruner(model, x, criterion="l1").prune_to(**{key: target}, channels_per_step=8, progress=False)
    now = {"flops": count_flops(model, x), "params": count_params(model)}
    reached = now[key] / start[key]
    assert target - 0.01 <= reached <= target
    assert log[-1][key] == reached and log[-1]["params"] == now["params"] / start["params"]  # exact fractions
    assert all(r["removed"] <= 8 for r in log) and log[0]["removed"] == 8


def coarse(dims):
    """Each conv channel is 2 to 6 points of the FLOPs: no count of the least important
    channels lands within 1 point of most targets; a combination of cuts does."""
    conv, norm, pool = {2: (nn.Conv2d, nn.BatchNorm2d, nn.AdaptiveAvgPool2d),
                        3: (nn.Conv3d, nn.BatchNorm3d, nn.AdaptiveAvgPool3d)}[dims]
    return nn.Sequential(
        conv(2, 16, 3, padding=1), norm(16), nn.ReLU(),
        conv(16, 32, 3, padding=1, stride=2), norm(32), nn.ReLU(),
        pool(1), nn.Flatten(), nn.Linear(32, 128), nn.ReLU(), nn.Linear(128, 5),
    ).eval()


def huge():
    """One 9×9 conv holds 78 % of the FLOPs and 80 % of the parameters: a channel on either
    side of it is about 10 points; the 1×1 convs after it give sub-point channels."""
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 9, padding=4), nn.ReLU(),
        nn.Conv2d(8, 32, 1), nn.ReLU(), nn.Conv2d(32, 32, 1), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(32, 4),
    ).eval()


def two_huge(wide=False):
    """Two 7×7 convs hold most of the FLOPs and parameters (a channel on either side of them is 4 to
    12 points); one fine layer (a Linear of 64, or a 1×1 conv of 96, channels under a point each)
    is the least important, so importance-first steps would use it up before the last step."""
    if wide:
        return nn.Sequential(
            nn.Conv2d(3, 6, 7, padding=3), nn.ReLU(), nn.Conv2d(6, 6, 7, padding=3), nn.ReLU(),
            nn.Conv2d(6, 6, 7, padding=3), nn.ReLU(), nn.Conv2d(6, 96, 1), nn.ReLU(),
            nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(96, 4)).eval()
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 7, padding=3), nn.ReLU(),
        nn.Conv2d(8, 8, 7, padding=3), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
        nn.Linear(8, 64), nn.ReLU(), nn.Linear(64, 4)).eval()


LANDING = {
    "coarse 2-D": (lambda: coarse(2), torch.randn(2, 2, 8, 8)),
    "coarse 3-D": (lambda: coarse(3), torch.randn(2, 2, 6, 6, 6)),
    # without the lookahead (intermediate steps keep fine channels in reserve) these end 1.7 to 4.6 points
    # under: huge conv at flops 0.5 and 0.3, two huge convs at flops 0.5 and params 0.5, wide at params 0.7
    "huge conv": (huge, torch.randn(2, 3, 8, 8)),
    "two huge convs": (two_huge, torch.randn(2, 3, 8, 8)),
    "two huge convs, wide": (lambda: two_huge(wide=True), torch.randn(2, 3, 8, 8)),
}


@pytest.mark.parametrize("net, key, target", [
    (net, key, target) for net in LANDING for key, target in [("flops", 0.5), ("flops", 0.3), ("params", 0.5),
                                                              ("params", 0.7)]])
def test_prune_to_lands_within_one_point_on_coarse_nets(net, key, target):
    build, x = LANDING[net]
    torch.manual_seed(0)
    model = build()
    start = {"flops": count_flops(model, x), "params": count_params(model)}
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no "closest under" warning: a combination lands
        log = Pruner(model, x, criterion="l1").prune_to(**{key: target}, channels_per_step=8, progress=False)
    reached = {"flops": count_flops(model, x) / start["flops"], "params": count_params(model) / start["params"]}
    assert target - 0.01 <= reached[key] <= target
    assert log[-1][key] == reached[key] and "landing" not in log[-1]


@pytest.mark.parametrize("net", ["huge conv", "4-conv cnn"])
def test_intermediate_steps_stay_importance_first_where_landing_is_not_at_stake(net):
    """The lookahead only reshapes a step that would leave the last one too few fine channels:
    on these runs every step but the last is the plain choice, the least important channels."""
    build, x = LANDING[net] if net in LANDING else (lambda: cnn(2), INPUTS[2])
    torch.manual_seed(0)
    model = build()
    twin = Pruner(copy.deepcopy(model), x, criterion="l1")
    pruner = Pruner(model, x, criterion="l1")
    pruner.prune_to(flops=0.5, channels_per_step=8, progress=False)
    assert len(pruner.history) >= 4
    for plan in pruner.history[:-1]:
        assert plan == twin.plan(8)
        twin.prune(plan)


def test_when_no_cut_lands_it_ends_at_the_closest_under_the_target_and_says_so():
    model, x = nn.Sequential(nn.Conv2d(1, 2, 3, padding=1), nn.ReLU(), nn.Conv2d(2, 1, 3, padding=1)), \
        torch.randn(1, 1, 6, 6)
    start = count_flops(model, x)
    with pytest.warns(UserWarning, match=r"no combination of cuts .* lands within 1 point.*ended at flops=0\.5") \
            as caught:
        log = Pruner(model, x, criterion="l1").prune_to(flops=0.7, progress=False)
    reached = count_flops(model, x) / start
    assert model[0].out_channels == 1 and reached < 0.69 and log[-1]["flops"] == reached
    assert "no combination" in log[-1]["landing"] and f"flops={reached:.6g}" in str(caught[0].message)


def test_when_provably_no_cut_lands_the_warning_says_none_exists_with_the_exact_fraction():
    """Every cut of this net is enumerated here: none ends within 1 point under 0.7, so the run must
    say that none exists, end at the closest cut under the target and give its exact fraction."""
    model = nn.Sequential(nn.Conv2d(1, 3, 3, padding=1), nn.ReLU(), nn.Conv2d(3, 2, 3, padding=1), nn.ReLU(),
                          nn.Conv2d(2, 1, 3, padding=1))
    x = torch.randn(1, 1, 6, 6)
    probe = Pruner(copy.deepcopy(model), x, criterion="l1")
    start = probe.measure()["flops"]
    under = [probe.measure({gid: range(k) for gid, k in (("0", a), ("2", b)) if k})["flops"] / start
             for a in range(3) for b in range(2)]
    under = [f for f in under if f <= 0.7]
    assert under and max(under) < 0.69  # no cut lands
    with pytest.warns(UserWarning, match=r"every count of each searched: none exists") as caught:
        log = Pruner(model, x, criterion="l1").prune_to(flops=0.7, progress=False)
    assert log[-1]["flops"] == max(under) == count_flops(model, x) / start
    assert f"ended at flops={max(under):.6g}, the closest" in str(caught[0].message)
    assert "none exists" in log[-1]["landing"]


def test_max_ratio_float_caps_every_group_of_its_original_channels():
    model, x = cnn(2), INPUTS[2]
    pruner = Pruner(model, x, criterion="l1", max_ratio=0.5)
    with pytest.warns(UserWarning, match="target not reached"):
        pruner.prune_to(flops=0.05, channels_per_step=16, progress=False)
    widths = [model[i].out_channels for i in (0, 3, 6)]
    assert widths == [16, 24, 24]
    assert all("max_ratio=0.5 reached" in pruner.skipped[g] for g in ("0", "3", "6"))


def test_max_ratio_per_layer_the_strictest_member_caps_the_group():
    model, x = cnn(2), INPUTS[2]
    conv3 = state_copy(model[3])
    pruner = Pruner(model, x, criterion="l1", max_ratio={"3": 0.0, model[6]: 0.25})
    assert str(pruner.skipped["0"]) == "max_ratio=0 of layer 3 reached"  # conv 3 reads group 0
    assert str(pruner.skipped["3"]) == "max_ratio=0 of layer 3 reached"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pruner.prune_to(flops=0.1, channels_per_step=8, progress=False)
    assert_state_equal(model[3], conv3)
    assert model[0].out_channels == 32 and model[6].out_channels == 36  # 48 - 12
    with pytest.raises(PruningValueError, match="max_ratio"):
        pruner.prune({"6": [0]})


def test_explicit_plan_beyond_max_ratio_is_refused_and_nothing_changes():
    model, x = cnn(2), INPUTS[2]
    before = state_copy(model)
    pruner = Pruner(model, x, criterion="l1", max_ratio=0.25)
    with pytest.raises(PruningValueError, match="group 3: removing 13 channels exceeds the 12"):
        pruner.prune({"3": range(13)})
    assert_state_equal(model, before)
    pruner.prune({"3": range(12)})
    assert model[3].out_channels == 36


def test_max_ratio_names_that_match_nothing_list_close_names():
    model, x = cnn(2), INPUTS[2]
    with pytest.raises(PruningValueError, match="'31'.*close names: 3"):
        Pruner(model, x, criterion="l1", max_ratio={"31": 0.5})
    with pytest.raises(PruningValueError, match=r"max_ratio=1.5.*\[0, 1\]"):
        Pruner(model, x, criterion="l1", max_ratio=1.5)


BAD_CALLS = {
    "channels_per_step=0": (lambda p: p.prune_to(flops=0.5, channels_per_step=0), r"channels_per_step=0.*int >= 1"),
    "channels_per_step=-1": (lambda p: p.prune_to(flops=0.5, channels_per_step=-1), "channels_per_step=-1"),
    "channels_per_step=1.5": (lambda p: p.prune_to(flops=0.5, channels_per_step=1.5), r"fraction in \(0, 1\)"),
    "prune_every=0": (lambda p: p.prune_to(flops=0.5, prune_every=0), r"prune_every=0.*int >= 1"),
    "flops=0": (lambda p: p.prune_to(flops=0), r"flops=0.*\(0, 1\]"),
    "params='half'": (lambda p: p.prune_to(params="half"), "params='half'"),
    "no target": (lambda p: p.prune_to(), "flops= or params="),
    "fine_tune=3": (lambda p: p.prune_to(flops=0.5, fine_tune=3), "fine_tune=3.*callable"),
    "progress='yes'": (lambda p: p.prune_to(flops=0.5, progress="yes"), "progress='yes'"),
    "scope='laye'": (lambda p: p.step(2, scope="laye"), "scope='laye'.*'global', 'layer'"),
    "step(0)": (lambda p: p.step(0), "n=0"),
    "step(-1)": (lambda p: p.step(-1), "n=-1"),
    "plan(1.0)": (lambda p: p.plan(1.0), r"n=1.0.*\(0, 1\)"),
    "plan(groups=['99'])": (lambda p: p.plan(1, groups=["99"]), r"groups=\['99'\]: no such group; groups are \['0'"),
}


@pytest.mark.parametrize("case", BAD_CALLS, ids=list(BAD_CALLS))
def test_bad_arguments_are_refused_before_anything_changes(case):
    call, message = BAD_CALLS[case]
    model, x = cnn(2), INPUTS[2]
    before = state_copy(model)
    pruner = Pruner(model, x, criterion="l1")
    with pytest.raises(PruningValueError, match=message):
        call(pruner)
    assert_state_equal(model, before)
    assert pruner.log == [] and pruner.history == []


@pytest.mark.parametrize("kwargs, message", [
    ({"min_channels": 0}, "min_channels=0"), ({"round_to": 0}, "round_to=0"),
    ({"aggregation": "median"}, "aggregation='median'.*'sum'"),
    ({"flops_regularization": -1.0}, "flops_regularization"),
    ({"criterion": "l3"}, "unknown criterion 'l3'.*l1"),
])
def test_bad_pruner_options_name_the_option(kwargs, message):
    with pytest.raises(PruningValueError, match=message):
        Pruner(cnn(2), INPUTS[2], **{"criterion": "l1", **kwargs})


@pytest.mark.parametrize("returned, kept", [
    (torch.tensor(0.25), 0.25), (torch.tensor([0.5]), 0.5), (3, 3.0), ("fine", "fine"), (None, None),
])
def test_fine_tune_results_are_kept_in_the_log(returned, kept):
    model, x = cnn(2), INPUTS[2]
    log = Pruner(model, x, criterion="l1").prune_to(flops=0.8, fine_tune=lambda: returned, progress=False)
    assert all(r.get("metric") == kept for r in log) and log
    if kept is not None:
        assert type(log[-1]["metric"]) is type(kept)


def test_fine_tune_returning_a_many_element_tensor_or_dict():
    model, x = cnn(2), INPUTS[2]
    pruner = Pruner(model, x, criterion="l1")
    log = pruner.prune_to(flops=0.9, fine_tune=lambda: torch.tensor([1.0, 2.0]), progress=False)
    assert torch.equal(log[-1]["metric"], torch.tensor([1.0, 2.0]))
    log = pruner.prune_to(flops=0.8, fine_tune=lambda: {"loss": torch.tensor(1.5)}, progress=False)
    assert log[-1]["loss"] == 1.5


class Sliced(nn.Module):
    """``a``'s output is sliced to a literal 16 channels: any cut below channel 16 breaks it."""

    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Conv2d(3, 32, 1), nn.Conv2d(16, 8, 1)
        self.c, self.d = nn.Conv2d(3, 12, 1), nn.Conv2d(12, 8, 1)

    def forward(self, x):
        return self.b(self.a(x)[:, :16]) + self.d(torch.relu(self.c(x)))


def test_a_group_whose_real_cut_fails_is_skipped_and_the_others_pruned():
    torch.manual_seed(0)
    model, x = Sliced(), torch.randn(2, 3, 5, 5)
    with torch.no_grad():
        model.a.weight[:8] *= 1e-3  # a's lowest channels come first: the step's plan holds both groups
        model.c.weight[:3] *= 1e-2
    a_before = state_copy(model.a)
    pruner = Pruner(model, x, criterion=WeightNorm())
    first = pruner.plan(12)
    assert set(first.removals) == {"a", "c"}  # the per-group trial (a's channel 31) passed
    with pytest.warns(UserWarning, match="group a is not pruned: trial prune failed"):
        plan = pruner.step(12)
    assert set(plan.removals) == {"c"} and len(plan) == 11 and model.c.out_channels == 1
    assert "trial prune failed" in pruner.skipped["a"] and "a" not in {g.id for g in pruner.groups}
    assert_state_equal(model.a, a_before)
    assert model(x).shape == (2, 8, 5, 5)
    pruner.step(0.5) if pruner.groups else None  # later steps do not retry the failing group
    assert "trial prune failed" in pruner.skipped["a"]


class _Terminal(io.StringIO):
    def isatty(self):
        return True


def test_progress_is_a_log_line_per_step_unless_stderr_is_a_terminal(monkeypatch, caplog):
    model, x = cnn(2), INPUTS[2]
    stream = io.StringIO()
    monkeypatch.setattr(sys, "stderr", stream)
    with caplog.at_level(logging.INFO, logger="prunable"):
        log = Pruner(model, x, criterion="l1").prune_to(flops=0.8, progress=True)
    lines = [r.getMessage() for r in caplog.records if r.name == "prunable"]
    assert len(lines) == len(log) and lines[0].startswith("pruning step 1: 8 channels removed; flops 0.")
    assert "\r" not in stream.getvalue()
    terminal = _Terminal()
    monkeypatch.setattr(sys, "stderr", terminal)
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="prunable"):
        log = Pruner(cnn(2), x, criterion="l1").prune_to(flops=0.8, progress=True)
    assert "pruning" in terminal.getvalue() and "\r" in terminal.getvalue()
    assert not [r for r in caplog.records if r.name == "prunable"]
