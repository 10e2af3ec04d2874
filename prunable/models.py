"""Seed-style models built from prunable layers: ``CharNet`` and ``vgg``.

Their ``prune()`` removes the globally least important feature map — the
smallest layer-wise L2-normalised Taylor estimate across every convolution and
hidden Linear — and fixes every consumer, by walking the layer list (no
hard-coded indices).

Example
-------
>>> import torch
>>> net = CharNet(10, config=[8, "M", 16, "M"], input_size=16)
>>> with net.pruning(True):
...     net(torch.randn(4, 1, 16, 16)).logsumexp(1).sum().backward()
>>> layer, index = net.prune()
>>> net(torch.randn(2, 1, 16, 16)).shape
torch.Size([2, 10])
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from .errors import EstimationError
from .nn import PBatchNorm1d, PBatchNorm2d, PConv2d, PLinear, PruningSwitch, TaylorMixin
from .surgery import Cut, Role, apply_cuts, handler_for, keep_indices

__all__ = ["SeedNet", "CharNet", "vgg", "CHARNET_CONFIG"]

CHARNET_CONFIG: tuple = (96, "M", 128, "M", 160, "M", 256, 256, "M", 384, 384, "M")
Config = Sequence[int | str]


def _pooled(size: int, pool: nn.MaxPool2d) -> int:
    k, s, p = pool.kernel_size, pool.stride, pool.padding
    return (size + 2 * p - k) // s + 1


class SeedNet(nn.Module):
    """A plain CNN (``features`` then ``classifier``) with a seed-style ``prune()``.

    Parameters
    ----------
    config
        Output channels of each 3×3 convolution, ``"M"`` for a 3×3/stride-2 max pool.
    num_classes, in_channels, input_size
        Output classes, input channels and square input side.
    hidden
        Width of the hidden fully connected layer.
    batch_norm
        Put a ``PBatchNorm2d`` (``PBatchNorm1d`` in the classifier) after each layer.
    activation
        ``"prelu"`` (per-channel PReLU) or ``"relu"``.
    """

    def __init__(
        self, config: Config, num_classes: int, in_channels: int = 3, input_size: int = 32,
        hidden: int = 512, batch_norm: bool = True, activation: str = "relu", dropout: float = 0.5,
    ) -> None:
        super().__init__()
        if activation not in ("relu", "prelu"):
            raise ValueError(f"activation must be 'relu' or 'prelu', got {activation!r}")
        act = (lambda c: nn.PReLU(c)) if activation == "prelu" else (lambda c: nn.ReLU(inplace=True))
        layers: list[nn.Module] = []
        channels, size = in_channels, input_size
        for item in config:
            if item == "M":
                layers.append(nn.MaxPool2d(3, stride=2, padding=1))
                size = _pooled(size, layers[-1])
                continue
            layers.append(PConv2d(channels, int(item), 3, padding=1, bias=not batch_norm))
            layers += [PBatchNorm2d(int(item))] if batch_norm else []
            layers.append(act(int(item)))
            channels = int(item)
        self.features = nn.Sequential(*layers)
        self.spatial = (size, size)
        head: list[nn.Module] = [nn.Flatten(), PLinear(channels * size * size, hidden, bias=not batch_norm)]
        head += [PBatchNorm1d(hidden)] if batch_norm else []
        head += [act(hidden), nn.Dropout(dropout), PLinear(hidden, num_classes)]
        self.classifier = nn.Sequential(*head)
        for name, module in self.named_modules():
            if hasattr(module, "pruning_name"):
                module.pruning_name = name

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x))

    def prunable_layers(self) -> list[TaylorMixin]:
        """Convolutions and hidden Linear layers, in order (the output layer excluded)."""
        layers = [m for m in self.modules() if isinstance(m, TaylorMixin)]
        return layers[:-1]

    def pruning(self, flag: bool = True) -> PruningSwitch:
        """Turn Taylor estimation on/off in every prunable layer (context manager too)."""
        previous = any(m.is_pruning for m in self.prunable_layers())
        for m in self.prunable_layers():
            m.pruning(flag)
        return PruningSwitch(self, previous)

    def reset_estimates(self) -> None:
        """Forget accumulated estimates in every layer."""
        for m in self.prunable_layers():
            m.reset_estimates()

    def prune(self, optimizer: torch.optim.Optimizer | None = None) -> tuple[str, int]:
        """Remove the globally least important feature map; returns ``(layer, index)``.

        Candidates are the layers with more than one channel left. Raises
        :class:`~prunable.errors.EstimationError` if no estimates were
        accumulated (turn ``pruning(True)`` on and run backward first).
        """
        best: tuple[float, int, TaylorMixin] | None = None
        for layer in self.prunable_layers():
            if not layer.has_estimates:
                raise EstimationError(f"{layer.pruning_name}: no Taylor estimates; run backward with pruning(True)")
            scores = layer.normalized_estimates()
            if len(scores) > 1 and (best is None or float(scores.min()) < best[0]):
                best = (float(scores.min()), int(scores.argmin()), layer)
        if best is None:
            raise EstimationError("every prunable layer is down to one channel")
        _, index, layer = best
        self._remove(layer, index, optimizer)
        return layer.pruning_name, index

    def _remove(self, producer: TaylorMixin, index: int, optimizer) -> None:
        """Cut channel ``index`` out of ``producer`` and of every consumer, atomically.

        The layers after ``producer`` are asked through their handlers: channelwise ones
        (norms, PReLU) follow it, the first one with input channels consumes it.
        """
        size = handler_for(producer).channels(producer, Role.OUT)
        keep = keep_indices(size, [index])
        cuts = [Cut(producer, Role.OUT, keep, name=producer.pruning_name)]
        order = list(self.features) + list(self.classifier)
        for module in order[order.index(producer) + 1:]:
            handler = handler_for(module)
            if handler is not None and handler.channelwise:
                cuts.append(Cut(module, Role.IN, keep))
            elif handler is not None and handler.params(module, Role.IN):
                cuts.append(Cut(module, Role.IN, _consumer_keep(handler.channels(module, Role.IN), size, keep)))
                break
        apply_cuts(cuts, optimizer)
        producer.keep_estimates(keep)


def _consumer_keep(inputs: int, size: int, keep: torch.Tensor) -> torch.Tensor:
    """Input indices a consumer of ``inputs`` channels keeps when its producer of ``size``
    channels keeps ``keep``: a flattened map gives each channel ``inputs // size`` inputs."""
    if inputs == size:
        return keep
    return torch.arange(inputs).view(size, -1)[keep].flatten()


