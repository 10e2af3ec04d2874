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

Before that, the intermediate steps must leave the last one something to combine:
:func:`in_reserve` says which groups a step should leave alone so that enough
fine-grained channels (each under the tolerance) remain to fill the gap between
the coarse ones.

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

import itertools
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

__all__ = ["Found", "Option", "in_reserve", "search"]

#: How far under a target a run may end (absolute fraction).
TOLERANCE = 0.01
#: Buckets the knapsack keeps at most (its resolution adapts to the amount to remove).
_BUCKETS = 1000
#: Combinations few enough to try every one (then :attr:`Found.complete`: none is missed).
_EVERY = 20_000


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
    targets, False when none does and they are the closest under the targets instead;
    ``complete`` when every combination of the options was tried (else the knapsack's
    buckets may have merged one away)."""

    inside: bool
    counts: list[dict[str, int]]
    ratios: list[dict[str, float]]
    complete: bool = False


def search(options: Sequence[Option], now: Mapping[str, float], targets: Mapping[str, float], *,
           pairs: Mapping[tuple[str, str], Mapping[str, float]] | None = None, tolerance: float = TOLERANCE,
           keep: int = 4, at_least: Mapping[str, int] | None = None) -> Found:
    """Units per group that bring the fractions ``now`` to at most ``targets``, within ``tolerance``.

    A knapsack over ``options`` keyed by the amount removed: each combination's fall is
    exact under the measured terms (``pairs[(g, h)][m]``: the fall of cutting one unit of
    each of ``g`` and ``h`` together is ``drop_g + drop_h − pairs[(g, h)][m]``). Of the
    combinations that land (every target met, the closest within ``tolerance``), the
    ``keep`` removing the least importance (then the fewest channels); if none lands,
    the ``keep`` closest under the targets. ``at_least[g]``: combinations take that many
    units of ``g`` or more (does a run that takes them first still land?).
    """
    metrics = list(targets)
    least = tuple(min((at_least or {}).get(o.group, 0), o.limit + 1) for o in options)
    key = max(range(len(metrics)), key=lambda i: now[metrics[i]] - targets[metrics[i]])  # the binding target
    need = tuple(now[m] - targets[m] for m in metrics)  # how much each fraction must fall
    top = need[key] + tolerance
    index = {o.group: i for i, o in enumerate(options)}
    cross: list[list[tuple[int, tuple[float, ...]]]] = [[] for _ in options]  # (earlier option, pair terms)
    for (g, h), terms in (pairs or {}).items():
        if g in index and h in index and g != h:
            first, last = sorted((index[g], index[h]))
            cross[last].append((first, tuple(terms.get(m, 0.0) for m in metrics)))
    complete = math.prod(o.limit + 1 for o in options) <= _EVERY
    under = (_every(options, cross, metrics, need, least) if complete
             else _knapsack(options, cross, metrics, need, key, top, least))
    inside = sorted((u for u in under if u[0] <= tolerance), key=lambda u: _cost(options, u[1]))[:keep]
    chosen = inside or sorted(under)[:keep]
    counts = [{o.group: k for o, k in zip(options, c) if k} for _, c, _ in chosen]
    ratios = [{m: now[m] - f for m, f in zip(metrics, falls)} for _, _, falls in chosen]
    return Found(bool(inside), counts, ratios, complete)


def _every(options: Sequence[Option], cross: list[list[tuple[int, tuple[float, ...]]]], metrics: list[str],
           need: tuple[float, ...], least: tuple[int, ...]) -> list[tuple[float, tuple[int, ...], tuple[float, ...]]]:
    """Every combination that meets all targets, with its gap and falls (for small searches)."""
    own = [[tuple(o.fall(m, k) for m in metrics) for k in range(o.limit + 1)] for o in options]
    pairs = [(first, last, terms) for last, found in enumerate(cross) for first, terms in found]
    under = []
    for counts in itertools.product(*(range(lo, o.limit + 1) for o, lo in zip(options, least))):
        falls = tuple(sum(own[i][k][j] for i, k in enumerate(counts))
                      - sum(t[j] * counts[f] * counts[g] for f, g, t in pairs) for j in range(len(metrics)))
        if all(f >= n for f, n in zip(falls, need)):
            under.append((min(f - n for f, n in zip(falls, need)), counts, falls))
    return under


def _knapsack(options: Sequence[Option], cross: list[list[tuple[int, tuple[float, ...]]]], metrics: list[str],
              need: tuple[float, ...], key: int, top: float, least: tuple[int, ...],
              ) -> list[tuple[float, tuple[int, ...], tuple[float, ...]]]:
    """The combinations that meet all targets, as the bucketed knapsack keeps them (large searches)."""
    states: dict[Any, _State] = {0: (0.0, 0, (), (0.0,) * len(metrics))}
    under: list[tuple[float, tuple[int, ...], tuple[float, ...]]] = []
    for i, option in enumerate(options):
        states = _grow(states, option, cross[i], metrics, need, key, top, max(top, 1e-9) / _BUCKETS, under,
                       least[i], not any(least[i + 1:]))
    width = len(options)
    for _, _, counts, falls in states.values():
        if all(f >= n for f, n in zip(falls, need)):
            under.append((min(f - n for f, n in zip(falls, need)), counts + (0,) * (width - len(counts)), falls))
    return under


#: A partial combination: importance removed, channels removed, units per option so far, falls.
_State = tuple[float, int, tuple[int, ...], tuple[float, ...]]


def _grow(states: dict[Any, _State], option: Option, cross: list[tuple[int, tuple[float, ...]]],
          metrics: list[str], need: tuple[float, ...], key: int, top: float, step: float,
          under: list[tuple[float, tuple[int, ...], tuple[float, ...]]], least: int = 0,
          final: bool = True) -> dict[Any, _State]:
    """``states`` with ``least`` … ``limit`` units of ``option`` added, one state per bucket of the
    binding fall (and of which targets are met): the least importance. A combination past the
    window is not grown further; it goes to ``under`` (with its gap, if every target is met)
    when it is ``final`` (the later options need no units)."""
    own = [tuple(option.fall(m, k) for m in metrics) for k in range(option.limit + 1)]
    grown: dict[Any, _State] = {}
    for importance, channels, counts, falls in states.values():
        shared = tuple(sum(t[j] * counts[i] for i, t in cross) for j in range(len(metrics)))
        for k, fall in enumerate(own):
            if k < least:
                continue
            new = tuple(f + o - k * c for f, o, c in zip(falls, fall, shared))
            if k and new[key] > top:  # past the window; more units only fall further
                if final and all(f >= n for f, n in zip(new, need)):
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


def in_reserve(costs: Mapping[str, Mapping[str, float]], units: Mapping[str, int],
               excess: Mapping[str, float], *, before: Mapping[str, int] | None = None,
               tolerance: float = TOLERANCE, limit: int = 256) -> set[str]:
    """The groups an intermediate step should leave alone so that the last step can still land.

    ``costs[g][m]``: how much fraction ``m`` one unit of group ``g`` removes (first order);
    ``units[g]``: units ``g`` may still lose once the step is applied (``before[g]``: before it);
    ``excess[m]``: how far fraction ``m`` will still be above its target then. A group is
    *fine* when a unit of it removes less than ``tolerance`` of every metric, else *coarse*.
    The last step lands when the fine groups can fill what the coarse units miss: for every
    metric, their capacity (at most ``limit`` units of each) must reach the smaller of the
    excess and the smallest coarse unit, plus ``tolerance``. When the step would leave less
    than that, and (given ``before``) it is the step that breaks it, the fine groups are
    returned: the step should take coarse channels only. Otherwise (nothing at stake, no coarse
    group left, or too few fine channels even before the step) an empty set.

    Example
    -------
    >>> costs = {"coarse": {"flops": 0.1}, "fine": {"flops": 0.005}}
    >>> in_reserve(costs, {"coarse": 6, "fine": 30}, {"flops": 0.3})     # 15 points of fine left
    set()
    >>> in_reserve(costs, {"coarse": 6, "fine": 12}, {"flops": 0.3})     # 6 points: too few
    {'fine'}
    >>> in_reserve(costs, {"coarse": 6, "fine": 12}, {"flops": 0.3}, before={"coarse": 6, "fine": 16})
    set()
    """
    left = [g for g in costs if units.get(g, 0) > 0]
    fine = {g for g in left if all(v < tolerance for v in costs[g].values())}
    for m, gap in excess.items() if fine else ():
        coarse = [costs[g].get(m, 0.0) for g in left if costs[g].get(m, 0.0) >= tolerance]
        need = min(gap, min(coarse, default=0.0)) + tolerance
        reserve = sum(costs[g].get(m, 0.0) * min(units[g], limit) for g in fine)
        had = math.inf if before is None else sum(costs[g].get(m, 0.0) * min(before.get(g, 0), limit) for g in fine)
        if coarse and reserve < need <= had:
            return fine
    return set()
