"""Schedule: prune step by step to a FLOPs, parameter or latency target, and report.

:func:`prune_to` alternates estimation (a few training batches) and pruning
steps until the model is at most the target fraction of the FLOPs and/or
parameters it had when its :class:`~prunable.Pruner` was created. The last steps
are sized on meta copies (nothing is cut until the size is known) so the run
ends at or under the target, within :data:`TOLERANCE` of it whenever some
combination of cuts allows (:mod:`prunable.landing`). With ``latency=f`` the model's
measured latency is the target instead: channels are ranked by importance per second
of latency (HALP) from a :class:`~prunable.latency.LatencyTable`, and each step is
sized from the table. Progress is a tqdm bar when stderr is a terminal, otherwise one
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

import math
import numbers
import warnings
import weakref
from collections.abc import Callable, Mapping
from typing import Any

import torch

from . import landing
from .errors import PruningValueError, SurgeryError
from .landing import TOLERANCE
from .latency import LatencyGoal
from .plan import Plan
from .progress import Progress, stderr_is_terminal
from .sizes import unit_costs, unit_of

__all__ = ["TOLERANCE", "Progress", "prune_to", "report", "stderr_is_terminal"]

#: Groups tried, least important first, for a last step that a whole channel of the first group overshoots.
_CANDIDATES = 32
#: Units of one group a last step may combine with others: at least _LIMIT, more if the fall needs them, at most _MOST.
_LIMIT, _MOST = 16, 256

#: FLOPs/params counted during one prune_to run, by (plans applied, plan or None for the model)
_MEMO: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
#: Why the last step of a prune_to run could not end within TOLERANCE under the target
_LANDING: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
#: Whether a prune_to run's model had a coarse group (a channel over TOLERANCE) at its first step
_COARSE: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
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
    on meta copies so the run ends at or under the target, within :data:`TOLERANCE`
    whenever a combination of cuts allows it: a count of the least important
    channels (bisection) or, when single channels are coarser than that, the
    combination of cuts in several groups removing the least importance
    (:func:`prunable.landing.search` over the 32 least important groups, up to
    16 channels, or blocks, of each, or as many as the fall needs, 256 at most).
    Before that, each step leaves enough fine-grained channels (each under
    :data:`TOLERANCE`) for the last one to fill the gaps between coarse ones
    (:func:`prunable.landing.in_reserve`; coarse channels only when they would
    run short); elsewhere the steps take the least important channels. When none lands, the run ends at the closest
    under the target that was measured (never above it), warns with the exact
    fractions and says why in the last record's ``landing``. After each step,
    ``on_step(record)`` is called outside the hooks (validate, checkpoint, log …).

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
            if latency is None and _met(ratios, targets) and _gap(ratios, targets) > TOLERANCE:
                record["landing"] = _LANDING.pop(pruner, "no cut lands within 1 point under the target")
                warnings.warn(f"prunable: {record['landing']}; ended at {_shown(ratios, targets)}, the closest "
                              f"under {_shown(targets, targets)} that was found", stacklevel=3)
            for value in (result, on_step(dict(record)) if on_step is not None else None):
                record.update(_as_record(value))
            pruner.log.append(record)
            bar.update(record)
    finally:
        pruner.ranking_cost = hook
        bar.close()
        _MEMO.pop(pruner, None)
        _LANDING.pop(pruner, None)
        _COARSE.pop(pruner, None)
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
    """The next step: ``step`` channels in importance order, unless that leaves the last step too
    few fine-grained channels to land (then coarse channels only, :func:`_reserved`); a step that
    would cross a target is sized by bisection on meta copies, then by :func:`_finest`."""
    groups, available = None, pruner.available
    if not available:
        return Plan({})
    base = pruner.plan(step if isinstance(step, float) else min(step, available))
    if len(base) and not _met(_ratios(_measured(pruner, base), start), targets):
        reserved = _reserved(pruner, targets, start, base)
        groups = [g.id for g in pruner.groups if g.id not in reserved] if reserved else None
        available = sum(pruner.caps.get(gid, 0) for gid in groups) if groups is not None else 0
        if available:
            base = pruner.plan(step if isinstance(step, float) else min(step, available), groups=groups)
        else:
            groups = None
    if not len(base):
        return base
    if not _met(_ratios(_measured(pruner, base), start), targets):
        return _still_lands(pruner, targets, start, base, groups)
    now, ratios = _ratios(_measured(pruner), start), _ratios(_measured(pruner, base), start)
    key = max(targets, key=lambda k: now[k] - targets[k])  # the binding target
    (lo, r_lo), (hi, r_hi), best = (0, now[key]), (len(base), ratios[key]), base
    bisect = False
    while hi - lo > 1 and _gap(ratios, targets) > TOLERANCE:  # interpolation, every other try a halving
        guess = lo + round((r_lo - targets[key]) / max(r_lo - r_hi, 1e-12) * (hi - lo))
        mid = (lo + hi) // 2 if bisect else min(max(guess, lo + 1), hi - 1)
        bisect = not bisect
        plan = pruner.plan(mid, groups=groups)
        if _met(measured := _ratios(_measured(pruner, plan), start), targets):
            (hi, r_hi), best, ratios = (mid, measured[key]), plan, measured
        else:
            lo, r_lo = mid, measured[key]
    if _gap(ratios, targets) <= TOLERANCE:
        return best
    return _finest(pruner, targets, start, best, pruner.plan(lo, groups=groups) if lo > 0 else None)


def _reserved(pruner: Any, targets: dict[str, float], start: dict[str, int], base: Plan) -> set[str]:
    """The lookahead: the fine-grained groups the intermediate step ``base`` should leave alone so
    that the last step can still land (:func:`prunable.landing.in_reserve`); none when the model had
    no coarse group at the run's first step (a channel's share of the start only shrinks)."""
    if _COARSE.get(pruner) is False:
        return set()
    costs = unit_costs(pruner.model, pruner.example_inputs, pruner.groups, {k: start[k] for k in targets})
    coarse = _COARSE.setdefault(pruner, any(v >= TOLERANCE for c in costs.values() for v in c.values()))
    if not coarse:
        return set()
    caps, removed = pruner.caps, {gid: len(idx) for gid, idx in base.removals.items()}
    units = {g.id: (caps.get(g.id, 0) - removed.get(g.id, 0)) // unit_of(g) for g in pruner.groups}
    after = _ratios(_measured(pruner, base), start)
    return landing.in_reserve(costs, units, {k: after[k] - v for k, v in targets.items()}, limit=_MOST,
                              before={g.id: caps.get(g.id, 0) // unit_of(g) for g in pruner.groups})


def _still_lands(pruner: Any, targets: dict[str, float], start: dict[str, int], base: Plan,
                 groups: list[str] | None) -> Plan:
    """The lookahead, on a model with a coarse group: ``base`` if a combination of cuts taking at
    least its units still lands within :data:`TOLERANCE` (predicted from the measured options),
    else the most channels of the same choice that keep it so, else the combination that lands
    now; ``base`` when none lands from here either or the prediction cannot cover it."""
    if not _COARSE.get(pruner):
        return base
    now = _ratios(_measured(pruner), start)
    options, units, _ = _options(pruner, now, targets, start)
    pairs, unit = _pairs(pruner, options, units, now, start), {o.group: o.unit for o in options}

    def lands(plan: Plan) -> bool:
        least = {g: -(-len(idx) // unit[g]) for g, idx in plan.removals.items() if g in unit}
        return len(least) < len(plan.removals) or landing.search(options, now, targets, pairs=pairs,
                                                                 at_least=least).inside
    found = landing.search(options, now, targets, pairs=pairs)
    if not found.inside or lands(base):
        return base
    lo, hi = 0, len(base)  # lo channels keep a landing, hi do not
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if lands(pruner.plan(mid, groups=groups)) else (lo, mid)
    if lo:
        return pruner.plan(lo, groups=groups)
    for counts in found.counts:
        plan = _combination(pruner, options, counts)
        ratios = _ratios_of(pruner, plan, start)
        if ratios is not None and _met(ratios, targets) and _gap(ratios, targets) <= TOLERANCE:
            return plan
    return base


def _ratios_of(pruner: Any, plan: Plan, start: dict[str, int]) -> dict[str, float] | None:
    """The fractions of ``start`` left after ``plan``, measured on a meta copy; None if it cannot be cut."""
    try:
        return _ratios(_measured(pruner, plan), start)
    except (SurgeryError, PruningValueError):
        return None


def _combination(pruner: Any, options: list[landing.Option], counts: Mapping[str, int]) -> Plan:
    """The plan of ``counts`` units of each option's group, the least important channels of each."""
    removals: dict[str, tuple[int, ...]] = {}
    for option in options:
        if counts.get(option.group):
            removals.update(pruner.plan(option.unit * counts[option.group], groups=[option.group]).removals)
    return Plan(removals)


