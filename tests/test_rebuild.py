"""After ``prune``, the pruner's graph (rebuilt when next needed: the trace of the plan's traced
trial, or a trace of the cut meta copy its plain trial ran, or a fresh one) must equal the graph a fresh ``Pruner``
builds on the pruned model."""

import warnings

import pytest
import torch
import torchvision
from torch import nn

from prunable import DependencyGraph, Pruner, WeightNorm
from prunable.errors import SurgeryError
from prunable.graph import meta_clone


def _plan(pruner, fraction, seed):
    g = torch.Generator().manual_seed(seed)
    plan = {}
    for grp in pruner.groups:
        if grp.blocks is not None:  # attention heads: the same number from each
            k = int(grp.blocks.shape[1] * fraction)
            idx = [i for row in grp.blocks for i in row[torch.randperm(len(row), generator=g)[:k]].tolist()]
        else:
            idx = torch.randperm(grp.channels, generator=g)[: int(grp.channels * fraction)].tolist()
        if idx:
            plan[grp.id] = idx
    return plan


def _assert_same_graph(graph: DependencyGraph, fresh: DependencyGraph, model: nn.Module) -> None:
    modules = dict(model.named_modules(remove_duplicate=False))
    assert [g.id for g in graph.groups] == [g.id for g in fresh.groups]
    for g, f in zip(graph.groups, fresh.groups):
        assert (g.channels, g.skip_reason) == (f.channels, f.skip_reason), g.id
        assert torch.equal(g.classes, f.classes), g.id
        assert [(m.target, m.producer) for m in g.members] == [(m.target, m.producer) for m in f.members], g.id
        for m, n in zip(g.members, f.members):
            assert torch.equal(m.classes, n.classes), (g.id, m.target.label())
            assert m.target.module is modules[m.target.name]
        assert [(name, dim) for name, dim, _ in g.measure] == [(name, dim) for name, dim, _ in f.measure]
        assert all(torch.equal(a[2], b[2]) for a, b in zip(g.measure, f.measure)), g.id
        assert (g.blocks is None) == (f.blocks is None) and g.blocks_of == f.blocks_of, g.id
        assert g.blocks is None or torch.equal(g.blocks, f.blocks), g.id


def _tiny_vit() -> nn.Module:
    return torchvision.models.VisionTransformer(image_size=32, patch_size=8, num_layers=2, num_heads=2,
                                                hidden_dim=48, mlp_dim=64, num_classes=10)


MODELS = {
    "resnet18": lambda: torchvision.models.resnet18(num_classes=10),
    "mobilenet_v2": lambda: torchvision.models.mobilenet_v2(num_classes=10),
    "densenet121": lambda: torchvision.models.densenet121(num_classes=10),
    "efficientnet_b0": lambda: torchvision.models.efficientnet_b0(num_classes=10),
    "shufflenet_v2_x1_0": lambda: torchvision.models.shufflenet_v2_x1_0(num_classes=10),
    "convnext_tiny": lambda: torchvision.models.convnext_tiny(num_classes=10),
    "vit": _tiny_vit,
}


@pytest.mark.parametrize("path", ["trial-copy", "trial-trace", "fresh-trace"])
@pytest.mark.parametrize("name", list(MODELS))
def test_graph_after_prune_equals_fresh_graph(name, path, monkeypatch):
    import prunable.validation

    vetted = path == "trial-trace"
    if path == "fresh-trace":  # no cut copy kept by the plain trial: the pruned model is traced afresh
        monkeypatch.setattr(prunable.validation.Trials, "passed_copy", lambda self, plan: None)
    torch.manual_seed(0)
    model = MODELS[name]().eval()
    x = torch.randn(1, 3, 32 if name == "vit" else 64, 32 if name == "vit" else 64)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pruner = Pruner(model, x, criterion=WeightNorm())
        for step, fraction in enumerate((0.5, 0.3)):
            plan = _plan(pruner, fraction, step)
            if vetted:  # the traced trial's trace becomes the new graph
                assert pruner.vet(plan) == []
            pruner.prune(plan)
            fresh = Pruner(model, x, criterion=WeightNorm())
            _assert_same_graph(pruner.graph, fresh.graph, model)
            assert pruner.skipped == fresh.skipped
            assert [g.id for g in pruner.groups] == [g.id for g in fresh.groups]
            assert pruner._points.keys() == fresh._points.keys()
    assert model(x).shape == (1, 10)
    if name == "vit":  # the stream and the heads' dims went too
        assert model.hidden_dim < 48 and model.encoder.layers[0].self_attention.head_dim < 24


def _count_traces(monkeypatch):
    """Calls of the two tracing entry points the pruner uses (a fresh trace, a traced trial)."""
    import prunable.pruner
    import prunable.validation

    calls = []
    for module, name in ((prunable.pruner, "trace_model"), (prunable.pruner, "trace_clone"),
                         (prunable.validation, "trace_cut")):
        real = getattr(module, name)

        def counted(*args, _real=real, _name=name, **kwargs):
            calls.append(_name)
            return _real(*args, **kwargs)

        monkeypatch.setattr(module, name, counted)
    return calls


