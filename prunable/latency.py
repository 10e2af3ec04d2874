"""Latency table: what each prunable layer costs on the device the model lives on.

Latency as a pruning target, after HALP (Shen et al., NeurIPS 2022, "Structural
Pruning via Latency-Saliency Knapsack"): every layer that a prunable group
touches is timed alone, on its real input (captured in one forward pass of the
example inputs), for a coarse grid of (input, output) channel counts; times in
between are interpolated. A time is cached by the layer's *signature* (type,
``extra_repr`` — kernel, stride, groups, counts —, tensor shapes, input shape,
dtype, device) and the counts, so identical layers (the blocks of a ResNet
stage) are timed once.

From the table: :meth:`LatencyTable.predict` (how much faster the model gets
when groups lose channels), :meth:`LatencyTable.costs` (seconds one channel of
each group costs: ranking by importance ÷ cost is HALP's "importance per unit
of latency") and :meth:`LatencyTable.rounding` (groups whose time steps down at
multiples of :data:`ALIGN` channels: there, rounding the kept count pays).
Layers are resized through the handler registry (:func:`~prunable.surgery.apply_cuts`
on a copy); a layer that cannot be timed alone is left out, its name and reason
in :attr:`LatencyTable.untimed`, and only the whole-model measurement sees it.

Example
-------
>>> import torch
>>> from torch import nn
>>> from prunable import Pruner
>>> model = nn.Sequential(nn.Conv2d(3, 16, 3), nn.BatchNorm2d(16), nn.ReLU(), nn.Conv2d(16, 4, 3))
>>> pruner = Pruner(model, torch.randn(1, 3, 16, 16), criterion="l1")
>>> table = LatencyTable(model, pruner.example_inputs, pruner.groups)
>>> sorted(table.layers), table.untimed, sorted(table.costs(pruner.groups))
(['0', '1', '3'], {}, ['0'])
"""

from __future__ import annotations

import bisect
import copy
import itertools
import statistics
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from torch.utils._pytree import tree_flatten

from .errors import PrunableError
from .inputs import call_model
from .plan import Plan
from .surgery import Cut, Role, apply_cuts, handler_for

__all__ = ["ALIGN", "GRID", "PAIRS", "LatencyGoal", "LatencyTable", "LayerTimes", "layer_sides", "measure", "signature"]

#: Channel multiple whose latency steps :meth:`LatencyTable.rounding` looks for.
ALIGN = 8
#: Fractions of a layer's channels at which it is timed (per side); times in between are interpolated.
GRID = (1.0, 0.75, 0.5, 0.25)
#: Alternated runs of the model and its starting copy behind each measured latency ratio.
PAIRS = 5
#: Timing a layer stops adding repeats once this many seconds were spent on one grid point.
POINT_BUDGET_S = 0.05

Timer = Callable[[nn.Module, Any], float]


def measure(module: nn.Module, inputs: Any, *, warmup: int = 1, repeats: int = 5) -> float:
    """Median wall time in seconds of ``module`` on ``inputs`` (read as by
    :func:`~prunable.inputs.call_model`), in eval mode without gradients.

    Every CUDA device holding a tensor of the module or of the inputs is
    synchronised before and after each run. Repeats stop early once
    :data:`POINT_BUDGET_S` seconds were spent (at least 3 are kept). The
    module's train/eval mode is restored.

    Example
    -------
    >>> measure(nn.Linear(4, 4), torch.randn(2, 4), warmup=0, repeats=1) > 0
    True
    """
    tensors = itertools.chain(module.parameters(), module.buffers(), tree_flatten(inputs)[0])
    devices = sorted({t.device for t in tensors if isinstance(t, torch.Tensor) and t.is_cuda}, key=str)
    was_training, times, spent = module.training, [], 0.0
    module.eval()
    try:
        with torch.no_grad():
            for i in range(warmup + repeats):
                for d in devices:
                    torch.cuda.synchronize(d)
                start = time.perf_counter()
                call_model(module, inputs)
                for d in devices:
                    torch.cuda.synchronize(d)
                if i >= warmup:
                    times.append(time.perf_counter() - start)
                    spent += times[-1]
                    if len(times) >= 3 and spent > POINT_BUDGET_S:
                        break
    finally:
        module.train(was_training)
    return statistics.median(times)


