"""Scoring: per-layer normalisation, aggregation of coupled producers, non-finite scores."""

import math

import pytest
import torch

from prunable.errors import EstimationError
from prunable.importance import Aggregation, l2_normalize
from prunable.scoring import _group_score, aggregate


def _masked(parts, size, how):
    """The aggregation spelled out: negative indices (channels of no producer) are dropped."""
    out, count = torch.zeros(size), torch.zeros(size)
    for s, index in parts:
        for v, i in zip(s.tolist(), index.tolist()):
            if i >= 0:
                out[i] = max(out[i], v) if how is Aggregation.MAX and count[i] else out[i] + v
                count[i] += 1
    return out / count.clamp(min=1) if how is Aggregation.MEAN else out


@pytest.mark.parametrize("how", list(Aggregation))
@pytest.mark.parametrize("seed", range(10))
def test_aggregate_leaves_out_negative_indices(how, seed):
    gen = torch.Generator().manual_seed(seed)
    size = int(torch.randint(1, 9, (1,), generator=gen))
    parts = []
    for _ in range(int(torch.randint(1, 4, (1,), generator=gen))):
        n = int(torch.randint(1, 12, (1,), generator=gen))
        parts.append((torch.rand(n, generator=gen) + 0.1, torch.randint(-3, size, (n,), generator=gen)))
    got = aggregate(parts, size, how)
    assert got.shape == (size,)
    torch.testing.assert_close(got, _masked(parts, size, how))


class _Fixed:
    """A criterion returning fixed scores per point name."""

    normalize = True

    def __init__(self, values):
        self.values = values

    def scores(self, point):
        return self.values[point]


class _Group:
    id, channels = "g", 3
    measure = [("a", 0, torch.tensor([0, 1, 2])), ("b", 0, torch.tensor([2, -1, 0]))]


@pytest.mark.parametrize("normalize", [True, False])
def test_group_score_normalises_each_layer_as_l2_normalize(normalize):
    values = {"a": torch.tensor([3.0, 4.0, 0.0]), "b": torch.tensor([1e-20, 2e-20, 0.0])}  # b: a norm near 0
    criterion = _Fixed(values)
    criterion.normalize = normalize
    got = _group_score(_Group(), criterion, {"a": "a", "b": "b"}, Aggregation.SUM, 0.0)
    norm = l2_normalize if normalize else (lambda s: s)
    a, b = norm(values["a"]), norm(values["b"])
    assert torch.equal(got, torch.stack([a[0] + b[2], a[1], a[2] + b[0]]))


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
def test_group_score_names_the_layer_of_a_non_finite_score(bad):
    values = {"a": torch.tensor([1.0, 2.0, 3.0]), "b": torch.tensor([1.0, bad, 0.0])}
    with pytest.raises(EstimationError, match="group g: non-finite importance from b"):
        _group_score(_Group(), _Fixed(values), {"a": "a", "b": "b"}, Aggregation.SUM, 0.0)


def test_group_score_of_huge_finite_scores_is_not_called_non_finite():
    values = {"a": torch.tensor([3e38, 3e38, 1.0]), "b": torch.tensor([1.0, 1.0, 1.0])}  # the norm overflows
    got = _group_score(_Group(), _Fixed(values), {"a": "a", "b": "b"}, Aggregation.SUM, 0.0)
    b = l2_normalize(values["b"])
    assert torch.equal(got, l2_normalize(values["a"]) + torch.stack([b[2], b[1] * 0, b[0]]))
