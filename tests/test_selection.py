"""Selection without a model: scores + constraints → Plan; validation bisection."""

import pytest
import torch
from torch import nn

from prunable import Plan, PruningValueError
from prunable.selection import (
    Constraints, GroupLayout, Scope, Selector, capacity, parse_scope, removal_count, resolve_max_ratio,
)
from prunable.validation import failing_groups


def own(gid, slot, n):
    """A group whose only member (``slot``) holds one index per channel."""
    return GroupLayout(gid, (slot,), torch.ones(1, n, dtype=torch.long))


def test_global_takes_the_lowest_scores_within_each_cap():
    sel = Selector([own("a", 0, 4), own("b", 1, 3)], sizes=[4, 3], caps={"a": 2, "b": 3})
    scores = {"a": torch.tensor([0.1, 0.2, 0.3, 9.0]), "b": torch.tensor([0.15, 5.0, 6.0])}
    assert sel.plan(scores, 3) == Plan({"a": (0, 1), "b": (0,)})  # a capped at 2, so b's 0.15 is taken
    assert sel.plan(scores, 1) == Plan({"a": (0,)})


def test_layer_scope_takes_n_of_every_group():
    sel = Selector([own("a", 0, 4), own("b", 1, 3)], sizes=[4, 3])
    scores = {"a": torch.tensor([4.0, 3.0, 2.0, 1.0]), "b": torch.tensor([1.0, 0.0, 2.0])}
    assert sel.plan(scores, 2, Scope.LAYER) == Plan({"a": (2, 3), "b": (0, 1)})
    assert sel.plan(scores, 0.5, "layer") == Plan({"a": (2, 3), "b": (0, 1)})  # round(1.5) = 2


def test_a_member_shared_by_two_groups_keeps_one_index():
    # a concat branch (member 2) holds channels 0, 1 of group a and channel 0 of group b
    a = GroupLayout("a", (0, 2), torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0]]))
    b = GroupLayout("b", (1, 2), torch.tensor([[1, 1, 1, 1], [1, 0, 0, 0]]))
    sel = Selector([a, b], sizes=[4, 4, 3], caps={"a": 3, "b": 3})
    plan = sel.plan({"a": torch.tensor([0.0, 0.1, 5.0, 6.0]), "b": torch.tensor([0.2, 7.0, 8.0, 9.0])}, 3)
    assert plan == Plan({"a": (0, 1, 2)})  # b's 0.2 would empty member 2: the next lowest instead
    with pytest.raises(PruningValueError, match="member 2"):
        sel.check({"a": [0, 1], "b": [0]})
    sel.check({"a": [0, 1], "b": [1]})


def test_blocks_lose_the_same_number_and_round_to_keeps_multiples():
    blocked = GroupLayout("h", (0,), torch.ones(1, 6, dtype=torch.long), blocks=torch.tensor([[0, 1, 2], [3, 4, 5]]))
    sel = Selector([blocked], sizes=[6])
    plan = sel.plan({"h": torch.tensor([0.0, 0.1, 0.2, 5.0, 6.0, 7.0])}, 2)
    assert plan == Plan({"h": (0, 3)})  # one per head, not the two lowest of head 0
    sel = Selector([own("a", 0, 16)], sizes=[16], caps={"a": 12})
    assert len(sel.plan({"a": torch.arange(16.0)}, 3, round_to=8).removals["a"]) == 8
    sel = Selector([own("a", 0, 16)], sizes=[16], caps={"a": 6})
    assert sel.plan({"a": torch.arange(16.0)}, 6, round_to=4).removals["a"] == (0, 1, 2, 3)  # 8 kept would pass the cap


