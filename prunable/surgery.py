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

import enum
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from .errors import PruningValueError, SurgeryError
from .staging import SurgeryStats, Undo, nbytes, roll_back, size_attributes, stage, swap

__all__ = [
    "Role",
    "Cut",
    "ModuleHandler",
    "register_handler",
    "handler_for",
    "apply_cuts",
    "keep_indices",
    "check_indices",
    "slice_optimizer_state",
    "SurgeryStats",
]


class Role(enum.Enum):
    """Which side of a module a cut applies to."""

    IN = "in"
    OUT = "out"


class ModuleHandler:
    """Describes how to cut the input or output channels of one module type.

    Subclass it and register it with :func:`register_handler` to make a custom
    module prunable. ``params`` maps parameter/buffer names to the axis that
    holds channels; ``resize`` updates the module's size attributes.
    """

    def params(self, module: nn.Module, role: Role) -> dict[str, int]:
        """Names of tensors to slice for ``role`` and the channel axis of each."""
        return {}

    def resize(self, module: nn.Module, role: Role, n: int) -> None:
        """Set the module's attributes after its ``role`` side has ``n`` channels."""

    def local_keep(self, module: nn.Module, role: Role, name: str, keep: torch.Tensor) -> torch.Tensor:
        """Indices to keep along tensor ``name`` given the channels kept on the ``role`` side."""
        return keep

    def meta_type(self, module: nn.Module) -> type | None:
        """The class a ``meta`` copy of ``module`` takes for tracing and trial runs, or None
        for its own: the local equivalent of a module that only runs inside a process group
        on a GPU (SyncBatchNorm → a BatchNorm). It must hold the same tensors and attributes."""
        return None


_HANDLERS: dict[type | str, ModuleHandler] = {}


def register_handler(module_type: type | str, *, replace: bool = False) -> Callable[[type], type]:
    """Class decorator registering a :class:`ModuleHandler` for ``module_type``.

    ``module_type`` is a class, or its qualified name (``"package.module.Class"``)
    to cover a class without importing its package. Lookup follows the module's
    MRO, so a handler for a base class covers its subclasses. Registering a type
    twice raises unless ``replace=True``.

    Example
    -------
    >>> class Scale(nn.Module):
    ...     def __init__(self, c):
    ...         super().__init__()
    ...         self.gain = nn.Parameter(torch.ones(c))
    >>> @register_handler(Scale)
    ... class ScaleHandler(ModuleHandler):
    ...     def params(self, module, role):
    ...         return {"gain": 0}
    """

    def decorate(cls: type) -> type:
        if module_type in _HANDLERS and not replace:
            name = module_type if isinstance(module_type, str) else module_type.__name__
            raise PruningValueError(
                f"a handler for {name} is already registered "
                f"({type(_HANDLERS[module_type]).__name__}); pass replace=True"
            )
        _HANDLERS[module_type] = cls()
        return cls

    return decorate


def handler_for(module: nn.Module) -> ModuleHandler | None:
    """The handler registered for ``type(module)`` or its nearest base class."""
    for klass in type(module).__mro__:
        if klass in _HANDLERS:
            return _HANDLERS[klass]
        qualified = f"{klass.__module__}.{klass.__qualname__}"
        if qualified in _HANDLERS:
            return _HANDLERS[qualified]
    return None


def is_depthwise(conv: nn.Module) -> bool:
    """True for a convolution whose every group has one input channel."""
    return conv.groups > 1 and conv.groups == conv.in_channels


