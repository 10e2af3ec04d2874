"""A model's configuration object (Hugging Face ``model.config``) follows its pruned sizes.

A Hugging Face model is built from a config (``LlamaForCausalLM(config)``); after
pruning, ``config.intermediate_size``, ``config.head_dim`` or ``config.hidden_size``
should describe the pruned model. Which field sizes which tensor is never guessed
from names: :func:`sync_config` rebuilds the model from candidate configs on the
``meta`` device (no memory, no weights) and accepts a new field value only when
every tensor whose size that field changes then has exactly the pruned model's
shape. A field is never changed when the layers disagree (layer 0 keeps 36
feed-forward channels, layer 1 keeps 40): one number cannot describe both, and a
:class:`ConfigWarning` names the tensors the config does not describe.

The candidate values come from the pruned model itself: an integer module attribute
the pruning rewrote (``self_attn.head_dim``, kept equal to its channels by the
size-attribute rule of :mod:`prunable.trace`), tried as the config field of the same
name, and each new size along an axis whose old size equalled a field. Once a config is
accepted, integer attributes that the rebuilt modules derive from it
(``mlp.intermediate_size``) are copied to the pruned modules whose tensors have
the rebuilt shapes.

Example
-------
>>> import torch
>>> from torch import nn
>>> class Config:
...     def __init__(self, width=8):
...         self.width = width
...     def to_dict(self):
...         return dict(vars(self))
>>> class Net(nn.Module):
...     def __init__(self, config):
...         super().__init__()
...         self.config, self.width = config, config.width
...         self.a, self.b = nn.Linear(4, config.width), nn.Linear(config.width, 2)
>>> net = Net(Config())
>>> net.a, net.b = nn.Linear(4, 5), nn.Linear(5, 2)      # pruned to 5 channels
>>> sync_config(net)
[]
>>> net.config.width, net.width
(5, 5)
"""

from __future__ import annotations

import copy
import warnings
from typing import Any

import torch
from torch import nn

__all__ = ["ConfigWarning", "sync_config"]


class ConfigWarning(UserWarning):
    """The pruned model has sizes its config cannot describe (they differ between layers)."""


Shapes = dict[str, tuple[int, ...]]


def _shapes(model: nn.Module) -> Shapes:
    """Shape of every parameter and persistent buffer (what ``state_dict`` holds)."""
    return {k: tuple(v.shape) for k, v in model.state_dict(keep_vars=True).items() if isinstance(v, torch.Tensor)}


def _build(model: nn.Module, config: Any) -> nn.Module:
    """``type(model)(config)`` on the meta device, quietly."""
    with torch.device("meta"), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return type(model)(config)


def _fields(config: Any) -> dict[str, int]:
    """The top-level integer fields of ``config``."""
    try:
        items = config.to_dict().items()
    except Exception:  # noqa: BLE001 - not a config object
        return {}
    return {k: v for k, v in items if type(v) is int and getattr(config, k, None) == v}


def _candidates(model: nn.Module, base: nn.Module, fields: dict[str, int], reference: Shapes,
                actual: Shapes) -> list[tuple[str, int]]:
    """``(field, value)`` pairs worth trying: integer attributes the pruning rewrote (a field the
    model reads with ``getattr(config, "head_dim", ...)`` may be missing from the config), then
    the new sizes of axes whose old size equalled a field."""
    seen: dict[tuple[str, int], None] = {}
    built = dict(base.named_modules())
    for name, module in model.named_modules():
        if module._parameters or module._buffers:  # a layer's own sizes (Linear.out_features): not a config's
            continue
        old = vars(built[name]) if name in built else {}
        for k, v in vars(module).items():
            if type(v) is int and type(old.get(k)) is int and v != old[k] and not k.startswith("_"):
                seen.setdefault((k, v))
    for key, shape in actual.items():
        for old, new in zip(reference[key], shape):
            if old != new:
                for k, v in fields.items():
                    if v == old:
                        seen.setdefault((k, new))
    return list(seen)


def _mismatched(actual: Shapes, shapes: Shapes) -> set[str]:
    return {k for k, v in actual.items() if shapes.get(k) != v}


def _copy_attributes(model: nn.Module, before: nn.Module, after: nn.Module) -> None:
    """Integer attributes the new config changes, on modules whose own tensors have the new shapes."""
    old, new = dict(before.named_modules()), dict(after.named_modules())
    for name, module in model.named_modules():
        a, b = old.get(name), new.get(name)
        if a is None or b is None or type(a) is not type(module):
            continue
        own = {k: tuple(t.shape) for k, t in module.state_dict(keep_vars=True).items() if "." not in k}
        if own != {k: tuple(t.shape) for k, t in b.state_dict(keep_vars=True).items() if "." not in k}:
            continue
        for k, v in vars(b).items():
            if type(v) is int and vars(a).get(k) != v and vars(module).get(k) == vars(a).get(k):
                setattr(module, k, v)


def _with(config: Any, fields: dict[str, int]) -> Any:
    """A copy of ``config`` with ``fields`` set."""
    out = copy.deepcopy(config)
    for k, v in fields.items():
        setattr(out, k, v)
    return out


def _own_config(model: nn.Module, config: Any, fields: dict[str, int]) -> None:
    """Give ``model`` its own copy of ``config`` with ``fields`` set: every module holding the
    shared object gets the copy (the caller's config, and other models built from it, keep theirs)."""
    mine = _with(config, fields)  # accepted: they were set on a copy once already
    for module in model.modules():
        for k, v in list(vars(module).items()):
            if v is config:
                setattr(module, k, mine)


def sync_config(model: nn.Module) -> list[str]:
    """Update ``model.config`` (and the integer attributes derived from it) to the model's sizes.

    Does nothing for a model without a ``config`` that ``type(model)(config)`` builds. The
    model's modules get a copy of the config: the object the model was built from is left as it was.
    Returns the names of the tensors whose sizes the config still does not describe
    (and warns with :class:`ConfigWarning` when there are any).

    Example
    -------
    >>> sync_config(nn.Linear(2, 2))
    []
    """
    config = getattr(model, "config", None)
    fields = _fields(config)
    if not fields:
        return []
    actual = _shapes(model)
    try:
        base = _build(model, config)
    except Exception:  # noqa: BLE001 - not buildable from its config: nothing to keep in sync
        return []
    reference = _shapes(base)
    if reference.keys() != actual.keys() or any(len(reference[k]) != len(v) for k, v in actual.items()):
        return []
    wrong, accepted, build, built = _mismatched(actual, reference), {}, base, reference
    for field, value in _candidates(model, base, fields, reference, actual) if wrong else ():
        if field in accepted:
            continue
        try:
            rebuilt = _build(model, _with(config, {**accepted, field: value}))
        except Exception:  # noqa: BLE001 - the config refuses the value (heads must divide the width)
            continue
        shapes = _shapes(rebuilt)
        changed = {k for k, v in shapes.items() if v != built.get(k)}
        if changed and not changed & _mismatched(actual, shapes) and shapes.keys() == actual.keys():
            accepted[field], build, built, wrong = value, rebuilt, shapes, _mismatched(actual, shapes)
    if accepted:
        _own_config(model, config, accepted)
        _copy_attributes(model, base, build)
    if wrong:
        warnings.warn(f"prunable: {type(model).__name__}.config cannot describe the pruned sizes of "
                      f"{', '.join(sorted(wrong)[:4])}{' …' if len(wrong) > 4 else ''} (they differ from "
                      "layer to layer or follow no config field); save and load the model with "
                      "prunable.save / prunable.load", ConfigWarning, stacklevel=3)
    return sorted(wrong)
