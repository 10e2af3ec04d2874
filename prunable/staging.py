"""Per-module transactions for :func:`prunable.surgery.apply_cuts`: slice, swap, undo.

Slicing a whole model at once (every new parameter, gradient and optimizer
moment built before any is swapped in) needs about the touched tensors once
more at the peak — with AdamW four times the parameters. Here one module's
tensors are staged, swapped in, and the old ones freed before the next module
is staged, so the extra memory at the peak is the largest module's share.

What makes it safe: everything that can be checked without allocating (the
handlers, index ranges, agreeing cuts) is checked before the first swap, and
the plan was trial-run on a meta copy. What can still fail mid-way (a device
out of memory, an exotic tensor subclass) is undone: for every tensor swapped
the *removed* slices are kept in host memory (:class:`Undo`), and the old
tensor is rebuilt by putting kept and removed slices back in place, bitwise.
The undo log costs the removed channels only, and no device memory: a GPU
holds at most one module's new tensors beyond the model's own. A tensor that
lives in host memory is kept whole instead (``whole=True``: no copy and no
slicing of what goes; its memory is released when the cut is done).

Example
-------
>>> t = torch.arange(12.).view(3, 4)
>>> axes = {0: torch.tensor([0, 2]), 1: torch.tensor([1, 3])}
>>> new, removed = slice_with_undo(t, axes)
>>> new.tolist(), torch.equal(unslice(new, axes, removed, t.shape), t)
([[1.0, 3.0], [9.0, 11.0]], True)
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from .errors import SurgeryError

__all__ = [
    "slice_with_undo", "unslice", "Undo", "SurgeryStats", "stage", "swap", "swap_parameter", "roll_back",
    "nbytes", "size_attributes", "is_parameter",
]


_META = torch.device("meta")


def _complement(keep: torch.Tensor, size: int) -> torch.Tensor:
    mask = torch.ones(size, dtype=torch.bool, device=keep.device)
    mask[keep] = False
    return mask.nonzero().flatten()


def slice_with_undo(tensor: torch.Tensor, axes: dict[int, torch.Tensor], whole: bool = False,
                    ) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """``tensor`` keeping ``axes[a]`` along each axis ``a`` (in order), and the slices removed
    on the way, moved to host memory: what :func:`unslice` needs to rebuild ``tensor``.
    With ``whole``, ``[tensor]`` itself instead of the removed slices (no copy)."""
    out, removed = tensor, []
    if tensor.is_meta:  # nothing to keep: a meta tensor is its shape
        shape = list(tensor.shape)
        for axis, keep in axes.items():
            shape[axis] = keep.shape[0]
        return torch.empty(shape, dtype=tensor.dtype, device=_META), removed
    if whole:  # a whole tensor is its own undo
        device = tensor.device
        for axis, keep in axes.items():
            out = out.index_select(axis, keep if keep.device == device else keep.to(device))
        return out.contiguous(), [tensor]
    for axis, keep in axes.items():
        gone = _complement(keep, out.shape[axis]).to(tensor.device)  # on keep's device: meta has no nonzero
        removed.append(out.index_select(axis, gone).to("cpu"))
        out = out.index_select(axis, keep.to(tensor.device))
    return out.contiguous(), removed


def unslice(new: torch.Tensor, axes: dict[int, torch.Tensor], removed: list[torch.Tensor],
            shape: torch.Size, whole: bool = False) -> torch.Tensor:
    """The tensor of ``shape`` that :func:`slice_with_undo` cut into ``new`` and ``removed``
    (``whole``: ``removed`` holds that tensor itself)."""
    if whole:
        return removed[0]
    if new.is_meta:
        return new.new_empty(shape)
    out = new
    sizes = list(shape)
    partial = [list(shape)]
    for axis in list(axes)[:-1]:  # the shape after each cut but the last
        sizes[axis] = len(axes[axis])
        partial.append(list(sizes))
    for (axis, keep), gone, size in reversed(list(zip(axes.items(), removed, partial))):
        whole = out.new_empty(size)
        whole.index_copy_(axis, keep.to(new.device), out)
        whole.index_copy_(axis, _complement(keep, size[axis]).to(new.device), gone.to(new.device))
        out = whole
    return out


@dataclass
class Undo:
    """What one swapped tensor needs to be put back: removed slices of it, its gradient
    and its optimizer state tensors (by state key), and the shape before the cut."""

    entry: Any
    shape: torch.Size
    removed: list[torch.Tensor]
    grad_removed: list[torch.Tensor] | None = None
    state_removed: dict[str, list[torch.Tensor]] = field(default_factory=dict)
    #: ``removed`` (and the gradient's and state's) hold the old tensors whole (host memory)
    whole: bool = False

    @property
    def nbytes(self) -> int:
        parts = [*self.removed, *(self.grad_removed or [])] + [t for v in self.state_removed.values() for t in v]
        return sum(t.numel() * t.element_size() for t in parts)


@dataclass
class SurgeryStats:
    """Bytes staged by one :func:`~prunable.surgery.apply_cuts` call.

    ``peak_bytes``: the most new tensor bytes alive at once beyond the model's
    own, on the model's device (one module's parameters, gradients and optimizer
    state); ``total_bytes``: all new tensor bytes, which staging the whole model
    at once would hold at its peak; ``undo_bytes``: the undo log (removed slices),
    in host memory.
    """

    peak_bytes: int = 0
    total_bytes: int = 0
    undo_bytes: int = 0

    def staged(self, nbytes: int, undo_bytes: int) -> None:
        self.total_bytes += nbytes
        self.peak_bytes = max(self.peak_bytes, nbytes)
        self.undo_bytes += undo_bytes


def size_attributes(module: nn.Module | dict[str, object]) -> dict[str, object]:
    """The int, bool, float and tuple attributes of ``module`` (its sizes), to restore on failure;
    ``module`` may also be a copy of a module's ``vars`` taken before the cut."""
    attributes = module if isinstance(module, dict) else vars(module)
    return {k: v for k, v in attributes.items() if type(v) in (int, bool, float, tuple)}