def _finest(pruner: Any, targets: dict[str, float], start: dict[str, int], fallback: Plan,
            closer: Plan | None) -> Plan:
    """The last cut, when no count of the least important channels lands within :data:`TOLERANCE`.

    The cuts of the :data:`_CANDIDATES` least important groups are measured
    (:func:`_options`) and :func:`prunable.landing.search` combines them; the
    combinations it predicts to land (else the closest under the targets) are measured,
    the first that lands is taken.
    Else ``closer`` (the most channels in score order that stay above the
    targets) or a measured combination that stays above them: the next step
    searches again from there (unless every combination of every prunable group
    was searched: then no later step could land either); else the measured cut
    closest under the targets (``fallback`` included), and :func:`prune_to`
    warns with the exact fractions.
    """
    now = _ratios(_measured(pruner), start)
    options, units, measured = _options(pruner, now, targets, start)
    found = landing.search(options, now, targets, pairs=_pairs(pruner, options, units, now, start))
    for counts in found.counts:  # those that land, else the closest under the targets
        plan = _combination(pruner, options, counts)
        ratios = _ratios_of(pruner, plan, start) if len(plan) else None
        if ratios is None:
            continue
        if _met(ratios, targets) and _gap(ratios, targets) <= TOLERANCE:
            return plan
        if not _met(ratios, targets) and closer is None:  # a second-order miss: the next step goes on from it
            closer = plan
        measured.append((plan, ratios))
    proven = not found.inside and _every_cut(pruner, options, found)  # then no later step could land either
    if closer is not None and not proven:
        return closer
    measured.append((fallback, _ratios(_measured(pruner, fallback), start)))
    searched = (f"the {len(options)} prunable group(s) (every count of each searched: none exists)" if proven
                else f"the {len(options)} least important groups")
    _LANDING[pruner] = ("the combinations predicted to land within 1 point did not when measured" if found.inside
                        else f"no combination of cuts of {searched} lands within 1 point under the target")
    return min((item for item in measured if _met(item[1], targets)), key=lambda item: _gap(item[1], targets))[0]


