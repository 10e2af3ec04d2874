"""FLOPs, parameter counts and CPU latency.

FLOPs come from :class:`torch.utils.flop_counter.FlopCounterMode` run on a
``meta`` copy of the model: no arithmetic is done and the model (its running
statistics, its train/eval mode) is untouched.

Example
-------
>>> import torch
>>> from torch import nn
>>> net = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU())
>>> count_flops(net, torch.randn(1, 3, 10, 10))
27648
>>> count_params(net)
224
"""

from __future__ import annotations

import copy
import itertools
import statistics
import time
from typing import Any

import torch
from torch import nn
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_flatten
from torch.utils.flop_counter import FlopCounterMode

from .copies import meta_clone
from .inputs import call_model, inputs_to
from .meta import RNN_KERNELS, call, rnn_meta

__all__ = ["count_flops", "count_params", "module_flops", "measure_latency", "devices_to_sync"]


class _RecurrentFlops(TorchFunctionMode):
    """Inside a ``FlopCounterMode``: a recurrent kernel on a padded meta sequence is counted from
    its shapes (:func:`~prunable.meta.rnn_meta`: the same count, without running every time step);
    FLOP-free operations on meta tensors skip their slow decomposed meta kernels
    (:func:`~prunable.meta.call` with ``counted=True``)."""

    def __init__(self, counter: FlopCounterMode) -> None:
        super().__init__()
        self.counter = counter

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        fast = rnn_meta(func, args, kwargs) if func in RNN_KERNELS else None
        if fast is None:
            return call(func, args, kwargs, counted=True)
        for parent in set(self.counter.mod_tracker.parents):
            self.counter.flop_counts[parent][torch.ops.aten.addmm] += fast[1]
        return fast[0]


def _count(model: nn.Module, inputs: Any) -> FlopCounterMode:
    """Count on a meta copy; on a real copy when the forward pass needs real values
    (data-dependent post-processing of a detector)."""
    try:
        clone = _frozen(meta_clone(model))
        with torch.no_grad(), FlopCounterMode(display=False) as counter, _RecurrentFlops(counter):
            call_model(clone, inputs_to(inputs, "meta"))
    except Exception:  # noqa: BLE001 - data-dependent code: count with real values
        clone = _frozen(copy.deepcopy(model))
        with torch.no_grad(), FlopCounterMode(display=False) as counter:
            call_model(clone, inputs)
    return counter


def _frozen(clone: nn.Module) -> nn.Module:
    """``clone`` (a copy of the user's model) in eval mode, its parameters not requiring grad.

    Eval mode lets a batch of one through BatchNorm1d. Under ``no_grad`` a view of a
    parameter (``self.cls_token.expand(n, -1, -1)``) still requires grad but has no
    grad_fn, and the counter's module tracker asserts on such a module input; with the
    copy's parameters frozen no input requires grad.
    """
    for param in clone.parameters():
        param.requires_grad_(False)
    return clone.eval()


def count_flops(model: nn.Module, inputs: Any) -> int:
    """FLOPs of one forward pass of ``model`` on ``inputs`` (a tensor, a tuple of
    positional inputs, a dict of keyword inputs or an ``(args, kwargs)`` pair, see
    :mod:`prunable.inputs`).

    Counted as torch counts them (a multiply-add is 2 FLOPs) for the ops
    :class:`~torch.utils.flop_counter.FlopCounterMode` knows (convolutions,
    matrix products, attention).
    """
    return int(_count(model, inputs).get_total_flops())


def module_flops(model: nn.Module, inputs: Any) -> dict[str, int]:
    """FLOPs per module qualified name (``""`` is the whole model)."""
    counts = _count(model, inputs).get_flop_counts()
    root = type(model).__name__
    out = {}
    for name, ops in counts.items():
        if name == "Global":
            continue
        key = "" if name == root else name[len(root) + 1:] if name.startswith(root + ".") else name
        out[key] = int(sum(ops.values()))
    return out


def count_params(model: nn.Module) -> int:
    """Number of parameters of ``model`` (shared parameters counted once)."""
    return sum(p.numel() for p in model.parameters())


def devices_to_sync(model: nn.Module, inputs: Any) -> list[torch.device]:
    """Every CUDA device holding a parameter or buffer of ``model`` or a tensor of ``inputs``
    (nested in tuples, lists and dicts), in a stable order.

    Example
    -------
    >>> devices_to_sync(nn.Linear(2, 2), {"x": [torch.randn(1, 2)]})
    []
    """
    tensors = itertools.chain(model.parameters(), model.buffers(), tree_flatten(inputs)[0])
    found = {t.device for t in tensors if isinstance(t, torch.Tensor) and t.is_cuda}
    return sorted(found, key=lambda d: -1 if d.index is None else d.index)


def _synchronize(devices: list[torch.device]) -> None:
    for device in devices:
        torch.cuda.synchronize(device)


@torch.no_grad()
def measure_latency(model: nn.Module, inputs: Any, warmup: int = 3, repeats: int = 10) -> float:
    """Median wall time in seconds of one forward pass on ``inputs`` (read as by
    :func:`count_flops`), in eval mode.

    The model's train/eval mode is restored afterwards. Every CUDA device the
    model's parameters and buffers and the inputs (nested ones too) use is
    synchronised before and after each run (:func:`devices_to_sync`), so the
    time covers the kernels, not only their launch.
    """
    was_training = model.training
    model.eval()
    devices = devices_to_sync(model, inputs)
    times = []
    try:
        for i in range(warmup + repeats):
            _synchronize(devices)
            start = time.perf_counter()
            call_model(model, inputs)
            _synchronize(devices)
            if i >= warmup:
                times.append(time.perf_counter() - start)
    finally:
        model.train(was_training)
    return statistics.median(times)
