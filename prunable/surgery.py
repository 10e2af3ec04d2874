"""Cutting channels out of real tensors, transactionally.

This module is the single place where parameters, buffers, gradients and
optimizer state are sliced. Both doors of prunable use it: the drop-in layers of
:mod:`prunable.nn` and the automatic :class:`prunable.Pruner`.

A :class:`Cut` says "keep these indices of this module's inputs (or outputs)".
:func:`apply_cuts` first checks every cut, then slices and swaps one module at a
time; if a cut is invalid, or anything fails on the way, nothing is modified. Parameters are sliced *in place*
(``param.data = ...``) so the ``nn.Parameter`` objects, and therefore an
optimizer built before pruning, stay valid.

How a module type is cut is described by a :class:`ModuleHandler`, registered
with :func:`register_handler`.

Example
-------
>>> import torch
>>> from torch import nn
>>> conv = nn.Conv2d(3, 8, 3)
>>> apply_cuts([Cut(conv, Role.OUT, keep_indices(8, [0, 5]))])
>>> conv.weight.shape, conv.out_channels
(torch.Size([6, 3, 3, 3]), 6)
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.nn.utils import parametrize

from .errors import PruningValueError, SurgeryError
from .handlers import (
    ModuleHandler, ParametrizationHandler, Role, handler_for, is_depthwise, register_handler, registered_types,
    unregister_handler,
)
from .staging import SurgeryStats, Undo, nbytes, roll_back, size_attributes, stage, swap

__all__ = [
    "Role",
    "Cut",
    "ModuleHandler",
    "register_handler",
    "handler_for",
    "registered_types",
    "unregister_handler",
    "is_depthwise",
    "resolve",
    "cut_slices",
    "channel_parameters",
    "parametrized",
    "parametrization_problem",
    "check_copyable",
    "originals",
    "apply_cuts",
    "keep_indices",
    "check_indices",
    "slice_optimizer_state",
    "ParametrizationHandler",
    "SurgeryStats",
]


def check_indices(index: int | Iterable[int], size: int, layer: str) -> list[int]:
    """Validate channel indices to remove from a dimension of ``size`` channels.

    Returns the sorted unique indices. Raises :class:`PruningValueError` naming
    ``layer`` and the value if an index is out of range, if nothing is given, or
    if every channel would be removed.
    """
    if isinstance(index, torch.Tensor):
        index = index.tolist()
    items = [index] if isinstance(index, int) else list(index)
    if not items:
        raise PruningValueError(f"{layer}: no channel index given")
    for i in items:
        if isinstance(i, bool) or not isinstance(i, int):
            raise PruningValueError(f"{layer}: channel index {i!r} is not an int")
        if not 0 <= i < size:
            raise PruningValueError(f"{layer}: channel index {i} out of range [0, {size})")
    unique = sorted(set(items))
    if len(unique) >= size:
        raise PruningValueError(
            f"{layer}: removing {len(unique)} of {size} channels would leave none"
        )
    return unique


def keep_indices(size: int, remove: Iterable[int], device: torch.device | None = None) -> torch.Tensor:
    """Sorted ``LongTensor`` of the indices in ``range(size)`` not in ``remove``."""
    mask = torch.ones(size, dtype=torch.bool)
    removed = list(remove)
    if removed:
        mask[torch.as_tensor(removed, dtype=torch.long)] = False
    return torch.nonzero(mask).flatten().to(device) if device else torch.nonzero(mask).flatten()


@dataclass(frozen=True)
class Cut:
    """Keep ``keep`` along one channel axis of a module.

    With ``param=None`` the module's registered handler decides which tensors
    to slice for ``role``; with ``param`` set, only that parameter or buffer is
    sliced along ``axis`` (used for bare parameters such as a layer scale).
    """

    module: nn.Module
    role: Role | None
    keep: torch.Tensor
    param: str | None = None
    axis: int = 0
    name: str = ""
    #: an object whose ``bound(keep)`` has ``resize(module, role, n)``, run after the cut
    #: (rescaling the queries of an attention: :class:`prunable.sdpa.QueryScale`)
    rescale: Any = None

    def label(self) -> str:
        who = self.name or type(self.module).__name__
        return f"{who}.{self.param}" if self.param else f"{who}.{self.role.value if self.role else ''}"


@dataclass
class _Pending:
    owner: nn.Module
    attr: str
    tensor: torch.Tensor
    axes: dict[int, torch.Tensor]


def _expand(cuts: Sequence[Cut]) -> tuple[dict[tuple[int, str], _Pending], list[tuple]]:
    """Turn cuts into per-tensor slicing orders and attribute updates."""
    pending: dict[tuple[int, str], _Pending] = {}
    resizes: list[tuple] = []
    for cut in cuts:
        slices, sizes = cut_slices(cut)
        resizes += sizes
        for owner, attr, tensor, axis, keep in slices:
            entry = pending.get((id(owner), attr))
            if entry is None:
                pending[id(owner), attr] = _Pending(owner, attr, tensor, {axis: keep})
                continue
            if axis in entry.axes and not torch.equal(entry.axes[axis], keep):
                raise SurgeryError(f"{cut.label()}: axis {axis} of {attr!r} cut twice differently")
            entry.axes[axis] = keep
    return pending, resizes


TensorSlice = tuple[nn.Module, str, torch.Tensor, int, torch.Tensor]


def cut_slices(cut: Cut) -> tuple[list[TensorSlice], list[tuple]]:
    """What ``cut`` slices: ``(owner, attribute, tensor, axis, indices kept)`` per tensor,
    and the ``(handler, module, role, n)`` size updates to make afterwards.

    Weights under ``torch.nn.utils.parametrize`` resolve to their original tensors
    (and the parametrization's own state). Raises :class:`SurgeryError` naming
    the cut when it would leave nothing or an index is out of range.
    """
    module, role, full = cut.module, cut.role, cut.keep
    kept = full.shape[0]
    if kept == 0:
        raise SurgeryError(f"{cut.label()}: the cut would leave no channels")
    if cut.param is None:
        handler = handler_for(module)
        if handler is None:
            raise SurgeryError(f"{cut.label()}: no handler for {type(module).__name__}; "
                               "register one with prunable.register_handler")
        names = handler.params(module, role)
        resizes: list[tuple] = [(handler, module, role, kept)]
    else:
        handler, names, resizes = _BARE, {cut.param: cut.axis}, []
    out: list[TensorSlice] = []
    top = None  # the largest index kept, read once (when a tensor needs it) and checked against each tensor
    for name, axis in names.items():
        keep = handler.local_keep(module, role, name, full)
        owner, attr = resolve(module, name) if "." in name else (module, name)
        if parametrized(owner, attr):
            out += _parametrized_slices(cut, owner, attr, axis, keep)
            continue
        tensor = _tensor_of(owner, attr)
        if cut.param is not None and isinstance(tensor, int) and not isinstance(tensor, bool):
            resizes.append((_AttributeSize(attr), owner, role, keep.shape[0]))  # a size attribute
        elif tensor is not None:
            if keep is not full:  # a handler's own indices (grouped convolutions)
                out.append(_checked(cut, owner, attr, tensor, axis % tensor.dim(), keep))
                continue
            if top is None:
                top = int(full.max())
            out.append(_checked(cut, owner, attr, tensor, axis % tensor.dim(), keep, top))
    if cut.rescale is not None:
        resizes.append((cut.rescale.bound(full), module, role, kept))
    return out, resizes


#: the handler of a cut naming its tensor (``Cut.param``): slices it as it is, resizes nothing
_BARE = ModuleHandler()


def _tensor_of(owner: nn.Module, attr: str) -> Any:
    """``getattr(owner, attr, None)``, read straight from the module's parameter and buffer
    tables when it is there (``nn.Module.__getattr__`` is the slow path of attribute lookup)."""
    tables = owner.__dict__
    for table in (tables.get("_parameters"), tables.get("_buffers")):
        if table is not None and attr in table:
            return table[attr]
    return getattr(owner, attr, None)


def channel_parameters(cut: Cut) -> list[tuple[nn.Parameter, int, torch.Tensor]]:
    """The parameters holding channels ``cut.keep`` of ``cut``'s side: ``(parameter, axis,
    indices)`` per parameter, through the handler (grouped positions, parametrization
    originals). Buffers (running statistics) are left out. What zeroing a channel
    touches: the oracle ranking and the "pruned equals zeroed" tests use it.

    Example
    -------
    >>> conv = nn.Conv2d(4, 2, 1)
    >>> [(tuple(p.shape), axis, idx.tolist()) for p, axis, idx in
    ...  channel_parameters(Cut(conv, Role.IN, torch.tensor([1, 3])))]
    [((2, 4, 1, 1), 1, [1, 3])]
    """
    slices, _ = cut_slices(cut)
    return [(t, axis, idx) for _, _, t, axis, idx in slices if isinstance(t, nn.Parameter)]


def _checked(cut: Cut, owner: nn.Module, attr: str, tensor: torch.Tensor, axis: int, keep: torch.Tensor,
             top: int | None = None) -> TensorSlice:
    """The slice, once every index of ``keep`` (largest: ``top`` when known) is in range."""
    if top is None and keep.shape[0]:
        top = int(keep.max())
    if top is not None and top >= tensor.shape[axis]:
        raise SurgeryError(f"{cut.label()}: index {top} out of range for "
                           f"{attr!r} with {tensor.shape[axis]} channels on axis {axis}")
    return owner, attr, tensor, axis, keep


def parametrized(module: nn.Module, name: str) -> bool:
    """True if ``module.<name>`` is computed by ``torch.nn.utils.parametrize``."""
    # ``parametrize`` keeps its ModuleDict in ``_modules``: without one there, skip its getattr
    # (a miss raises and catches an AttributeError in ``nn.Module.__getattr__``)
    modules = module.__dict__.get("_modules")
    if modules is not None and "parametrizations" not in modules:
        return False
    return parametrize.is_parametrized(module, name)


def parametrization_problem(module: nn.Module, name: str) -> str | None:
    """Why a parametrized ``module.<name>`` cannot be sliced (a parametrization without a
    :class:`ParametrizationHandler`), or None when it can (or is not parametrized)."""
    if not parametrized(module, name):
        return None
    for p in module.parametrizations[name]:
        if not isinstance(handler_for(p), ParametrizationHandler):
            return f"{name} is parametrized by {type(p).__name__}, which prunable cannot slice"
    return None


def check_copyable(model: nn.Module) -> None:
    """Raise :class:`PruningValueError` naming the layer if a module of ``model`` is
    reparametrized by the legacy hooks of ``nn.utils.weight_norm`` / ``spectral_norm``:
    their computed weight is a plain attribute, which cannot be copied for tracing."""
    from torch.nn.utils.spectral_norm import SpectralNorm
    from torch.nn.utils.weight_norm import WeightNorm

    for name, module in model.named_modules():
        for hook in module._forward_pre_hooks.values():
            if isinstance(hook, (WeightNorm, SpectralNorm)):
                kind = "weight_norm" if isinstance(hook, WeightNorm) else "spectral_norm"
                raise PruningValueError(
                    f"{name or type(module).__name__} (legacy nn.utils.{kind} on {hook.name!r}) cannot be "
                    "traced (its weight is a computed attribute); use torch.nn.utils.parametrizations."
                    f"{kind}, which prunable supports")


def originals(module: nn.Module, name: str) -> list[torch.Tensor]:
    """The tensors ``module.<name>`` is computed from: its parametrization's originals
    (``original`` or ``original0``, ``original1`` …), or ``[module.<name>]`` when it is
    not parametrized. Gradient-based criteria hook these leaves."""
    if not parametrized(module, name):
        return [getattr(module, name)]
    plist = module.parametrizations[name]
    return [t for n, t in [*plist._parameters.items(), *plist._buffers.items()]
            if n.startswith("original") and t is not None]


def _parametrized_slices(cut: Cut, owner: nn.Module, attr: str, axis: int, keep: torch.Tensor) -> list[TensorSlice]:
    """A parametrized weight: slice its originals (their size-one axes stay) and the
    state its parametrizations' handlers name (spectral norm's ``_u``/``_v``)."""
    plist = owner.parametrizations[attr]
    originals = {n: t for n, t in [*plist._parameters.items(), *plist._buffers.items()]
                 if n.startswith("original") and t is not None}
    shape = max(originals.values(), key=lambda t: t.numel()).shape
    axis %= len(shape)
    out = []
    for n, t in originals.items():
        if t.dim() != len(shape) or t.shape[axis] not in (1, shape[axis]):
            raise SurgeryError(f"{cut.label()}: {attr}'s original {n} of shape {tuple(t.shape)} does not "
                               f"follow the weight's shape {tuple(shape)}")
        if t.shape[axis] == shape[axis]:
            out.append(_checked(cut, plist, n, t, axis, keep))
    for p in plist:
        handler = handler_for(p)
        if not isinstance(handler, ParametrizationHandler):
            raise SurgeryError(f"{cut.label()}: {attr} is parametrized by {type(p).__name__}, which prunable "
                               "cannot slice; register a prunable.ParametrizationHandler for it")
        for n, (ax, k) in handler.follow(p, shape, axis, keep).items():
            out.append(_checked(cut, p, n, getattr(p, n), ax, k))
    return out


def resolve(module: nn.Module, name: str) -> tuple[nn.Module, str]:
    """``(owner, attribute)`` of a possibly dotted name (``"qkv.weight"``)."""
    path, _, attr = name.rpartition(".")
    return (module.get_submodule(path) if path else module), attr


class _AttributeSize(ModuleHandler):
    """Keeps an ``int`` attribute equal to the number of channels left (``hidden_dim``)."""

    def __init__(self, attr: str) -> None:
        self.attr = attr

    def resize(self, module: nn.Module, role: Role | None, n: int) -> None:
        setattr(module, self.attr, n)


def _slice(tensor: torch.Tensor, axes: dict[int, torch.Tensor]) -> torch.Tensor:
    out = tensor
    for axis, keep in axes.items():
        out = out.index_select(axis, keep.to(tensor.device))
    return out.contiguous()


def _sliced_state(state: dict, shape: torch.Size, axes: dict[int, torch.Tensor]) -> dict:
    return {
        k: _slice(v, axes) if isinstance(v, torch.Tensor) and v.shape == shape else v
        for k, v in state.items()
    }


def apply_cuts(
    cuts: Sequence[Cut], optimizer: torch.optim.Optimizer | None = None, *, stats: SurgeryStats | None = None
) -> None:
    """Apply ``cuts`` to their modules (and ``optimizer``'s state) atomically.

    Every cut is checked before any tensor is touched. Then one module at a
    time is staged (its new parameters, gradients and optimizer state), swapped
    in and its old tensors freed, so the extra memory at the peak is about the
    largest module's share, not the whole model's (:mod:`prunable.staging`).
    If anything fails on the way, the modules already swapped are put back
    from the removed slices kept aside: :class:`SurgeryError` naming the
    tensor, everything unchanged. ``stats`` (a :class:`SurgeryStats`) receives
    the bytes staged.
    """
    pending, resizes = _expand(cuts)
    by_module: dict[int, list[_Pending]] = {}
    for entry in pending.values():
        by_module.setdefault(id(entry.owner), []).append(entry)
    undo: list[Undo] = []
    sizes = {id(module): (module, vars(module).copy()) for _, module, _, _ in resizes}  # sizes: put back on failure
    try:
        for entries in by_module.values():
            staged = [stage(entry, optimizer) for entry in entries]
            if stats is not None:
                stats.staged(sum(nbytes(new, grad, *(state[k] for k in log.state_removed))
                                 for _, new, grad, state, log in staged),
                             sum(log.nbytes for *_, log in staged))
            for entry, new, new_grad, state, log in staged:
                swap(entry, new, new_grad, state, optimizer)
                undo.append(log)
            del staged
        for handler, module, role, n in resizes:
            handler.resize(module, role, n)
    except Exception as exc:
        roll_back(undo, optimizer)
        for module, saved in sizes.values():
            vars(module).update(size_attributes(saved))
        if isinstance(exc, SurgeryError):
            raise
        raise SurgeryError(f"applying the cuts failed, model unchanged: {type(exc).__name__}: {exc}") from exc


def slice_optimizer_state(
    optimizer: torch.optim.Optimizer, param: torch.Tensor, old_shape: torch.Size, axis: int, keep: torch.Tensor
) -> None:
    """Slice ``optimizer``'s per-parameter state of ``param`` along ``axis``.

    Use it when a parameter was sliced outside :func:`apply_cuts`: every state
    tensor of shape ``old_shape`` (SGD momentum, Adam moments) keeps ``keep``.
    """
    if param in optimizer.state:
        optimizer.state[param] = _sliced_state(optimizer.state[param], old_shape, {axis: keep})
