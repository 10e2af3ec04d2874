"""Cutting channels out of real tensors, transactionally.

This module is the single place where parameters, buffers, gradients and
optimizer state are sliced. Both doors of prunable use it: the drop-in layers of
:mod:`prunable.nn` and the automatic :class:`prunable.Pruner`.

A :class:`Cut` says "keep these indices of this module's inputs (or outputs)".
:func:`apply_cuts` first computes every new tensor, then swaps them all in; if
any cut is invalid nothing is modified. Parameters are sliced *in place*
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
    "legacy_reparametrization",
    "apply_cuts",
    "keep_indices",
    "check_indices",
    "slice_optimizer_state",
    "ParametrizationHandler",
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
            entry = pending.setdefault((id(owner), attr), _Pending(owner, attr, tensor, {}))
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
    if len(cut.keep) == 0:
        raise SurgeryError(f"{cut.label()}: the cut would leave no channels")
    resizes: list[tuple] = []
    if cut.param is None:
        handler = handler_for(cut.module)
        if handler is None:
            raise SurgeryError(f"{cut.label()}: no handler for {type(cut.module).__name__}; "
                               "register one with prunable.register_handler")
        names = handler.params(cut.module, cut.role)
        resizes.append((handler, cut.module, cut.role, len(cut.keep)))
    else:
        handler, names = ModuleHandler(), {cut.param: cut.axis}
    out: list[TensorSlice] = []
    for name, axis in names.items():
        keep = handler.local_keep(cut.module, cut.role, name, cut.keep)
        owner, attr = resolve(cut.module, name)
        if parametrized(owner, attr):
            out += _parametrized_slices(cut, owner, attr, axis, keep)
            continue
        tensor = getattr(owner, attr, None)
        if isinstance(tensor, int) and not isinstance(tensor, bool) and cut.param is not None:
            resizes.append((_AttributeSize(attr), owner, cut.role, len(keep)))  # a size attribute
        elif tensor is not None:
            out.append(_checked(cut, owner, attr, tensor, axis % tensor.dim(), keep))
    if cut.rescale is not None:
        resizes.append((cut.rescale.bound(cut.keep), cut.module, cut.role, len(cut.keep)))
    return out, resizes


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


def _checked(cut: Cut, owner: nn.Module, attr: str, tensor: torch.Tensor, axis: int, keep: torch.Tensor) -> TensorSlice:
    if len(keep) and int(keep.max()) >= tensor.shape[axis]:
        raise SurgeryError(f"{cut.label()}: index {int(keep.max())} out of range for "
                           f"{attr!r} with {tensor.shape[axis]} channels on axis {axis}")
    return owner, attr, tensor, axis, keep


def parametrized(module: nn.Module, name: str) -> bool:
    """True if ``module.<name>`` is computed by ``torch.nn.utils.parametrize``."""
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


def legacy_reparametrization(model: nn.Module) -> str | None:
    """Qualified name and kind of the first module reparametrized by the legacy hooks of
    ``nn.utils.weight_norm`` / ``nn.utils.spectral_norm`` (their computed weight is a plain
    attribute that cannot be copied), or None."""
    from torch.nn.utils.spectral_norm import SpectralNorm
    from torch.nn.utils.weight_norm import WeightNorm

    for name, module in model.named_modules():
        for hook in module._forward_pre_hooks.values():
            if isinstance(hook, (WeightNorm, SpectralNorm)):
                kind = "weight_norm" if isinstance(hook, WeightNorm) else "spectral_norm"
                return f"{name or type(module).__name__} (legacy nn.utils.{kind} on {hook.name!r})"
    return None


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


def apply_cuts(cuts: Sequence[Cut], optimizer: torch.optim.Optimizer | None = None) -> None:
    """Apply ``cuts`` to their modules (and ``optimizer``'s state) atomically.

    Every new tensor is computed before any is assigned, so a failure raises
    :class:`SurgeryError` naming the cut and leaves everything unchanged.
    """
    pending, resizes = _expand(cuts)
    staged = []
    for entry in pending.values():
        try:
            new = _slice(entry.tensor.detach(), entry.axes)
            grad = entry.tensor.grad
            new_grad = _slice(grad, entry.axes) if grad is not None else None
            state = None
            if optimizer is not None and entry.tensor in optimizer.state:
                state = _sliced_state(optimizer.state[entry.tensor], entry.tensor.shape, entry.axes)
        except Exception as exc:  # noqa: BLE001 - re-raised with context
            name = type(entry.owner).__name__
            raise SurgeryError(f"{name}.{entry.attr}: slicing failed: {exc}") from exc
        staged.append((entry, new, new_grad, state))
    for entry, new, new_grad, state in staged:
        _swap(entry, new, new_grad, state, optimizer)
    for handler, module, role, n in resizes:
        handler.resize(module, role, n)


def _swap(entry: _Pending, new, new_grad, state, optimizer) -> None:
    tensor = entry.tensor
    if isinstance(tensor, nn.Parameter):
        _swap_parameter(tensor, new)
        tensor.grad = new_grad
        if state is not None:
            optimizer.state[tensor] = state
    else:
        entry.owner._buffers[entry.attr] = new


def _swap_parameter(param: nn.Parameter, new: torch.Tensor) -> None:
    """Give ``param`` the data (and shape) of ``new``, keeping the Python object.

    ``torch.utils.swap_tensors`` also replaces the autograd metadata, so a graph
    still alive from before the cut cannot poison the next backward with the old
    shape. Falls back to ``.data`` assignment when swapping is impossible.
    """
    replacement = nn.Parameter(new, requires_grad=param.requires_grad)
    replacement.__dict__.update(param.__dict__)
    try:
        torch.utils.swap_tensors(param, replacement)
    except RuntimeError:
        param.data = new
        return
    # the hook dicts still point at the old tensor's autograd hooks: hand them to the new one,
    # or every hook registered from now on (Taylor criteria's gradient hooks) would never fire
    for attr in ("_backward_hooks", "_post_accumulate_grad_hooks"):
        hooks = getattr(param, attr, None)
        if hooks is not None:
            setattr(param, attr, None)
            if hooks:
                setattr(param, attr, type(hooks)(hooks))


def slice_optimizer_state(
    optimizer: torch.optim.Optimizer, param: torch.Tensor, old_shape: torch.Size, axis: int, keep: torch.Tensor
) -> None:
    """Slice ``optimizer``'s per-parameter state of ``param`` along ``axis``.

    Use it when a parameter was sliced outside :func:`apply_cuts`: every state
    tensor of shape ``old_shape`` (SGD momentum, Adam moments) keeps ``keep``.
    """
    if param in optimizer.state:
        optimizer.state[param] = _sliced_state(optimizer.state[param], old_shape, {axis: keep})
