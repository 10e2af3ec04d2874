"""Plans made on one instance of an architecture, applied to another: plan on ``meta``, cut the real weights.

A model too large to hold twice (or to hold at all while planning) can be built
on the ``meta`` device (``with torch.device("meta"): model = build()``): a
:class:`~prunable.Pruner` over it traces, groups and trial-runs plans without a
byte of weights. Scores that read values (L1, BN scales, Taylor) do not exist
there: plan with a data-free criterion (``"random"``) or with explicit channel
indices. :func:`export_plan` turns a plan into plain JSON data holding the plan
and the shape of every parameter and buffer of the model it was made for;
:func:`apply_plan` checks those shapes against the real model (naming the
module and both shapes on a mismatch, the model untouched), then traces the
real model once (on a meta copy), trial-runs the plan there and cuts the real
tensors, all or nothing.

Example
-------
>>> import json, torch
>>> from torch import nn
>>> from prunable import Pruner
>>> def build():
...     return nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Conv2d(8, 4, 3))
>>> with torch.device("meta"):
...     planned = build()
>>> pruner = Pruner(planned, torch.empty(1, 3, 8, 8, device="meta"), criterion="random")
>>> text = json.dumps(export_plan(pruner, {"0": [1, 5]}))
>>> real = build()
>>> _ = apply_plan(real, json.loads(text), torch.randn(1, 3, 8, 8))
>>> real[0].out_channels, real[2].weight.shape[1]
(6, 6)
"""

from __future__ import annotations

import warnings
from collections.abc import Iterable, Mapping
from typing import Any

import torch
from torch import nn

from .distributed import unwrap
from .errors import PruningValueError, SurgeryError
from .importance import Random
from .plan import Plan
from .pruner import Pruner

__all__ = ["PLAN_FORMAT", "apply_plan", "check_shapes", "export_plan", "tensor_shapes"]

#: The ``"format"`` value of a record written by :func:`export_plan`.
PLAN_FORMAT = "prunable-plan/1"


def tensor_shapes(model: nn.Module) -> dict[str, list[int]]:
    """Shape of every parameter and buffer of ``model``, by qualified name (any device, ``meta`` too).

    Example
    -------
    >>> tensor_shapes(nn.Linear(3, 2))
    {'weight': [2, 3], 'bias': [2]}
    """
    named = dict(model.named_parameters())
    named.update(model.named_buffers())
    return {name: list(t.shape) for name, t in named.items()}


def export_plan(pruner: Pruner, plan: Plan | Mapping[str, Iterable[int]]) -> dict[str, Any]:
    """``plan`` (not yet applied) for ``pruner.model`` as JSON-able data, with the model's tensor shapes.

    The plan is checked against the pruner's groups and constraints and trial-run
    on a meta copy first (:meth:`Pruner.vet`); ``pruner.model`` is not changed.

    Parameters
    ----------
    pruner
        A Pruner over the model the plan was made for (its parameters may be on ``meta``).
    plan
        A :class:`~prunable.Plan` or ``{group id: channel indices}``.

    Returns
    -------
    dict
        ``{"format": PLAN_FORMAT, "plan": {group id: [indices]}, "shapes": {tensor name: shape}}``.

    Raises
    ------
    PruningValueError
        An unknown or skipped group, an index out of range, a group left below its minimum.
    SurgeryError
        The plan breaks the forward pass of the model (the culprit groups are named).

    Example
    -------
    >>> net = nn.Sequential(nn.Linear(4, 6), nn.ReLU(), nn.Linear(6, 2))
    >>> record = export_plan(Pruner(net, torch.zeros(1, 4), criterion="random"), {"0": [2]})
    >>> record["plan"], record["shapes"]["0.weight"]
    ({'0': [2]}, [6, 4])
    """
    plan = Plan.coerce(plan)
    failing = pruner.vet(plan)
    if failing:
        raise SurgeryError(f"the plan breaks the forward pass of {type(pruner.model).__name__}: {failing}")
    return {"format": PLAN_FORMAT, "plan": plan.to_dict(), "shapes": tensor_shapes(pruner.model)}