@register_handler(nn.modules.conv._ConvNd)
class _ConvHandler(ModuleHandler):
    def params(self, module: nn.Module, role: Role) -> dict[str, int]:
        out_axis, in_axis = (1, 0) if module.transposed else (0, 1)
        if role is Role.OUT:
            names = {"weight": out_axis}
            if module.bias is not None:
                names["bias"] = 0
            return names
        if is_depthwise(module):
            return {} if not module.transposed else {"weight": 0}
        return {"weight": in_axis}

    def local_keep(self, module: nn.Module, role: Role, name: str, keep: torch.Tensor) -> torch.Tensor:
        if role is Role.IN and module.groups > 1 and not is_depthwise(module):
            # grouped: the graph removes the same position from every group
            return keep[keep < module.in_channels // module.groups]
        return keep

    def resize(self, module: nn.Module, role: Role, n: int) -> None:
        if role is Role.OUT:
            module.out_channels = n
        elif is_depthwise(module):
            module.in_channels = module.groups = n
        else:
            module.in_channels = n


@register_handler(nn.Linear)
class _LinearHandler(ModuleHandler):
    def params(self, module: nn.Module, role: Role) -> dict[str, int]:
        if role is Role.IN:
            return {"weight": 1}
        return {"weight": 0, "bias": 0} if module.bias is not None else {"weight": 0}

    def resize(self, module: nn.Module, role: Role, n: int) -> None:
        if role is Role.IN:
            module.in_features = n
        else:
            module.out_features = n


class _ChannelwiseHandler(ModuleHandler):
    """Modules whose inputs and outputs are the same channels (norms, PReLU)."""

    tensors: tuple[str, ...] = ("weight", "bias")

    def params(self, module: nn.Module, role: Role) -> dict[str, int]:
        return {n: 0 for n in self.tensors if getattr(module, n, None) is not None}


@register_handler(nn.modules.batchnorm._NormBase)
class _NormHandler(_ChannelwiseHandler):
    tensors = ("weight", "bias", "running_mean", "running_var")

    def resize(self, module: nn.Module, role: Role, n: int) -> None:
        module.num_features = n


class LocalBatchNorm(nn.modules.batchnorm._BatchNorm):
    """A BatchNorm for inputs of any rank ≥ 2: what a meta copy of a SyncBatchNorm runs.

    SyncBatchNorm refuses to run outside CUDA while a process group is
    initialised, and meta copies are not on CUDA; over one process it computes
    exactly this. ``dropped_state`` is not copied (a process group cannot be).
    """

    dropped_state = ("process_group",)

    def _check_input_dim(self, input: torch.Tensor) -> None:
        if input.dim() < 2:
            raise ValueError(f"expected at least 2D input (got {input.dim()}D input)")


@register_handler(nn.SyncBatchNorm)
class _SyncBatchNormHandler(_NormHandler):
    def meta_type(self, module: nn.Module) -> type | None:
        return LocalBatchNorm


@register_handler(nn.LayerNorm)
class _LayerNormHandler(_ChannelwiseHandler):
    def resize(self, module: nn.Module, role: Role, n: int) -> None:
        module.normalized_shape = (n,)


@register_handler(nn.GroupNorm)
class _GroupNormHandler(_ChannelwiseHandler):
    def resize(self, module: nn.Module, role: Role, n: int) -> None:
        if module.num_groups == module.num_channels:
            module.num_groups = n
        module.num_channels = n


@register_handler(nn.PReLU)
class _PReLUHandler(_ChannelwiseHandler):
    def params(self, module: nn.Module, role: Role) -> dict[str, int]:
        return {"weight": 0} if module.num_parameters > 1 else {}

    def resize(self, module: nn.Module, role: Role, n: int) -> None:
        if module.num_parameters > 1:
            module.num_parameters = n


@register_handler(nn.Embedding)
class _EmbeddingHandler(ModuleHandler):
    def params(self, module: nn.Module, role: Role) -> dict[str, int]:
        return {"weight": 1} if role is Role.OUT else {}

    def resize(self, module: nn.Module, role: Role, n: int) -> None:
        if role is Role.OUT:
            module.embedding_dim = n


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
        if len(cut.keep) == 0:
            raise SurgeryError(f"{cut.label()}: the cut would leave no channels")
        if cut.param is None:
            handler = handler_for(cut.module)
            if handler is None:
                raise SurgeryError(
                    f"{cut.label()}: no handler for {type(cut.module).__name__}; "
                    "register one with prunable.register_handler"
                )
            names = handler.params(cut.module, cut.role)
            resizes.append((handler, cut.module, cut.role, len(cut.keep)))
        else:
            handler, names = ModuleHandler(), {cut.param: cut.axis}
        for name, axis in names.items():
            keep = handler.local_keep(cut.module, cut.role, name, cut.keep)
            owner, attr = _resolve(cut.module, name)
            tensor = getattr(owner, attr, None)
            if isinstance(tensor, int) and not isinstance(tensor, bool) and cut.param is not None:
                resizes.append((_AttributeSize(attr), owner, cut.role, len(keep)))  # a size attribute
                continue
            if tensor is None:
                continue
            key = (id(owner), attr)
            entry = pending.setdefault(key, _Pending(owner, attr, tensor, {}))
            axis = axis % tensor.dim()
            if axis in entry.axes and not torch.equal(entry.axes[axis], keep):
                raise SurgeryError(f"{cut.label()}: axis {axis} of {attr!r} cut twice differently")
            if len(keep) and int(keep.max()) >= tensor.shape[axis]:
                raise SurgeryError(
                    f"{cut.label()}: index {int(keep.max())} out of range for "
                    f"{attr!r} with {tensor.shape[axis]} channels on axis {axis}"
                )
            entry.axes[axis] = keep
    return pending, resizes


def _resolve(module: nn.Module, name: str) -> tuple[nn.Module, str]:
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
    stats = stats if stats is not None else SurgeryStats()
    by_module: dict[int, list[_Pending]] = {}
    for entry in pending.values():
        by_module.setdefault(id(entry.owner), []).append(entry)
    undo: list[Undo] = []
    sizes = [(module, size_attributes(module)) for _, module, _, _ in resizes]
    try:
        for entries in by_module.values():
            staged = [stage(entry, optimizer) for entry in entries]
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
        for module, saved in sizes:
            vars(module).update(saved)
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