def test_capacity_and_constraints():
    assert capacity(16, 16) == 15 and capacity(16, 16, min_channels=4) == 12
    assert capacity(16, 16, max_ratio=0.25) == 4 and capacity(12, 16, max_ratio=0.25) == 0
    assert capacity(10, 16, max_ratio=0.5) == 2  # of the ORIGINAL 16, 6 are gone already
    assert capacity(16, 16, max_ratio=0.0) == 0 and capacity(8, 8, round_to=8) == 0
    rules = Constraints(max_ratio=0.5, layer_ratios={"conv": 0.25, "fc": 0.0})
    assert rules.cap(16, 16, ["bn", "conv"]) == 4  # the strictest member
    assert rules.cap(16, 16, ["bn"]) == 8 and rules.cap(16, 16, ["conv", "fc"]) == 0
    assert rules.reason(16, 16, ["fc"]) == "max_ratio=0 of layer fc reached"
    assert rules.reason(8, 16, ["bn"]) == "max_ratio=0.5 reached"
    assert Constraints(min_channels=2).reason(2, 16) == "2 channel(s) left, min_channels=2"
    assert Constraints().reason(16, 16) is None


def test_max_ratio_resolution_and_errors():
    net = nn.Sequential(nn.Conv2d(3, 4, 1), nn.Conv2d(4, 4, 1))
    modules = dict(net.named_modules())
    assert resolve_max_ratio(0.3, modules) == (0.3, {})
    assert resolve_max_ratio({net[1]: 0.0, "0": 0.5}, modules) == (1.0, {"1": 0.0, "0": 0.5})
    named = {"features.conv1": None, "features.conv2": None, "classifier": None}
    with pytest.raises(PruningValueError, match="'features.conv3'.*close names: .*features.conv1"):
        resolve_max_ratio({"features.conv3": 0.5}, named)
    with pytest.raises(PruningValueError, match="Linear"):
        resolve_max_ratio({nn.Linear(2, 2): 0.5}, modules)
    for bad in (1.5, -0.1, "0.5", True, None):
        with pytest.raises(PruningValueError, match=r"max_ratio=.*fraction in \[0, 1\]"):
            resolve_max_ratio(bad, modules)
    with pytest.raises(PruningValueError, match=r"max_ratio\['0'\]=2"):
        resolve_max_ratio({"0": 2}, modules)


@pytest.mark.parametrize("n", [0, -1, 1.5, 0.0, True, "3", None])
def test_bad_counts_name_the_value_and_what_is_allowed(n):
    with pytest.raises(PruningValueError, match=r"n=.*(positive int|ratio must be in \(0, 1\))"):
        removal_count(n, Scope.GLOBAL, [8], 7)


def test_scope_names_list_the_choices():
    assert parse_scope("global") is Scope.GLOBAL
    with pytest.raises(PruningValueError, match="scope='laye'.*'global', 'layer'"):
        parse_scope("laye")


def test_check_refuses_what_a_plan_may_not_do():
    sel = Selector([own("a", 0, 4), own("b", 1, 3)], sizes=[4, 3], caps={"a": 1, "b": 2})
    for removals, message in [({"x": [0]}, "unknown group 'x'"), ({"b": [3]}, "index 3 out of range"),
                              ({"a": [0, 1]}, "exceeds the 1"), ({"b": [0]}, "cannot be pruned: why")]:
        with pytest.raises(PruningValueError, match=message):
            sel.check(removals, skipped={"b": "why"} if removals == {"b": [0]} else {})
    sel.check({"a": [2], "b": [0, 1]})


def test_probe_takes_the_last_channel_that_can_go():
    a = GroupLayout("a", (0, 1), torch.tensor([[1, 1, 1], [0, 0, 1]]))  # member 1 lives only in channel 2
    sel = Selector([a, own("b", 2, 1)], sizes=[3, 1, 1])
    probe, stuck = sel.probe()
    assert probe == {"a": [1]} and stuck == ["b"]


def test_bisection_finds_every_culprit_with_few_trials():
    calls = []
    culprits = {"g3", "g11"}

    def run(removals):
        calls.append(set(removals))
        bad = culprits & set(removals)
        return f"breaks {sorted(bad)}" if bad else None

    removals = {f"g{i}": [0] for i in range(16)}
    found = failing_groups(run, removals)
    assert {gid for gid, _ in found} == culprits and all("breaks" in e for _, e in found)
    assert len(calls) <= 2 * 2 * 4 + 1  # 2 culprits, log2(16) = 4 levels
    assert run({k: v for k, v in removals.items() if k not in culprits}) is None
    assert failing_groups(run, {"g1": [0]}) == []


