"""Schedule: prune step by step to a FLOPs, parameter or latency target, and report.

:func:`prune_to` alternates estimation (a few training batches) and pruning
steps until the model is at most the target fraction of the FLOPs and/or
parameters it had when its :class:`~prunable.Pruner` was created. The last steps
are sized on meta copies (nothing is cut until the size is known) so the run
ends at or under the target, within :data:`TOLERANCE` of it when one channel
allows. With ``latency=f`` the model's measured latency is the target instead:
channels are ranked by importance per second of latency (HALP) from a
:class:`~prunable.latency.LatencyTable`, and each step is sized from the table.
Progress is a tqdm bar when stderr is a terminal, otherwise one
``logging`` line per step on the ``"prunable"`` logger.

Example
-------
>>> import torch
>>> from torch import nn
>>> from prunable import Pruner
>>> model = nn.Sequential(nn.Conv2d(3, 16, 3), nn.ReLU(), nn.Conv2d(16, 4, 3))
>>> pruner = Pruner(model, torch.randn(1, 3, 8, 8), criterion="l1")
>>> log = prune_to(pruner, flops=0.5, progress=False)
>>> 0.49 <= log[-1]["flops"] <= 0.5
True
"""

from __future__ import annotations

import logging
import numbers
import sys
import warnings
import weakref
from collections.abc import Callable, Mapping
from typing import Any

import torch

from .errors import PruningValueError, SurgeryError
from .latency import LatencyGoal
from .plan import Plan

__all__ = ["TOLERANCE", "Progress", "combination", "prune_to", "report", "stderr_is_terminal"]

#: How far under a target :func:`prune_to` may end (absolute fraction) when one channel allows it.
TOLERANCE = 0.01
#: Groups tried, cheapest first, for a last step that a whole channel of the first group overshoots.
_CANDIDATES = 32

logger = logging.getLogger("prunable")
#: FLOPs/params counted during one prune_to run, by (plans applied, plan or None for the model)
_MEMO: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
#: what ``cost=`` may be
COSTS = (None, "latency")


def prune_to(
    pruner: Any, *, flops: float | None = None, params: float | None = None, latency: float | None = None,
    cost: str | None = None, fine_tune: Callable[[], Any] | None = None, prune_every: int = 1,
    channels_per_step: int | float = 8, progress: bool = True, on_step: Callable[[dict[str, Any]], Any] | None = None,
) -> list[dict[str, Any]]:
    """Prune ``pruner.model`` step by step until FLOPs and/or params are at most the given
    fractions of the model's when the Pruner was created (or its measured latency, ``latency=``).

    Before each step, ``fine_tune()`` is called ``prune_every`` times inside
    :meth:`~prunable.Pruner.estimate` (a few training batches: forward, backward,
    optimizer step). Each step removes ``channels_per_step`` channels (a count,
    or a fraction in (0, 1) of those left), except the last ones: they are sized
    by bisection on meta copies so the run ends at or under the target, within
    :data:`TOLERANCE` when a single channel allows it (else as close under as
    one channel of some group gets). After each step, ``on_step(record)`` is
    called outside the hooks (validate, checkpoint, log …).

    Returns (and appends to ``pruner.log``) one record per step: ``step``,
    ``removed`` channels, ``flops`` and ``params`` as exact fractions of the
    start, and what ``fine_tune`` and ``on_step`` returned last: a dict merged
    in, anything else as ``metric`` (a number or one-element tensor as a float,
    other values as they are).

    ``latency=f`` (not with ``flops``/``params``): prune until the model's
    measured latency on the example inputs, on the device it lives on, is at
    most ``f`` times its latency when this call started (a copy taken then and
    the model timed in alternation, :class:`prunable.latency.LatencyGoal`;
    :func:`prunable.latency.measure`: median of repeats, CUDA synchronised).
    A :class:`~prunable.latency.LatencyTable` is built first
    (every layer timed alone on its real input for a grid of channel counts);
    channels are ranked by importance per second of latency (HALP); each step is
    sized so that the table predicts the target is not crossed by much, and the
    whole model is measured after it (``latency`` in the record). Groups whose
    time steps down at multiples of :data:`~prunable.latency.ALIGN` channels
    keep such a multiple (rounded down) when their cap allows. ``cost="latency"``
    ranks by importance per second with a FLOPs or params target too.

    Raises
    ------
    PruningValueError
        For a bad argument, before anything is run or changed.
    """
    targets = _check(pruner, flops, params, latency, cost, fine_tune, prune_every, channels_per_step, progress,
                     on_step)
    start = pruner.baseline
    ratios = _ratios(pruner.measure(), start)
    goal = LatencyGoal(pruner, latency) if latency is not None or cost == "latency" else None
    if latency is not None:
        ratios["latency"] = goal.ratio
    bar, hook = Progress(progress), pruner.ranking_cost
    try:
        if goal is not None:
            pruner.ranking_cost, pruner.latency_table = goal.table.costs, goal.table
        while not _met(ratios, targets):
            result = None
            if fine_tune is not None:
                with pruner.estimate():
                    for _ in range(prune_every):
                        result = fine_tune()
            before = len(pruner.history)
            try:
                plan = pruner.step_with(lambda: goal.next_plan(channels_per_step) if latency is not None
                                        else _next_plan(pruner, channels_per_step, targets, start))
            except PruningValueError:
                warnings.warn("prunable: every group is at its minimum; target not reached", stacklevel=3)
                break
            except SurgeryError as exc:  # no plan passes its trial run: the model is as the last step left it
                warnings.warn(f"prunable: {exc}; target not reached", stacklevel=3)
                break
            _forget(pruner, before, plan)
            ratios = _ratios(_measured(pruner), start)
            if latency is not None:
                ratios["latency"] = goal.measured()
            record: dict[str, Any] = {"step": len(pruner.log) + 1, "removed": len(plan), **ratios}
            for value in (result, on_step(dict(record)) if on_step is not None else None):
                record.update(_as_record(value))
            pruner.log.append(record)
            bar.update(record)
    finally:
        pruner.ranking_cost = hook
        bar.close()
        _MEMO.pop(pruner, None)
    return pruner.log


