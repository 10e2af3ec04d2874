"""The layer zoo (tests/layer_zoo.py): every registered layer type is pruned correctly.

For each row, channels made dead by hand must be exactly the L1 plan and leave the
output unchanged; a random plan must compute what the copy with those channels'
readers zeroed computes. A handler registered by prunable without a row fails.
"""

import copy
import warnings

import pytest
import torch
from torch import nn

from layer_zoo import ROWS, LayerCase
from prunable import Pruner, PruningValueError, SkipKind
from prunable.surgery import Cut, Role, channel_parameters, registered_types

ids = [row.name for row in ROWS]


def _quiet_pruner(model: nn.Module, x, criterion: str) -> Pruner:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return Pruner(model, x, criterion=criterion)


def test_every_registered_handler_has_a_row():
    ours = {key for key, handler in registered_types().items() if type(handler).__module__.startswith("prunable.")}
    covered = {key for row in ROWS for key in row.covers}
    missing = [key if isinstance(key, str) else key.__qualname__ for key in ours - covered]
    assert not missing, f"registered handler types without a row in tests/layer_zoo.py: {missing}"


@pytest.mark.parametrize("row", ROWS, ids=ids)
def test_dead_channels_are_exactly_the_l1_plan(row: LayerCase):
    model = row.build().eval()
    row.kill(model, list(row.dead))
    x = row.inputs()
    with torch.no_grad():
        before = model(x)
    pruner = _quiet_pruner(model, x, "l1")
    plan = pruner.plan(len(row.dead))
    assert {k: tuple(v) for k, v in plan.removals.items()} == {row.group: row.dead}, pruner.skipped
    channels = next(g.channels for g in pruner.groups if g.id == row.group)
    pruner.prune(plan)
    after = next(g.channels for g in pruner.groups if g.id == row.group)
    assert after == channels - len(row.dead)
    with torch.no_grad():
        out = model(x)
    assert out.shape == before.shape
    if row.exact:
        assert torch.allclose(out, before, atol=1e-5, rtol=0), (out - before).abs().max()


def _zero_readers(model: nn.Module, pruner: Pruner, removals: dict[str, list[int]]) -> None:
    """Zero, in ``model`` (a copy of ``pruner.model``), every parameter reading a removed channel."""
    by_id = {g.id: g for g in pruner.graph.groups}
    removed = torch.cat([by_id[gid].classes[torch.as_tensor(idx)] for gid, idx in removals.items()])
    modules = dict(model.named_modules())
    for g in pruner.graph.groups:
        for m in g.members:
            t = m.target
            hit = torch.nonzero(torch.isin(m.classes, removed)).flatten()
            if t.role is Role.OUT or not len(hit):
                continue
            with torch.no_grad():
                for p, axis, idx in channel_parameters(Cut(modules[t.name], t.role, hit, t.param, t.axis)):
                    p.index_fill_(axis, idx, 0)