def signature(module: nn.Module, x: torch.Tensor) -> tuple:
    """What a layer's time depends on: its type, ``extra_repr`` (kernel, stride, groups,
    counts), its own tensors' shapes and dtypes, and its input's shape, dtype and device.

    Example
    -------
    >>> signature(nn.Conv2d(3, 8, 3), torch.ones(1, 3, 8, 8)) == signature(nn.Conv2d(3, 8, 3), torch.ones(1, 3, 8, 8))
    True
    """
    own = tuple((n, tuple(t.shape), str(t.dtype)) for n, t in itertools.chain(
        module.named_parameters(recurse=False), module.named_buffers(recurse=False)) if t is not None)
    return (type(module).__qualname__, module.extra_repr(), own, tuple(x.shape), str(x.dtype), str(x.device))


@dataclass
class LayerTimes:
    """One timed layer: its input, full counts (when the table was built) and grid.

    ``tied``: input and output channels are the same (a norm, a depthwise conv): one count.
    ``axis``: the input's channel axis (None when the input side does not vary).
    """

    name: str
    module: nn.Module
    x: torch.Tensor
    full_in: int
    full_out: int
    tied: bool
    axis: int | None
    key: tuple
    ins: list[int] = field(default_factory=list)
    outs: list[int] = field(default_factory=list)