def test_bisection_blames_a_group_that_fails_only_with_another():
    def run(removals):
        return "together" if {"a", "d"} <= set(removals) else None

    found = failing_groups(run, {"a": [0], "b": [0], "c": [0], "d": [0]})
    assert [gid for gid, _ in found] == ["d"]


def test_count_tables_of_all_groups_at_once_equal_counting_each_member():
    import torchvision

    from prunable import Pruner, WeightNorm
    from prunable.selection import count_tables

    model = torchvision.models.squeezenet1_1(num_classes=10).eval()  # concats: members span several groups
    groups = Pruner(model, torch.randn(1, 3, 64, 64), criterion=WeightNorm()).graph.groups
    tables = count_tables(groups)
    assert len(tables) == len(groups) > 10
    for g, table in zip(groups, tables):
        expected = [[int((m.classes.reshape(-1) == c).sum()) for c in g.classes.tolist()] for m in g.members]
        assert table.tolist() == expected, g.id


@pytest.mark.parametrize("seed", range(20))
def test_count_tables_ignore_negative_foreign_and_unknown_labels(seed):
    from types import SimpleNamespace as NS

    from prunable.selection import count_tables

    gen = torch.Generator().manual_seed(seed)
    perm = torch.randperm(60, generator=gen)  # labels 0..59 shared out among the groups, in random order
    sizes = torch.randint(1, 6, (5,), generator=gen).tolist()
    groups, start = [], 0
    for size in sizes:
        classes = perm[start:start + size]
        start += size
        members = [NS(classes=torch.randint(-3, 70, (int(torch.randint(1, 9, (1,), generator=gen)),), generator=gen))
                   for _ in range(int(torch.randint(1, 4, (1,), generator=gen)))]
        members.append(NS(classes=classes[torch.randint(0, size, (4,), generator=gen)]))  # its own labels, repeated
        groups.append(NS(classes=classes, channels=size, members=members))
    for g, table in zip(groups, count_tables(groups)):
        expected = [[int((m.classes.reshape(-1) == c).sum()) for c in g.classes.tolist()] for m in g.members]
        assert table.tolist() == expected


def _first_by_tuple_sort(scores, caps, n):
    """The global order spelled out: (score, group id, channel) ascending, the first n under the caps."""
    chosen = {}
    for _, gid, i in sorted((float(v), gid, i) for gid, s in scores.items() for i, v in enumerate(s.tolist())):
        if n <= 0:
            break
        if len(chosen.setdefault(gid, [])) < caps.get(gid, 0):
            chosen[gid].append(i)
            n -= 1
    return {gid: idx for gid, idx in chosen.items() if idx}


@pytest.mark.parametrize("seed", range(40))
def test_global_ranking_in_one_sort_equals_the_tuple_order_with_ties_and_caps(seed):
    gen = torch.Generator().manual_seed(seed)
    values = torch.tensor([0.0, -0.0, 1.0, 0.5, 2.0])  # few distinct values: many ties across groups
    scores = {f"g{int(torch.randint(0, 50, (1,), generator=gen))}":
              values[torch.randint(0, 5, (int(torch.randint(1, 12, (1,), generator=gen)),), generator=gen)]
              for _ in range(int(torch.randint(1, 6, (1,), generator=gen)))}
    caps = {g: int(torch.randint(0, len(s) + 1, (1,), generator=gen)) for g, s in scores.items()}
    n = int(torch.randint(1, sum(len(s) for s in scores.values()) + 2, (1,), generator=gen))
    layouts = [own(g, slot, len(s)) for slot, (g, s) in enumerate(scores.items())]
    sel = Selector(layouts, sizes=[len(s) + 1 for s in scores.values()], caps=caps)  # no member can empty
    expected = _first_by_tuple_sort(scores, caps, n)
    if n <= sel.available():  # plan refuses more than the caps allow
        assert sel.plan(scores, n) == Plan({g: tuple(sorted(idx)) for g, idx in expected.items()})
    chosen = sel.guard().take_ranked(scores, caps, n)
    assert chosen == expected and list(chosen) == list(expected)  # same channels, same order
