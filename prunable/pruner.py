"""``Pruner``: prune any model, no per-architecture code.

The Pruner orchestrates: the graph (:mod:`prunable.graph`) finds the groups, the
criterion (:mod:`prunable.importance`) scores them, :mod:`prunable.selection`
turns scores and constraints into a :class:`~prunable.plan.Plan`,
:mod:`prunable.validation` tries it on a meta copy and :mod:`prunable.surgery`
applies it. The step-by-step loop and the report live in :mod:`prunable.schedule`.

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
import gc
import math
import warnings
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any

import torch
from torch import nn

from . import schedule
from .accumulate import InPlaceClamps
from .admission import Admission
from .distributed import unwrap
from .configs import sync_config
from .errors import PruningValueError, SurgeryError
from .graph import ChannelGroup, DependencyGraph, Traced, trace_clone, trace_model
from .importance import Aggregation, Criterion, MeasurePoint, estimating, make_criterion
from .inputs import input_tensors
from .plan import Plan
from .reasons import SkipReason
from .scoring import flops_per_channel, group_scores
from .selection import Scope, parse_scope
from .sizes import Baseline, sizes, widths
from .surgery import apply_cuts
from .validation import Trials, invalid_groups

__all__ = ["Pruner", "Scope"]


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
    max_ratio
        The most a group may lose of the channels it had when the Pruner was
        created: a fraction in [0, 1] for every group, or ``{layer name or
        module: fraction}`` (other layers: 1.0). A group is capped by the
        strictest of its layers (producers, norms and consumers); 0.0 means the
        layer is never pruned. Default 1.0: no cap beyond ``min_channels``.
    optimizer
        An optimizer whose per-parameter state is sliced with the parameters.
    aggregation
        How coupled channels' scores combine (:class:`Aggregation`).
    flops_regularization
        λ of Molchanov et al.'s Eq. 9: scores become ``θ − λ·MFLOPs(channel)``, the
        FLOPs one channel costs per example, in millions; ``True`` means λ = 1e-3.
    validate
        Try each plan on a meta copy before touching the model, and at build, each group
        (removing one channel) when the forward pass holds an operation through which a cut could
        fail unseen by the graph (a reshape with sizes, a read channel count, a fixed-size operand).

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
        self, model: nn.Module, example_inputs: Any, criterion: Criterion | str | None = None, *,
        ignored_layers: Iterable[nn.Module | str] = (), min_channels: int = 1, round_to: int | None = None,
        max_ratio: float | Mapping[nn.Module | str, float] = 1.0, optimizer: torch.optim.Optimizer | None = None,
        aggregation: Aggregation | str = Aggregation.SUM, flops_regularization: float | bool = 0.0,
        validate: bool = True,
    ) -> None:
        model = unwrap(model)  # torch.compile / (Distributed)DataParallel: prune the module inside
        _check_options(min_channels, round_to, flops_regularization, validate)
        self.model = model
        self.example_inputs = example_inputs if isinstance(example_inputs, (tuple, dict)) else (example_inputs,)
        self._real: str | None = None  # why the forward pass needs real values, once known
        self.criterion = make_criterion(criterion)
        self.min_channels, self.round_to, self.optimizer = min_channels, round_to, optimizer
        self.aggregation = _aggregation(aggregation)
        self.flops_regularization = 1e-3 if flops_regularization is True else float(flops_regularization)
        self.validate = validate
        self.max_ratio = max_ratio
        #: set by a prune, the graph is rebuilt when next needed (:meth:`_sync`) from: the trial's trace, the
        #: trial's cut meta copy, and the model's :func:`_layout` then
        self._pending: tuple[Traced | None, nn.Module | None, tuple | None] | None = None
        self._adm = Admission.of(model, min_channels=min_channels, round_to=round_to, max_ratio=max_ratio,
                                       ignored=ignored_layers)  # caps, skipped groups and why
        self.constraints, self.ignored = self._adm.constraints, self._adm.ignored
        _check_inputs(model, self.example_inputs)
        self.history: list[Plan] = []
        self.log: list[dict[str, Any]] = []
        self._start = Baseline(model, self.example_inputs)  # the counts of :attr:`baseline`
        #: groups → seconds one channel of each costs; scores are divided by it (``prune_to(cost="latency")``)
        self.ranking_cost: Callable[[list[ChannelGroup]], Mapping[str, float]] | None = None
        #: the :class:`~prunable.latency.LatencyTable` of the last ``prune_to(latency=|cost="latency")``
        self.latency_table: Any = None
        with _gc_paused():
            spare = self._rebuild(warn=True)
        if spare is not None:  # the build's traced meta copy served no trial: it is the model as created
            self._start.offer(spare)
        self.initial_widths = self.widths()

    # -- graph -----------------------------------------------------------------
    def _rebuild(self, warn: bool = False, traced: Traced | None = None, probe: bool = True) -> nn.Module | None:
        """Groups of the model from ``traced`` (a fresh trace when None), then validate them: groups
        with no channel that can go are skipped; with ``probe``, also those whose trial run of
        removing one channel fails (after a prune, such a group is found by the next plan's trial).
        That trial is left out when every operation the trace saw on channels is one whose effect
        the graph follows exactly (:attr:`~prunable.shadow.Trace.fragile` is None): no cut the
        graph allows can break such a forward pass, and every plan is still tried before a cut.
        Returns the traced meta copy when no trial used it (else None)."""
        traced = trace_model(self.model, self.example_inputs) if traced is None else traced
        if traced.real is not None and self._real is None:
            self._real = traced.real
            warnings.warn(f"prunable: {type(self.model).__name__}'s forward pass cannot run on the meta device "
                          f"({traced.real}); tracing and trial runs use real copies of the model", stacklevel=3)
        self._graph = graph = DependencyGraph(self.model, self.example_inputs, traced=traced)
        self._trials_of = trials = Trials(self.model, self.example_inputs, graph.cuts, real=self._real)
        # the probe trial runs when some operation could break a cut unseen by the graph (trace.fragile)
        probe = probe and (traced.real is not None or traced.trace.fragile is not None)
        self._adm.update(graph.groups, (lambda selector: invalid_groups(
            selector, trials.runner(traced.clone) if probe else None)) if self.validate else None)
        for gid, reason in self._adm.skipped.items() if warn else ():
            if not reason.kind.expected:
                warnings.warn(f"prunable: group {gid} is not pruned: {reason}", stacklevel=3)
        self._points_of = _measure_points(self.model, self.groups)  # (no prune is pending here: nothing to sync)
        return traced.clone if not (probe and self.validate) else None  # the traced meta copy, when no trial used it

    def _sync(self) -> None:
        """Rebuild the graph after a prune, the first time it is needed: from the trace the
        plan's trial kept (``vet``, ``measure``, ``step``), else by tracing the meta copy its plain
        trial cut and ran, else (or when the model's modules, modes or sizes changed since the
        prune) from a fresh trace of the model."""
        if self._pending is not None:
            (traced, clone, layout), self._pending = self._pending, None
            try:
                with _gc_paused():
                    if layout != _layout(self.model):  # changed since the prune (modules, modes, sizes): trace it now
                        traced = clone = None
                    if traced is None and clone is not None:
                        traced = trace_clone(clone, self.model, self.example_inputs)
                    self._rebuild(traced=traced, probe=False)
            except BaseException:
                self._pending = (None, None, None)  # never a stale graph: the next use traces afresh (and raises again)
                raise

    @property
    def graph(self) -> DependencyGraph:
        """The :class:`~prunable.graph.DependencyGraph` of the model as it is now."""
        self._sync()
        return self._graph

    @property
    def _admission(self) -> Admission:
        self._sync()
        return self._adm

    @property
    def _trials(self) -> Trials:
        self._sync()
        return self._trials_of

    @property
    def _points(self) -> dict[str, MeasurePoint]:
        self._sync()
        return self._points_of

    @property
    def skipped(self) -> dict[str, SkipReason]:
        """Group id → why the group is not pruned (``str()`` it for the message; test ``.kind``)."""
        return self._admission.skipped

    @property
    def caps(self) -> dict[str, int]:
        """Group id → channels the group may still lose (``min_channels``, ``round_to``, ``max_ratio``)."""
        return dict(self._admission.selector.caps)

    @property
    def available(self) -> int:
        """Channels that may still be removed, over all prunable groups."""
        return self._admission.selector.available()

    @property
    def groups(self) -> list[ChannelGroup]:
        """Groups that can be pruned."""
        return [g for g in self.graph.groups if g.id not in self.skipped]

    # -- scores ----------------------------------------------------------------
    @contextlib.contextmanager
    def estimate(self) -> Iterator["Pruner"]:
        """Collect data-driven importance while the block runs forward/backward passes.

        Hooks are removed on exit, also when the block raises. A measured output that
        the model changes in place afterwards is copied in the forward pass, unless an
        in-place ReLU, ReLU6 or Hardtanh module alone changes it (its gradient is zero
        wherever the clamp changed a value, so the clamped output gives the same scores).
        """
        with estimating(self.criterion, list(self._points.values()), InPlaceClamps.modules(self.model)):
            yield self

    def scores(self) -> dict[str, torch.Tensor]:
        """Importance of every channel of every prunable group (lower = pruned first)."""
        penalty = flops_per_channel(self.model, self.example_inputs, self.groups) if self.flops_regularization else {}
        cost = self.ranking_cost(self.groups) if self.ranking_cost is not None else None
        return group_scores(self.groups, self.criterion, self._points, self.aggregation, penalty,
                            self.flops_regularization, device=next(self.model.parameters(), torch.empty(0)).device,
                            cost=cost)

    # -- pruning ---------------------------------------------------------------
    def plan(self, n: int | float = 1, scope: Scope | str = Scope.GLOBAL, *,
             groups: Iterable[str] | None = None) -> Plan:
        """The plan :meth:`step` would apply: the ``n`` least important channels.

        ``n`` is a count, or a float in (0, 1): that fraction of the channels
        (of all prunable groups with the global scope, of each group with the
        layer scope). ``groups`` restricts the choice to those group ids.
        """
        scope = parse_scope(scope)
        selector = self._admission.selector
        if groups is not None:
            selector = selector.only(groups, known=self._admission.all.layouts)
        scores = self.scores()
        return selector.plan({gid: scores[gid] for gid in selector.layouts}, n, scope, self.round_to)

    def step(self, n: int | float = 1, scope: Scope | str = Scope.GLOBAL) -> Plan:
        """Remove the ``n`` least important channels; returns the applied plan.

        A group whose cut breaks the forward pass is skipped from then on (its
        reason in :attr:`skipped`) and the channels are chosen again without it.
        """
        scope = parse_scope(scope)
        tries = iter(range(len(self.graph.groups) + 2))

        def choose() -> Plan:  # after a group is skipped, fewer channels may be left than asked
            if next(tries) and isinstance(n, int) and not isinstance(n, bool):
                return self.plan(min(n, self.available), scope) if self.available else Plan({})
            return self.plan(n, scope)

        return self.step_with(choose)

    def step_with(self, choose: Callable[[], Plan]) -> Plan:
        """Apply the plan ``choose()`` returns, as :meth:`step` does: groups whose cut breaks
        the model are skipped with their reason and ``choose()`` is asked again."""
        for _ in range(len(self.graph.groups) + 1):
            plan = Plan.coerce(choose())
            if not len(plan):
                raise PruningValueError("nothing left to prune: every group is at its minimum")
            if not self.validate or not self.vet(plan):
                self.prune(plan)
                return plan
        raise SurgeryError("no plan passes its trial run; model unchanged")

    def vet(self, plan: Plan | Mapping[str, Iterable[int]]) -> list[tuple[str, str]]:
        """Try ``plan`` on a meta copy; the groups whose cut breaks the forward pass, with the
        error. Those groups are skipped from then on (:attr:`skipped` says why)."""
        plan = Plan.coerce(plan)
        self._admission.all.check(plan.removals, self.skipped, self.min_channels)
        failing = self._trials.failing(plan)
        self._admission.fail(failing, stacklevel=3)
        return failing

    def measure(self, plan: Plan | Mapping[str, Iterable[int]] | None = None) -> dict[str, int]:
        """FLOPs (of the example inputs) and parameters of the model now, or once ``plan`` is
        applied (counted on a meta copy; the model is not touched).

        Raises :class:`SurgeryError` (and skips the culprit groups) if ``plan`` breaks the model.
        """
        if plan is None:
            return sizes(self.model, self.example_inputs)
        plan = Plan.coerce(plan)
        failing = self.vet(plan)
        if failing:
            raise SurgeryError(f"the plan breaks the forward pass: {failing}")
        return self._trials.measure(plan)

    @property
    def baseline(self) -> dict[str, int]:
        """FLOPs and params of the model when the Pruner was created (counted on a meta copy
        kept at the first prune, or on the model itself before it)."""
        return self._start.counts()

    def prune(self, plan: Plan | Mapping[str, Iterable[int]]) -> None:
        """Apply ``plan`` (group id → channel indices) atomically.

        Raises :class:`PruningValueError` for an unknown or skipped group, an
        index out of range or a group left below ``min_channels`` (or beyond its
        ``max_ratio``), and :class:`SurgeryError` if the pruned model would not
        run; in both cases the model and optimizer are unchanged.
        """
        _check_grad_mode()
        plan = Plan.coerce(plan)
        self._admission.all.check(plan.removals, self.skipped, self.min_channels)
        with _gc_paused():
            self._prune(plan)

    def _prune(self, plan: Plan) -> None:
        """The body of :meth:`prune`. The plan's trial run (a plain forward pass of the cut meta
        copy, unless ``vet``/``measure``/``step`` traced it already) guards the cut; the graph of
        the pruned model is rebuilt when next needed (:meth:`_sync`), from that trace or copy."""
        trials = self._trials
        failing = trials.failing(plan, trace=False) if self.validate else []
        if failing:
            gid, error = failing[0]
            raise SurgeryError(f"group {gid}: pruning it breaks the forward pass ({error}); model unchanged")
        traced = trials.traced(plan) if self.validate else None
        # else the meta copy the plain trial cut and ran is traced at the rebuild (not for a model whose
        # config follows its sizes: that copy ran with the config as it was)
        clone = trials.passed_copy(plan) if traced is None and getattr(self.model, "config", None) is None else None
        self._start.keep(self._real)
        apply_cuts(trials.cuts(plan), self.optimizer)
        sync_config(self.model)  # a Hugging Face config follows the new sizes
        self.history.append(plan)
        self.criterion.reset()
        # the rebuild runs no probe trial: this plan's trial guarded the cut, and a group that can no longer
        # lose a channel is found (bisected, skipped with its reason) by the trial of the next plan holding it
        self._pending = (traced, clone, _layout(self.model))

    # -- schedule and report ------------------------------------------------------
    def prune_to(
        self, flops: float | None = None, params: float | None = None, *, latency: float | None = None,
        cost: str | None = None, fine_tune: Callable[[], Any] | None = None, prune_every: int = 1,
        channels_per_step: int | float = 8, progress: bool = True,
        on_step: Callable[[dict[str, Any]], Any] | None = None,
    ) -> list[dict[str, Any]]:
        """Prune step by step until FLOPs and/or params (or the measured latency) are at most
        the given fractions of the model's when the Pruner was created, ending within 1 point
        under a FLOPs/params target when a combination of cuts allows; see
        :func:`prunable.schedule.prune_to`."""
        return schedule.prune_to(self, flops=flops, params=params, latency=latency, cost=cost, fine_tune=fine_tune,
                                 prune_every=prune_every, channels_per_step=channels_per_step, progress=progress,
                                 on_step=on_step)

    def report(self) -> str:
        """A markdown summary, measured now; see :func:`prunable.schedule.report`."""
        return schedule.report(self)

    def widths(self) -> dict[str, int]:
        """Output channels of every producing layer of the current graph."""
        return widths(self.graph.groups)


def _measure_points(model: nn.Module, groups: list[ChannelGroup]) -> dict[str, MeasurePoint]:
    """Where the criterion observes each producer of ``groups``, by module name."""
    modules = dict(model.named_modules())
    return {name: MeasurePoint(name, modules[name], dim, member.target.module)
            for g in groups for (name, dim, _), member in zip(g.measure, g.producers) if dim is not None}


def _layout(model: nn.Module) -> tuple:
    """What a trace of ``model`` depends on besides its code: every module (name, identity,
    train/eval mode) and the shapes of its parameters; compared to tell whether the model
    changed since a prune."""
    return tuple((name, id(m), m.training, tuple(None if p is None else p.shape for p in m._parameters.values()))
                 for name, m in model.named_modules(remove_duplicate=False))


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


def _check_options(min_channels: Any, round_to: Any, flops_regularization: Any, validate: Any) -> None:
    """Refuse bad options before anything is built."""
    if isinstance(min_channels, bool) or not isinstance(min_channels, int) or min_channels < 1:
        raise PruningValueError(f"min_channels={min_channels!r}: an int >= 1 is allowed")
    if round_to is not None and (isinstance(round_to, bool) or not isinstance(round_to, int) or round_to < 1):
        raise PruningValueError(f"round_to={round_to!r}: None or an int >= 1 is allowed")
    if not isinstance(flops_regularization, (bool, int, float)) or (
            not isinstance(flops_regularization, bool) and not 0 <= flops_regularization < math.inf):
        raise PruningValueError(f"flops_regularization={flops_regularization!r}: a number >= 0 or True/False "
                                "is allowed")
    if not isinstance(validate, bool):
        raise PruningValueError(f"validate={validate!r}: True or False is allowed")


def _aggregation(value: Any) -> Aggregation:
    try:
        return Aggregation(value)
    except ValueError:
        choices = ", ".join(repr(a.value) for a in Aggregation)
        raise PruningValueError(f"aggregation={value!r}: choose one of {choices}") from None


def _check_grad_mode() -> None:
    """Pruning inside ``torch.inference_mode()`` is refused."""
    if torch.is_inference_mode_enabled():
        raise PruningValueError("prune() called inside torch.inference_mode(): the pruned "
                                "parameters could never be trained again; call it outside")


def _check_inputs(model: nn.Module, inputs: Any) -> None:
    """Example inputs must sit on the model's device."""
    param = next(model.parameters(), None)
    for t in input_tensors(inputs):
        if param is not None and t.device.type != param.device.type:
            raise PruningValueError(
                f"example input on {t.device} but the model's parameters are on {param.device}")