@pytest.mark.parametrize("row", [r for r in ROWS if r.zeroed], ids=[r.name for r in ROWS if r.zeroed])
def test_random_plan_equals_zeroed_copy(row: LayerCase):
    model = row.build().eval()
    x = row.inputs()
    pruner = _quiet_pruner(model, x, "random")
    scores = pruner.scores()
    removals = {g.id: scores[g.id].argsort()[: max(1, g.channels // 3)].sort().values.tolist()
                for g in pruner.groups if g.blocks is None and g.channels > 1}
    assert row.group in removals, pruner.skipped
    zeroed = copy.deepcopy(model)
    _zero_readers(zeroed, pruner, removals)
    pruner.prune(removals)
    with torch.no_grad():
        assert torch.allclose(model(x), zeroed(x), atol=1e-5, rtol=0)


def test_embedding_keeps_vocabulary_and_padding_row():
    row = next(r for r in ROWS if r.name == "embedding")
    model = row.build()
    pruner = _quiet_pruner(model, row.inputs(), "l2")  # a weight criterion scores the embedding dim
    pruner.step(3)
    assert model.embed.weight.shape == (20, 5) and model.embed.padding_idx == 0
    assert not model.embed.weight[0].any()


def test_parametrizations_keep_working_after_pruning():
    for name in ("weight_norm", "spectral_norm"):
        row = next(r for r in ROWS if r.name == name)
        model = row.build()
        pruner = _quiet_pruner(model, row.inputs(), "l1")
        pruner.step(2)
        originals = {n: tuple(t.shape) for n, t in model[0].parametrizations.weight.named_parameters()}
        assert model[0].weight.shape[0] == 6
        assert originals == ({"original": (6, 3, 3, 3)} if name == "spectral_norm"
                             else {"original0": (6, 1, 1, 1), "original1": (6, 3, 3, 3)})
        model.train()
        model(row.inputs()).sum().backward()  # spectral norm's power iteration runs on the sliced _u/_v
        assert all(p.grad is not None for p in model.parameters())


def test_legacy_weight_norm_is_refused_with_the_layer_name():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.utils.weight_norm(nn.Conv2d(8, 4, 1)))
    with pytest.raises(PruningValueError, match=r"^2 \(legacy nn.utils.weight_norm"):
        Pruner(model, torch.randn(1, 3, 8, 8))


def test_unknown_parametrization_is_skipped_with_a_reason():
    class Doubled(nn.Module):
        def forward(self, w: torch.Tensor) -> torch.Tensor:
            return 2 * w

    conv = nn.Conv2d(3, 8, 3)
    torch.nn.utils.parametrize.register_parametrization(conv, "weight", Doubled())
    model = nn.Sequential(conv, nn.ReLU(), nn.Conv2d(8, 4, 1))
    pruner = _quiet_pruner(model, torch.randn(1, 3, 8, 8), "l1")
    assert pruner.skipped["0"].kind is SkipKind.UNSUPPORTED_LAYER and "Doubled" in str(pruner.skipped["0"])


def test_split_along_channels_with_literal_sizes_is_skipped():
    class Halves(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv, self.a, self.b = nn.Conv2d(3, 8, 3), nn.Conv2d(4, 2, 1), nn.Conv2d(4, 2, 1)

        def forward(self, x):
            left, right = self.conv(x).split(4, dim=1)
            return self.a(left) + self.b(right)

    pruner = _quiet_pruner(Halves(), torch.randn(1, 3, 8, 8), "l1")
    reason = pruner.skipped["conv"]
    assert reason.kind is SkipKind.UNSUPPORTED_OP and "literal sizes" in str(reason)


def test_docs_layer_table_is_the_generated_one():
    """docs/zoo.md ends with the section ``python bench/layer_table.py`` writes from the zoo and the registry."""
    from pathlib import Path

    from layer_zoo import DOC_MARKER, markdown

    doc = (Path(__file__).resolve().parents[1] / "docs" / "zoo.md").read_text()
    assert DOC_MARKER in doc, "run python bench/layer_table.py"
    generated = DOC_MARKER + doc.split(DOC_MARKER, 1)[1]
    assert generated == markdown(), "docs/zoo.md is stale: run python bench/layer_table.py"


BLOCKED_LAYOUTS = ["embedding", "embeddingbag", "convtranspose2d_grouped", "convtranspose2d_depthwise", "pixel_shuffle",
                   "weight_norm", "spectral_norm", "conv1d_bn1d", "lstm", "gru"]


@pytest.mark.parametrize("criterion", ["l1", "l2", "random", "taylor-weight", "taylor-bn", "bn-scale", "taylor",
                                       "apoz"])
@pytest.mark.parametrize("name", BLOCKED_LAYOUTS)
def test_every_criterion_scores_the_channels_the_handler_names(name, criterion):
    """Regression (issue 11): weight criteria guessed axis 0 (an Embedding's vocabulary) and crashed."""
    row = next(r for r in ROWS if r.name == name)
    model, x = row.build(), row.inputs()
    pruner = _quiet_pruner(model, x, criterion)
    with pruner.estimate():
        model(x).float().pow(2).sum().backward()
    scores = pruner.scores()
    group = next((g for g in pruner.groups if g.id == row.group), None)
    assert group is not None, pruner.skipped
    assert scores[group.id].shape == (group.channels,) and torch.isfinite(scores[group.id]).all()
    pruner.step(1)
    assert model(x).shape == model(x).shape


def test_taylor_weight_hooks_the_originals_of_a_parametrized_weight():
    """The weight of weight_norm is recomputed every forward: its gradient reaches g and v, not a stored weight."""
    row = next(r for r in ROWS if r.name == "weight_norm")
    model, x = row.build(), row.inputs()
    pruner = _quiet_pruner(model, x, "taylor-weight")
    with pruner.estimate():
        model(x).pow(2).sum().backward()
    g, v, bias = (model[0].parametrizations.weight.original0, model[0].parametrizations.weight.original1, model[0].bias)
    # (Σ θ·dL/dθ)² per channel and tensor, as for a plain weight; v·dL/dv sums to ~0 per row (scale invariance)
    expected = sum(t.flatten(1).sum(1).pow(2) for t in (g * g.grad, v * v.grad, (bias * bias.grad)[:, None]))
    torch.testing.assert_close(pruner.criterion.scores(pruner._points["0"]), expected.detach())
