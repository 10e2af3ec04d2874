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

import copy
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from torch import nn

from .copies import meta_clone
from .graph import Traced, trace_cut
from .inputs import call_model, inputs_to
from .meta import MetaShortcuts
from .reasons import SkipKind, SkipReason
from .surgery import Cut, apply_cuts

__all__ = ["cut_copy", "failing_groups", "invalid_groups", "trial", "trial_runner", "traced_trial"]


def cut_copy(model: nn.Module, cuts: list[Cut], clone: nn.Module | None = None,
             real: str | None = None) -> nn.Module:
    """A copy of ``model`` with ``cuts`` applied: ``clone`` (a copy to cut), else a meta copy,
    else (``real`` says why the forward pass needs real values) a real one."""
    if clone is None:
        clone = meta_clone(model) if real is None else copy.deepcopy(model)
    twin = dict(zip((id(m) for m in model.modules()), clone.modules()))
    apply_cuts([Cut(twin[id(c.module)], c.role, c.keep, c.param, c.axis, c.name) for c in cuts])
    return clone


def trial(model: nn.Module, example_inputs: Any, cuts: list[Cut], clone: nn.Module | None = None,
          real: str | None = None) -> str | None:
    """Apply ``cuts`` to a copy of ``model`` (see :func:`cut_copy`) and run it.

    Returns the error as one line of text, or None when the cut model runs.
    ``model`` is never touched.
    """
    try:
        cut = cut_copy(model, cuts, clone, real)
        with torch.no_grad(), MetaShortcuts():
            call_model(cut, example_inputs if real is not None else inputs_to(example_inputs, "meta"))
    except Exception as exc:  # noqa: BLE001 - reported to the caller
        return f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
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


def invalid_groups(selector: Any, run: Callable[[Mapping[str, Sequence[int]]], str | None],
                   ) -> dict[str, SkipReason]:
    """Groups of ``selector`` (a :class:`~prunable.selection.Selector`) that cannot lose a
    channel, with the reason: every channel is the last of some layer, or removing the
    last one that can go (one per block) breaks the forward pass (``run``, bisected)."""
    probe, stuck = selector.probe()
    out = {gid: SkipReason(SkipKind.LAST_CHANNEL) for gid in stuck}
    out.update((gid, SkipReason(SkipKind.TRIAL_FAILED, f"trial prune failed: {error}"))
               for gid, error in failing_groups(run, probe))
    return out


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
