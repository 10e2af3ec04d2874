"""Landing: which cuts of which groups end a pruning run just under its target.

The last step of :func:`prunable.schedule.prune_to` must remove an exact amount
of FLOPs (or parameters): at least ``excess``, at most ``excess`` plus a
tolerance. When single channels are coarse (one costs more than the tolerance),
no count of the least important channels does; a combination of a few cuts in
several groups may. :func:`search` finds it: a knapsack over the groups'
:class:`Option` s (``k`` units of a group, ``k = 0 … limit``), each group's drop
measured, with the second-order terms measured too (FLOPs and parameters are
products of the channel counts on both sides of a layer: cutting two groups that
meet at a layer removes less than the sum of the two cuts). Among the
combinations that land, the one removing the least importance wins.

Pure: options and fractions in, counts out; no model needed.

Example
-------
>>> big = Option("big", unit=1, limit=4, drop={"flops": 0.06}, importance=(0, 1.0, 2.0, 3.0, 4.0))
>>> small = Option("small", unit=1, limit=4, drop={"flops": 0.021}, importance=(0, 0.1, 0.2, 0.3, 0.4))
>>> found = search([big, small], now={"flops": 0.6}, targets={"flops": 0.5})
>>> found.inside, found.counts[0], round(found.ratios[0]["flops"], 3)
(True, {'big': 1, 'small': 2}, 0.498)
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

__all__ = ["Found", "Option", "search"]

#: How far under a target a run may end (absolute fraction).
TOLERANCE = 0.01
#: Buckets the knapsack keeps at most (its resolution adapts to the amount to remove).
_BUCKETS = 1000


@dataclass(frozen=True)
class Option:
    """The cuts of one group: ``k`` units of ``unit`` channels, ``k = 0 … limit``.

    ``drop[m]``: how much fraction ``m`` (``"flops"``, ``"params"``) falls when one unit
    goes; ``bend[m]``: the second-order term, ``drop(k) = (drop + bend)·k − bend·k²``
    (two units measured: ``bend = drop(1) − drop(2) / 2``); ``importance[k]``: the
    importance the first ``k`` units remove (``importance[0] == 0``).
    """

    group: str
    unit: int
    limit: int
    drop: Mapping[str, float]
    importance: Sequence[float]
    bend: Mapping[str, float] = field(default_factory=dict)

    def fall(self, metric: str, k: int) -> float:
        """How much ``metric`` falls when ``k`` units go (this group alone)."""
        b = self.bend.get(metric, 0.0)
        return (self.drop[metric] + b) * k - b * k * k


@dataclass(frozen=True)
class Found:
    """What :func:`search` found: units per group (``counts``, best first) and the fractions
    predicted for each; ``inside`` is True when they land within the tolerance under the
    targets, False when none does and they are the closest under the targets instead."""

    inside: bool
    counts: list[dict[str, int]]
    ratios: list[dict[str, float]]


def search(options: Sequence[Option], now: Mapping[str, float], targets: Mapping[str, float], *,
           pairs: Mapping[tuple[str, str], Mapping[str, float]] | None = None, tolerance: float = TOLERANCE,
           keep: int = 4) -> Found:
    """Units per group that bring the fractions ``now`` to at most ``targets``, within ``tolerance``.

    A knapsack over ``options`` keyed by the amount removed: each combination's fall is
    exact under the measured terms (``pairs[(g, h)][m]``: the fall of cutting one unit of
    each of ``g`` and ``h`` together is ``drop_g + drop_h − pairs[(g, h)][m]``). Of the
    combinations that land (every target met, the closest within ``tolerance``), the
    ``keep`` removing the least importance (then the fewest channels); if none lands,
    the ``keep`` closest under the targets.
    """
    metrics = list(targets)
    key = max(range(len(metrics)), key=lambda i: now[metrics[i]] - targets[metrics[i]])  # the binding target
    need = tuple(now[m] - targets[m] for m in metrics)  # how much each fraction must fall
    top = need[key] + tolerance
    index = {o.group: i for i, o in enumerate(options)}
    cross: list[list[tuple[int, tuple[float, ...]]]] = [[] for _ in options]  # (earlier option, pair terms)
    for (g, h), terms in (pairs or {}).items():
        if g in index and h in index and g != h:
            first, last = sorted((index[g], index[h]))
            cross[last].append((first, tuple(terms.get(m, 0.0) for m in metrics)))
    states: dict[Any, _State] = {0: (0.0, 0, (), (0.0,) * len(metrics))}
    under: list[tuple[float, tuple[int, ...], tuple[float, ...]]] = []
    for i, option in enumerate(options):
        states = _grow(states, option, cross[i], metrics, need, key, top, max(top, 1e-9) / _BUCKETS, under)
    width = len(options)
    for _, _, counts, falls in states.values():
        if all(f >= n for f, n in zip(falls, need)):
            under.append((min(f - n for f, n in zip(falls, need)), counts + (0,) * (width - len(counts)), falls))
    inside = sorted((u for u in under if u[0] <= tolerance), key=lambda u: _cost(options, u[1]))[:keep]
    chosen = inside or sorted(under)[:keep]
    counts = [{o.group: k for o, k in zip(options, c) if k} for _, c, _ in chosen]
    ratios = [{m: now[m] - f for m, f in zip(metrics, falls)} for _, _, falls in chosen]
    return Found(bool(inside), counts, ratios)


#: A partial combination: importance removed, channels removed, units per option so far, falls.
_State = tuple[float, int, tuple[int, ...], tuple[float, ...]]


def _grow(states: dict[Any, _State], option: Option, cross: list[tuple[int, tuple[float, ...]]],
          metrics: list[str], need: tuple[float, ...], key: int, top: float, step: float,
          under: list[tuple[float, tuple[int, ...], tuple[float, ...]]]) -> dict[Any, _State]:
    """``states`` with 0 … ``limit`` units of ``option`` added, one state per bucket of the binding
    fall (and of which targets are met): the least importance. A combination past the window
    goes to ``under`` (with its gap, if every target is met) and is not grown further."""
    own = [tuple(option.fall(m, k) for m in metrics) for k in range(option.limit + 1)]
    grown: dict[Any, _State] = {}
    for importance, channels, counts, falls in states.values():
        shared = tuple(sum(t[j] * counts[i] for i, t in cross) for j in range(len(metrics)))
        for k, fall in enumerate(own):
            new = tuple(f + o - k * c for f, o, c in zip(falls, fall, shared))
            if k and new[key] > top:  # past the window; more units only fall further
                if all(f >= n for f, n in zip(new, need)):
                    under.append((min(f - n for f, n in zip(new, need)), counts + (k,), new))
                break
            entry = (importance + option.importance[k], channels + k * option.unit, counts + (k,), new)
            bucket = (round(new[key] / step), tuple(f >= n for f, n in zip(new, need)))
            if bucket not in grown or entry[:2] < grown[bucket][:2]:
                grown[bucket] = entry
    return grown


def _cost(options: Sequence[Option], counts: tuple[int, ...]) -> tuple[float, int]:
    """Importance and channels a combination removes."""
    return (sum(o.importance[k] for o, k in zip(options, counts)),
            sum(o.unit * k for o, k in zip(options, counts)))
