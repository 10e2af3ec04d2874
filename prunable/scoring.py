"""Scoring: one importance score per channel of every group, from a criterion.

A group's channel is held by several producers (residual partners, concat
branches); each producer's scores are read from the criterion at its measure
point, checked, optionally L2-normalised per layer, and combined
(:class:`~prunable.importance.Aggregation`). Optionally the FLOPs a channel costs
are subtracted (Molchanov et al.'s Eq. 9).

Example
-------
>>> import torch
>>> parts = [(torch.tensor([1.0, 2.0]), torch.tensor([0, 1])), (torch.tensor([3.0]), torch.tensor([1]))]
>>> aggregate(parts, 2, Aggregation.SUM), aggregate(parts, 2, Aggregation.MAX)
(tensor([1., 5.]), tensor([1., 3.]))
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from typing import Any

import torch
from torch import nn

from .distributed import reduce_scores
from .errors import EstimationError
from .flops import module_flops
from .inputs import batch_size
from .importance import Aggregation, Criterion, MeasurePoint, l2_normalize

__all__ = ["aggregate", "flops_per_channel", "group_scores"]


def group_scores(groups: Iterable[Any], criterion: Criterion, points: Mapping[str, MeasurePoint],
                 aggregation: Aggregation, penalty: Mapping[str, float] | None = None,
                 strength: float = 0.0, device: torch.device | None = None,
                 cost: Mapping[str, float] | None = None) -> dict[str, torch.Tensor]:
    """Score of every channel of every group (lower = pruned first), averaged over ranks.

    ``penalty[g]`` (MFLOPs per channel of group ``g``) times ``strength`` is subtracted.
    ``cost[g]`` (> 0: the seconds one channel of ``g`` costs, from a
    :class:`~prunable.latency.LatencyTable`) divides the score: channels are then
    ranked by importance per unit of cost, as in HALP.
    Raises :class:`EstimationError` for a non-finite score, naming group and layer (under
    ``torch.distributed``, on every rank: see :func:`~prunable.distributed.reduce_scores`).
    """
    out, error = {}, None
    for g in groups:
        try:
            out[g.id] = _group_score(g, criterion, points, aggregation, (penalty or {}).get(g.id, 0.0) * strength)
            if cost is not None and g.id in cost:
                out[g.id] = out[g.id] / cost[g.id]
        except EstimationError as exc:  # under torch.distributed: raised on every rank below
            error = error or str(exc)
            out[g.id] = torch.full((g.channels,), math.nan)
    return reduce_scores(out, device=device, error=error)


def _group_score(g: Any, criterion: Criterion, points: Mapping[str, MeasurePoint], aggregation: Aggregation,
                 penalty: float) -> torch.Tensor:
    parts = []
    for name, dim, index in g.measure:
        if dim is None:
            continue
        s = criterion.scores(points[name]).detach()
        if s.is_meta:
            raise EstimationError(
                f"group {g.id}: {type(criterion).__name__} read {name}'s values, but they are on the meta device "
                "(a model built under torch.device('meta') has shapes, no values): plan with criterion='random' "
                "or with explicit channel indices, and apply the plan to the real model (prunable.apply_plan)")
        s = s.float().cpu()
        norm = torch.linalg.vector_norm(s)  # finite whenever every score is; else (or on overflow) check each
        if not math.isfinite(float(norm)) and not bool(torch.isfinite(s).all()):
            raise EstimationError(f"group {g.id}: non-finite importance from {name}: {s.tolist()[:8]}")
        parts.append((l2_normalize(s, norm=norm) if criterion.normalize else s, index))
    score = aggregate(parts, g.channels, aggregation)
    return score - penalty if penalty else score


def flops_per_channel(model: nn.Module, example_inputs: Any, groups: Iterable[Any]) -> dict[str, float]:
    """MFLOPs one channel of each group costs per example (its layers' FLOPs / their widths)."""
    flops = module_flops(model, example_inputs)
    batch = batch_size(example_inputs)
    return {g.id: sum(flops.get(m.target.name, 0) / max(len(m.classes), 1)
                      for m in g.members if m.target.param is None) / 1e6 / batch for g in groups}


def aggregate(parts: list[tuple[torch.Tensor, torch.Tensor]], size: int, how: Aggregation) -> torch.Tensor:
    """Combine per-producer scores (scores, group channel of each) into one score per group channel."""
    if how is Aggregation.MAX:
        out = torch.full((size,), -math.inf)
        for s, index in parts:
            ok = index >= 0
            out.scatter_reduce_(0, index[ok], s[ok], reduce="amax")
        return torch.where(torch.isinf(out), torch.zeros_like(out), out)
    # a negative index (a channel of no producer here) adds to one spare entry past the end:
    # no boolean-mask indexing, and the same sums in the same order
    out = torch.zeros(size + 1)
    count = torch.zeros(size + 1) if how is Aggregation.MEAN else None  # a sum needs no count
    for s, index in parts:
        index = torch.where(index >= 0, index, size)
        out.index_add_(0, index, s)
        if count is not None:
            count.index_add_(0, index, torch.ones(index.shape[0]))
    return out[:size] / count[:size].clamp(min=1) if count is not None else out[:size]
