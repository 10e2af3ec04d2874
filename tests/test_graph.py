import copy
import warnings

import pytest
import torch
import torchvision
from torch import nn

from hypothesis import given, settings, strategies as st

from prunable import DependencyGraph, ModuleHandler, Pruner, SkipKind, WeightNorm, register_handler
from prunable.handlers import unregister_handler
from helpers import Opaque, randomize_bn, smallest_per_component, zero_plan


def _plan(pruner, fraction=0.3, seed=0):
    g = torch.Generator().manual_seed(seed)
    return {grp.id: torch.randperm(grp.channels, generator=g)[: int(grp.channels * fraction)].tolist()
            for grp in pruner.groups if int(grp.channels * fraction) > 0}


@pytest.mark.parametrize("name", ["resnet18", "mobilenet_v2", "densenet121", "shufflenet_v2_x1_0", "regnet_x_400mf"])
def test_pruned_equals_zeroed_copy(name):
    model = torchvision.models.get_model(name, num_classes=10).eval()
    randomize_bn(model)
    x = torch.randn(2, 3, 64, 64)
    pruner = Pruner(model, x, criterion=WeightNorm())
    removals = _plan(pruner)
    zeroed = copy.deepcopy(model)
    zero_plan(zeroed, pruner.graph, removals)
    expected = zeroed(x)
    pruner.prune(removals)
    torch.testing.assert_close(model(x), expected, atol=1e-4, rtol=1e-4)


def test_resnet_stage_is_one_group_and_prints_readably():
    model = torchvision.models.resnet18()
    graph = DependencyGraph(model, torch.randn(1, 3, 64, 64))
    stage = next(g for g in graph.groups if g.id == "conv1")
    names = {m.target.label() for m in stage.members}
    assert {"conv1.out", "layer1.0.conv2.out", "layer1.1.conv2.out", "layer2.0.conv1.in",
            "layer2.0.downsample.0.in"} <= names
    text = str(stage)
    assert text.startswith("conv1.out ⇄ layer1.0.conv2.out") and "(64 channels)" in text
    fc = next(g for g in graph.groups if g.id == "fc")
    assert fc.skip_reason.kind is SkipKind.MODEL_OUTPUT


def test_tracing_changes_neither_mode_nor_parameters():
    model = torchvision.models.resnet18().train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    DependencyGraph(model, torch.randn(2, 3, 32, 32))
    assert model.training
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k


class Branchy(nn.Module):
    """Control flow, concat, chunk, squeeze-excitation and flatten→Linear."""

    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(3, 8, 3, padding=1)
        self.b = nn.Conv2d(3, 6, 3, padding=1)
        self.bn = nn.BatchNorm2d(14)
        self.se1 = nn.Conv2d(14, 4, 1)
        self.se2 = nn.Conv2d(4, 14, 1)
        self.c = nn.Conv2d(7, 5, 3, stride=2, padding=1)
        self.fc = nn.Linear(5 * 4 * 4, 3)

    def forward(self, x):
        y = torch.cat([self.a(x), self.b(x)], 1)
        if y.shape[-1] > 4:  # Python control flow on shapes
            y = self.bn(y)
        s = torch.sigmoid(self.se2(torch.relu(self.se1(y.mean((2, 3), keepdim=True)))))
        y = y * s
        left, right = y.chunk(2, dim=1)
        return self.fc(torch.flatten(self.c(left + right), 1))


def test_cat_chunk_se_flatten():
    model = Branchy().eval()
    x = torch.randn(2, 3, 8, 8)
    pruner = Pruner(model, x, criterion=WeightNorm())
    ids = {g.id for g in pruner.groups}
    assert {"a", "c", "se1"} <= ids
    concat = next(g for g in pruner.groups if g.id == "a")
    assert concat.channels == 7  # chunk(2) pairs channel j of each half
    assert {"a.out", "b.out", "bn", "se1.in", "se2.out", "c.in"} <= {m.target.label() if m.target.name != "bn" else "bn" for m in concat.members}
    c = next(g for g in pruner.groups if g.id == "c")
    fc_in = next(m for m in c.members if m.target.label() == "fc.in")
    assert len(fc_in.classes) == 80 and len(set(fc_in.classes.tolist())) == 5
    zeroed = copy.deepcopy(model)
    removals = {"c": [1, 3], "se1": [0]}
    zero_plan(zeroed, pruner.graph, removals)
    pruner.prune(removals)
    torch.testing.assert_close(model(x), zeroed(x), atol=1e-5, rtol=1e-5)
    assert model.fc.in_features == 48 and model.c.out_channels == 3