class CharNet(SeedNet):
    """The capstone CNN for Japanese characters (after Xiao et al., 2017).

    Conv(3×3)→BN→PReLU blocks per ``config`` (default
    ``[96,'M',128,'M',160,'M',256,256,'M',384,384,'M']``), then
    Linear→BN1d→PReLU→Dropout→Linear.

    Example
    -------
    >>> CharNet(46, input_size=48)(torch.randn(2, 1, 48, 48)).shape
    torch.Size([2, 46])
    """

    def __init__(
        self, num_classes: int, config: Config | None = None, in_channels: int = 1,
        input_size: int = 96, hidden: int = 1024,
    ) -> None:
        super().__init__(
            list(config or CHARNET_CONFIG), num_classes, in_channels=in_channels,
            input_size=input_size, hidden=hidden, batch_norm=True, activation="prelu",
        )


def vgg(
    config: Config, num_classes: int, batch_norm: bool = True, in_channels: int = 3,
    input_size: int = 32, hidden: int = 512,
) -> SeedNet:
    """A VGG-style :class:`SeedNet` of P-layers with ReLU and the same ``prune()``.

    Example
    -------
    >>> net = vgg([16, "M", 32, "M"], 10)
    >>> net(torch.randn(2, 3, 32, 32)).shape
    torch.Size([2, 10])
    """
    return SeedNet(config, num_classes, in_channels, input_size, hidden, batch_norm, "relu")
