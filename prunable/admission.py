"""Admission: which groups of a graph may be pruned, how far, and why the others may not.

After every (re)build of the graph, :meth:`Admission.update` gives each group its
cap (``min_channels``, ``round_to``, ``max_ratio`` of the channels it had at the
start, :class:`~prunable.constraints.Constraints`) and names the reason of every
group that may lose none (the graph's, an ignored layer, the constraints, a
trial prune that failed). Groups whose cut once failed stay skipped from then on
(:meth:`Admission.fail`). The selectors it keeps turn scores into plans
(:class:`~prunable.selection.Selector`): one over every group (its checks name
the skipped ones) and one over the groups that may be pruned.

Example
-------
>>> import torch
>>> from torch import nn
>>> from prunable.graph import DependencyGraph
>>> net = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Conv2d(8, 6, 3), nn.ReLU(), nn.Conv2d(6, 4, 3))
>>> groups = DependencyGraph(net, torch.randn(1, 3, 9, 9)).groups
>>> admission = Admission(Constraints(max_ratio=0.5), ignored={"0"})
>>> admission.update(groups)
>>> admission.selector.caps, str(admission.skipped["0"])
({'2': 3}, 'ignored layer 0')
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterable, Mapping
from typing import Any

from .constraints import Constraints, resolve_max_ratio
from .errors import PruningValueError
from .reasons import SkipKind, SkipReason
from .selection import Selector, layouts_of
from .validation import trial_failed

__all__ = ["Admission", "ignored_names"]


class Admission:
    """The prunable groups of a graph and their caps, under ``constraints``; producers named
    in ``ignored`` are never pruned.

    Attributes
    ----------
    skipped : dict[str, SkipReason]
        Group id → why the group is not pruned.
    all, selector : Selector
        Over every group, and over the groups not skipped.
    """

    def __init__(self, constraints: Constraints, ignored: Iterable[str] = ()) -> None:
        self.constraints, self.ignored = constraints, set(ignored)
        self.skipped: dict[str, SkipReason] = {}
        self.failed: dict[str, SkipReason] = {}  # groups whose cut failed: skipped from then on
        self.original: dict[str, int] | None = None  # channels of every group at the first update

    @classmethod
    def of(cls, model: Any, *, min_channels: int = 1, round_to: int | None = None,
           max_ratio: float | Mapping[Any, float] = 1.0, ignored: Iterable[Any] = ()) -> "Admission":
        """The admission of ``model``'s groups under these options (``max_ratio`` and ``ignored`` may name
        layers or hold the modules); a :class:`PruningValueError` names an entry that is no module of it."""
        modules = dict(model.named_modules())
        constraints = Constraints(min_channels, round_to, *resolve_max_ratio(max_ratio, modules))
        return cls(constraints, ignored_names(modules, ignored))

    def update(self, groups: list[Any], invalid: Callable[[Selector], dict[str, SkipReason]] | None = None,
               ) -> None:
        """Caps and reasons for ``groups`` (:class:`~prunable.graph.ChannelGroup` s, the current graph);
        ``invalid(selector)``, when given, names the groups whose trial cut fails (skipped from then on)."""
        if self.original is None:
            self.original = {g.id: g.channels for g in groups}
        caps, self.skipped = self.constraints.limits(groups, self.original, self.failed, self.ignored)
        layouts, sizes, labels = layouts_of(groups)
        self.all = Selector(layouts, sizes, caps, labels)  # every group: checks name the skipped ones
        self.selector = self.all.without(self.skipped)
        if invalid is not None:
            found = invalid(self.selector)
            # a group whose trial failed stays skipped (as after vet): not bisected again at every rebuild
            self.failed.update((gid, r) for gid, r in found.items() if r.kind is SkipKind.TRIAL_FAILED)
            self.skipped.update(found)
            self.selector = self.all.without(self.skipped)

    def fail(self, failing: Iterable[tuple[str, str]], stacklevel: int = 2) -> None:
        """Skip the groups of ``failing`` (group id, error of its trial cut) from now on, with a warning."""
        for gid, error in failing:
            self.failed[gid] = self.skipped[gid] = trial_failed(error)
            warnings.warn(f"prunable: group {gid} is not pruned: {self.skipped[gid]}", stacklevel=stacklevel + 1)
        self.selector = self.all.without(self.skipped)


def ignored_names(modules: Mapping[str, Any], ignored: Iterable[Any]) -> set[str]:
    """Qualified names of ``ignored`` (modules or names of ``modules``, name → module); unknown entries raise.

    Example
    -------
    >>> from torch import nn
    >>> net = nn.Sequential(nn.Linear(2, 2), nn.Linear(2, 1))
    >>> sorted(ignored_names(dict(net.named_modules()), [net[1], "0"]))
    ['0', '1']
    """
    by_id = {id(m): n for n, m in modules.items()}
    out = set()
    for item in ignored:
        name = item if isinstance(item, str) else by_id.get(id(item))
        if name is None or name not in modules:
            shown = item if isinstance(item, str) else type(item).__name__
            raise PruningValueError(f"ignored_layers entry {shown!r} is not a module of the model")
        out.add(name)
    return out