def _next_plan(pruner: Any, step: int | float, targets: dict[str, float], start: dict[str, int]) -> Plan:
    """``step`` channels, or fewer if that crosses a target (sized on meta copies)."""
    for _ in range(len(pruner.graph.groups) + 1):
        try:
            return _sized(pruner, step, targets, start)
        except SurgeryError:  # the culprit groups are skipped now: choose again
            continue
    return Plan({})


def _sized(pruner: Any, step: int | float, targets: dict[str, float], start: dict[str, int]) -> Plan:
    available = pruner.available
    if not available:
        return Plan({})
    base = pruner.plan(step if isinstance(step, float) else min(step, available))
    if not len(base) or not _met(_ratios(_measured(pruner, base), start), targets):
        return base
    now, ratios = _ratios(_measured(pruner), start), _ratios(_measured(pruner, base), start)
    key = max(targets, key=lambda k: now[k] - targets[k])  # the binding target
    (lo, r_lo), (hi, r_hi), best = (0, now[key]), (len(base), ratios[key]), base
    bisect = False
    while hi - lo > 1 and _gap(ratios, targets) > TOLERANCE:  # interpolation, every other try a halving
        guess = lo + round((r_lo - targets[key]) / max(r_lo - r_hi, 1e-12) * (hi - lo))
        mid = (lo + hi) // 2 if bisect else min(max(guess, lo + 1), hi - 1)
        bisect = not bisect
        plan = pruner.plan(mid)
        if _met(measured := _ratios(_measured(pruner, plan), start), targets):
            (hi, r_hi), best, ratios = (mid, measured[key]), plan, measured
        else:
            lo, r_lo = mid, measured[key]
    if _gap(ratios, targets) <= TOLERANCE:
        return best
    return _finest(pruner, targets, start, best, pruner.plan(lo) if lo > 0 else None)


def _finest(pruner: Any, targets: dict[str, float], start: dict[str, int], fallback: Plan,
            closer: Plan | None) -> Plan:
    """The last cut, when one channel of the least important group overshoots the window.

    The smallest cut of each group is measured (least important groups first): the
    first that lands within :data:`TOLERANCE` under the targets is taken; else a
    combination of such cuts whose summed effect lands there (:func:`combination`;
    if the exact count stays above the targets, the next step refines it); else
    ``closer`` (the most channels in score order that stay above the targets), or
    the first cut that stays above them and from which a combination can finish;
    else the cut (or ``fallback``) closest under them.
    """
    now = _ratios(_measured(pruner), start)
    key = max(targets, key=lambda k: now[k] - targets[k])  # the binding target
    cuts, above, below = [], [], [(fallback, _ratios(_measured(pruner, fallback), start))]
    for gid, plan in _unit_cuts(pruner):
        try:
            ratios = _ratios(_measured(pruner, plan), start)
        except SurgeryError:
            continue
        if _met(ratios, targets) and _gap(ratios, targets) <= TOLERANCE:
            return plan
        (below if _met(ratios, targets) else above).append((plan, ratios))
        cuts.append((gid, len(plan), now[key] - ratios[key]))
    combined = _combined(pruner, cuts, now[key] - targets[key])
    if combined is not None:
        try:
            ratios = _ratios(_measured(pruner, combined), start)
        except (SurgeryError, PruningValueError):
            ratios = None
        if ratios is not None and (not _met(ratios, targets) or _gap(ratios, targets) <= TOLERANCE):
            return combined
    if closer is not None:
        return closer
    for plan, ratios in above:
        if _combined(pruner, cuts, ratios[key] - targets[key], build=False) is not None:
            return plan
    return min(below, key=lambda item: _gap(item[1], targets))[0]


