"""Every torchvision classification model: prune ~30 % of each group, check it still works."""

import warnings

import pytest
import torch

from prunable import AttentionHandler, Pruner, WeightNorm, count_flops, count_params
from prunable.surgery import handler_for
from helpers import fraction_plan
from zoo_models import REPRESENTATIVE, all_models, build

MODELS = all_models()


@pytest.mark.parametrize(
    "name", [n if n in REPRESENTATIVE else pytest.param(n, marks=pytest.mark.slow) for n in MODELS]
)
def test_zoo_model_prunes(name):
    model, x = build(name)
    with torch.no_grad():
        expected_shape = model(x).shape
    flops, params = count_flops(model, x), count_params(model)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pruner = Pruner(model, x, criterion=WeightNorm())
    assert pruner.groups, f"{name}: no prunable group"
    plan = fraction_plan(pruner)
    assert plan
    attention = [(m, h) for m in model.modules() if isinstance(h := handler_for(m), AttentionHandler)]
    widths = [(h.width(m), h.num_heads(m)) for m, h in attention]
    pruner.prune(plan)
    for (m, h), (width, heads) in zip(attention, widths):  # head dims pruned, heads kept
        assert h.width(m) < width and h.num_heads(m) == heads and h.width(m) % heads == 0
    with torch.no_grad():
        out = model(x)
    assert out.shape == expected_shape
    assert torch.isfinite(out).all()
    assert count_flops(model, x) < flops and count_params(model) < params


def test_zoo_covers_every_torchvision_classification_model():
    assert len(MODELS) >= 80
    assert REPRESENTATIVE <= set(MODELS)
