"""``Pruner``: prune any model, no per-architecture code.

Example
-------
>>> import torch, torchvision
>>> from prunable import Pruner, WeightNorm, count_flops
>>> model = torchvision.models.resnet18(num_classes=10)
>>> x = torch.randn(1, 3, 64, 64)
>>> before = count_flops(model, x)
>>> pruner = Pruner(model, x, criterion=WeightNorm())
>>> plan = pruner.step(64)            # the 64 least important channels, globally
>>> count_flops(model, x) < before, model(x).shape
(True, torch.Size([1, 10]))
"""

from __future__ import annotations

import contextlib
import copy
import enum
import gc
import math
import warnings
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any

import torch
from torch import nn

from .distributed import reduce_scores, unwrap
from .errors import EstimationError, PruningValueError, SurgeryError
from .flops import count_flops, count_params, module_flops
from .inputs import batch_size, call_model, input_tensors, inputs_to
from .copies import meta_clone
from .graph import ChannelGroup, DependencyGraph, Traced, positions, trace_cut, trace_model
from .importance import Aggregation, Criterion, MeasurePoint, l2_normalize, make_criterion
from .plan import Plan
from .reasons import SkipKind, SkipReason
from .attention import AttentionHandler
from .surgery import Cut, apply_cuts, handler_for
from .meta import MetaShortcuts

__all__ = ["Pruner", "Scope"]


class Scope(enum.Enum):
    """How ``Pruner.step(n)`` spends ``n``."""

    GLOBAL = "global"  #: the n least important channels over all groups
    LAYER = "layer"  #: the n least important channels of every group


