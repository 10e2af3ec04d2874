"""Shrink a fresh, unpruned model to the shapes of a pruned one: sizes, shapes, no trace.

:func:`size_attributes` records the integer size attributes of every module
(``out_channels``, ``hidden_dim``, ``head_dim``, ``normalized_shape`` …);
:func:`shrink_to` makes a fresh instance of the same architecture match a
pruned state dict: every parameter or buffer larger than its saved counterpart
keeps its first entries along the shrunk axes (through
:func:`prunable.surgery.apply_cuts`, so parameters stay the same objects) and
every size attribute takes its saved value. The values of the kept entries do
not matter: the caller loads the pruned weights next. :mod:`prunable.io` and
the Lightning callback build on it.

Example
-------
>>> import torch
>>> from torch import nn
>>> pruned, fresh = nn.Conv2d(3, 5, 3), nn.Conv2d(3, 8, 3)
>>> shrink_to(fresh, pruned.state_dict(), size_attributes(pruned))
>>> fresh.load_state_dict(pruned.state_dict())
<All keys matched successfully>
>>> fresh.out_channels
5
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from .errors import PrunableError, PruningValueError
from .surgery import Cut, apply_cuts

__all__ = ["model_device", "module_kinds", "shrink_to", "size_attributes"]


def model_device(model: nn.Module) -> torch.device:
    """The device of the model's first parameter (or buffer); the CPU for a model without tensors.

    Example
    -------
    >>> model_device(nn.Linear(2, 3))
    device(type='cpu')
    """
    tensor = next(model.parameters(), None)
    if tensor is None:
        tensor = next(model.buffers(), None)
    return tensor.device if tensor is not None else torch.device("cpu")


def qualname(module: nn.Module) -> str:
    """``package.module.Class`` of a module."""
    return f"{type(module).__module__}.{type(module).__qualname__}"


def _is_size(value: Any) -> bool:
    """An int, or a non-empty tuple/list of ints (``normalized_shape``); bools are not sizes."""
    if isinstance(value, (tuple, list)):
        return bool(value) and all(_is_size(v) for v in value)
    return isinstance(value, int) and not isinstance(value, bool)


def size_attributes(model: nn.Module) -> dict[str, dict[str, Any]]:
    """Every integer attribute (or tuple of ints) of every module: the sizes a prune may change.

    Example
    -------
    >>> size_attributes(nn.Sequential(nn.Linear(4, 2)))["0"]
    {'in_features': 4, 'out_features': 2}
    """
    return {name: {k: v for k, v in vars(m).items() if _is_size(v)} for name, m in model.named_modules()}


def module_kinds(model: nn.Module) -> dict[str, str]:
    """Qualified class name of every module, by module name (checked by :func:`shrink_to`).

    Example
    -------
    >>> module_kinds(nn.Sequential(nn.ReLU()))["0"]
    'torch.nn.modules.activation.ReLU'
    """
    return {name: qualname(m) for name, m in model.named_modules()}


def shrink_to(
    model: nn.Module, state_dict: Mapping[str, torch.Tensor], sizes: Mapping[str, Mapping[str, Any]], *,
    modules: Mapping[str, str] | None = None, buffers: Mapping[str, torch.Tensor] | None = None,
    source: str = "the file",
) -> None:
    """Shrink an unpruned ``model`` in place to the shapes of ``state_dict`` (weights not loaded).

    Every parameter or buffer larger than its counterpart in ``state_dict`` keeps
    its first entries along the shrunk axes (parameters stay the same objects);
    size attributes take the values in ``sizes`` (:func:`size_attributes` of the
    pruned model); ``buffers`` replace the model's buffers that are not in the
    state dict. Everything is checked before anything changes.

    Raises
    ------
    PruningValueError
        Naming the module and both sizes when the model cannot be shrunk to them
        (another architecture, or a model already pruned differently).

    Example
    -------
    >>> small, big = nn.Linear(4, 2), nn.Linear(6, 2)
    >>> shrink_to(big, small.state_dict(), size_attributes(small))
    >>> big.weight.shape, big.in_features
    (torch.Size([2, 4]), 4)
    """
    named = dict(model.named_modules())
    _check_modules(named, modules, source)
    _check_keys(model, state_dict, source)
    cuts = _shape_cuts(model, named, state_dict, source)
    changes = [(named[name], attr, value) for name, attrs in sizes.items() if name in named
               for attr, value in attrs.items()
               if _is_size(getattr(named[name], attr, None)) and getattr(named[name], attr) != value]
    try:
        apply_cuts(cuts)
    except PrunableError as exc:
        raise PruningValueError(f"the model does not fit {source}: {exc}") from exc
    for module, attr, value in changes:
        setattr(module, attr, type(getattr(module, attr))(value) if isinstance(value, (tuple, list)) else value)
    for name, value in (buffers or {}).items():
        path, _, attr = name.rpartition(".")
        owner = named.get(path)
        if owner is not None and isinstance(getattr(owner, attr, None), torch.Tensor):
            owner.register_buffer(attr, value.to(getattr(owner, attr).device), persistent=False)


def _check_modules(named: Mapping[str, nn.Module], modules: Mapping[str, str] | None, source: str) -> None:
    if modules is None:
        return
    for name, kind in modules.items():
        if name not in named:
            raise PruningValueError(f"the model has no module {name!r} ({kind} in {source}): another architecture")
        # the class, not where it was defined (a script's __main__.Net is an imported mypkg.Net); the top
        # module may be a subclass (a LightningModule with a loading hook): its children and shapes decide
        if name and not kind.endswith(f".{type(named[name]).__qualname__}"):
            raise PruningValueError(f"module {name!r} is a {kind} in {source} but a {qualname(named[name])} "
                                    "in the model: another architecture")
    extra = [n for n in named if n not in modules]
    if extra:
        raise PruningValueError(f"the model has modules {source} lacks, e.g. {extra[0]!r}: another architecture")


def _check_keys(model: nn.Module, state_dict: Mapping[str, torch.Tensor], source: str) -> None:
    keys = set(model.state_dict())
    missing, unexpected = sorted(set(state_dict) - keys), sorted(keys - set(state_dict))
    if missing or unexpected:
        what = f"lacks {missing[:3]}" if missing else f"has {unexpected[:3]}, not in {source}"
        raise PruningValueError(f"the weights in {source} do not fit the model: the model {what}")


def _shape_cuts(model: nn.Module, named: Mapping[str, nn.Module], state_dict: Mapping[str, torch.Tensor],
                source: str) -> list[Cut]:
    """One cut per shrunk axis of every parameter and persistent buffer."""
    cuts = []
    tensors = dict(model.named_parameters())
    tensors.update((k, v) for k, v in model.named_buffers() if k in state_dict)
    for key, tensor in tensors.items():
        saved = state_dict[key]
        if not isinstance(saved, torch.Tensor) or saved.shape == tensor.shape:
            continue
        path, _, attr = key.rpartition(".")
        old, new = tuple(tensor.shape), tuple(saved.shape)
        if len(old) != len(new) or any(n > o for n, o in zip(new, old)):
            raise PruningValueError(
                f"{f'module {path!r}' if path else 'the top module'}: {attr} has shape {list(new)} in {source} but "
                f"{list(old)} in the model; load into a fresh, unpruned instance of the saved architecture")
        cuts += [Cut(named[path], None, torch.arange(n), param=attr, axis=axis, name=path)
                 for axis, (n, o) in enumerate(zip(new, old)) if n != o]
    return cuts