def nbytes(*parts: torch.Tensor | None) -> int:
    """Bytes of the tensors among ``parts`` (None counts 0)."""
    return sum(t.numel() * t.element_size() for t in parts if t is not None)


def stage(entry: Any, optimizer: torch.optim.Optimizer | None) -> tuple:
    """The new tensors of one entry and the undo record that rebuilds the old ones."""
    tensor = entry.tensor
    whole = tensor.is_cpu  # host memory already: keep the old tensors, copy nothing
    try:  # a meta tensor is only read for its shape: no detached alias to make
        new, removed = slice_with_undo(tensor if tensor.is_meta else tensor.detach(), entry.axes, whole)
        log = Undo(entry, tensor.shape, removed, None, {}, whole)
        grad, new_grad = tensor.grad, None
        if grad is not None:
            new_grad, log.grad_removed = slice_with_undo(grad, entry.axes, whole)
        state = None
        if optimizer is not None and tensor in optimizer.state:
            state = dict(optimizer.state[tensor])
            for k, v in state.items():
                if isinstance(v, torch.Tensor) and v.shape == tensor.shape:
                    state[k], log.state_removed[k] = slice_with_undo(v, entry.axes, whole)
    except Exception as exc:  # noqa: BLE001 - re-raised with context
        raise SurgeryError(f"{type(entry.owner).__name__}.{entry.attr}: slicing failed: {exc}") from exc
    return entry, new, new_grad, state, log


