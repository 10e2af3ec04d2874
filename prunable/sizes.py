"""Sizes: FLOPs, parameters and layer widths of a model, now and before its first cut.

:func:`sizes` counts a model as it is; :class:`Baseline` keeps what is needed to
count it as it was before pruning began (a parameter-free meta copy, counted only
when asked); :func:`widths` gives the output channels of every producing layer of
a graph's groups, for the report.

Example
-------
>>> import torch
>>> from torch import nn
>>> net = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Conv2d(8, 4, 3))
>>> x = torch.randn(1, 3, 8, 8)
>>> start = Baseline(net, (x,))
>>> start.keep()                      # before the first cut
>>> net[2] = nn.Conv2d(8, 2, 3)       # the model changes
>>> start.counts() == sizes(nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Conv2d(8, 4, 3)), (x,))
True
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

from torch import nn

from .attention import AttentionHandler
from .copies import meta_clone
from .flops import count_flops, count_params, module_flops
from .surgery import handler_for

__all__ = ["Baseline", "sizes", "unit_costs", "unit_of", "widths"]


def sizes(model: nn.Module, example_inputs: Any) -> dict[str, int]:
    """FLOPs (of ``example_inputs``) and parameters of ``model``.

    Example
    -------
    >>> import torch
    >>> sizes(nn.Linear(3, 2), (torch.randn(1, 3),))
    {'flops': 12, 'params': 8}
    """
    return {"flops": count_flops(model, example_inputs), "params": count_params(model)}


class Baseline:
    """FLOPs and parameters of ``model`` before its first cut.

    :meth:`keep`, called before every cut, keeps a meta copy of the model the
    first time (or, when ``real`` says why its forward pass needs real values,
    counts the model at once); :meth:`counts` counts that copy when first
    asked, or the model itself while it was never cut.
    """

    def __init__(self, model: nn.Module, example_inputs: Any) -> None:
        self.model, self.example_inputs = model, example_inputs
        self._counts: dict[str, int] | None = None
        self._pristine: nn.Module | None = None  # a meta copy of the model before its first cut

    def counts(self) -> dict[str, int]:
        """FLOPs (of the example inputs) and parameters of the model before its first cut."""
        if self._counts is None and self._pristine is not None:
            self._counts, self._pristine = sizes(self._pristine, self.example_inputs), None
        if self._counts is None:
            self._counts = sizes(self.model, self.example_inputs)
        return self._counts

    def offer(self, copy: nn.Module) -> None:
        """``copy``, an unused meta copy of the model as it is now, never cut (the build's traced
        copy): kept for :meth:`counts`, so :meth:`keep` needs no copy of its own."""
        if self._counts is None and self._pristine is None:
            self._pristine = copy

    def keep(self, real: str | None = None) -> None:
        """Before a cut: keep what :meth:`counts` needs, once (a meta copy of the model;
        the counts themselves when ``real`` says the forward pass needs real values)."""
        if self._counts is not None or self._pristine is not None:
            return
        if real is None:
            self._pristine = meta_clone(self.model)
        else:
            self.counts()


def widths(groups: Iterable[Any]) -> dict[str, int]:
    """Output channels of every producing layer of ``groups`` (:class:`~prunable.graph.ChannelGroup` s),
    by layer name; attention layers (whose channels are heads) are left out."""
    return {m.target.name: len(m.classes) for g in groups for m in g.producers
            if not isinstance(handler_for(m.target.module), AttentionHandler)}


def unit_of(group: Any) -> int:
    """Channels one unit of a group is: one, or one per block (heads, GroupNorm groups)."""
    return 1 if group.blocks is None else len(group.blocks)


def unit_costs(model: nn.Module, example_inputs: Any, groups: Iterable[Any],
               start: Mapping[str, int]) -> dict[str, dict[str, float]]:
    """First order: the fraction of ``start[m]`` (``"flops"``, ``"params"``) one unit of each group
    costs now: the FLOPs and own parameters of its layers, divided by their widths.

    Example
    -------
    >>> import torch
    >>> from prunable.graph import DependencyGraph
    >>> net = nn.Sequential(nn.Conv2d(3, 8, 1), nn.ReLU(), nn.Conv2d(8, 2, 1))
    >>> x = torch.randn(1, 3, 4, 4)
    >>> costs = unit_costs(net, (x,), DependencyGraph(net, x).groups, sizes(net, (x,)))
    >>> {k: round(v, 4) for k, v in costs["0"].items()}     # 1/8 of conv 0, 1/8 of conv 2
    {'flops': 0.125, 'params': 0.125}
    """
    flops = module_flops(model, example_inputs) if "flops" in start else {}
    out = {}
    for g in groups:
        cost = dict.fromkeys(start, 0.0)
        for m in g.members:
            if m.target.param is not None or m.target.module is None:
                continue
            width = max(len(m.classes), 1)
            if "flops" in cost:
                cost["flops"] += flops.get(m.target.name, 0) / width
            if "params" in cost:
                cost["params"] += sum(p.numel() for p in m.target.module.parameters(recurse=False)) / width
        out[g.id] = {k: v * unit_of(g) / max(start[k], 1) for k, v in cost.items()}
    return out
