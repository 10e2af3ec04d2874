"""oracle_importance against its definition: |ΔL| from actually pruning each channel on a copy."""

import copy

import pytest
import torch
from torch import nn

from prunable import Pruner, WeightNorm, oracle_importance
from helpers import randomize_bn


class Mixed(nn.Module):
    """Residual partners (one group, two producers), a concat (channel offsets), flatten → Linear."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 5, 3, padding=1), nn.BatchNorm2d(5), nn.ReLU())
        self.a = nn.Conv2d(5, 5, 3, padding=1)
        self.b = nn.Conv2d(3, 4, 1)
        self.c = nn.Conv2d(9, 3, 3, padding=1, bias=False)
        self.fc = nn.Linear(3 * 4 * 4, 4)

    def forward(self, x):
        s = self.stem(x)
        y = torch.relu(s + self.a(s))                 # stem.0 and a: one group
        y = torch.cat([y, self.b(x)], 1)              # b's channels sit at offsets 5..8 of c's input
        y = nn.functional.max_pool2d(torch.relu(self.c(y)), 2)
        return self.fc(torch.flatten(y, 1))


def _data():
    torch.manual_seed(0)
    model = Mixed().eval()
    randomize_bn(model)
    batches = [(torch.randn(6, 3, 8, 8), torch.randint(0, 4, (6,))) for _ in range(2)]
    return model, batches


def _loss(model, batches):
    with torch.no_grad():
        total = sum(float(nn.functional.cross_entropy(model(x), y)) * len(x) for x, y in batches)
    return total / sum(len(x) for x, _ in batches)


def _pruned_deltas(model, batches, x):
    """For every prunable group and channel: loss of a copy with that channel pruned, minus the loss."""
    base = _loss(model, batches)
    groups = Pruner(copy.deepcopy(model), x, criterion=WeightNorm()).groups
    out = {}
    for g in groups:
        deltas = []
        for k in range(g.channels):
            twin = copy.deepcopy(model)
            Pruner(twin, x, criterion=WeightNorm()).prune({g.id: [k]})
            deltas.append(_loss(twin, batches) - base)
        out[g.id] = torch.tensor(deltas)
    return out


@pytest.mark.parametrize("signed", [False, True])
def test_oracle_equals_loss_change_of_actually_pruning_each_channel(signed):
    model, batches = _data()
    state = copy.deepcopy(model.state_dict())
    truth = _pruned_deltas(model, batches, batches[0][0])
    oracle = oracle_importance(model, nn.functional.cross_entropy, batches, signed=signed)
    assert set(oracle) == set(truth) == {"a", "b", "c"}
    for gid, deltas in truth.items():
        assert len(set(deltas.abs().tolist())) == len(deltas), f"{gid}: ties would hide a wrong channel"
        expected = deltas if signed else deltas.abs()
        torch.testing.assert_close(oracle[gid], expected, rtol=1e-4, atol=1e-6, msg=f"group {gid}")
    for key, value in model.state_dict().items():  # every silenced tensor is restored exactly
        assert torch.equal(value, state[key]), key


def test_single_channel_prunes_change_the_loss_both_ways():
    """Some channels help and some hurt an untrained model: a lost abs() or sign would show."""
    model, batches = _data()
    truth = _pruned_deltas(model, batches, batches[0][0])
    values = torch.cat(list(truth.values()))
    assert (values < 0).any() and (values > 0).any()