def roll_back(undo: list[Undo], optimizer: torch.optim.Optimizer | None) -> None:
    """Put back every tensor of ``undo`` (newest first) as it was before its swap."""
    for log in reversed(undo):
        entry, axes, tensor = log.entry, log.entry.axes, log.entry.tensor
        current = tensor if isinstance(tensor, nn.Parameter) else entry.owner._buffers[entry.attr]
        old = unslice(current.detach(), axes, log.removed, log.shape, log.whole)
        grad = tensor.grad if isinstance(tensor, nn.Parameter) else None
        old_grad = (unslice(grad, axes, log.grad_removed, log.shape, log.whole)
                    if log.grad_removed is not None else None)
        state = None
        if optimizer is not None and tensor in optimizer.state:
            state = dict(optimizer.state[tensor])
            for k, gone in log.state_removed.items():
                state[k] = unslice(state[k], axes, gone, log.shape, log.whole)
        swap(entry, old, old_grad, state, optimizer)


def swap(entry: Any, new: torch.Tensor, new_grad: torch.Tensor | None, state: dict | None,
         optimizer: torch.optim.Optimizer | None) -> None:
    """Put ``new`` (and its gradient and optimizer state) in place of ``entry.tensor``."""
    tensor = entry.tensor
    if is_parameter(tensor):
        swap_parameter(tensor, new)
        tensor.grad = new_grad
        if state is not None:
            optimizer.state[tensor] = state
    else:
        entry.owner._buffers[entry.attr] = new


def is_parameter(t: torch.Tensor) -> bool:
    """``isinstance(t, nn.Parameter)``, without the slow path of ``nn.Parameter``'s metaclass
    for exact parameters and plain tensors.

    Example
    -------
    >>> is_parameter(nn.Parameter(torch.ones(1))), is_parameter(torch.ones(1))
    (True, False)
    """
    if type(t) is nn.Parameter:
        return True
    if type(t) is torch.Tensor and not t.__dict__:
        return False
    return isinstance(t, nn.Parameter)


def swap_parameter(param: nn.Parameter, new: torch.Tensor) -> None:
    """Give ``param`` the data (and shape) of ``new``, keeping the Python object.

    ``torch.utils.swap_tensors`` also replaces the autograd metadata, so a graph
    still alive from before the cut cannot poison the next backward with the old
    shape. Falls back to ``.data`` assignment when swapping is impossible. A parameter
    nothing else refers to (no graph, view or tensor hook) takes ``.data`` directly:
    there is nothing to carry over.
    """
    if param.is_meta and new.is_meta and not param._backward_hooks and param.grad is None:
        param.data = new  # a shape without values: no autograd history or hooks to carry over
        return
    if _alone(param):  # no autograd node, view or hook holds it: nothing for a swap to carry over
        param.data = new
        return
    replacement = nn.Parameter(new, requires_grad=param.requires_grad)
    replacement.__dict__.update(param.__dict__)
    try:
        torch.utils.swap_tensors(param, replacement)
    except RuntimeError:  # refused: a view (or another tensor) shares this one
        _forget_accumulator(param)
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


def _forget_accumulator(param: nn.Parameter) -> None:
    """Make autograd drop ``param``'s gradient accumulator before its data changes shape.

    A graph alive from before the cut (a differentiable view of the weight, ``w[0]``) keeps
    the accumulator, which still expects the old shape: the next backward through the
    pruned layer would fail. ``.data`` of another dtype makes autograd forget it (it does
    so only on a dtype or device change), so the next forward pass makes a fresh one.
    """
    if param.requires_grad:
        param.data = torch.empty(0, dtype=torch.float16 if param.dtype != torch.float16 else torch.float32,
                                 device=param.device)


def _alone(param: nn.Parameter) -> bool:
    """True when nothing but ``param`` itself refers to its tensor: no autograd graph (an
    ``AccumulateGrad`` node holds the tensor while a graph from before the cut is alive),
    no view, no tensor hook, and ``param`` is an exact ``nn.Parameter``. Then no one can
    tell ``param.data = new`` from a swap, which costs several times more."""
    if type(param) is not nn.Parameter or param._backward_hooks:
        return False
    if getattr(param, "_post_accumulate_grad_hooks", None):
        return False
    use_count = getattr(param, "_use_count", None)  # what swap_tensors itself checks
    return use_count is not None and use_count() == 1
