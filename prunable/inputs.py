"""Example inputs: the one convention every part of prunable reads them with.

``example_inputs`` (of :class:`~prunable.Pruner`, :class:`~prunable.DependencyGraph`,
:func:`~prunable.count_flops` …) is one of

* a tensor, or anything that is not a tuple or a dict (a list of images for a
  torchvision detector): the model's only positional argument, ``model(x)``;
* a tuple: the positional arguments, ``model(*inputs)``;
* a dict: keyword arguments, ``model(**inputs)`` (a Hugging Face model's
  tokenizer output);
* a pair ``(args, kwargs)`` — a 2-tuple whose first item is a tuple and whose
  second is a dict: ``model(*args, **kwargs)``. To pass a dict as a positional
  argument, write ``((the_dict,), {})``.

Example
-------
>>> import torch
>>> split_inputs(torch.zeros(2))[0][0].shape
torch.Size([2])
>>> split_inputs({"input_ids": torch.zeros(1, 4, dtype=torch.long)})[1].keys()
dict_keys(['input_ids'])
>>> args, kwargs = split_inputs(((torch.zeros(1),), {"mask": None}))
>>> len(args), list(kwargs)
(1, ['mask'])
"""

from __future__ import annotations

import traceback
from typing import Any

import torch
from torch import nn
from torch.utils._pytree import tree_flatten, tree_map

__all__ = ["split_inputs", "call_model", "input_tensors", "inputs_to", "batch_size", "first_failing_op"]


def split_inputs(example_inputs: Any) -> tuple[tuple, dict]:
    """``(args, kwargs)`` of ``example_inputs`` under the module's convention.

    Example
    -------
    >>> split_inputs((1, 2))
    ((1, 2), {})
    """
    if isinstance(example_inputs, dict):
        return (), dict(example_inputs)
    if isinstance(example_inputs, tuple):
        if len(example_inputs) == 2 and type(example_inputs[0]) is tuple and isinstance(example_inputs[1], dict):
            return example_inputs[0], dict(example_inputs[1])
        return example_inputs, {}
    return (example_inputs,), {}


def call_model(model: nn.Module, example_inputs: Any) -> Any:
    """``model(*args, **kwargs)`` for ``example_inputs`` (see :func:`split_inputs`).

    Example
    -------
    >>> call_model(nn.Identity(), {"input": torch.ones(1)})
    tensor([1.])
    """
    args, kwargs = split_inputs(example_inputs)
    return model(*args, **kwargs)


def input_tensors(example_inputs: Any) -> list[torch.Tensor]:
    """Every tensor of ``example_inputs``, positional ones first.

    Example
    -------
    >>> len(input_tensors(([torch.ones(1), torch.ones(2)], {"y": torch.ones(3)})))
    3
    """
    return [t for t in tree_flatten(split_inputs(example_inputs))[0] if isinstance(t, torch.Tensor)]


def inputs_to(example_inputs: Any, device: str | torch.device) -> Any:
    """``example_inputs`` with every tensor moved to ``device`` (same structure).

    Example
    -------
    >>> inputs_to({"x": torch.ones(1)}, "meta")["x"].device
    device(type='meta')
    """
    return tree_map(lambda t: t.to(device) if isinstance(t, torch.Tensor) else t, example_inputs)


def batch_size(example_inputs: Any) -> int:
    """Examples in ``example_inputs``: the length of a leading list of tensors (a detector's
    list of images), else the first dim of the first tensor with one (1 if none).

    Example
    -------
    >>> batch_size([torch.ones(3, 8, 8), torch.ones(3, 6, 8)]), batch_size({"ids": torch.ones(4, 7)})
    (2, 4)
    """
    args, kwargs = split_inputs(example_inputs)
    lead = args[0] if args else next(iter(kwargs.values()), None)
    if isinstance(lead, list) and lead and all(isinstance(t, torch.Tensor) for t in lead):
        return len(lead)
    first = next((t for t in input_tensors(example_inputs) if t.dim()), None)
    return int(first.shape[0]) if first is not None else 1


def first_failing_op(exc: BaseException) -> str:
    """What failed in a forward pass, for a message: the torch operation that raised
    (the innermost ``func`` being dispatched by a ``__torch_function__`` mode or
    override, when there is one), then the error's first line.

    Example
    -------
    >>> first_failing_op(RuntimeError("meta tensors have no data\\nmore"))
    'RuntimeError: meta tensors have no data'
    """
    op = None
    for frame, _ in traceback.walk_tb(exc.__traceback__):
        if frame.f_code.co_name == "__torch_function__":
            func = frame.f_locals.get("func")
            op = getattr(func, "__name__", None) or op
    text = (str(exc).splitlines() or [""])[0].split(". ")[0]
    what = f"{type(exc).__name__}: {text[:160]}"
    return f"{op}: {what}" if op else what
