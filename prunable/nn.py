"""Drop-in prunable layers (the seed's door).

``PConv2d``, ``PLinear``, ``PBatchNorm2d`` and ``PBatchNorm1d`` are the torch
layers with the same constructors plus:

* ``pruning(flag)``: turn Taylor estimation on or off (also a context manager);
  off removes every hook and frees stored activations;
* ``taylor_estimates``: per output channel, Eq. 8 of Molchanov et al. (2017),
  accumulated over minibatches until ``reset_estimates()``, measured on the
  layer's own output;
* ``normalized_estimates()``: the layer-wise L2-normalised estimates;
* ``prune_feature_map(i)`` / ``drop_input_channel(i)``: physically remove
  channels (an int or a list); parameters are sliced in place so an optimizer
  keeps working, and ``optimizer=`` slices its state too.

Example
-------
>>> import torch
>>> conv = PConv2d(3, 8, 3, padding=1)
>>> with conv.pruning(True):
...     conv(torch.randn(2, 3, 8, 8)).pow(2).sum().backward()
>>> conv.taylor_estimates.shape
torch.Size([8])
>>> conv.prune_feature_map(int(conv.taylor_estimates.argmin()))
>>> conv.out_channels
7
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any

import torch
from torch import nn

from .errors import PruningValueError
from .importance import ScoreAccumulator, l2_normalize, taylor_per_example
from .surgery import Cut, Role, apply_cuts, check_indices, keep_indices

__all__ = ["PConv2d", "PLinear", "PBatchNorm2d", "PBatchNorm1d", "convert", "PruningSwitch", "TaylorMixin"]

Index = int | Iterable[int]


class PruningSwitch:
    """Returned by ``pruning(flag)``; as a context manager it restores the old state."""

    def __init__(self, target: Any, previous: bool) -> None:
        self._target = target
        self._previous = previous

    def __enter__(self) -> Any:
        return self._target

    def __exit__(self, *exc: object) -> None:
        self._target.pruning(self._previous)


class TaylorMixin:
    """Taylor estimation and channel removal shared by the prunable layers."""

    _out_attr = "out_channels"

    def _init_pruning(self) -> None:
        self._estimates = ScoreAccumulator()
        self._hook: Any = None
        self.pruning_name = ""

    def _label(self) -> str:
        return self.pruning_name or self.extra_repr_label()

    def extra_repr_label(self) -> str:
        return f"{type(self).__name__}({self.extra_repr()})"

    @property
    def is_pruning(self) -> bool:
        """Whether Taylor estimation is on."""
        return self._hook is not None

    def pruning(self, flag: bool = True) -> PruningSwitch:
        """Turn Taylor estimation on (``True``) or off (``False``).

        Off removes the forward hook; activations held for a pending backward
        are released with the autograd graph. Usable as a context manager,
        which restores the previous state on exit.
        """
        previous = self.is_pruning
        if flag and self._hook is None:
            self._hook = self.register_forward_hook(_record_taylor)
        elif not flag and self._hook is not None:
            self._hook.remove()
            self._hook = None
        return PruningSwitch(self, previous)

    @property
    def taylor_estimates(self) -> torch.Tensor:
        """Mean over all examples seen of ``|spatial mean of a·dL/da|`` per output channel."""
        return self._estimates.value(getattr(self, self._out_attr), self.weight.device)

    def reset_estimates(self) -> None:
        """Forget accumulated estimates."""
        self._estimates.reset()

    @property
    def has_estimates(self) -> bool:
        """Whether any example has been accumulated since the last reset."""
        return self._estimates.count > 0

    def keep_estimates(self, keep: torch.Tensor) -> None:
        """Keep the estimates of output channels ``keep`` only (after a cut made elsewhere)."""
        self._estimates.keep(keep)

    def normalized_estimates(self) -> torch.Tensor:
        """``taylor_estimates / ||taylor_estimates||_2`` (zeros stay zeros)."""
        return l2_normalize(self.taylor_estimates)

    def prune_feature_map(self, index: Index, optimizer: torch.optim.Optimizer | None = None) -> None:
        """Remove output channel(s) ``index`` (weight rows, bias and estimates)."""
        size = getattr(self, self._out_attr)
        removed = check_indices(index, size, self._label())
        keep = keep_indices(size, removed)
        apply_cuts([Cut(self, Role.OUT, keep, name=self._label())], optimizer)
        self._estimates.keep(keep)


def _record_taylor(module: TaylorMixin, inputs: tuple, output: torch.Tensor) -> None:
    if not (torch.is_grad_enabled() and output.requires_grad):
        return
    activation = output.detach()

    def on_grad(grad: torch.Tensor) -> None:
        module._estimates.add(taylor_per_example(activation, grad))

    output.register_hook(on_grad)


def _drop_inputs(module: nn.Module, size: int, index: Index, label: str, optimizer) -> None:
    removed = check_indices(index, size, label)
    apply_cuts([Cut(module, Role.IN, keep_indices(size, removed), name=label)], optimizer)


class PConv2d(TaylorMixin, nn.Conv2d):
    """``nn.Conv2d`` whose output feature maps can be scored and removed."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._init_pruning()

    def drop_input_channel(self, index: Index, optimizer: torch.optim.Optimizer | None = None) -> None:
        """Remove input channel(s) ``index`` from the weight."""
        if self.groups != 1:
            raise PruningValueError(f"{self._label()}: groups={self.groups}; only groups=1 supported here")
        _drop_inputs(self, self.in_channels, index, self._label(), optimizer)


