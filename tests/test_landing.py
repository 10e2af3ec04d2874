"""landing.search: the combination of cuts that lands within the tolerance, least importance first."""

import itertools

from prunable.landing import Option, search


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


def test_it_finds_a_landing_whenever_brute_force_does():
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