def test_chunk_halves_pruned_together():
    model = Branchy().eval()
    pruner = Pruner(model, torch.randn(1, 3, 8, 8), criterion=WeightNorm())
    pruner.prune({"a": [0]})  # channel 0 of `a` is paired with channel 7 of the concat
    assert model.bn.num_features == 12 and model.c.in_channels == 6


class LayerScale(nn.Module):
    """A bare per-channel parameter in a residual branch, like ConvNeXt's layer scale."""

    def __init__(self, c):
        super().__init__()
        self.conv = nn.Conv2d(c, c, 1)
        self.gain = nn.Parameter(torch.rand(c, 1, 1) + 0.5)
        self.head = nn.Conv2d(c, 2, 1)

    def forward(self, x):
        return self.head(x + self.conv(x) * self.gain)


def test_bare_parameter_is_sliced_with_its_group():
    model = nn.Sequential(nn.Conv2d(3, 6, 1), LayerScale(6)).eval()
    x = torch.randn(2, 3, 4, 4)
    pruner = Pruner(model, x, criterion=WeightNorm())
    stream = next(g for g in pruner.groups if g.id == "0")
    assert "1.gain" in {m.target.label() for m in stream.members}
    zeroed = copy.deepcopy(model)
    zero_plan(zeroed, pruner.graph, {"0": [2, 4]})
    pruner.prune({"0": [2, 4]})
    assert model[1].gain.shape == (4, 1, 1)
    torch.testing.assert_close(model(x), zeroed(x), atol=1e-5, rtol=1e-5)


class MyOpaque(Opaque):
    """Registered below; the base class stays without a handler for other tests."""


def test_custom_module_without_handler_is_reported_then_registered():
    model = nn.Sequential(nn.Conv2d(3, 8, 3), MyOpaque(8), nn.ReLU(), nn.Conv2d(8, 2, 1))
    with pytest.warns(UserWarning, match="no handler"):
        pruner = Pruner(model, torch.randn(1, 3, 6, 6), criterion=WeightNorm())
    assert "no handler" in pruner.skipped["0"]

    @register_handler(MyOpaque)
    class OpaqueHandler(ModuleHandler):
        def params(self, module, role):
            return {"weight": 0 if role.value == "out" else 1}

    pruner = Pruner(model, torch.randn(1, 3, 6, 6), criterion=WeightNorm())
    assert "0" in {g.id for g in pruner.groups}
    pruner.prune({"0": [1, 2]})
    assert model[1].weight.shape == (8, 6, 1, 1)
    with pytest.raises(ValueError, match="already registered"):
        register_handler(MyOpaque)(OpaqueHandler)


class TokenConcat(nn.Module):
    """A class token concatenated along the token dim joins the channels of the patch tokens."""

    def __init__(self):
        super().__init__()
        self.cls = nn.Parameter(torch.zeros(1, 1, 8))
        self.proj = nn.Linear(4, 8)
        self.fc1, self.fc2, self.head = nn.Linear(8, 16), nn.Linear(16, 8), nn.Linear(8, 2)
        self.one_a, self.one_b = nn.Conv2d(3, 1, 1), nn.Conv2d(3, 1, 1)
        self.mix = nn.Conv2d(2, 1, 1)

    def forward(self, x, img):
        t = torch.cat([self.cls.expand(x.shape[0], -1, -1), self.proj(x)], 1)
        t = t + self.fc2(torch.relu(self.fc1(t)))
        pair = torch.cat([self.one_a(img), self.one_b(img)], 1)  # two 1-channel maps: distinct channels
        return self.head(t[:, 0]) + self.mix(pair).mean((1, 2, 3))[:, None]


def test_token_concat_couples_but_single_channel_concat_does_not():
    model = TokenConcat()
    graph = DependencyGraph(model, (torch.randn(2, 5, 4), torch.randn(2, 3, 4, 4)))
    by_id = {g.id: g for g in graph.groups}
    assert by_id["fc1"].skip_reason is None and by_id["fc1"].channels == 16
    stream = next(g for g in graph.groups if "cls" in {m.target.label() for m in g.members})
    assert stream.channels == 8
    assert by_id["one_a"].channels == 1 and by_id["one_b"].channels == 1