def apply_plan(model: nn.Module, plan: Plan | Mapping[str, Any], example_inputs: Any, *,
               optimizer: torch.optim.Optimizer | None = None) -> nn.Module:
    """Apply a plan made on another instance of ``model``'s architecture (e.g. a ``meta`` copy), in place.

    Parameters
    ----------
    model
        The model to prune: same architecture and widths as the model the plan was made for.
    plan
        A record from :func:`export_plan` (its shapes are checked first), a
        :class:`~prunable.Plan` or ``{group id: channel indices}`` (not checked: the
        group ids and index ranges still are).
    example_inputs
        Inputs of one forward pass of ``model`` (as for :class:`~prunable.Pruner`).
    optimizer
        An optimizer whose per-parameter state is sliced with the parameters.

    Returns
    -------
    nn.Module
        ``model``, pruned.

    Raises
    ------
    PruningValueError
        ``model`` does not have the recorded shapes (the module and both shapes are
        named), the record is malformed, or the plan does not fit its groups.
    SurgeryError
        The plan breaks the forward pass of ``model``.

    In every case ``model`` (and ``optimizer``) is left exactly as it was.

    Example
    -------
    >>> net = nn.Sequential(nn.Linear(4, 6), nn.ReLU(), nn.Linear(6, 2))
    >>> apply_plan(net, {"0": [0, 3]}, torch.zeros(1, 4))[2]
    Linear(in_features=4, out_features=2, bias=True)
    """
    plan, shapes = _unpack(plan)
    target = unwrap(model)
    if shapes is not None:
        check_shapes(target, shapes)
    with warnings.catch_warnings():  # groups the plan leaves alone need no warning here
        warnings.filterwarnings("ignore", message="prunable: group .* is not pruned")
        pruner = Pruner(target, example_inputs, criterion=Random(), validate=False, optimizer=optimizer)
    failing = pruner.vet(plan)  # checks groups, ranges and minimums, then a trial run on a meta copy
    if failing:
        raise SurgeryError(f"the plan breaks the forward pass of {type(target).__name__}: {failing}; "
                           "model unchanged")
    pruner.prune(plan)
    return model


def _unpack(plan: Plan | Mapping[str, Any]) -> tuple[Plan, Mapping[str, Any] | None]:
    """The plan and the recorded shapes (None for a bare plan) of ``plan``."""
    if isinstance(plan, Plan) or "format" not in plan:
        return Plan.coerce(plan), None
    if plan.get("format") != PLAN_FORMAT or not isinstance(plan.get("plan"), Mapping) \
            or not isinstance(plan.get("shapes"), Mapping):
        raise PruningValueError(f"a plan record is {{'format': {PLAN_FORMAT!r}, 'plan': {{...}}, 'shapes': "
                                f"{{...}}}}, got format {plan.get('format')!r} and keys {sorted(plan)}")
    return Plan.coerce(plan["plan"]), plan["shapes"]


def check_shapes(model: nn.Module, shapes: Mapping[str, Any]) -> None:
    """Raise :class:`PruningValueError` unless ``model``'s tensors have exactly ``shapes``
    (:func:`tensor_shapes` of the model a plan was made for); the message names the module,
    the tensor and both shapes.

    Example
    -------
    >>> check_shapes(nn.Linear(3, 2), {"weight": [2, 4], "bias": [2]})
    Traceback (most recent call last):
    ...
    prunable.errors.PruningValueError: the top module: weight has shape [2, 3] in the model but [2, 4] \
in the plan's model; the plan was made for another architecture or width, model unchanged
    """
    own = tensor_shapes(model)
    for name, shape in shapes.items():
        path, _, attr = str(name).rpartition(".")
        where = f"module {path!r}" if path else "the top module"
        if name not in own:
            raise PruningValueError(f"{where}: the model has no tensor {attr!r} (shape {list(shape)} in the "
                                    "plan's model): another architecture, model unchanged")
        if own[name] != list(shape):
            raise PruningValueError(f"{where}: {attr} has shape {own[name]} in the model but {list(shape)} in "
                                    "the plan's model; the plan was made for another architecture or width, "
                                    "model unchanged")
    extra = sorted(set(own) - set(shapes))
    if extra:
        raise PruningValueError(f"the model has tensors the plan's model lacks, e.g. {extra[0]!r} "
                                f"(shape {own[extra[0]]}): another architecture, model unchanged")
