"""The softmax temperature of an attention, kept exact when its head dims are pruned.

Two ways a scale can follow the head dim:

- ``scaled_dot_product_attention`` with its default scale ``1/sqrt(q.shape[-1])``:
  the layer producing the queries is rescaled on pruning (:class:`QueryScale`), so
  the temperature of the remaining dims is kept;
- a scale computed in ``forward`` from a number that pruning rewrites:
  ``scores / math.sqrt(self.head_dim)`` (a size attribute that follows the channels)
  or ``q.shape[-1] ** -0.5``. The tracer sees only the Python float; it records the
  floats each module multiplies or divides tensors by (:func:`scalar_operand`), and
  :func:`derived_scales` finds those equal to ``sqrt(n)`` or ``1/sqrt(n)`` of a
  channel count ``n`` the pruning would change, unless the module stores that very
  float (``self.scale = head_dim ** -0.5`` in ``__init__`` is a constant). Those
  channels are kept, with a :class:`~prunable.reasons.SkipReason` naming the scale.

Example
-------
>>> from torch import nn
>>> attn = nn.Module()
>>> attn.head_dim = 8
>>> [str(r) for _, r in derived_scales([(attn, "attn", "head_dim", torch.arange(8))], {}, [(attn, 8 ** 0.5)])]
['attn: a scale sqrt(8) computed in forward from head_dim would change with it (the softmax temperature); kept']
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from .reasons import SkipKind, SkipReason
from .surgery import Role, handler_for, resolve

__all__ = ["QueryScale", "SCALING", "scalar_operand", "derived_scales"]

#: operations whose Python number operand scales a tensor (a softmax temperature, possibly)
SCALING = {"mul", "__mul__", "__rmul__", "div", "__truediv__", "mul_", "div_", "__imul__", "__itruediv__"}


@dataclass(frozen=True)
class QueryScale:
    """Rescales the query rows of a layer's outputs by ``sqrt(kept / before)`` after a cut.

    ``rows`` is a boolean mask over the producing layer's output channels (before
    the cut): True for the channels that become the queries of an attention with
    the default scale ``1/sqrt(head_dim)``. Every head keeps as many dims as every
    other, so ``kept / before`` (query rows) is ``head_dim' / head_dim``.

    Example
    -------
    >>> lin = nn.Linear(2, 4, bias=False)
    >>> _ = nn.init.ones_(lin.weight)
    >>> from prunable.surgery import Cut, apply_cuts
    >>> apply_cuts([Cut(lin, Role.OUT, torch.tensor([0, 2, 3]), rescale=QueryScale(torch.tensor([1, 1, 0, 0]).bool()))])
    >>> lin.weight[:, 0].tolist()                      # one query row of two left: sqrt(1/2)
    [0.7071067690849304, 1.0, 1.0]
    """

    rows: torch.Tensor

    def bound(self, keep: torch.Tensor) -> "_Rescaler":
        """What to do once the layer keeps output channels ``keep``."""
        queries = self.rows[keep.cpu()]
        return _Rescaler(queries, math.sqrt(int(queries.sum()) / max(int(self.rows.sum()), 1)))


@dataclass(frozen=True)
class _Rescaler:
    queries: torch.Tensor  # over the kept output channels: True for query rows
    factor: float

    def resize(self, module: nn.Module, role: Role | None, n: int) -> None:
        if self.factor == 1.0:
            return
        handler = handler_for(module)
        with torch.no_grad():
            for name, axis in handler.params(module, Role.OUT).items():
                owner, attr = resolve(module, name)
                t = getattr(owner, attr, None)  # len(queries) rows along axis: checked when traced
                if not isinstance(t, torch.Tensor):
                    continue
                scale = torch.where(self.queries, self.factor, 1.0).to(t.device, t.dtype)
                shape = [1] * t.dim()
                shape[axis] = -1
                t.mul_(scale.view(shape))



def scalar_operand(name: str, args: tuple, kwargs: dict) -> float | None:
    """The Python number a tensor is multiplied or divided by in operation ``name``, if any.

    Example
    -------
    >>> scalar_operand("__truediv__", (torch.ones(1), 2.0), {})
    2.0
    """
    if name not in SCALING:
        return None
    numbers = [a for a in (*args, *kwargs.values()) if type(a) in (int, float)]
    tensors = [a for a in (*args, *kwargs.values()) if isinstance(a, torch.Tensor)]
    return float(numbers[0]) if len(numbers) == 1 and len(tensors) == 1 else None


def _close(a: float, b: float) -> bool:
    return abs(a - b) <= 1e-9 * max(abs(a), abs(b))


def _derived(value: float, n: int) -> str | None:
    """``"sqrt(n)"`` or ``"1/sqrt(n)"`` when ``value`` is that number."""
    if n <= 1:
        return None
    for text, v in ((f"sqrt({n})", math.sqrt(n)), (f"1/sqrt({n})", 1 / math.sqrt(n))):
        if _close(value, v):
            return text
    return None


def _stored(module: nn.Module | None, value: float) -> bool:
    """Does ``module`` hold ``value`` as a float attribute (a scale fixed in ``__init__``)?"""
    return module is not None and any(type(v) is float and _close(v, value) for v in vars(module).values())


def derived_scales(sizes: list[tuple], shape_sizes: dict[int, list], scalars: list[tuple[Any, float]]
                   ) -> list[tuple[torch.Tensor, SkipReason]]:
    """Channels whose pruning would change a scale computed in ``forward``, with the reason.

    ``sizes`` are the tracer's size attributes ``(module, name, attribute, labels)``,
    ``shape_sizes`` the channel counts read from tensor shapes (count → labels read,
    None for unknown), ``scalars`` the ``(running module, number)`` of every scaling
    operation with a Python number.
    """
    out = []
    for module, name, attr, labels in sizes:
        for owner, value in scalars:
            text = _derived(value, len(labels)) if owner is module and not _stored(owner, value) else None
            if text:
                out.append((labels, SkipReason(SkipKind.SIZE_ATTRIBUTE, (
                    f"{name or '<model>'}: a scale {text} computed in forward from {attr} would change with it "
                    "(the softmax temperature); kept"))))
                break
    for n, reads in shape_sizes.items():
        hit = next(((o, v) for o, v in scalars if _derived(v, n) and not _stored(o, v)), None)
        if hit is not None:
            reason = SkipReason(SkipKind.SIZE_ATTRIBUTE, f"a scale {_derived(hit[1], n)} computed in forward "
                                "from a tensor's shape would change with its channels (the softmax temperature); kept")
            out += [(r, reason) for r in reads if r is not None]
    return out