def test_prune_traces_nothing_until_the_graph_is_needed(monkeypatch):
    model = torchvision.models.resnet18(num_classes=10).eval()
    x = torch.randn(1, 3, 32, 32)
    pruner = Pruner(model, x, criterion=WeightNorm())
    calls = _count_traces(monkeypatch)
    pruner.prune(pruner.plan(0.25, scope="layer"))
    assert calls == []  # a plain trial run guarded the cut
    widths = pruner.widths()  # the graph is needed: the trial's cut copy is traced
    assert calls == ["trace_clone"] and widths["conv1"] == 48
    plan = pruner.plan(0.25, scope="layer")
    assert pruner.vet(plan) == [] and calls == ["trace_clone", "trace_cut"]
    pruner.prune(plan)
    assert len(pruner.groups) > 0 and calls == ["trace_clone", "trace_cut"]  # the vetted trial's trace serves
    assert pruner.widths()["conv1"] == 36


def test_a_rebuild_that_fails_is_tried_again_never_served_stale(monkeypatch):
    import prunable.pruner

    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Conv2d(8, 6, 3), nn.ReLU(), nn.Conv2d(6, 4, 3))
    x = torch.randn(1, 3, 12, 12)
    pruner = Pruner(model, x, criterion=WeightNorm())
    pruner.prune({"0": [0, 1]})
    real = prunable.pruner.trace_model

    def broken(*args, **kwargs):
        raise RuntimeError("trace failed")

    real_clone = prunable.pruner.trace_clone
    monkeypatch.setattr(prunable.pruner, "trace_model", broken)
    monkeypatch.setattr(prunable.pruner, "trace_clone", broken)
    for _ in range(2):  # every use raises while the model cannot be traced
        with pytest.raises(RuntimeError, match="trace failed"):
            pruner.plan(1)
    monkeypatch.setattr(prunable.pruner, "trace_model", real)
    monkeypatch.setattr(prunable.pruner, "trace_clone", real_clone)
    assert pruner.widths() == {"0": 6, "2": 6, "4": 4}
    _assert_same_graph(pruner.graph, Pruner(model, x, criterion=WeightNorm()).graph, model)


@pytest.mark.parametrize("change", ["mode", "module", "vetted-mode"])
def test_a_model_changed_after_the_prune_is_traced_afresh(monkeypatch, change):
    """The trial's copy or trace is of the model as the prune left it: a module replaced or a mode
    switched since then makes the rebuild trace the model as it is now."""
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Conv2d(8, 6, 3), nn.ReLU(), nn.Conv2d(6, 4, 3)).eval()
    x = torch.randn(1, 3, 12, 12)
    pruner = Pruner(model, x, criterion=WeightNorm())
    calls = _count_traces(monkeypatch)
    plan = {"0": [0, 1]}
    if change == "vetted-mode":
        assert pruner.vet(plan) == []
    pruner.prune(plan)
    if change == "module":
        model[2] = nn.Conv2d(6, 5, 3)
        model[4] = nn.Conv2d(5, 4, 3)
    else:
        model.train()
    widths = pruner.widths()
    assert calls[-1] == "trace_model"
    assert widths == ({"0": 6, "2": 5, "4": 4} if change == "module" else {"0": 6, "2": 6, "4": 4})
    _assert_same_graph(pruner.graph, Pruner(model, x, criterion=WeightNorm()).graph, model)


def test_failing_plan_leaves_model_and_graph_unchanged():
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Conv2d(8, 4, 3))
    x = torch.randn(1, 3, 8, 8)
    pruner = Pruner(model, x, criterion=WeightNorm())
    graph = pruner.graph

    def broken(*args, **kwargs):
        raise RuntimeError("boom")

    state = {k: v.clone() for k, v in model.state_dict().items()}
    model[2].forward = broken  # the meta copy inherits it: every trial fails
    with pytest.raises(SurgeryError, match="boom"):
        pruner.prune({"0": [0, 1]})
    assert pruner.graph is graph
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())


def test_meta_clone_is_independent_of_the_model():
    model = torchvision.models.resnet18()
    clone = meta_clone(model)
    assert all(p.is_meta for p in clone.parameters())
    assert not any(p.is_meta for p in model.parameters())
    assert [n for n, _ in clone.named_modules()] == [n for n, _ in model.named_modules()]


@pytest.mark.parametrize("enabled", [True, False])
def test_garbage_collector_state_is_restored(enabled):
    import gc

    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Conv2d(8, 4, 3))
    was = gc.isenabled()
    try:
        (gc.enable if enabled else gc.disable)()
        pruner = Pruner(model, torch.randn(1, 3, 8, 8), criterion=WeightNorm())
        assert gc.isenabled() == enabled
        pruner.prune({"0": [0]})
        assert gc.isenabled() == enabled
        with pytest.raises(Exception):
            pruner.prune({"0": [99]})
        assert gc.isenabled() == enabled
    finally:
        (gc.enable if was else gc.disable)()


def test_meta_clone_copies_like_deepcopy():
    class Holder(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 4, 3)
            self.sizes, self.table, self.name = [1, 2], {"a": [3]}, "x"
            self.register_buffer("steps", torch.zeros(2))
            self.shared = self.conv  # the same module twice stays one module

    model = nn.Sequential(Holder(), nn.MultiheadAttention(8, 2))  # the latter has its own __setstate__
    clone = meta_clone(model)
    holder = clone[0]
    assert holder.sizes == [1, 2] and holder.sizes is not model[0].sizes
    assert holder.table == {"a": [3]} and holder.table["a"] is not model[0].table["a"]
    assert holder.shared is holder.conv and holder.conv is not model[0].conv
    assert holder.steps.is_meta and holder.conv.weight.is_meta and clone[1].in_proj_weight.is_meta
    assert holder.conv.kernel_size == (3, 3) and clone[1].embed_dim == 8
    holder.conv.register_forward_hook(lambda *a: None)
    assert not model[0].conv._forward_hooks  # hook tables are not shared