class LatencyTable:
    """Per-layer latencies of ``model`` on ``example_inputs``, for the layers of ``groups``.

    Parameters
    ----------
    model
        The model; only copies of its layers are run (its train/eval mode is restored).
    example_inputs
        One forward pass's inputs, as for :class:`~prunable.Pruner`.
    groups
        The prunable :class:`~prunable.graph.ChannelGroup` s; every layer one of
        them touches (an input or output side) is timed.
    timer
        ``timer(module, inputs) -> seconds``; :func:`measure` by default.
    cache
        Times by ``(signature, in, out)``; pass one dict to several tables to share it.

    Attributes
    ----------
    layers : dict[str, LayerTimes]
        The timed layers by qualified name.
    untimed : dict[str, str]
        Layers that could not be timed alone, with the reason.
    build_seconds : float
        Wall time spent building the table.
    """

    def __init__(self, model: nn.Module, example_inputs: Any, groups: Iterable[Any], *,
                 timer: Timer | None = None, cache: dict[tuple, float] | None = None) -> None:
        start = time.perf_counter()
        self.model, self.example_inputs, self.timer = model, example_inputs, timer
        self.cache: dict[tuple, float] = {} if cache is None else cache
        self.untimed: dict[str, str] = {}
        self.layers: dict[str, LayerTimes] = {}
        self._rounding: dict[str, int | None] = {}
        sides = layer_sides(groups)
        inputs = _captured(model, example_inputs, {name: s["module"] for name, s in sides.items()})
        for name, side in sides.items():
            self._add(name, side, inputs.get(name))
        self.build_seconds = time.perf_counter() - start

    # -- timing ------------------------------------------------------------------
    def _time(self, module: nn.Module, x: torch.Tensor) -> float:
        return (self.timer or measure)(module, x)

    def exact(self, name: str, n_in: int, n_out: int) -> float:
        """Seconds of layer ``name`` with ``n_in`` input and ``n_out`` output channels, timed
        (once per signature and counts)."""
        layer = self.layers[name]
        n_in, n_out = (n_out, n_out) if layer.tied else (n_in, n_out)
        key = (layer.key, n_in, n_out)
        if key not in self.cache:
            module, x = _resized(layer, n_in, n_out)
            self.cache[key] = self._time(module, x)
        return self.cache[key]

    def _add(self, name: str, side: dict[str, Any], x: torch.Tensor | None) -> None:
        module = side["module"]
        handler = handler_for(module)
        full_in, full_out = handler.channels(module, Role.IN), handler.channels(module, Role.OUT)
        tied = handler.channelwise or bool(set(side["in"]) & set(side["out"]))
        if x is None:
            self.untimed[name] = "its input is not one tensor (or it did not run)"
            return
        if full_out is None or full_in is None:
            full_in = full_out = full_in if full_out is None else full_out
        if full_in is None:
            self.untimed[name] = "its handler reports no channel count"
            return
        varies_in = tied or bool(side["in"])
        layer = LayerTimes(name, module, x, full_in, full_out, tied, None, signature(module, x))
        if varies_in and full_in > 1:
            layer.axis = _input_axis(layer)
            if layer.axis is None:
                self.untimed[name] = "no input axis accepts fewer channels"
                return
        layer.ins = _points(full_in) if varies_in and not tied else [full_in]
        layer.outs = _points(full_out) if (side["out"] or tied) else [full_out]
        self.layers[name] = layer
        try:
            for i, o in itertools.product(layer.ins, layer.outs):
                self.exact(name, i, o)
        except (PrunableError, RuntimeError, ValueError) as exc:
            del self.layers[name]
            self.untimed[name] = f"timing it resized failed: {type(exc).__name__}: {str(exc)[:120]}"

    # -- reading it ----------------------------------------------------------------
    def estimate(self, name: str, n_in: float, n_out: float) -> float:
        """Seconds of layer ``name`` at these counts, interpolated (bilinearly) in its grid."""
        layer, cache = self.layers[name], self.cache
        if layer.tied:  # one count: the grid is along the outputs
            lo, hi, w = _bracket(layer.outs, n_out)
            return max(0.0, (1 - w) * cache[(layer.key, lo, lo)] + w * cache[(layer.key, hi, hi)])
        (i0, i1, wi), (o0, o1, wo) = _bracket(layer.ins, n_in), _bracket(layer.outs, n_out)
        low = (1 - wo) * cache[(layer.key, i0, o0)] + wo * cache[(layer.key, i0, o1)]
        high = (1 - wo) * cache[(layer.key, i1, o0)] + wo * cache[(layer.key, i1, o1)]
        return max(0.0, (1 - wi) * low + wi * high)

    def predict(self, groups: Iterable[Any], removals: Mapping[str, int | float],
                exact: bool = False) -> float:
        """Change of the model's time (seconds; negative: faster) when each group ``g`` of
        ``removals`` loses ``removals[g]`` channels, from the current counts; ``exact``
        times the new counts instead of interpolating."""
        total, read = 0.0, (self.exact if exact else self.estimate)
        for name, n_in, n_out, new_in, new_out in self._changes(groups, removals):
            if exact:
                new_in, new_out = round(new_in), round(new_out)
            total += read(name, new_in, new_out) - read(name, n_in, n_out)
        return total

    def _changes(self, groups: Iterable[Any], removals: Mapping[str, int | float]) -> list[tuple]:
        """(layer, in now, out now, in after, out after) for every timed layer ``removals`` touches."""
        drop: dict[str, list[float]] = {}
        for g in groups:
            k = removals.get(g.id, 0)
            for m in g.members if k > 0 else ():
                t = m.target
                if t.role is not None and t.name in self.layers:
                    share = len(m.classes) / max(g.channels, 1)
                    drop.setdefault(t.name, [0.0, 0.0])[0 if t.role is Role.IN else 1] += share * k
        out = []
        for name, (d_in, d_out) in drop.items():
            layer = self.layers[name]
            handler = handler_for(layer.module)
            n_in, n_out = handler.channels(layer.module, Role.IN), handler.channels(layer.module, Role.OUT)
            n_in, n_out = n_in or n_out, n_out or n_in
            if layer.tied:
                d_in = d_out = max(d_in, d_out)
            d_in, d_out = (d_in if len(layer.ins) > 1 or layer.tied else 0.0), (d_out if len(layer.outs) > 1 else 0.0)
            out.append((name, n_in, n_out, max(1.0, n_in - d_in), max(1.0, n_out - d_out)))
        return out

    def costs(self, groups: Iterable[Any]) -> dict[str, float]:
        """Seconds one channel of each group costs now: the time saved by removing its next
        ``max(1, channels / 8)`` channels, per channel (floored at a thousandth of the
        largest cost, so no channel is free)."""
        groups = list(groups)
        raw = {}
        for g in groups:
            width = max(1, g.channels // 8)
            raw[g.id] = max(0.0, -self.predict(groups, {g.id: width}) / width)
        floor = max(max(raw.values(), default=0.0) * 1e-3, 1e-12)
        return {gid: max(v, floor) for gid, v in raw.items()}

    def rounding(self, groups: Iterable[Any]) -> dict[str, int]:
        """Groups whose time steps down at multiples of :data:`ALIGN` channels: ``{group: ALIGN}``.

        For a group of at least ``2 * ALIGN`` channels, the group's layers are timed with
        ``m``, ``m + 1`` and ``m + ALIGN`` channels (``m`` the multiple of :data:`ALIGN`
        nearest half its count): when the first extra channel costs at least half of
        what ``ALIGN`` extra channels cost, the time is a staircase there and a kept
        count rounded down to a multiple of :data:`ALIGN` pays. Decided once per group.
        """
        groups = list(groups)
        for g in groups:
            if g.id not in self._rounding:
                self._rounding[g.id] = self._steps(groups, g)
        return {g.id: r for g in groups if (r := self._rounding[g.id])}

    def _steps(self, groups: list[Any], g: Any) -> int | None:
        c = g.channels
        m = ALIGN * max(1, round(c / 2 / ALIGN))
        if c < 2 * ALIGN or m + ALIGN > c:
            return None
        try:
            at = [self.predict(groups, {g.id: c - n}, exact=True) for n in (m, m + 1, m + ALIGN)]
        except (PrunableError, RuntimeError, ValueError):
            return None
        return ALIGN if at[2] > at[0] and at[1] - at[0] >= 0.5 * (at[2] - at[0]) else None


class LatencyGoal:
    """One latency-targeted :func:`~prunable.schedule.prune_to` run: the table of
    ``pruner``'s model, its measured latency ratio, and the sizing of each step.

    ``fraction`` is the target (None: the table only ranks channels, ``cost="latency"``).
    The ratio is measured against a copy of the model taken when the run starts,
    the two timed in alternation (:data:`PAIRS` pairs, the median of the per-pair
    ratios), so that load on a shared machine slows both alike.
    """

    def __init__(self, pruner: Any, fraction: float | None) -> None:
        self.pruner, self.fraction, self.scale, self.expected, self.ratio = pruner, fraction, 1.0, 0.0, 1.0
        self.table = LatencyTable(pruner.model, pruner.example_inputs, pruner.groups)
        self.reference = copy.deepcopy(pruner.model) if fraction is not None else None
        self.reference_seconds = self._time(pruner.model) if fraction is not None else 1.0

    def _time(self, module: nn.Module) -> float:
        return (self.table.timer or measure)(module, self.pruner.example_inputs)

    def measured(self) -> float:
        """The model's latency now ÷ at the start (and how far the table's last prediction was off)."""
        ratios, seconds = [], []
        for i in range(PAIRS + 1):  # the first pair warms up
            ref, now = self._time(self.reference), self._time(self.pruner.model)
            if i:
                ratios.append(now / ref)
                seconds.append(ref)
        before, self.ratio, self.reference_seconds = self.ratio, statistics.median(ratios), statistics.median(seconds)
        if self.expected:  # measured drop ÷ predicted drop, bounded: the table's bias on this model
            self.scale = min(max((before - self.ratio) / self.expected, 0.25), 2.0)
        return self.ratio

    def predicted(self, plan: Plan) -> float:
        """The latency ratio the table predicts once ``plan`` is applied."""
        return self.ratio - self.scale * self._drop(plan)

    def _drop(self, plan: Plan) -> float:
        """The table's drop of the latency ratio from ``plan``."""
        seconds = -self.table.predict(self.pruner.groups, {g: len(i) for g, i in plan.removals.items()})
        return seconds / self.reference_seconds

    def next_plan(self, step: int | float) -> Plan:
        """``step`` channels, or the fewest that the table says reach the target; rounded."""
        pruner = self.pruner
        if not pruner.available:
            return Plan({})
        base = pruner.plan(step if isinstance(step, float) else min(step, pruner.available))
        if len(base) and self.predicted(base) <= self.fraction:
            lo, hi = 0, len(base)
            while hi - lo > 1:
                mid = (lo + hi) // 2
                plan = pruner.plan(mid)
                if self.predicted(plan) <= self.fraction:
                    hi, base = mid, plan
                else:
                    lo = mid
        plan = self.snap(base)
        self.expected = self._drop(plan)
        return plan

    def snap(self, plan: Plan) -> Plan:
        """Each group of ``plan`` whose time steps at multiples of ``r`` channels
        (:meth:`~prunable.latency.LatencyTable.rounding`) keeps a multiple of ``r``
        (its kept count rounded down), when its cap allows."""
        pruner = self.pruner
        rounding, caps = self.table.rounding(pruner.groups), pruner.caps
        channels = {g.id: g.channels for g in pruner.groups}
        removals = dict(plan.removals)
        for gid, idx in plan.removals.items():
            r = rounding.get(gid)
            keep = channels[gid] - len(idx)
            if not r or keep % r == 0 or keep < 2 * r or channels[gid] - r * (keep // r) > caps.get(gid, 0):
                continue
            snapped = pruner.plan(channels[gid] - r * (keep // r), groups=[gid]).removals.get(gid)
            removals[gid] = snapped if snapped else idx
        return Plan(removals)


def layer_sides(groups: Iterable[Any]) -> dict[str, dict[str, Any]]:
    """Every layer a group touches: ``{name: {"module", "in": {group: indices}, "out": {...}}}``.

    Example
    -------
    >>> layer_sides([])
    {}
    """
    sides: dict[str, dict[str, Any]] = {}
    for g in groups:
        for m in g.members:
            t = m.target
            if t.role is None or t.module is None or handler_for(t.module) is None:
                continue
            entry = sides.setdefault(t.name, {"module": t.module, "in": {}, "out": {}})
            entry["in" if t.role is Role.IN else "out"][g.id] = len(m.classes)
    return sides


def _captured(model: nn.Module, example_inputs: Any, modules: Mapping[str, nn.Module]) -> dict[str, torch.Tensor]:
    """The input tensor of each of ``modules`` in one forward pass (first call; one tensor only)."""
    found: dict[str, torch.Tensor] = {}

    def hook(name: str) -> Callable[..., None]:
        def record(module: nn.Module, args: tuple) -> None:
            tensors = [a for a in args if isinstance(a, torch.Tensor)]
            if name not in found and len(args) == 1 and len(tensors) == 1:
                found[name] = tensors[0].detach().clone()
        return record

    handles = [m.register_forward_pre_hook(hook(name)) for name, m in modules.items()]
    was_training = model.training
    try:
        model.eval()
        with torch.no_grad():
            call_model(model, example_inputs)
    finally:
        model.train(was_training)
        for h in handles:
            h.remove()
    return found


def _points(n: int) -> list[int]:
    return sorted({max(1, round(n * f)) for f in GRID})


def _bracket(points: list[int], n: float) -> tuple[int, int, float]:
    """Neighbouring grid points of ``n`` and ``n``'s weight on the upper one (linear, extrapolated)."""
    if len(points) == 1:
        return points[0], points[0], 0.0
    j = min(max(bisect.bisect_left(points, n), 1), len(points) - 1)
    lo, hi = points[j - 1], points[j]
    return lo, hi, (n - lo) / (hi - lo)


def _resized(layer: LayerTimes, n_in: int, n_out: int) -> tuple[nn.Module, torch.Tensor]:
    """A copy of the layer cut to the first ``n_in`` / ``n_out`` channels, and its input."""
    module = copy.deepcopy(layer.module)
    cuts = []
    if n_in != layer.full_in:
        cuts.append(Cut(module, Role.IN, torch.arange(n_in)))
    if n_out != layer.full_out:
        cuts.append(Cut(module, Role.OUT, torch.arange(n_out)))
    if cuts:
        apply_cuts(cuts)
    x = layer.x if layer.axis is None or n_in == layer.full_in else layer.x.narrow(layer.axis, 0, n_in)
    return module, x.contiguous()


def _input_axis(layer: LayerTimes) -> int | None:
    """The axis of the layer's input that holds its input channels: of the axes of that
    size, the one along which a copy with one channel less accepts a narrowed input."""
    axes = [d for d in range(layer.x.dim()) if layer.x.shape[d] == layer.full_in]
    if len(axes) <= 1:
        return axes[0] if axes else None
    fewer = layer.full_in - 1
    for d in axes:
        trial = LayerTimes(**{**vars(layer), "axis": d})
        try:
            module, x = _resized(trial, fewer, fewer if layer.tied else layer.full_out)
            with torch.no_grad():
                module(x)
            return d
        except (PrunableError, RuntimeError, ValueError):
            continue
    return None