class Pruner:
    """Prune channels of an unmodified model, in place.

    Parameters
    ----------
    model
        The model; pruned in place. A ``torch.compile``, ``DataParallel`` or
        ``DistributedDataParallel`` wrapper is unwrapped: the module inside is
        pruned (and is :attr:`model`); the wrapper runs it afterwards.
    example_inputs
        The inputs of one forward pass: a tensor (or a list, e.g. of images), a tuple
        of positional inputs, a dict of keyword inputs (``model(**inputs)``) or an
        ``(args, kwargs)`` pair; see :mod:`prunable.inputs`. When the forward pass
        cannot run on the ``meta`` device (data-dependent post-processing: a
        detector's score threshold, NMS), tracing and trial runs use real copies
        of the model; a warning names the operation once.
    criterion
        A :class:`~prunable.importance.Criterion` or its name (``"taylor"``, ``"l1"`` …,
        see :data:`~prunable.importance.CRITERIA`); :class:`TaylorActivation` by default.
    ignored_layers
        Modules (or qualified names) whose output channels are never pruned.
    min_channels
        Every group keeps at least this many channels.
    round_to
        Keep channel counts multiples of this (e.g. 8 for fast kernels).
    optimizer
        An optimizer whose per-parameter state is sliced with the parameters.
    aggregation
        How coupled channels' scores combine (:class:`Aggregation`).
    flops_regularization
        λ of Molchanov et al.'s Eq. 9: scores become ``θ − λ·MFLOPs(channel)``, the
        FLOPs one channel costs per example, in millions; ``True`` means λ = 1e-3.
    validate
        Check each group and each plan on a meta copy before touching the model.

    Attributes
    ----------
    groups : list[ChannelGroup]
        The prunable groups.
    skipped : dict[str, SkipReason]
        Group id → why it is not pruned (``str()`` it for the message; test ``.kind``).
    history : list[Plan]
        Every plan applied, in order.
    """

    def __init__(
        self, model: nn.Module, example_inputs: Any, criterion: Criterion | str | None = None,
        ignored_layers: Iterable[nn.Module | str] = (), min_channels: int = 1, round_to: int | None = None,
        optimizer: torch.optim.Optimizer | None = None, aggregation: Aggregation = Aggregation.SUM,
        flops_regularization: float | bool = 0.0, validate: bool = True,
    ) -> None:
        model = unwrap(model)  # torch.compile / (Distributed)DataParallel: prune the module inside
        if not isinstance(min_channels, int) or min_channels < 1:
            raise PruningValueError(f"min_channels must be an int >= 1, got {min_channels!r}")
        if round_to is not None and (not isinstance(round_to, int) or round_to < 1):
            raise PruningValueError(f"round_to must be None or an int >= 1, got {round_to!r}")
        self.model = model
        self.example_inputs = example_inputs if isinstance(example_inputs, (tuple, dict)) else (example_inputs,)
        self._real: str | None = None  # why the forward pass needs real values, once known
        self.criterion = make_criterion(criterion)
        self.min_channels, self.round_to, self.optimizer = min_channels, round_to, optimizer
        self.aggregation = Aggregation(aggregation)
        self.flops_regularization = 1e-3 if flops_regularization is True else float(flops_regularization)
        self.validate = validate
        self.ignored = _ignored_names(model, ignored_layers)
        _check_inputs(model, self.example_inputs)
        self.history: list[Plan] = []
        self.log: list[dict[str, float]] = []
        self._start: dict[str, int] | None = None  # FLOPs/params before the first prune, once measured
        with _gc_paused():
            self._rebuild(warn=True)
        self._initial_widths = self._widths()
        self._initial_params = count_params(model)

    # -- graph -----------------------------------------------------------------
    def _rebuild(self, warn: bool = False, traced: Traced | None = None) -> None:
        """Groups of the model from ``traced`` (a fresh trace when None), then validate them."""
        traced = trace_model(self.model, self.example_inputs) if traced is None else traced
        if traced.real is not None and self._real is None:
            self._real = traced.real
            warnings.warn(f"prunable: {type(self.model).__name__}'s forward pass cannot run on the meta device "
                          f"({traced.real}); tracing and trial runs use real copies of the model", stacklevel=3)
        self.graph = DependencyGraph(self.model, self.example_inputs, traced=traced)
        self.skipped: dict[str, SkipReason] = {}
        for g in self.graph.groups:
            reason = g.skip_reason or next((SkipReason(SkipKind.IGNORED, f"ignored layer {m.target.name}")
                                            for m in g.producers if m.target.name in self.ignored), None)
            if reason is None and g.channels <= self.min_channels:
                reason = SkipReason(SkipKind.MIN_CHANNELS,
                                    f"{g.channels} channel(s) left, min_channels={self.min_channels}")
            if reason:
                self.skipped[g.id] = reason
        if self.validate:
            self.skipped.update(self._invalid_groups(traced.clone))
        if warn:
            for gid, reason in self.skipped.items():
                if not reason.kind.expected:
                    warnings.warn(f"prunable: group {gid} is not pruned: {reason}", stacklevel=3)
        modules = dict(self.model.named_modules())
        self._points = {}
        for g in self.groups:
            for (name, dim, _), member in zip(g.measure, g.producers):
                if dim is None:
                    continue
                self._points[name] = MeasurePoint(name, modules[name], dim, member.target.module)

    @property
    def groups(self) -> list[ChannelGroup]:
        """Groups that can be pruned."""
        return [g for g in self.graph.groups if g.id not in self.skipped]

    def _trial(self, cuts: list[Cut], clone: nn.Module | None = None) -> str | None:
        """Apply ``cuts`` to a meta copy (``clone``, or a fresh one) and run it; the error text, or None.

        When the forward pass needs real values (``self._real``), a real copy runs
        on the real example inputs instead.
        """
        if clone is None:
            clone = meta_clone(self.model) if self._real is None else copy.deepcopy(self.model)
        twin = dict(zip((id(m) for m in self.model.modules()), clone.modules()))
        moved = [Cut(twin[id(c.module)], c.role, c.keep, c.param, c.axis, c.name) for c in cuts]
        inputs = self.example_inputs if self._real is not None else inputs_to(self.example_inputs, "meta")
        try:
            apply_cuts(moved)
            with torch.no_grad(), MetaShortcuts():
                call_model(clone, inputs)
        except Exception as exc:  # noqa: BLE001 - reported to the caller
            return f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
        return None

    def _failing(self, removals: dict[str, list[int]], clone: nn.Module | None = None) -> list[tuple[str, str]]:
        """Group ids whose removal breaks the forward pass (bisection).

        ``clone``, a meta copy of the model, serves the first trial (it is cut there).
        """
        error = self._trial(self.graph.cuts(removals), clone) if removals else None
        if error is None:
            return []
        if len(removals) == 1:
            return [(next(iter(removals)), error)]
        items = list(removals.items())
        half = len(items) // 2
        return self._failing(dict(items[:half])) + self._failing(dict(items[half:]))

    def _invalid_groups(self, clone: nn.Module | None = None) -> list[tuple[str, SkipReason]]:
        """Groups that cannot lose a channel: every channel is the last of some layer,
        or removing one breaks the forward pass (checked on a meta copy: ``clone`` if given)."""
        guard, probe, stuck = _MemberGuard(self.groups), {}, []
        for g in self.groups:
            if g.blocks is not None:  # one channel of every head / GroupNorm group
                idx = guard.take_per_block(g.id, g.blocks, list(reversed(range(g.channels))), 1)
            else:
                i = next((i for i in reversed(range(g.channels)) if guard.emptied_by(g.id, i) is None), None)
                idx = [] if i is None else [i]
                if idx:
                    guard.remove(g.id, idx[0])
            if not idx:
                stuck.append((g.id, SkipReason(SkipKind.LAST_CHANNEL)))
                continue
            probe[g.id] = idx
        return stuck + [(gid, SkipReason(SkipKind.TRIAL_FAILED, f"trial prune failed: {error}"))
                        for gid, error in self._failing(probe, clone)]

    # -- scores ----------------------------------------------------------------
    @contextlib.contextmanager
    def estimate(self) -> Iterator["Pruner"]:
        """Collect data-driven importance while the block runs forward/backward passes.

        Hooks are removed on exit, also when the block raises.
        """
        if self.criterion.needs_grad and not torch.is_grad_enabled():
            raise EstimationError(f"{type(self.criterion).__name__} needs gradients but they are "
                                  "disabled (torch.no_grad / inference_mode) around estimate()")
        handles = self.criterion.attach(list(self._points.values()))
        try:
            yield self
        finally:
            for h in handles:
                h.remove()

    def scores(self) -> dict[str, torch.Tensor]:
        """Importance of every channel of every prunable group (lower = pruned first)."""
        penalty = self._flops_per_channel() if self.flops_regularization else {}
        out, error = {}, None
        for g in self.groups:
            try:
                out[g.id] = self._group_score(g, penalty)
            except EstimationError as exc:  # under torch.distributed: raised on every rank below
                error = error or str(exc)
                out[g.id] = torch.full((g.channels,), math.nan)
        device = next(self.model.parameters(), torch.empty(0)).device
        return reduce_scores(out, device=device, error=error)

    def _group_score(self, g: ChannelGroup, penalty: dict[str, float]) -> torch.Tensor:
        parts = []
        for name, dim, index in g.measure:
            if dim is None:
                continue
            s = self.criterion.scores(self._points[name]).detach().float().cpu()
            if not bool(torch.isfinite(s).all()):
                raise EstimationError(f"group {g.id}: non-finite importance from {name}: {s.tolist()[:8]}")
            s = l2_normalize(s) if self.criterion.normalize else s
            parts.append((s, index))
        score = _aggregate(parts, g.channels, self.aggregation)
        if g.id in penalty:
            score = score - self.flops_regularization * penalty[g.id]
        return score

    def _flops_per_channel(self) -> dict[str, float]:
        flops = module_flops(self.model, self.example_inputs)
        out = {}
        for g in self.groups:
            total = sum(flops.get(m.target.name, 0) / max(len(m.classes), 1)
                        for m in g.members if m.target.param is None)
            out[g.id] = total / 1e6 / batch_size(self.example_inputs)
        return out

    # -- pruning ---------------------------------------------------------------
    def plan(self, n: int | float = 1, scope: Scope | str = Scope.GLOBAL) -> Plan:
        """The plan :meth:`step` would apply: the ``n`` least important channels.

        ``n`` is a count, or a float in (0, 1): that fraction of the channels
        (of all prunable groups with the global scope, of each group with the
        layer scope).
        """
        scope = Scope(scope)
        caps = {g.id: g.channels - self._floor(g.channels) for g in self.groups}
        per_group = self._count(n, scope, caps)
        scores = self.scores()
        guard = _MemberGuard(self.groups)
        order = {gid: s.argsort().tolist() for gid, s in scores.items()}
        if scope is Scope.LAYER:
            chosen = {g.id: guard.take(g.id, order[g.id], min(per_group(g.channels), caps[g.id]))
                      for g in self.groups}
        else:
            flat = sorted((float(v), gid, i) for gid, s in scores.items() for i, v in enumerate(s.tolist()))
            chosen = guard.take_global([(gid, i) for _, gid, i in flat], caps, per_group(0))
        if self.round_to:
            for gid, idx in list(chosen.items()):
                target = self._rounded(gid, len(idx), caps[gid]) if idx else 0
                if target != len(idx):
                    guard.release(gid, idx)
                    chosen[gid] = guard.take(gid, order[gid], target)
        for g in self.groups:  # attention heads, GroupNorm groups: the same number from each
            idx = chosen.get(g.id, [])
            if g.blocks is not None and idx:
                guard.release(g.id, idx)
                per_block = min(int(round(len(idx) / len(g.blocks))), caps[g.id] // len(g.blocks))
                chosen[g.id] = guard.take_per_block(g.id, g.blocks, order[g.id], per_block)
        return Plan({gid: tuple(idx) for gid, idx in chosen.items() if idx})

    def _count(self, n: int | float, scope: Scope, caps: dict[str, int]) -> Callable[[int], int]:
        """Validate ``n``; returns channels to remove as a function of a group's size."""
        if isinstance(n, float) and not isinstance(n, bool):
            if not 0 < n < 1:
                raise PruningValueError(f"pruning ratio must be in (0, 1), got {n!r}")
            if scope is Scope.LAYER:
                return lambda channels: int(round(n * channels))
            total = max(1, int(round(n * sum(g.channels for g in self.groups))))
            return lambda channels: min(total, sum(caps.values()))
        if not isinstance(n, int) or isinstance(n, bool) or n < 1:
            raise PruningValueError(f"n must be a positive int or a ratio in (0, 1), got {n!r}")
        available = sum(caps.values())
        if scope is Scope.GLOBAL and n > available:
            raise PruningValueError(f"n={n} exceeds the {available} channels that can still be pruned")
        return lambda channels: n

    def _floor(self, channels: int) -> int:
        floor = self.min_channels
        if self.round_to:
            floor = max(floor, min(channels, self.round_to))
        return floor

    def _rounded(self, gid: str, k: int, cap: int) -> int:
        channels = next(g.channels for g in self.groups if g.id == gid)
        kept = max(self.round_to, ((channels - k) // self.round_to) * self.round_to)
        return min(channels - kept, cap) if channels - kept > 0 else 0

    def step(self, n: int = 1, scope: Scope | str = Scope.GLOBAL) -> Plan:
        """Remove the ``n`` least important channels; returns the applied plan."""
        plan = self.plan(n, scope)
        if not len(plan):
            raise PruningValueError("nothing left to prune: every group is at its minimum")
        self.prune(plan)
        return plan

    def prune(self, plan: Plan | Mapping[str, Iterable[int]]) -> None:
        """Apply ``plan`` (group id → channel indices) atomically.

        Raises :class:`PruningValueError` for an unknown or skipped group, an
        index out of range or a group left below ``min_channels``, and
        :class:`SurgeryError` if the pruned model would not run; in both cases
        the model and optimizer are unchanged.
        """
        if torch.is_inference_mode_enabled():
            raise PruningValueError("prune() called inside torch.inference_mode(): the pruned "
                                    "parameters could never be trained again; call it outside")
        with _gc_paused():
            self._prune(Plan.coerce(plan))

    def _prune(self, plan: Plan) -> None:
        """The body of :meth:`prune`. The plan's trial run traces the pruned meta copy,
        so the graph of the pruned model needs no second trace."""
        self._check(plan)
        removals = {k: list(v) for k, v in plan.removals.items()}
        cuts = self.graph.cuts(removals)
        traced = self._traced_trial(cuts) if self.validate else None
        if self.validate and traced is None:
            failing = self._failing(removals)
            if failing:
                gid, error = failing[0]
                raise SurgeryError(f"group {gid}: pruning it breaks the forward pass ({error}); model unchanged")
        apply_cuts(cuts, self.optimizer)
        self.history.append(plan)
        self.criterion.reset()
        self._rebuild(traced=traced)

    def _traced_trial(self, cuts: list[Cut]) -> Traced | None:
        """Trace the model as ``cuts`` will leave it, on a meta copy; None if that fails.

        A success is the trial run of the plan and the trace of the pruned model
        at once. A failure is settled by :meth:`_failing`, which names the group.
        """
        try:
            return trace_cut(self.model, self.example_inputs, cuts, real=self._real)
        except Exception:  # noqa: BLE001 - _failing reports it
            return None

    def _check(self, plan: Plan) -> None:
        by_id = {g.id: g for g in self.graph.groups}
        for gid, idx in plan.removals.items():
            if gid not in by_id:
                raise PruningValueError(f"unknown group {gid!r}; groups are {list(by_id)[:8]}...")
            if gid in self.skipped:
                raise PruningValueError(f"group {gid} cannot be pruned: {self.skipped[gid]}")
            size = by_id[gid].channels
            bad = [i for i in idx if not 0 <= i < size]
            if bad:
                raise PruningValueError(f"group {gid}: channel index {bad[0]} out of range [0, {size})")
            if size - len(idx) < self.min_channels:
                raise PruningValueError(
                    f"group {gid}: removing {len(idx)} of {size} channels leaves fewer than "
                    f"min_channels={self.min_channels}")
            blocks = by_id[gid].blocks
            if blocks is not None:
                counts = torch.isin(blocks, torch.as_tensor(list(idx), dtype=torch.long)).sum(1).tolist()
                if len(set(counts)) > 1 or counts[0] >= blocks.shape[1]:
                    raise PruningValueError(
                        f"group {gid}: {by_id[gid].blocks_of} must each lose the same number of their "
                        f"{blocks.shape[1]} channels, and keep at least one; the plan removes {counts}")
        guard = _MemberGuard(self.graph.groups)
        if guard.fits(plan.removals):
            return
        for gid, idx in plan.removals.items():
            for i in idx:
                emptied = guard.emptied_by(gid, i)
                if emptied:
                    raise PruningValueError(f"group {gid}: removing channel {i} leaves {emptied} with no channels")
                guard.remove(gid, i)

    def prune_to(
        self, flops: float | None = None, params: float | None = None,
        fine_tune: Callable[[], Any] | None = None, prune_every: int = 1, channels_per_step: int = 8,
        progress: bool = True, on_step: Callable[[dict[str, float]], Any] | None = None,
    ) -> list[dict[str, float]]:
        """Prune step by step until FLOPs and/or params are at most the given fractions.

        Before each step, ``fine_tune()`` is called ``prune_every`` times inside
        :meth:`estimate` (a few training batches: forward, backward, optimizer
        step). After each step, ``on_step(record)`` is called outside the hooks
        (validate, checkpoint, log …). Returns (and appends to ``self.log``) one
        record per step: step, channels removed, FLOPs and params as fractions of
        the start, and what ``fine_tune`` and ``on_step`` returned last (a number
        as ``metric``, a dict merged in).

        Example
        -------
        >>> import torch
        >>> from torch import nn
        >>> model = nn.Sequential(nn.Conv2d(3, 16, 3), nn.ReLU(), nn.Conv2d(16, 4, 3))
        >>> pruner = Pruner(model, torch.randn(1, 3, 8, 8), criterion="l1")
        >>> log = pruner.prune_to(flops=0.6, channels_per_step=2, progress=False,
        ...                       on_step=lambda record: {"width": model[0].out_channels})
        >>> log[-1]["flops"] <= 0.6, log[-1]["width"] == model[0].out_channels
        (True, True)
        """
        targets = {"flops": flops, "params": params}
        for key, value in targets.items():
            if value is not None and not 0 < value <= 1:
                raise PruningValueError(f"{key} target must be a fraction in (0, 1], got {value!r}")
        if flops is None and params is None:
            raise PruningValueError("give a flops= or params= target")
        if self.criterion.needs_activations or self.criterion.needs_grad:
            if fine_tune is None:
                raise PruningValueError(f"{type(self.criterion).__name__} needs data: pass fine_tune=")
        start = self._measure()
        if self._start is None:
            self._start = start
        ratios = {"flops": 1.0, "params": 1.0}
        bar = _progress(progress)
        while not all(ratios[k] <= v for k, v in targets.items() if v is not None):
            result = None
            if fine_tune is not None:
                with self.estimate():
                    for _ in range(prune_every):
                        result = fine_tune()
            if not self.groups:
                warnings.warn("prunable: no prunable group left before reaching the target", stacklevel=2)
                break
            try:
                plan = self.step(channels_per_step)
            except PruningValueError:
                warnings.warn("prunable: every group is at its minimum; target not reached", stacklevel=2)
                break
            ratios = self._ratios(start)
            record = {"step": len(self.log) + 1, "removed": len(plan), **ratios}
            for value in (result, on_step(dict(record)) if on_step is not None else None):
                record.update(value if isinstance(value, dict) else {} if value is None else {"metric": float(value)})
            self.log.append(record)
            bar(record)
        bar(None)
        return self.log

    def report(self) -> str:
        """A markdown summary: FLOPs (of the example inputs) and params now and at the
        start, output channels of every pruned layer (start → now) and the steps taken.

        The starting FLOPs are known when :meth:`prune_to` ran, or when ``report()`` was
        first called before any prune (counting them costs a forward pass, so a bare
        :meth:`step` does not).

        Example
        -------
        >>> import torch
        >>> from torch import nn
        >>> model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Conv2d(8, 4, 3))
        >>> pruner = Pruner(model, torch.randn(1, 3, 8, 8), criterion="l1")
        >>> plan = pruner.step(3)
        >>> print(pruner.report().splitlines()[-1])
        | 0 | 8 | 5 |
        """
        now = self._measure()
        if self._start is None and not self.history:
            self._start = now
        start = self._start or {"params": self._initial_params}
        lines = ["| | start | now | now / start |", "|---|---:|---:|---:|"]
        for key in ("flops", "params"):
            if key in start:
                lines.append(f"| {key} | {start[key]:,} | {now[key]:,} | {now[key] / max(start[key], 1):.3f} |")
            else:  # FLOPs are counted by a forward pass: only prune_to / report() before pruning do
                lines.append(f"| {key} | not measured | {now[key]:,} | — |")
        lines += ["", f"{len(self.history)} plan(s) applied, "
                  f"{sum(len(p) for p in self.history)} channels removed.", "",
                  "| layer | output channels at start | now |", "|---|---:|---:|"]
        widths = self._widths()
        for name, first in self._initial_widths.items():
            if widths.get(name, first) != first:
                lines.append(f"| {name} | {first} | {widths[name]} |")
        return "\n".join(lines)

    def _widths(self) -> dict[str, int]:
        """Output channels of every producing layer of the current graph."""
        return {m.target.name: len(m.classes) for g in self.graph.groups for m in g.producers
                if not isinstance(handler_for(m.target.module), AttentionHandler)}

    def _measure(self) -> dict[str, int]:
        return {"flops": count_flops(self.model, self.example_inputs), "params": count_params(self.model)}

    def _ratios(self, start: dict[str, int]) -> dict[str, float]:
        now = self._measure()
        return {k: now[k] / max(start[k], 1) for k in now}


def _aggregate(parts: list[tuple[torch.Tensor, torch.Tensor]], size: int, how: Aggregation) -> torch.Tensor:
    """Combine per-producer scores into one score per group channel."""
    if how is Aggregation.MAX:
        out = torch.full((size,), -math.inf)
        for s, index in parts:
            ok = index >= 0
            out.scatter_reduce_(0, index[ok], s[ok], reduce="amax")
        return torch.where(torch.isinf(out), torch.zeros_like(out), out)
    out, count = torch.zeros(size), torch.zeros(size)
    for s, index in parts:
        ok = index >= 0
        out.index_add_(0, index[ok], s[ok])
        count.index_add_(0, index[ok], torch.ones(int(ok.sum())))
    return out / count.clamp(min=1) if how is Aggregation.MEAN else out


class _MemberGuard:
    """Tracks channels left in every module side and parameter while a plan is chosen,
    so no layer inside a group (one branch of a concat tied to others) is emptied.

    How many indices of each member every group channel holds is counted lazily,
    the first time a group is asked about.
    """

    def __init__(self, groups: list[ChannelGroup]) -> None:
        self.left: list[float] = []
        self.labels: list[str] = []
        self.groups = {g.id: g for g in groups}
        self.slots: dict[str, list[int]] = {}
        self.hits: dict[str, list[tuple[int, list[int]]]] = {}
        self.counts: dict[str, torch.Tensor] = {}
        index: dict[tuple, int] = {}
        for g in groups:
            slots = []
            for m in g.members:
                key = (m.target.uid, m.target.role, m.target.param, m.target.axis)
                if key not in index:
                    index[key] = len(self.left)
                    self.left.append(math.inf if bool((m.classes < 0).any()) else len(m.classes))
                    self.labels.append("")
                self.labels[index[key]] = m.target.label()
                slots.append(index[key])
            self.slots[g.id] = slots

    def _hits(self, gid: str) -> list[tuple[int, list[int]]]:
        """(member slot, indices of the member held by each channel of ``gid``) per member."""
        hits = self.hits.get(gid)
        if hits is None:
            g = self.groups[gid]
            labels = [m.classes.reshape(-1) for m in g.members]
            member = torch.repeat_interleave(torch.arange(len(labels)), torch.tensor([len(x) for x in labels]))
            at = positions(g.classes, torch.cat(labels))
            ok = at >= 0
            counts = torch.bincount(member[ok] * g.channels + at[ok], minlength=len(labels) * g.channels)
            self.counts[gid] = counts.view(len(labels), g.channels)
            hits = self.hits[gid] = list(zip(self.slots[gid], self.counts[gid].tolist()))
        return hits

    def emptied_by(self, gid: str, i: int) -> str | None:
        """Label of a member that removing channel ``i`` of ``gid`` would empty."""
        left = self.left
        return next((self.labels[slot] for slot, counts in self._hits(gid)
                     if counts[i] and left[slot] - counts[i] < 1), None)

    def remove(self, gid: str, i: int, sign: int = 1) -> None:
        for slot, counts in self._hits(gid):
            self.left[slot] -= sign * counts[i]

    def fits(self, removals: Mapping[str, Iterable[int]]) -> bool:
        """True if removing every channel of ``removals`` at once leaves each member
        at least one index (then no single removal on the way empties one either)."""
        left = list(self.left)
        for gid, idx in removals.items():
            self._hits(gid)
            taken = self.counts[gid][:, torch.as_tensor(list(idx), dtype=torch.long)].sum(1)
            for slot, k in zip(self.slots[gid], taken.tolist()):
                left[slot] -= k
        return all(v >= 1 for v in left)

    @staticmethod
    def _first(order: list[tuple[str, int]], caps: dict[str, int], n: int) -> dict[str, list[int]]:
        """The first ``n`` entries of ``order``, at most ``caps[g]`` per group."""
        chosen: dict[str, list[int]] = {}
        for gid, i in order:
            if n <= 0:
                break
            taken = chosen.setdefault(gid, [])
            if len(taken) < caps[gid]:
                taken.append(i)
                n -= 1
        return {gid: idx for gid, idx in chosen.items() if idx}

    def _remove_all(self, gid: str, idx: list[int]) -> None:
        """:meth:`remove` for every channel of ``idx`` at once."""
        self._hits(gid)
        taken = self.counts[gid][:, torch.as_tensor(idx, dtype=torch.long)].sum(1)
        for slot, k in zip(self.slots[gid], taken.tolist()):
            self.left[slot] -= k

    def release(self, gid: str, idx: list[int]) -> None:
        for i in idx:
            self.remove(gid, i, -1)

    def take(self, gid: str, order: list[int], k: int) -> list[int]:
        """The first ``k`` channels of ``order`` that can go."""
        return self.take_global([(gid, i) for i in order], {gid: k}, k).get(gid, [])

    def take_per_block(self, gid: str, blocks: torch.Tensor, order: list[int], k: int) -> list[int]:
        """``k`` channels of every row of ``blocks``, first in ``order``; fewer if some row
        cannot give ``k`` (the same number from each row), none if ``k`` is 0."""
        rank = {c: r for r, c in enumerate(order)}
        rows = [sorted(row, key=lambda c: rank.get(c, len(rank))) for row in blocks.tolist()]
        k = min(k, blocks.shape[1] - 1)
        while k > 0:
            taken = [self.take(gid, row, k) for row in rows]
            if all(len(t) == k for t in taken):
                return sorted(i for t in taken for i in t)
            for t in taken:
                self.release(gid, t)
            k -= 1
        return []

    def take_global(self, order: list[tuple[str, int]], caps: dict[str, int], n: int) -> dict[str, list[int]]:
        """Walk ``order``; take up to ``n`` channels, at most ``caps[g]`` per group."""
        chosen = self._first(order, caps, n)
        if self.fits(chosen):  # the usual case: no member emptied, no channel skipped
            for gid, idx in chosen.items():
                self._remove_all(gid, idx)
            return chosen
        chosen = {}
        for gid, i in order:
            if n <= 0:
                break
            if len(chosen.setdefault(gid, [])) < caps[gid] and self.emptied_by(gid, i) is None:
                self.remove(gid, i)
                chosen[gid].append(i)
                n -= 1
        return chosen


@contextlib.contextmanager
def _gc_paused() -> Iterator[None]:
    """Pause Python's cyclic garbage collector while the block runs.

    Tracing and validating allocate many short-lived objects, all freed by
    reference counting; in a large process, one full collection triggered by
    them can cost more than the work itself. The previous state is restored.
    """
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


def _progress(enabled: bool) -> Callable[[dict | None], None]:
    """A tqdm progress callback when tqdm is installed and ``enabled``."""
    try:
        from tqdm.auto import tqdm
    except ImportError:
        enabled = False
    if not enabled:
        return lambda record: None
    bar = tqdm(desc="pruning", unit="step")

    def update(record: dict | None) -> None:
        if record is None:
            bar.close()
            return
        bar.update(1)
        bar.set_postfix({k: f"{v:.3f}" for k, v in record.items() if k not in ("step", "removed")
                         and isinstance(v, float)})

    return update


def _ignored_names(model: nn.Module, ignored: Iterable[nn.Module | str]) -> set[str]:
    """Qualified names of ``ignored``; unknown entries raise."""
    by_id = {id(m): n for n, m in model.named_modules()}
    names = set(by_id.values())
    out = set()
    for item in ignored:
        name = item if isinstance(item, str) else by_id.get(id(item))
        if name is None or name not in names:
            shown = item if isinstance(item, str) else type(item).__name__
            raise PruningValueError(f"ignored_layers entry {shown!r} is not a module of the model")
        out.add(name)
    return out


def _check_inputs(model: nn.Module, inputs: Any) -> None:
    """Example inputs must sit on the model's device."""
    param = next(model.parameters(), None)
    for t in input_tensors(inputs):
        if param is not None and t.device.type != param.device.type:
            raise PruningValueError(
                f"example input on {t.device} but the model's parameters are on {param.device}")
