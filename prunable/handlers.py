"""The handler registry: the one place that knows how each layer type lays out its channels.

A :class:`ModuleHandler` says, for one module type, which axes of which tensors
hold its input (``Role.IN``) and output (``Role.OUT``) channels, how to slice
them (:meth:`ModuleHandler.local_keep`), how many channels each side has, whether
inputs and outputs are the same channels (:attr:`ModuleHandler.channelwise`:
norms, PReLU), what a criterion reads (:meth:`ModuleHandler.out_view`: one row
per output channel) and which attributes to update after a cut. The tracer, the
graph, the criteria and the seed's models ask the handler; no other module
branches on a layer type.

Register a handler with :func:`register_handler`; :func:`handler_for` looks a
module up along its class hierarchy. :func:`registered_types` lists them all.

Example
-------
>>> import torch
>>> from torch import nn
>>> conv = nn.ConvTranspose2d(4, 6, 3)
>>> handler_for(conv).params(conv, Role.OUT)
{'weight': 1, 'bias': 0}
>>> handler_for(conv).out_view(conv, "weight").shape
torch.Size([6, 36])
"""

from __future__ import annotations

import enum
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from .errors import PruningValueError

__all__ = [
    "Role", "ModuleHandler", "ParametrizationHandler", "register_handler", "handler_for",
    "registered_types", "unregister_handler", "is_depthwise", "LocalBatchNorm",
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

    #: inputs and outputs are the same channels (a norm, PReLU): the module only follows its producer
    channelwise: bool = False
    #: what is pruned, in words (the docs' layer table)
    describes: str = ""

    def params(self, module: nn.Module, role: Role) -> dict[str, int]:
        """Names of tensors to slice for ``role`` and the channel axis of each."""
        return {}

    def resize(self, module: nn.Module, role: Role, n: int) -> None:
        """Set the module's attributes after its ``role`` side has ``n`` channels."""

    def local_keep(self, module: nn.Module, role: Role, name: str, keep: torch.Tensor) -> torch.Tensor:
        """Indices to keep along tensor ``name`` given the channels kept on the ``role`` side."""
        return keep

    def channels(self, module: nn.Module, role: Role) -> int | None:
        """Channels on the ``role`` side (None when no tensor holds them)."""
        for name, axis in self.params(module, role).items():
            t = getattr(module, name, None)
            if isinstance(t, torch.Tensor):
                return int(t.shape[axis])
        return None

    def weights(self, module: nn.Module) -> list[str]:
        """Names of the producing weights that weight criteria read (through :meth:`out_view`)."""
        return ["weight"] if isinstance(getattr(module, "weight", None), torch.Tensor) else []

    def biases(self, module: nn.Module) -> list[str]:
        """Names of the producing biases that Taylor-weight criteria add (through :meth:`out_view`)."""
        return ["bias"] if isinstance(getattr(module, "bias", None), torch.Tensor) else []

    #: ``trace_module(tracer, module, args, kwargs, output)``: set it (define the method) for a
    #: module the tracer must run as ONE operation (attention, recurrent layers): the operations
    #: inside its forward are not traced, and the hook labels its output from its inputs through
    #: the tracer's public methods (``input_labels``, ``consume``, ``produce``, ``label_output`` …).
    trace_module: Callable[..., None] | None = None

    def activation(self, module: nn.Module, output: Any) -> torch.Tensor | None:
        """The tensor in ``module``'s forward ``output`` on which activation criteria observe its
        output channels (the channels along the dim the tracer recorded); None if there is none."""
        if isinstance(output, (tuple, list)) and output:  # (output, attention weights)
            output = output[0]
        return output if isinstance(output, torch.Tensor) else None

    def channel_view(self, module: nn.Module, tensor: torch.Tensor, dim: int) -> torch.Tensor:
        """``tensor`` (from :meth:`activation`, or its gradient) viewed so that ``dim`` holds one
        entry per output channel (an RNN's ``(…, D·H)`` as ``(…, D, H)``); other dims are averaged."""
        return tensor

    def meta_type(self, module: nn.Module) -> type | None:
        """The class a ``meta`` copy of ``module`` takes for tracing and trial runs, or None
        for its own: the local equivalent of a module that only runs inside a process group
        on a GPU (SyncBatchNorm → a BatchNorm). It must hold the same tensors and attributes."""
        return None

    def out_view(self, module: nn.Module, name: str, tensor: torch.Tensor | None = None) -> torch.Tensor:
        """``tensor`` (default: the module's tensor ``name``) as ``(output channels, -1)``.

        What weight criteria read: row ``k`` holds every entry of output channel ``k``.
        """
        t = getattr(module, name) if tensor is None else tensor
        axis = self.params(module, Role.OUT).get(name, 0) % max(t.dim(), 1)
        return t.movedim(axis, 0).reshape(t.shape[axis], -1)


class ParametrizationHandler(ModuleHandler):
    """A ``torch.nn.utils.parametrize`` parametrization whose originals can be sliced
    like the weight it computes; :meth:`follow` names its own state to slice along."""

    def follow(
        self, module: nn.Module, shape: torch.Size, axis: int, keep: torch.Tensor
    ) -> dict[str, tuple[int, torch.Tensor]]:
        """Tensors of the parametrization ``module`` to slice when the computed weight of
        ``shape`` keeps ``keep`` along ``axis``: name → (axis, indices kept)."""
        return {}


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
        _FOUND.clear()
        return cls

    return decorate


def handler_for(module: nn.Module) -> ModuleHandler | None:
    """The handler registered for ``type(module)`` or its nearest base class."""
    cls = type(module)
    try:
        return _FOUND[cls]
    except KeyError:
        pass
    found = None
    for klass in cls.__mro__:
        if klass in _HANDLERS:
            found = _HANDLERS[klass]
            break
        qualified = f"{klass.__module__}.{klass.__qualname__}"
        if qualified in _HANDLERS:
            found = _HANDLERS[qualified]
            break
    _FOUND[cls] = found
    return found


#: ``handler_for``'s answers by module class; emptied whenever the registry changes
_FOUND: dict[type, ModuleHandler | None] = {}


def unregister_handler(module_type: type | str) -> ModuleHandler:
    """Remove and return the handler registered for exactly ``module_type`` (tests, plugins).

    Raises :class:`PruningValueError` if none is registered for it.
    """
    if module_type not in _HANDLERS:
        raise PruningValueError(f"no handler is registered for {module_type!r}")
    _FOUND.clear()
    return _HANDLERS.pop(module_type)


def registered_types() -> dict[type | str, ModuleHandler]:
    """Every registered module type (a class or a qualified name) and its handler."""
    return dict(_HANDLERS)


def is_depthwise(conv: nn.Module) -> bool:
    """True for a convolution whose every group has one input channel."""
    return conv.groups > 1 and conv.groups == conv.in_channels


@register_handler(nn.modules.conv._ConvNd)
class ConvHandler(ModuleHandler):
    """Conv1d/2d/3d and ConvTranspose1d/2d/3d, grouped and depthwise included.

    A conv's weight is ``(out, in / groups, *k)``; a transposed conv's is
    ``(in, out / groups, *k)``. For grouped convs the graph removes the same
    position from every group, so the per-group axis keeps ``keep``'s first-group entries.
    """

    describes = "output channels (weight, bias); input channels of the weight; groups kept"

    def _axes(self, module: nn.Module) -> tuple[int, int]:
        return (1, 0) if module.transposed else (0, 1)

    def params(self, module: nn.Module, role: Role) -> dict[str, int]:
        out_axis, in_axis = self._axes(module)
        if role is Role.OUT:
            names = {} if module.transposed and is_depthwise(module) else {"weight": out_axis}
            if module.bias is not None:
                names["bias"] = 0
            return names
        if is_depthwise(module):
            return {"weight": 0} if module.transposed else {}
        return {"weight": in_axis}

    def local_keep(self, module: nn.Module, role: Role, name: str, keep: torch.Tensor) -> torch.Tensor:
        if name != "weight" or module.groups == 1 or is_depthwise(module):
            return keep
        per_group = module.weight.shape[1]  # the grouped axis: in/groups (conv), out/groups (transposed)
        if (role is Role.IN) != module.transposed:
            return keep[keep < per_group]
        return keep

    def channels(self, module: nn.Module, role: Role) -> int:
        return int(module.out_channels if role is Role.OUT else module.in_channels)

    def out_view(self, module: nn.Module, name: str, tensor: torch.Tensor | None = None) -> torch.Tensor:
        t = getattr(module, name) if tensor is None else tensor
        if name != "weight" or not module.transposed:
            return super().out_view(module, name, t)
        g = module.groups  # (in, out/g, *k) → (g, in/g, out/g, k) → (out, in/g · k)
        return t.reshape(g, t.shape[0] // g, t.shape[1], -1).transpose(1, 2).reshape(g * t.shape[1], -1)

    def resize(self, module: nn.Module, role: Role, n: int) -> None:
        if role is Role.OUT:
            module.out_channels = n
        elif is_depthwise(module):
            module.in_channels = module.groups = n
        else:
            module.in_channels = n


@register_handler(nn.Linear)
class LinearHandler(ModuleHandler):
    describes = "output features (weight rows, bias); input features (weight columns)"

    def params(self, module: nn.Module, role: Role) -> dict[str, int]:
        if role is Role.IN:
            return {"weight": 1}
        return {"weight": 0, "bias": 0} if module.bias is not None else {"weight": 0}

    def channels(self, module: nn.Module, role: Role) -> int:
        return int(module.in_features if role is Role.IN else module.out_features)

    def resize(self, module: nn.Module, role: Role, n: int) -> None:
        if role is Role.IN:
            module.in_features = n
        else:
            module.out_features = n


class ChannelwiseHandler(ModuleHandler):
    """Modules whose inputs and outputs are the same channels (norms, PReLU)."""

    channelwise = True
    tensors: tuple[str, ...] = ("weight", "bias")

    def params(self, module: nn.Module, role: Role) -> dict[str, int]:
        return {n: 0 for n in self.tensors if getattr(module, n, None) is not None}


@register_handler(nn.modules.batchnorm._NormBase)
class NormHandler(ChannelwiseHandler):
    """BatchNorm1d/2d/3d, SyncBatchNorm and InstanceNorm1d/2d/3d, affine or not,
    with or without running statistics."""

    describes = "the channels of its input (affine weight/bias and running statistics, when present)"
    tensors = ("weight", "bias", "running_mean", "running_var")

    def channels(self, module: nn.Module, role: Role) -> int:
        return int(module.num_features)

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
class SyncBatchNormHandler(NormHandler):
    """SyncBatchNorm: cut like a BatchNorm; traced and trial-run as a :class:`LocalBatchNorm`."""

    def meta_type(self, module: nn.Module) -> type | None:
        return LocalBatchNorm


@register_handler(nn.LayerNorm)
class LayerNormHandler(ChannelwiseHandler):
    describes = "the last (normalised) dimension: weight, bias, normalized_shape"

    def resize(self, module: nn.Module, role: Role, n: int) -> None:
        module.normalized_shape = (n,)


@register_handler(nn.RMSNorm)
class RMSNormHandler(ChannelwiseHandler):
    describes = "the last (normalised) dimension: weight, normalized_shape"

    def resize(self, module: nn.Module, role: Role, n: int) -> None:
        module.normalized_shape = (n,)


@register_handler(nn.GroupNorm)
class GroupNormHandler(ChannelwiseHandler):
    describes = "the channels of its input, the same number from every group"

    def channels(self, module: nn.Module, role: Role) -> int:
        return int(module.num_channels)

    def resize(self, module: nn.Module, role: Role, n: int) -> None:
        if module.num_groups == module.num_channels:
            module.num_groups = n
        module.num_channels = n


@register_handler(nn.PReLU)
class PReLUHandler(ChannelwiseHandler):
    describes = "one slope per channel (a single shared slope is left as it is)"

    def params(self, module: nn.Module, role: Role) -> dict[str, int]:
        return {"weight": 0} if module.num_parameters > 1 else {}

    def resize(self, module: nn.Module, role: Role, n: int) -> None:
        if module.num_parameters > 1:
            module.num_parameters = n


@register_handler(nn.Embedding)
class EmbeddingHandler(ModuleHandler):
    """``nn.Embedding``: the embedding dimension (weight columns); the vocabulary and
    ``padding_idx`` are untouched."""

    describes = "the embedding dimension (weight columns); vocabulary and padding_idx untouched"

    def params(self, module: nn.Module, role: Role) -> dict[str, int]:
        return {"weight": 1} if role is Role.OUT else {}

    def channels(self, module: nn.Module, role: Role) -> int | None:
        return int(module.embedding_dim) if role is Role.OUT else None

    def resize(self, module: nn.Module, role: Role, n: int) -> None:
        if role is Role.OUT:
            module.embedding_dim = n


register_handler(nn.EmbeddingBag)(EmbeddingHandler)


@register_handler("torch.nn.utils.parametrizations._WeightNorm")
class WeightNormParametrization(ParametrizationHandler):
    """``parametrizations.weight_norm``: ``original0`` (g) and ``original1`` (v) are sliced
    like the weight; g's size-one axes are left alone."""

    describes = "the originals g (original0) and v (original1), like the weight"


@register_handler("torch.nn.utils.parametrizations._SpectralNorm")
class SpectralNormParametrization(ParametrizationHandler):
    """``parametrizations.spectral_norm``: the original is sliced like the weight, and the
    power-iteration vectors with it: ``_u`` along ``dim``, ``_v`` along the flattened rest."""

    describes = "the original weight, and the power-iteration vectors _u/_v with it"

    def follow(
        self, module: nn.Module, shape: torch.Size, axis: int, keep: torch.Tensor
    ) -> dict[str, tuple[int, torch.Tensor]]:
        if len(shape) <= 1:
            return {}
        dim = module.dim % len(shape)
        if axis % len(shape) == dim:
            return {"_u": (0, keep)}
        rest = [n for d, n in enumerate(shape) if d != dim]
        at = axis % len(shape) - (axis % len(shape) > dim)
        grid = torch.arange(int(torch.tensor(rest).prod())).view(rest)
        return {"_v": (0, grid.index_select(at, keep).reshape(-1).sort().values)}