def _every_cut(pruner: Any, options: list[landing.Option], found: landing.Found) -> bool:
    """Whether the search tried every combination of every count of every prunable group."""
    caps = pruner.caps
    return found.complete and len(options) == len(pruner.groups) and all(
        o.limit == caps.get(o.group, 0) // o.unit for o in options)


def _options(pruner: Any, now: dict[str, float], targets: dict[str, float], start: dict[str, int],
             ) -> tuple[list[landing.Option], dict[str, Plan], list[tuple[Plan, dict[str, float]]]]:
    """The cuts of the least important groups for :func:`prunable.landing.search`: one unit
    (a channel, one per block) measured, two units too where the group meets itself at a layer;
    up to :data:`_LIMIT` units of each, or as many as the whole fall needs (:data:`_MOST` at
    most); the unit plans; every plan measured, with its fractions."""
    scores, caps = pruner.scores(), pruner.caps
    groups = {g.id: g for g in pruner.groups}
    options, units, measured = [], {}, []
    for gid in sorted(scores, key=lambda gid: float(scores[gid].min()))[:_CANDIDATES]:
        blocks = groups[gid].blocks
        plan = pruner.plan(1 if blocks is None else len(blocks), groups=[gid])
        try:
            ratios = _ratios(_measured(pruner, plan), start) if len(plan) else None
        except SurgeryError:
            continue
        if ratios is None:
            continue
        unit, drop, bend = len(plan), {k: now[k] - ratios[k] for k in now}, {}
        reach = max(((now[k] - v + TOLERANCE) / drop[k] for k, v in targets.items() if drop[k] > 0), default=0)
        limit = min(caps.get(gid, 0) // unit, max(_LIMIT, min(_MOST, math.ceil(reach))))
        layers = _layers(groups[gid])
        if limit >= 2 and len(layers) != len(set(layers)):  # in and out of one layer: the fall may bend
            try:
                two = _ratios(_measured(pruner, pruner.plan(2 * unit, groups=[gid])), start)
            except SurgeryError:
                continue
            bend = {k: drop[k] - (now[k] - two[k]) / 2 for k in now}
        order = [0.0, *scores[gid].sort().values.double().cumsum(0).tolist()]
        importance = [order[k * unit] for k in range(limit + 1)]
        options.append(landing.Option(gid, unit, limit, drop, importance, bend))
        units[gid] = plan
        measured.append((plan, ratios))
    return options, units, measured


def _pairs(pruner: Any, options: list[landing.Option], units: dict[str, Plan], now: dict[str, float],
           start: dict[str, int]) -> dict[tuple[str, str], dict[str, float]]:
    """For two groups that meet at a layer, how much less cutting a unit of each removes than the sum."""
    layers = {g.id: set(_layers(g)) for g in pruner.groups}
    out = {}
    for i, a in enumerate(options):
        for b in options[i + 1:]:
            if a.unit and b.unit and layers[a.group] & layers[b.group] and a.limit and b.limit:
                try:
                    both = _ratios(_measured(pruner, Plan({**units[a.group].removals,
                                                           **units[b.group].removals})), start)
                except (SurgeryError, PruningValueError):
                    continue
                out[(a.group, b.group)] = {k: a.drop[k] + b.drop[k] - (now[k] - both[k]) for k in now}
    return out


def _layers(group: Any) -> list[str]:
    """Names of the layers a group's channels are inputs or outputs of (a name twice: both)."""
    return [m.target.name for m in group.members if m.target.param is None]


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


def _shown(ratios: Mapping[str, float], targets: Mapping[str, float]) -> str:
    """``flops=0.48951`` for the targeted fractions, exactly enough to compare."""
    return ", ".join(f"{k}={ratios[k]:.6g}" for k in targets)


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