def _unit_cuts(pruner: Any) -> list[tuple[str, Plan]]:
    """The smallest cut of each group (one channel, one per block), least important groups first."""
    scores = pruner.scores()
    blocks = {g.id: g.blocks for g in pruner.groups}
    out = []
    for gid in sorted(scores, key=lambda gid: float(scores[gid].min()))[:_CANDIDATES]:
        plan = pruner.plan(1 if blocks[gid] is None else len(blocks[gid]), groups=[gid])
        if len(plan):
            out.append((gid, plan))
    return out


def _combined(pruner: Any, cuts: list[tuple[str, int, float]], excess: float, build: bool = True) -> Any:
    """A plan of several cuts per group whose summed effects remove ``excess`` plus up to
    :data:`TOLERANCE` (lowest-ranked groups preferred); None if no combination does
    (with ``build=False``, the counts per cut instead of the plan)."""
    caps = pruner.caps
    counts = combination([c for _, _, c in cuts], [min(caps.get(g, 0) // u, 8) for g, u, _ in cuts],
                         excess + 0.1 * TOLERANCE, excess + 0.9 * TOLERANCE)
    if counts is None or not build:
        return counts
    removals = {}
    for (gid, unit, _), k in zip(cuts, counts):
        if k:
            removals.update(pruner.plan(unit * k, groups=[gid]).removals)
    return Plan(removals)


def combination(costs: list[float], limits: list[int], low: float, high: float,
                unit: float = 1e-4) -> list[int] | None:
    """Counts ``k[i] <= limits[i]`` with ``low <= sum(k[i] * costs[i]) <= high``, preferring
    the earliest items (the cost of a copy of item ``i`` is ``i + 1``); None if none.

    Example
    -------
    >>> combination([0.06, 0.021], [4, 4], 0.100, 0.108)
    [1, 2]
    """
    best: dict[int, tuple[int, tuple[int, ...]]] = {0: (0, ())}
    top = int(high / unit)
    for i, (cost, limit) in enumerate(zip(costs, limits)):
        step = int(round(cost / unit))
        grown: dict[int, tuple[int, tuple[int, ...]]] = {}
        for total, (penalty, ks) in best.items():
            for k in range(limit + 1 if step > 0 else 1):
                t = total + k * step
                if t > top:
                    break
                entry = (penalty + k * (i + 1), ks + (k,))
                if t not in grown or entry < grown[t]:
                    grown[t] = entry
        best = grown
    fits = [v for t, v in best.items() if low / unit <= t <= top]
    return list(min(fits)[1]) if fits else None


def _measured(pruner: Any, plan: Plan | None = None) -> dict[str, int]:
    """``pruner.measure(plan)``, counted once per plan while the model is unchanged."""
    memo = _MEMO.setdefault(pruner, {})
    key = (len(pruner.history), plan)
    if key not in memo:
        memo[key] = pruner.measure(plan)
    return memo[key]


def _forget(pruner: Any, before: int, applied: Plan) -> None:
    """After ``applied`` was pruned: what was counted for it is the model now; the rest is stale."""
    memo = _MEMO.get(pruner, {})
    known = memo.get((before, applied))
    memo.clear()
    if known is not None and len(pruner.history) == before + 1:
        memo[(before + 1, None)] = known


def _ratios(now: dict[str, int], start: dict[str, int]) -> dict[str, float]:
    return {k: now[k] / max(start[k], 1) for k in ("flops", "params")}


def _met(ratios: dict[str, float], targets: dict[str, float]) -> bool:
    return all(ratios[k] <= v for k, v in targets.items())


def _gap(ratios: dict[str, float], targets: dict[str, float]) -> float:
    """How far under its target the closest target is."""
    return min(v - ratios[k] for k, v in targets.items())


def _as_record(value: Any) -> dict[str, Any]:
    """What a callback returned, as record entries."""
    if value is None:
        return {}
    if isinstance(value, Mapping):
        return {str(k): _plain(v) for k, v in value.items()}
    return {"metric": _plain(value)}


def _plain(value: Any) -> Any:
    """A number as a float (a one-element tensor too); anything else as it is."""
    if isinstance(value, torch.Tensor) and value.numel() == 1:
        return value.item()
    if isinstance(value, numbers.Real) and not isinstance(value, bool):
        return float(value)
    return value


def _check(pruner: Any, flops: Any, params: Any, latency: Any, cost: Any, fine_tune: Any, prune_every: Any,
           step: Any, progress: Any, on_step: Any) -> dict[str, float]:
    """Every argument of :func:`prune_to`, checked before anything runs; the targets."""
    targets = {}
    for key, value in (("flops", flops), ("params", params), ("latency", latency)):
        if value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, numbers.Real) or not 0 < value <= 1:
            raise PruningValueError(f"{key}={value!r}: a target is a fraction in (0, 1] of the model's {key}")
        targets[key] = float(value)
    if not targets:
        raise PruningValueError("give a flops= or params= target, or latency= (a fraction in (0, 1])")
    if "latency" in targets and len(targets) > 1:
        raise PruningValueError(f"latency={latency!r} cannot be combined with flops= or params=: give one kind "
                                "of target (latency ranks by importance per second; add cost='latency' to a "
                                "FLOPs target for that ranking)")
    if cost not in COSTS:
        raise PruningValueError(f"cost={cost!r}: None (the criterion's scores) or 'latency' (importance per second "
                                "of latency, HALP) is allowed")
    for key, value in (("fine_tune", fine_tune), ("on_step", on_step)):
        if value is not None and not callable(value):
            raise PruningValueError(f"{key}={value!r}: a callable or None is allowed")
    if isinstance(prune_every, bool) or not isinstance(prune_every, int) or prune_every < 1:
        raise PruningValueError(f"prune_every={prune_every!r}: an int >= 1 (fine_tune calls per step) is allowed")
    if isinstance(step, bool) or not isinstance(step, (int, float)) or (
            isinstance(step, int) and step < 1) or (isinstance(step, float) and not 0 < step < 1):
        raise PruningValueError(f"channels_per_step={step!r}: an int >= 1 or a fraction in (0, 1) is allowed")
    if not isinstance(progress, bool):
        raise PruningValueError(f"progress={progress!r}: True or False is allowed")
    criterion = pruner.criterion
    if (criterion.needs_activations or criterion.needs_grad) and fine_tune is None:
        raise PruningValueError(f"{type(criterion).__name__} needs data: pass fine_tune= "
                                "(or choose a data-free criterion such as 'l1')")
    return targets


def stderr_is_terminal() -> bool:
    """True when ``sys.stderr`` is an interactive terminal (progress bars belong there only)."""
    stream = sys.stderr
    return stream is not None and hasattr(stream, "isatty") and stream.isatty()


class Progress:
    """A tqdm bar when ``enabled``, tqdm is installed and stderr is a terminal;
    otherwise one INFO line per step on the ``"prunable"`` logger."""

    def __init__(self, enabled: bool = True) -> None:
        self.bar = None
        if enabled and stderr_is_terminal():
            try:
                from tqdm.auto import tqdm
            except ImportError:
                return
            self.bar = tqdm(desc="pruning", unit="step", file=sys.stderr)

    def update(self, record: dict[str, Any]) -> None:
        numbers_ = {k: v for k, v in record.items() if k not in ("step", "removed") and isinstance(v, float)}
        if self.bar is not None:
            self.bar.update(1)
            self.bar.set_postfix({k: f"{v:.3f}" for k, v in numbers_.items()})
            return
        logger.info("pruning step %d: %d channels removed; %s", record["step"], record["removed"],
                    ", ".join(f"{k} {v:.4f}" for k, v in numbers_.items()))

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def report(pruner: Any) -> str:
    """A markdown summary, measured when called: FLOPs (of the example inputs) and params
    at the start (when the Pruner was created) and now, the plans applied, and the output
    channels of every pruned layer (start → now).

    Example
    -------
    >>> import torch
    >>> from torch import nn
    >>> from prunable import Pruner
    >>> model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Conv2d(8, 4, 3))
    >>> pruner = Pruner(model, torch.randn(1, 3, 8, 8), criterion="l1")
    >>> plan = pruner.step(3)
    >>> print(report(pruner).splitlines()[2])
    | flops | 24,768 | 15,480 | 0.625 |
    >>> print(report(pruner).splitlines()[-1])
    | 0 | 8 | 5 |
    """
    start, now = pruner.baseline, pruner.measure()
    lines = ["| | start | now | now / start |", "|---|---:|---:|---:|"]
    for key in ("flops", "params"):
        lines.append(f"| {key} | {start[key]:,} | {now[key]:,} | {now[key] / max(start[key], 1):.3f} |")
    lines += ["", f"{len(pruner.history)} plan(s) applied, "
              f"{sum(len(p) for p in pruner.history)} channels removed.", "",
              "| layer | output channels at start | now |", "|---|---:|---:|"]
    widths = pruner.widths()
    for name, first in pruner.initial_widths.items():
        if widths.get(name, first) != first:
            lines.append(f"| {name} | {first} | {widths[name]} |")
    return "\n".join(lines)