def test_measure_point_is_the_norm_after_each_producer_over_many_steps():
    """Regression: tensor ids are reused during a trace; the measure point must not drift."""
    from prunable import CharNet

    torch.manual_seed(0)
    net = CharNet(10, config=[16, "M", 24, "M", 32, "M"], input_size=16, hidden=32)
    pruner = Pruner(net, torch.zeros(2, 1, 16, 16), criterion=WeightNorm())
    for _ in range(30):
        for g in pruner.groups:
            (name, _, _), = g.measure
            prefix, index = g.id.rsplit(".", 1)
            assert name == f"{prefix}.{int(index) + 1}", (g.id, name)
        pruner.step(2)


class ShapedReshape(nn.Module):
    """``num_classes`` equals the conv width, but the reshape reads the width from ``h.shape``."""

    def __init__(self, literal: bool = False):
        super().__init__()
        self.num_classes, self.literal = 12, literal
        self.conv, self.fc = nn.Conv2d(3, 12, 3), nn.Linear(12, 12)

    def forward(self, x):
        h = self.conv(x)
        width = self.num_classes if self.literal else h.shape[1]
        batch = h.size(0) if self.literal else h.shape[0]  # size(0) reads no channel dim; .shape reads all
        return self.fc(h.reshape(batch, width, -1).mean(-1))


def test_size_read_from_a_shape_never_rewrites_an_attribute():
    """Regression (issue 11): pruning the conv to 9 rewrote ``num_classes`` to 9."""
    model = ShapedReshape()
    with pytest.warns(UserWarning, match="may be the attribute num_classes"):
        pruner = Pruner(model, torch.randn(2, 3, 8, 8), criterion=WeightNorm())
    assert pruner.skipped["conv"].kind is SkipKind.SIZE_ATTRIBUTE
    assert model.num_classes == 12 and model.fc.out_features == 12


def test_size_attribute_passed_literally_follows_the_channels():
    model = ShapedReshape(literal=True)
    x = torch.randn(2, 3, 8, 8)
    pruner = Pruner(model, x, criterion=WeightNorm())
    pruner.prune({"conv": [0, 4, 7]})
    assert model.num_classes == 9 and model.conv.out_channels == 9 and model(x).shape == (2, 12)


def test_group_skipped_for_a_value_not_its_text():
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.Conv2d(8, 4, 1))
    graph = DependencyGraph(model, torch.randn(1, 3, 6, 6))
    reason = graph.groups[-1].skip_reason
    assert reason.kind is SkipKind.MODEL_OUTPUT and str(reason) == "model output" and "output" in reason


@settings(max_examples=300, deadline=None)
@given(st.integers(0, 40).flatmap(lambda n: st.tuples(st.just(n), st.lists(
    st.lists(st.tuples(st.integers(0, max(n - 1, 0)), st.integers(0, max(n - 1, 0))), max_size=12), max_size=4))))
def test_components_are_the_smallest_node_of_each_component(case):
    """Leaves (nodes on one edge), stars, chains, self-loops and repeated edges: the labels equal a
    plain union-find's, whichever way the propagation takes (leaves joined at the end, nodes renumbered)."""
    from prunable.shadow import components

    n, parts = case
    pairs = [torch.tensor(p, dtype=torch.long).reshape(-1, 2) for p in parts] if n else []
    edges = [(e[:, 0], e[:, 1]) for e in pairs]
    expected = smallest_per_component(n, [tuple(e) for p in parts for e in p] if n else [])
    assert components(n, edges).tolist() == expected


