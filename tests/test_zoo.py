"""Every torchvision classification model: prune ~30 % of each group, check it still works."""

import warnings

import pytest
import torch

from prunable import Pruner, WeightNorm, count_flops, count_params
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
    pruner.prune(plan)
    with torch.no_grad():
        out = model(x)
    assert out.shape == expected_shape
    assert torch.isfinite(out).all()
    assert count_flops(model, x) < flops and count_params(model) < params


def test_zoo_covers_every_torchvision_classification_model():
    assert len(MODELS) >= 80
    assert REPRESENTATIVE <= set(MODELS)
