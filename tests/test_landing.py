"""landing.search: the combination of cuts that lands within the tolerance, least importance first."""

import itertools

import pytest

from prunable import landing
from prunable.landing import Option, in_reserve, search


def option(group, drop, limit=4, importance=1.0, bend=0.0, unit=1):
    return Option(group, unit, limit, {"flops": drop}, [importance * k for k in range(limit + 1)],
                  {"flops": bend} if bend else {})


def test_the_least_important_combination_that_lands_wins():
    # 0.1 to remove: 2·a (0.104, importance 2.0) or 5·b (0.105, importance 5·0.3 = 1.5) both land
    a, b = option("a", 0.052, importance=1.0), option("b", 0.021, limit=6, importance=0.3)
    found = search([a, b], {"flops": 0.6}, {"flops": 0.5})
    assert found.inside and found.counts[0] == {"b": 5}
    assert abs(found.ratios[0]["flops"] - 0.495) < 1e-9
    cheap_a = option("a", 0.052, importance=0.1)
    assert search([cheap_a, b], {"flops": 0.6}, {"flops": 0.5}).counts[0] == {"a": 2}


def test_no_combination_lands_then_the_closest_under_the_target():
    found = search([option("a", 0.32, limit=2), option("b", 0.35, limit=1)], {"flops": 1.0}, {"flops": 0.7})
    assert not found.inside and found.counts[0] == {"a": 1} and abs(found.ratios[0]["flops"] - 0.68) < 1e-12
    found = search([option("a", 0.32, limit=2), option("b", 0.35, limit=1)], {"flops": 1.0}, {"flops": 0.665})
    assert not found.inside and found.counts[0] == {"b": 1}  # 0.65: closer under 0.665 than 0.36 or 0.33


def test_the_second_order_terms_make_the_prediction_exact():
    """Two groups meeting at a layer: cutting both removes less than the sum of the two."""
    a, b = option("a", 0.04, limit=1, importance=0.1), option("b", 0.04, limit=3)
    # summed, 1·a + 2·b = 0.12 would land in [0.115, 0.125] for less importance than 3·b; it removes 0.10
    found = search([a, b], {"flops": 1.0}, {"flops": 0.885}, pairs={("a", "b"): {"flops": 0.01}})
    assert found.inside and found.counts[0] == {"b": 3}
    for counts, ratios in zip(found.counts, found.ratios):
        ka, kb = counts.get("a", 0), counts.get("b", 0)
        assert abs(ratios["flops"] - (1.0 - 0.04 * (ka + kb) + 0.01 * ka * kb)) < 1e-12
        assert 0.875 <= ratios["flops"] <= 0.885


def test_a_bend_is_the_second_unit_costing_less():
    bent = option("a", 0.1, limit=3, bend=0.02)  # drop(1)=0.1, drop(2)=0.16, drop(3)=0.18
    found = search([bent], {"flops": 1.0}, {"flops": 0.845})
    assert found.inside and found.counts[0] == {"a": 2} and abs(found.ratios[0]["flops"] - 0.84) < 1e-12


@pytest.mark.parametrize("every", [landing._EVERY, 0], ids=["every combination", "knapsack"])
def test_it_finds_a_landing_whenever_brute_force_does(every, monkeypatch):
    monkeypatch.setattr(landing, "_EVERY", every)
    drops = [0.052, 0.087, 0.139, 0.26]
    options = [option(str(i), d, limit=2, importance=1 + i) for i, d in enumerate(drops)]
    falls = [sum(k * d for k, d in zip(ks, drops)) for ks in itertools.product(range(3), repeat=4)]
    landed = missed = 0
    for target in [x / 100 for x in range(30, 100, 3)]:
        need = 1.0 - target
        found = search(options, {"flops": 1.0}, {"flops": target})
        if any(need + 1e-4 <= f <= need + 0.0099 for f in falls):  # clearly inside
            assert found.inside and target - 0.01 <= found.ratios[0]["flops"] <= target, target
            landed += 1
        elif not any(need - 1e-4 <= f <= need + 0.0101 for f in falls):  # clearly none
            assert not found.inside and found.ratios[0]["flops"] < target - 0.01, target
            missed += 1
    assert landed > 5 and missed > 5  # both cases occur


def test_two_targets_both_met():
    a = Option("a", 1, 4, {"flops": 0.06, "params": 0.004}, [0, 1, 2, 3, 4])
    b = Option("b", 1, 4, {"flops": 0.003, "params": 0.03}, [0, 1, 2, 3, 4])
    found = search([a, b], {"flops": 1.0, "params": 1.0}, {"flops": 0.886, "params": 0.968})
    assert found.inside and found.counts[0] == {"a": 2, "b": 1}  # 2·a alone: params 0.992
    assert abs(found.ratios[0]["flops"] - 0.877) < 1e-12 and abs(found.ratios[0]["params"] - 0.962) < 1e-12


def test_at_least_keeps_only_combinations_that_take_those_units():
    """Does a run that takes 2 units of a first still land? 3·a + ... no: only 0.2 more may go."""
    a, b = option("a", 0.1, limit=4, importance=0.1), option("b", 0.006, limit=40, importance=1.0)
    target = {"flops": 0.795}
    assert search([a, b], {"flops": 1.0}, target).counts[0] == {"a": 2, "b": 1}  # 0.206
    found = search([a, b], {"flops": 1.0}, target, at_least={"b": 5})
    assert found.inside and found.counts[0] == {"a": 1, "b": 18}  # 0.1 + 0.108 = 0.208: 0.792
    assert not search([a, b], {"flops": 1.0}, target, at_least={"a": 3}).inside  # 0.3 is past the window
    assert found.complete


@pytest.mark.parametrize("fine_units, before, kept", [
    (30, None, set()),          # 30 · 0.5 = 15 points of fine channels: more than one coarse unit + 1
    (20, None, {"fine"}),       # 10 points: a 10-point gap between coarse units could not be filled
    (20, 24, {"fine"}),         # this step is what leaves too few (12 points before it)
    (20, 20, set()),            # too few already before it: reserving would not help
])
def test_in_reserve_keeps_enough_fine_channels_to_fill_a_coarse_gap(fine_units, before, kept):
    costs = {"coarse": {"flops": 0.1}, "fine": {"flops": 0.005}, "gone": {"flops": 0.001}}
    units = {"coarse": 6, "fine": fine_units, "gone": 0}
    prior = None if before is None else {"coarse": 6, "fine": before}
    assert in_reserve(costs, units, {"flops": 0.3}, before=prior, limit=256) == kept


def test_in_reserve_nothing_at_stake_without_coarse_groups_or_near_the_end():
    fine = {"a": {"flops": 0.005}, "b": {"flops": 0.002}}
    assert in_reserve(fine, {"a": 2, "b": 1}, {"flops": 0.5}) == set()  # every unit fine: any count lands
    costs = {"coarse": {"flops": 0.1}, "fine": {"flops": 0.005}}
    assert in_reserve(costs, {"coarse": 6, "fine": 5}, {"flops": 0.01}) == set()  # 2.5 points cover 0.01 + 0.01
    assert in_reserve(costs, {"coarse": 6, "fine": 3}, {"flops": 0.01}) == {"fine"}
