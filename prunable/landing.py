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

__all__ = ["Found", "Option", "search"]

#: How far under a target a run may end (absolute fraction).
TOLERANCE = 0.01
#: Buckets the knapsack keeps at most (its resolution adapts to the amount to remove).
_BUCKETS = 4000


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
    key = max(metrics, key=lambda m: now[m] - targets[m])  # the binding target
    excess = now[key] - targets[key]
    step = max(excess + tolerance, 1e-9) / _BUCKETS
    index = {o.group: i for i, o in enumerate(options)}
    cross: list[list[tuple[int, Mapping[str, float]]]] = [[] for _ in options]  # (earlier option, terms)
    for (g, h), terms in (pairs or {}).items():
        if g in index and h in index and g != h:
            first, last = sorted((index[g], index[h]))
            cross[last].append((first, terms))
    states = {0: (0.0, 0, (), tuple(0.0 for _ in metrics))}
    under: list[tuple[float, tuple[int, ...], tuple[float, ...]]] = []
    for i, option in enumerate(options):
        grown: dict[int, tuple[float, int, tuple[int, ...], tuple[float, ...]]] = {}
        for importance, channels, counts, falls in states.values():
            for k in range(option.limit + 1):
                new = tuple(f + option.fall(m, k) - k * sum(t.get(m, 0.0) * counts[j] for j, t in cross[i])
                            for m, f in zip(metrics, falls))
                if k and new[metrics.index(key)] > excess + tolerance:  # beyond the window: only more after
                    if all(now[m] - v <= targets[m] for m, v in zip(metrics, new)):
                        under.append((-min(targets[m] - now[m] + v for m, v in zip(metrics, new)),
                                      counts + (k,) + (0,) * (len(options) - i - 1), new))
                    break
                entry = (importance + option.importance[k], channels + k * option.unit, counts + (k,), new)
                bucket = round(new[metrics.index(key)] / step)
                if bucket not in grown or entry[:2] < grown[bucket][:2]:
                    grown[bucket] = entry
        states = grown
    met = [(s, min(targets[m] - now[m] + v for m, v in zip(metrics, s[3]))) for s in states.values()
           if all(now[m] - v <= targets[m] for m, v in zip(metrics, s[3]))]
    inside = sorted((s for s, gap in met if gap <= tolerance), key=lambda s: s[:2])[:keep]
    if inside:
        return _found(True, options, metrics, now, [(s[2], s[3]) for s in inside])
    under += [(-gap, s[2], s[3]) for s, gap in met]
    return _found(False, options, metrics, now, [(c, f) for _, c, f in sorted(under, reverse=True)[:keep]])


def _found(inside: bool, options: Sequence[Option], metrics: list[str], now: Mapping[str, float],
           chosen: list[tuple[tuple[int, ...], tuple[float, ...]]]) -> Found:
    counts = [{o.group: k for o, k in zip(options, c) if k} for c, _ in chosen]
    ratios = [{m: now[m] - v for m, v in zip(metrics, f)} for _, f in chosen]
    return Found(inside, counts, ratios)
