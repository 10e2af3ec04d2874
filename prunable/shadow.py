"""Channel labels ("shadows") and the raw record of a trace.

A shadow is an integer tensor shaped like an activation whose entries name the
channel each element belongs to. Shadows are stored as broadcast views of the
smallest tensor holding them, so their cost follows the number of channels.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from .surgery import Role

__all__ = ["FREE", "FIXED", "Target", "Trace", "canonical", "varying_dims", "labels_along"]

FREE, FIXED = -1, -2


@dataclass(frozen=True)
class Target:
    """One sliceable thing: a module side (``role``) or one parameter axis."""

    module: nn.Module = field(compare=False, hash=False)
    name: str
    role: Role | None = None
    param: str | None = None
    axis: int = 0
    uid: int = 0

    def label(self) -> str:
        if self.param is not None:
            return f"{self.name}.{self.param}" if self.name else self.param
        return f"{self.name or '<model>'}.{self.role.value}"


@dataclass
class Trace:
    """Raw result of tracing: slots, union edges, producers and consumers."""

    n_slots: int = 0
    edges: list[torch.Tensor] = field(default_factory=list)
    blocked: list[tuple[torch.Tensor, str]] = field(default_factory=list)
    producers: dict[tuple, tuple[Target, torch.Tensor]] = field(default_factory=dict)
    consumers: dict[tuple, tuple[Target, torch.Tensor]] = field(default_factory=dict)
    params: dict[int, tuple[Target, torch.Tensor]] = field(default_factory=dict)
    measure: dict[tuple, tuple[str, int]] = field(default_factory=dict)
    #: (slots as rows, what the rows are): every row must lose as many channels as the others
    #: (the heads of an attention layer, the groups of a GroupNorm)
    blocks: list[tuple[torch.Tensor, str]] = field(default_factory=list)
    #: (module, module name, int attribute, labels): a size attribute used as a literal shape
    sizes: list[tuple[nn.Module, str, str, torch.Tensor]] = field(default_factory=list)

    def new_slots(self, n: int) -> torch.Tensor:
        slots = torch.arange(self.n_slots, self.n_slots + n)
        self.n_slots += n
        return slots

    def union(self, a: torch.Tensor, b: torch.Tensor, reason: str = "fixed-size operand") -> None:
        """Record that labels ``a`` and ``b`` (same shape) are the same channel."""
        a, b = _compress(a, b)
        both = (a >= 0) & (b >= 0)
        if both.any():
            x, y = a[both], b[both]
            if len(x) > 64:  # deduplicate through one 1-D key: much faster than unique(dim=0)
                base = int(y.max()) + 1
                key = torch.unique(x * base + y)
                x, y = key // base, key % base
            self.edges.append(torch.stack([x, y], 1))
        for x, y in ((a, b), (b, a)):
            hit = (x >= 0) & (y == FIXED)
            if hit.any():
                self.block(x[hit], reason)

    def block(self, labels: torch.Tensor, reason: str) -> None:
        labels = _core(canonical(labels)) if labels.dim() else labels
        labels = labels[labels >= 0]
        if labels.numel():
            self.blocked.append((torch.unique(labels), reason))


def _core(shadow: torch.Tensor) -> torch.Tensor:
    """``shadow`` with every broadcast (stride-0) dim narrowed to size one: a cheap view."""
    for d in range(shadow.dim()):
        if shadow.stride(d) == 0 and shadow.shape[d] > 1:
            shadow = shadow.narrow(d, 0, 1)
    return shadow


def canonical(shadow: torch.Tensor) -> torch.Tensor:
    """The same labels as a broadcast view of the smallest tensor holding them.

    Shadows are mostly constant along batch and spatial dims; storing them as
    ``expand``-ed views keeps every later check proportional to the number of
    channels, not to the activation size.
    """
    core = _core(shadow)
    for d in sorted(range(core.dim()), key=lambda i: -core.shape[i]):
        if core.shape[d] > 1 and bool((core == core.narrow(d, 0, 1)).all()):
            core = core.narrow(d, 0, 1)
    return core.expand(shadow.shape)


def _compress(*shadows: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """Narrow dims along which every shadow is constant to size one."""
    cores = [_core(canonical(s)) for s in shadows]
    shape = [max(c.shape[d] for c in cores) for d in range(cores[0].dim())]
    return tuple(c.expand(shape) for c in cores)


def varying_dims(shadow: torch.Tensor) -> list[int]:
    """Dims along which the labels of ``shadow`` change."""
    core = _core(canonical(shadow))
    return [d for d in range(core.dim()) if core.shape[d] > 1]


def labels_along(shadow: torch.Tensor, dim: int) -> torch.Tensor | None:
    """Label of each index of ``dim`` if labels are constant along other dims, else None."""
    core = _core(canonical(shadow))
    if any(core.shape[d] > 1 for d in range(core.dim()) if d != dim % core.dim()):
        return None
    return core.reshape(-1).expand(shadow.shape[dim]).clone()
