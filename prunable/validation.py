"""Validation: try a cut on a ``meta`` copy of the model before touching the model.

A trial applies the cuts of a plan to a parameter-free copy and runs one forward
pass there (no arithmetic). When a plan fails, :func:`failing_groups` bisects it
to the groups whose cuts break the forward pass, so they can be skipped with
their reason while the others are pruned.

Example
-------
>>> import torch
>>> from torch import nn
>>> from prunable.graph import DependencyGraph
>>> net = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Conv2d(8, 4, 3))
>>> x = torch.randn(1, 3, 8, 8)
>>> graph = DependencyGraph(net, x)
>>> trial(net, (x,), graph.cuts({"0": [1, 2]})) is None
True
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from torch import nn

from .flops import count_flops, count_params
from .graph import Traced, cut_copy, trace_cut
from .inputs import call_model, inputs_to
from .meta import MetaShortcuts
from .reasons import SkipKind, SkipReason
from .surgery import Cut

__all__ = ["Trials", "cut_copy", "failing_groups", "invalid_groups", "trial", "trial_failed", "trial_runner",
           "traced_trial"]


def trial(model: nn.Module, example_inputs: Any, cuts: list[Cut], clone: nn.Module | None = None,
          real: str | None = None, *, passed: list[nn.Module] | None = None) -> str | None:
    """Apply ``cuts`` to a copy of ``model`` (see :func:`cut_copy`) and run it.

    Returns the error as one line of text, or None when the cut model runs (then
    the cut copy is appended to ``passed``, when given). ``model`` is never touched.
    """
    try:
        cut = cut_copy(model, cuts, clone, real)
        with torch.no_grad(), MetaShortcuts():
            call_model(cut, example_inputs if real is not None else inputs_to(example_inputs, "meta"))
    except Exception as exc:  # noqa: BLE001 - reported to the caller
        return f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
    if passed is not None:
        passed.append(cut)
    return None


def trial_runner(model: nn.Module, example_inputs: Any, cuts_of: Callable[[dict[str, list[int]]], list[Cut]],
                 clone: nn.Module | None = None, real: str | None = None,
                 ) -> Callable[[Mapping[str, Sequence[int]]], str | None]:
    """``removals → error or None``: a :func:`trial` of the cuts ``cuts_of(removals)``;
    ``clone``, a meta copy of ``model``, serves the first trial (it is cut there)."""
    spare = [clone] if clone is not None else []

    def run(removals: Mapping[str, Sequence[int]]) -> str | None:
        cuts = cuts_of({k: list(v) for k, v in removals.items()})
        return trial(model, example_inputs, cuts, spare.pop() if spare else None, real)

    return run


def invalid_groups(selector: Any, run: Callable[[Mapping[str, Sequence[int]]], str | None] | None,
                   ) -> dict[str, SkipReason]:
    """Groups of ``selector`` (a :class:`~prunable.selection.Selector`) that cannot lose a
    channel, with the reason: every channel is the last of some layer, or removing the
    last one that can go (one per block) breaks the forward pass (``run``, bisected; not
    tried when ``run`` is None)."""
    probe, stuck = selector.probe()
    out = {gid: SkipReason(SkipKind.LAST_CHANNEL) for gid in stuck}
    if run is not None:
        out.update((gid, trial_failed(error)) for gid, error in failing_groups(run, probe))
    return out


def trial_failed(error: str) -> SkipReason:
    """The reason a group whose cut fails with ``error`` is skipped."""
    return SkipReason(SkipKind.TRIAL_FAILED, f"trial prune failed: {error}")


def traced_trial(model: nn.Module, example_inputs: Any, cuts: list[Cut], real: str | None = None) -> Traced | None:
    """Trace ``model`` as ``cuts`` will leave it, on a meta copy; None if that fails.

    A success is the trial run of the cuts and the trace of the pruned model at once.
    """
    try:
        return trace_cut(model, example_inputs, cuts, real=real)
    except Exception:  # noqa: BLE001 - failing_groups names the culprit
        return None


def failing_groups(
    run: Callable[[Mapping[str, Sequence[int]]], str | None], removals: Mapping[str, Sequence[int]],
    base: Mapping[str, Sequence[int]] | None = None,
) -> list[tuple[str, str]]:
    """Groups of ``removals`` whose cuts break the model, with the error (bisection).

    ``run(removals)`` tries removals and returns the error or None. A group is
    blamed when its removal fails on top of ``base`` and of the groups already
    found to pass; what remains after removing the blamed groups passes as a
    whole. About ``2·k·log2(n)`` trials for ``k`` culprits among ``n`` groups.

    Example
    -------
    >>> run = lambda removals: "boom" if "bad" in removals else None
    >>> failing_groups(run, {"a": [0], "bad": [1], "c": [2]})
    [('bad', 'boom')]
    """
    base = dict(base or {})
    error = run({**base, **removals}) if removals else None
    if error is None:
        return []
    if len(removals) == 1:
        return [(next(iter(removals)), error)]
    items = list(removals.items())
    half = len(items) // 2
    first = failing_groups(run, dict(items[:half]), base)
    blamed = {gid for gid, _ in first}
    base.update((gid, idx) for gid, idx in items[:half] if gid not in blamed)
    second = failing_groups(run, dict(items[half:]), base)
    if not first and not second:  # each half passes alone, not together: blame the second half's first
        return [(items[half][0], error)]
    return first + second


class Trials:
    """Trial runs of plans for one graph of ``model`` (``cuts_of``: its :meth:`~prunable.graph.
    DependencyGraph.cuts`). The last plan that passed keeps its traced pruned meta copy, so
    measuring a plan and then pruning it traces the pruned model once.

    Example
    -------
    >>> import torch
    >>> from torch import nn
    >>> from prunable.graph import DependencyGraph
    >>> from prunable.plan import Plan
    >>> net = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Conv2d(8, 4, 3))
    >>> x = torch.randn(1, 3, 8, 8)
    >>> trials = Trials(net, (x,), DependencyGraph(net, x).cuts)
    >>> plan = Plan({"0": (1, 2)})
    >>> trials.failing(plan), trials.pruned_copy(plan)[0].out_channels
    ([], 6)
    """

    def __init__(self, model: nn.Module, example_inputs: Any, cuts_of: Callable[[dict[str, list[int]]], list[Cut]],
                 real: str | None = None) -> None:
        self.model, self.example_inputs, self.cuts_of, self.real = model, example_inputs, cuts_of, real
        self._last: tuple[Any, Traced] | None = None
        self._passed: Any = None  # the last plan whose plain trial passed
        self._passed_copy: nn.Module | None = None  # the meta copy that trial cut and ran
        self._cuts: tuple[Any, list[Cut]] | None = None

    def cuts(self, plan: Any) -> list[Cut]:
        """The cuts of ``plan`` (a :class:`~prunable.plan.Plan`); those of the last plan asked
        are kept (its trial and its real prune cut the same channels)."""
        if self._cuts is None or self._cuts[0] != plan:
            self._cuts = (plan, self.cuts_of({k: list(v) for k, v in plan.removals.items()}))
        return self._cuts[1]

    def runner(self, clone: nn.Module | None = None) -> Callable[[Mapping[str, Sequence[int]]], str | None]:
        """A :func:`trial_runner` for this graph."""
        return trial_runner(self.model, self.example_inputs, self.cuts_of, clone, real=self.real)

    def failing(self, plan: Any, *, trace: bool = True) -> list[tuple[str, str]]:
        """The groups of ``plan`` whose cuts break the forward pass, with the error (bisected).

        With ``trace``, the trial run is traced and, when it passes, its trace is kept
        (:meth:`traced`: the graph of the pruned model at no second trace); without, it is a
        plain forward pass of the cut copy, a few times cheaper. A plan that passed once
        is not tried again.
        """
        if self.traced(plan) is not None or (not trace and self._passed == plan):
            return []
        if trace:
            traced = traced_trial(self.model, self.example_inputs, self.cuts(plan), real=self.real)
            if traced is not None:
                self._last = (plan, traced)
                return []
        elif trial(self.model, self.example_inputs, self.cuts(plan), real=self.real, passed=(kept := [])) is None:
            self._passed, self._passed_copy = plan, kept[0] if self.real is None else None
            return []
        return failing_groups(self.runner(), {k: list(v) for k, v in plan.removals.items()})

    def passed_copy(self, plan: Any) -> nn.Module | None:
        """The meta copy that the last passing plain trial of ``plan`` cut and ran (the model as
        ``plan`` leaves it), handed out once; None for another plan."""
        if self._passed != plan:
            return None
        clone, self._passed_copy = self._passed_copy, None
        return clone

    def traced(self, plan: Any) -> Traced | None:
        """The trace of the model pruned by ``plan``, if ``plan`` is the last that passed."""
        return self._last[1] if self._last is not None and self._last[0] == plan else None

    def measure(self, plan: Any) -> dict[str, int]:
        """FLOPs (of the example inputs) and parameters of the model once ``plan`` is applied."""
        clone = self.pruned_copy(plan)
        return {"flops": count_flops(clone, self.example_inputs), "params": count_params(clone)}

    def pruned_copy(self, plan: Any) -> nn.Module:
        """A copy of the model with ``plan`` applied: the kept traced meta copy, else a fresh one."""
        traced = self.traced(plan)
        if traced is not None and traced.clone is not None:
            return traced.clone
        return cut_copy(self.model, self.cuts(plan), real=self.real)