class PLinear(TaylorMixin, nn.Linear):
    """``nn.Linear`` whose outputs can be scored and removed."""

    _out_attr = "out_features"

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._init_pruning()

    def drop_input_channel(self, index: Index, optimizer: torch.optim.Optimizer | None = None) -> None:
        """Remove input feature(s) ``index`` (a Linear → Linear connection)."""
        _drop_inputs(self, self.in_features, index, self._label(), optimizer)

    def drop_inputs(
        self, input_shape: Iterable[int], index: Index, dim: int = 0,
        optimizer: torch.optim.Optimizer | None = None,
    ) -> None:
        """Remove channel(s) ``index`` of a flattened input of shape ``input_shape``.

        ``input_shape`` is the unflattened per-example shape, e.g. ``(C, H, W)``,
        and ``dim`` the axis of it that holds channels; every one of the
        ``H*W`` input features of a removed channel is dropped.

        Example
        -------
        >>> fc = PLinear(4 * 2 * 2, 10)
        >>> fc.drop_inputs((4, 2, 2), 1)
        >>> fc.in_features
        12
        """
        shape = tuple(int(s) for s in input_shape)
        if not shape or math.prod(shape) != self.in_features:
            raise PruningValueError(
                f"{self._label()}: input_shape {shape} has {math.prod(shape) if shape else 0} "
                f"elements but in_features is {self.in_features}"
            )
        if not -len(shape) <= dim < len(shape):
            raise PruningValueError(f"{self._label()}: dim {dim} out of range for input_shape {shape}")
        removed = check_indices(index, shape[dim], self._label())
        flat = torch.arange(self.in_features).view(shape).movedim(dim, 0)[removed].flatten()
        keep = keep_indices(self.in_features, flat.tolist())
        apply_cuts([Cut(self, Role.IN, keep, name=self._label())], optimizer)


class _PBatchNorm:
    """Input-channel removal for batch norms (weight, bias, running stats)."""

    def drop_input_channel(self, index: Index, optimizer: torch.optim.Optimizer | None = None) -> None:
        """Remove channel(s) ``index``, affine or not, with their running stats."""
        label = self.pruning_name or f"{type(self).__name__}({self.num_features})"
        _drop_inputs(self, self.num_features, index, label, optimizer)


class PBatchNorm2d(_PBatchNorm, nn.BatchNorm2d):
    """``nn.BatchNorm2d`` that can lose channels."""

    pruning_name = ""


class PBatchNorm1d(_PBatchNorm, nn.BatchNorm1d):
    """``nn.BatchNorm1d`` that can lose channels."""

    pruning_name = ""


_CONVERSIONS: dict[type, type] = {
    nn.Conv2d: PConv2d,
    nn.Linear: PLinear,
    nn.BatchNorm2d: PBatchNorm2d,
    nn.BatchNorm1d: PBatchNorm1d,
}


def convert(model: nn.Module) -> nn.Module:
    """Swap stock ``Conv2d``/``Linear``/``BatchNorm{1,2}d`` for prunable ones in place.

    The modules keep their parameters (the same ``nn.Parameter`` objects), so
    an existing optimizer still applies. Subclasses of those types are left
    alone. Returns ``model``.

    Example
    -------
    >>> net = convert(nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4)))
    >>> type(net[0]).__name__
    'PConv2d'
    """
    for name, module in model.named_modules():
        target = _CONVERSIONS.get(type(module))
        if target is None:
            continue
        module.__class__ = target
        if hasattr(module, "_init_pruning"):
            module._init_pruning()
        module.pruning_name = name
    return model