@given(st.lists(st.integers(-3, 50), max_size=60), st.booleans(), st.integers(1, 3))
def test_distinct_is_torch_unique(values, ordered, repeat):
    from prunable.shadow import distinct

    t = torch.tensor(sorted(values) if ordered else values, dtype=torch.long).repeat_interleave(repeat)
    big = t.repeat(4096 // max(len(t), 1) + 1)  # above the size where increasing runs skip the sort
    big = big.sort().values if ordered else big
    for x in (t, big):
        assert torch.equal(distinct(x), torch.unique(x))


class Scaled(nn.Module):
    """Runs as one operation through its handler's ``trace_module``."""

    def forward(self, x):
        return x * 2.0


def test_a_module_traced_as_one_operation_is_labelled_with_torch_functions_off():
    """The handler's bookkeeping on shadows is not dispatched through the tracer (it cost
    ViT-B/16 3,600 extra dispatched calls): torch function modes are off in ``trace_module``."""
    seen = []

    @register_handler(Scaled)
    class ScaledHandler(ModuleHandler):
        def params(self, module, role):
            return {}

        def trace_module(self, tracer, module, args, kwargs, output):
            seen.append(torch._C._is_torch_function_mode_enabled())
            labels = tracer.input_labels(args[0], 1, tracer.name_of(module))
            tracer.label_output(output, labels + 0, 1)

    try:
        graph = DependencyGraph(nn.Sequential(nn.Conv2d(3, 4, 1), Scaled(), nn.Conv2d(4, 2, 1)),
                                torch.randn(1, 3, 4, 4))
    finally:
        unregister_handler(Scaled)
    assert seen == [False]
    assert [str(g) for g in graph.groups][0] == "0.out ⇄ 2.in  (4 channels)"


class SplitPartners(nn.Module):
    """``cat(a(img), b(img)) + x(img)``: x's channels are a's then b's, so all three are one group."""

    def __init__(self):
        super().__init__()
        self.a, self.b, self.x = nn.Conv2d(3, 2, 1), nn.Conv2d(3, 3, 1), nn.Conv2d(3, 5, 1)
        self.head = nn.Conv2d(5, 2, 1)

    def forward(self, img):
        return self.head(torch.cat([self.a(img), self.b(img)], 1) + self.x(img))


def test_a_producer_whose_channels_belong_to_two_others_joins_them_in_one_group():
    groups = DependencyGraph(SplitPartners(), torch.randn(1, 3, 4, 4)).groups
    assert str(groups[0]) == "a.out ⇄ b.out ⇄ x.out ⇄ head.in  (5 channels)" and len(groups) == 2
    assert [m.classes.tolist() for m in groups[0].producers] == [groups[0].classes[:2].tolist(),
                                                                  groups[0].classes[2:].tolist(),
                                                                  groups[0].classes.tolist()]


@settings(max_examples=300, deadline=None)
@given(st.integers(1, 12).flatmap(lambda k: st.tuples(
    st.lists(st.integers(-1, k - 1), min_size=k, max_size=k),
    st.lists(st.lists(st.integers(-2, k + 2), max_size=6), min_size=1, max_size=6))))
def test_members_by_group_lists_each_member_under_every_group_it_holds(case):
    """Member → groups through runs of one group: the same lists as asking channel by channel
    (fails when a run crosses into the next member, or an empty member shifts the owners)."""
    from types import SimpleNamespace

    groups_of_class, parts = case
    held = [c for c, g in enumerate(groups_of_class) if g >= 0]  # the classes producers hold
    if not held:
        return
    lookup = torch.full((len(groups_of_class),), -1, dtype=torch.long)
    lookup[held] = torch.arange(len(held))
    label = [groups_of_class[c] for c in held]
    comp = torch.tensor([label.index(x) for x in label], dtype=torch.long)  # a group: its smallest held class
    members = [SimpleNamespace(classes=torch.tensor(p, dtype=torch.long)) for p in parts]
    flat = torch.cat([m.classes for m in members])
    got = DependencyGraph._members_by_group(members, flat, lookup, comp)
    expected: dict[int, list] = {}
    for m, p in zip(members, parts):
        for g in sorted({int(comp[lookup[c]]) for c in p if 0 <= c < len(lookup) and lookup[c] >= 0}):
            expected.setdefault(g, []).append(m)
    assert {g: [id(m) for m in ms] for g, ms in got.items()} == {g: [id(m) for m in ms] for g, ms in expected.items()}


@pytest.mark.parametrize("attention", [False, True])
def test_tracing_leaves_no_global_hook_behind(attention):
    """torch.compile warns of any global module hook left registered (a global hook's handle
    with keyword arguments leaves its flag behind); a module traced as one operation (attention)
    still gets its keyword arguments."""
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.proj = nn.Linear(8, 16)
            self.attn = nn.MultiheadAttention(16, 2, batch_first=True) if attention else None
            self.head = nn.Linear(16, 3)

        def forward(self, x):
            h = self.proj(x)
            if self.attn is not None:
                h = self.attn(h, h, h, need_weights=False)[0]
            return self.head(h)

    net, x = Net().eval(), torch.randn(2, 5, 8)
    graph = DependencyGraph(net, x)
    assert graph.groups
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        torch._dynamo.reset()
        out = torch.compile(net, backend="eager")(x)
    torch.testing.assert_close(out, net(x))
