"""Meta copies of a model: a deep copy whose tensors live on the ``meta`` device.

Tracing (:mod:`prunable.graph`), trial prunes and FLOPs counts (:mod:`prunable.flops`)
run on such copies: no memory for the weights, no arithmetic, and the model
itself is never touched.

Example
-------
>>> import torch
>>> from torch import nn
>>> net = nn.Sequential(nn.Linear(2, 3))
>>> net.cache = [torch.ones(4)]          # a tensor a forward pass left in an attribute
>>> clone = meta_clone(net)
>>> clone[0].weight.is_meta, clone.cache[0].is_meta, net.cache[0].is_meta
(True, True, False)
"""

from __future__ import annotations

import copy
import itertools
from collections import OrderedDict
from typing import Any

import torch
from torch import nn

from .staging import is_parameter
from .surgery import handler_for

__all__ = ["meta_clone"]


def meta_clone(model: nn.Module) -> nn.Module:
    """A deep copy of ``model`` whose tensors live on ``meta``: parameters, buffers and
    tensors held in plain attributes (anchor grids, strides, masks, rotary caches a
    forward pass left behind), also inside lists, tuples and dicts held by a module."""
    memo: dict[int, Any] = {}
    modules = list(model.modules())  # one walk of the tree serves both loops
    for module in modules:
        for t in itertools.chain(module._parameters.values(), module._buffers.values()):
            if t is not None and id(t) not in memo:
                memo[id(t)] = _meta_tensor(t)
    for module in modules:  # tensors held elsewhere get their twins before anything is deep-copied
        for key, value in module.__dict__.items():
            kind = type(value)
            if kind in _ATOMIC or (key in _OWN_TABLES and not value):  # an empty table: made afresh below
                continue
            if kind in _FLAT:
                if id(value) not in memo:  # (a table in memo was copied: its tensors are in memo too)
                    copied = _flat_copy(value, memo)
                    if copied is not None:
                        memo[id(value)] = copied
                    elif key not in _TABLES:
                        _meta_attributes(value, memo)
            elif not (kind is tuple and _atoms(value)):  # a tuple of sizes holds no tensor
                _meta_attributes(value, memo)
    return _copy_module(model, memo, {})


#: a module's own tables: parameters, buffers and submodules are copied by the loops above
_TABLES = frozenset({"_parameters", "_buffers", "_modules"})
#: every table ``nn.Module`` makes for itself (hooks, name sets): never shared with another module
_OWN_TABLES = frozenset(k for k, v in vars(nn.Module()).items() if type(v) in (dict, OrderedDict, set))
_META = torch.device("meta")


def _meta_tensor(t: torch.Tensor) -> torch.Tensor:
    meta = torch.empty_like(t, device=_META)
    return nn.Parameter(meta, requires_grad=t.requires_grad) if is_parameter(t) else meta


def _meta_attributes(value: Any, memo: dict[int, Any], depth: int = 0) -> None:
    """Put a meta twin in ``memo`` for every tensor in ``value`` (a tensor, or a list,
    tuple or dict of them, nested), so ``deepcopy`` copies it onto ``meta``."""
    if isinstance(value, torch.Tensor):
        if id(value) not in memo:
            memo[id(value)] = _meta_tensor(value)
    elif type(value) in (list, tuple, dict, OrderedDict) and depth < 8:
        for item in value.values() if isinstance(value, dict) else value:
            if type(item) not in _ATOMIC:
                _meta_attributes(item, memo, depth + 1)


#: values ``copy.deepcopy`` returns as they are
_ATOMIC = frozenset({int, float, bool, str, bytes, type(None), torch.dtype, torch.device, torch.layout,
                     torch.memory_format, type, range})


def _copy_module(module: nn.Module, memo: dict[int, Any], classes: dict[type, tuple]) -> nn.Module:
    """``copy.deepcopy(module, memo)`` for plain modules, without deepcopy's per-attribute
    dispatch for the atoms (ints, tuples of ints, strings …) that make up most of a
    module's state; modules with their own copy protocol go through ``deepcopy``.
    ``classes``: what is known of each class (its handler, whether it copies itself)."""
    if id(module) in memo:
        return memo[id(module)]
    known = classes.get(type(module))
    if known is None:
        known = classes[type(module)] = (handler_for(module), _own_protocol(type(module)))
    handler, protocol = known
    local = handler.meta_type(module) if handler is not None else None  # SyncBatchNorm → a BatchNorm
    if local is None and protocol:
        return copy.deepcopy(module, memo)
    cls = local or type(module)
    new = cls.__new__(cls)
    memo[id(module)] = new
    state = module.__dict__.copy()  # the atoms, as deepcopy returns them; everything else is replaced below
    dropped = getattr(local, "dropped_state", ())
    for key, value in module.__dict__.items():
        kind = type(value)
        if kind in _ATOMIC:
            if key in dropped:
                state[key] = None
        elif key in dropped or key == "_compiled_call_impl":  # copies run eagerly (``module.compile()``)
            state[key] = None
        elif id(value) in memo:  # a tensor, or a table copied by meta_clone: what deepcopy returns
            state[key] = memo[id(value)]
        elif key in _OWN_TABLES and kind in _FLAT and not value:  # what deepcopy makes of an empty table
            state[key] = kind()
        elif kind is tuple and _atoms(value):
            continue
        elif key == "_modules" and kind in _FLAT:
            state[key] = kind((k, None if m is None else _copy_module(m, memo, classes)) for k, m in value.items())
        elif kind is list and _atoms(value):  # what deepcopy makes of a list of atoms, remembered as it would
            state[key] = memo[id(value)] = list(value)
        else:
            state[key] = copy.deepcopy(value, memo)
    new.__setstate__(state)
    return new


def _own_protocol(cls: type) -> bool:
    """True if ``cls`` overrides one of deepcopy's protocol methods (:data:`_PROTOCOL`)."""
    return any(getattr(cls, name, None) is not getattr(nn.Module, name, None) for name in _PROTOCOL)


def _atoms(values: tuple | list) -> bool:
    """True when every item of ``values`` is an atom (``deepcopy`` returns it as it is)."""
    return all(map(_ATOMIC.__contains__, map(type, values)))


#: a class overriding one of these copies itself; ``__setstate__`` alone (``Conv2d``'s) is honoured
#: by :func:`_copy_module`, which calls it as ``deepcopy`` would
_PROTOCOL = ("__deepcopy__", "__reduce_ex__", "__reduce__", "__getstate__")


_FLAT = (OrderedDict, dict, set)


def _flat_copy(value: Any, memo: dict[int, Any]) -> Any:
    """What ``copy.deepcopy(value, memo)`` returns, made directly, for a module's
    tensor and hook tables and name sets (``deepcopy`` is slow on ``OrderedDict``
    and ``set``); None for anything else."""
    kind = type(value)
    if kind is dict or kind is OrderedDict:
        copied = kind()
        for k, v in value.items():
            twin = None if v is None else memo.get(id(v), _MISSING)
            if type(k) is not str or twin is _MISSING:
                return None
            copied[k] = twin
        return copied
    if kind is set and all(type(v) is str for v in value):
        return set(value)
    return None


#: what ``memo.get`` answers for an object not copied yet
_MISSING = object()
