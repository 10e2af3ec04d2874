"""Save and load pruned models as plain data: no pickled code, ever.

:func:`save` works for any model (torchvision, timm, Hugging Face, your own
``nn.Module``); :func:`load` shrinks a fresh, unpruned instance of the same
architecture to the saved widths and loads the weights strictly. A prunable
file is one :func:`torch.save` archive holding only strings, numbers, lists,
dicts and tensors::

    {"format": "prunable/2",
     "state_dict": {...},                      # the pruned weights
     "sizes": {"layer1.0.conv1": {"in_channels": 64, "out_channels": 40, ...}, ...},
     "modules": {"layer1.0.conv1": "torch.nn.modules.conv.Conv2d", ...},
     "buffers": {...},                         # buffers left out of the state dict
     "architecture": {"name": "CharNet", ...} or None,   # optional: how to build it
     "plans": [{"features.0": [3, 7]}, ...],   # optional: pruner.history, in order
     "input_shape": [1, 1, 32, 32] or None,    # optional: an input the model accepts
     "meta": {"params": ..., "flops": ...}}    # for ``info``; free-form JSON data

Loading is shape-driven: every parameter or buffer of the fresh model that is
larger than its saved counterpart keeps its first entries along the shrunk
axes (through :func:`prunable.surgery.apply_cuts`, so parameters stay the same
objects), every integer size attribute (``out_channels``, ``hidden_dim``,
``head_dim`` …) takes its saved value, and the saved weights are then loaded
with ``strict=True``. No trace, no example input, no replayed plans. Files of
the first format (``prunable/1``: architecture + plans) are still read and
their plans replayed.

:func:`read` uses ``torch.load(..., weights_only=True)``, which refuses any
pickled object that is not plain data.

Example
-------
>>> import os, tempfile, torch
>>> from torch import nn
>>> from prunable import Pruner
>>> net = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 4, 3))
>>> _ = Pruner(net, torch.zeros(1, 3, 8, 8), criterion="l1").step(3)
>>> path = os.path.join(tempfile.mkdtemp(), "net.pt")
>>> save(net, path)
>>> fresh = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 4, 3))
>>> again = load(path, fresh)
>>> x = torch.randn(2, 3, 8, 8)
>>> again[0].out_channels, torch.equal(again(x), net.eval()(x))
(5, True)
"""

from __future__ import annotations

import os
import pickle
import types
import warnings
import zipfile
from collections.abc import Callable, Mapping, Sequence
from typing import IO, Any

import torch
from torch import nn

from .distributed import unwrap
from .errors import PrunableError
from .flops import count_flops, count_params
from .importance import WeightNorm
from .models import CharNet, SeedNet
from .plan import Plan
from .pruner import Pruner
from .restore import model_device, module_kinds, shrink_to, size_attributes

__all__ = [
    "FORMAT", "READABLE", "ModelFileError", "UnsafeFileError", "BUILDERS", "build_model", "save", "load", "read",
    "info",
]

#: The value of the ``"format"`` key of every file this version writes and reads.
FORMAT = "prunable/2"
#: Formats this version reads (``prunable/1``: plans replayed, no sizes).
READABLE = ("prunable/1", FORMAT)

PathOrFile = str | os.PathLike[str] | IO[bytes]


class ModelFileError(PrunableError, ValueError):
    """A model file is missing, unreadable, not a prunable file, or does not fit its architecture."""


class UnsafeFileError(ModelFileError):
    """A model file holds pickled objects other than plain data; it was not executed."""


def _charnet(arch: Mapping[str, Any]) -> nn.Module:
    return CharNet(**arch)


def _seednet(arch: Mapping[str, Any]) -> nn.Module:
    return SeedNet(**arch)


def _zoo_model(arch: Mapping[str, Any], family: str, build: Callable[[str, int], nn.Module],
               unknown: type[Exception]) -> nn.Module:
    """``build(model name, num_classes)`` for an architecture dict of a model family
    (``{'name': family, 'model': NAME, 'num_classes': N}``), with errors naming the family."""
    extra = set(arch) - {"model", "num_classes"}
    if "model" not in arch or extra:
        raise ModelFileError(
            f"a {family} architecture is {{'name': '{family}', 'model': NAME, 'num_classes': N}}, "
            f"got keys {sorted(arch)}")
    try:
        return build(arch["model"], arch.get("num_classes", 1000))
    except unknown as exc:
        raise ModelFileError(f"unknown {family} model {arch['model']!r}: {exc}") from exc


def _torchvision(arch: Mapping[str, Any]) -> nn.Module:
    try:
        import torchvision
    except ImportError as exc:
        raise ModelFileError("this file holds a torchvision model: pip install torchvision") from exc
    return _zoo_model(arch, "torchvision", lambda name, n: torchvision.models.get_model(
        name, weights=None, num_classes=n), ValueError)


def _timm(arch: Mapping[str, Any]) -> nn.Module:
    try:
        import timm
    except ImportError as exc:
        raise ModelFileError("this file holds a timm model: pip install timm") from exc
    return _zoo_model(arch, "timm", lambda name, n: timm.create_model(
        name, pretrained=False, num_classes=n), RuntimeError)


#: Known architectures: ``architecture["name"]`` → builder taking the other keys.
BUILDERS: Mapping[str, Callable[[Mapping[str, Any]], nn.Module]] = types.MappingProxyType(
    {"CharNet": _charnet, "SeedNet": _seednet, "torchvision": _torchvision, "timm": _timm})


def build_model(architecture: Mapping[str, Any]) -> nn.Module:
    """Build the unpruned model an architecture dict describes (see :data:`BUILDERS`).

    Parameters
    ----------
    architecture
        ``{"name": NAME, **kwargs}``; ``NAME`` is a key of :data:`BUILDERS`.

    Returns
    -------
    nn.Module
        A freshly initialised, unpruned model.

    Raises
    ------
    ModelFileError
        If the name is unknown or the builder rejects the arguments.

    Example
    -------
    >>> build_model({"name": "CharNet", "num_classes": 3, "config": [4], "input_size": 8}).spatial
    (8, 8)
    """
    if not isinstance(architecture, Mapping) or "name" not in architecture:
        raise ModelFileError(f"an architecture is a dict with a 'name' key, got {architecture!r}")
    name = architecture["name"]
    if name not in BUILDERS:
        raise ModelFileError(f"unknown architecture {name!r}; known: {sorted(BUILDERS)} (or pass build=)")
    kwargs = {k: v for k, v in architecture.items() if k != "name"}
    try:
        return BUILDERS[name](kwargs)
    except TypeError as exc:
        raise ModelFileError(f"architecture {name!r}: bad arguments {kwargs}: {exc}") from exc


def _eval_flops(model: nn.Module, shape: Sequence[int] | None) -> int | None:
    """FLOPs of one forward pass in eval mode (BatchNorm1d refuses batch 1 in train mode)."""
    if shape is None:
        return None
    was_training = model.training
    try:
        model.eval()
        return count_flops(model, torch.zeros(*shape, device=model_device(model)))
    except Exception:  # noqa: BLE001 - FLOPs are informative only
        return None
    finally:
        model.train(was_training)


def save(
    model: nn.Module, path: PathOrFile, *, plans: Sequence[Plan | Mapping[str, Sequence[int]]] = (),
    architecture: Mapping[str, Any] | None = None, example_input_shape: Sequence[int] | None = None,
    meta: Mapping[str, Any] | None = None,
) -> None:
    """Write a (pruned) model as plain data: its weights and the sizes :func:`load` needs.

    Any model works; nothing but the model and a path is required. Everything
    else is optional and only makes :func:`info` and :func:`load` more convenient.

    Parameters
    ----------
    model
        The pruned model.
    path
        File name or binary file object.
    plans
        The plans that turned the unpruned architecture into ``model``, in order
        (``pruner.history``); kept as history for :func:`info`.
    architecture
        JSON-able ``{"name": ..., **kwargs}`` that :func:`build_model` turns into the
        unpruned model, so that ``load(path)`` needs no model.
    example_input_shape
        Shape of an input the model accepts, e.g. ``(1, 1, 32, 32)``; the FLOPs of
        one such input are stored for :func:`info`.
    meta
        Extra JSON-able information stored as is (merged over ``params``/``flops``).

    Example
    -------
    >>> import io
    >>> buffer = io.BytesIO()
    >>> save(nn.Linear(4, 2), buffer)
    >>> buffer.tell() > 0
    True
    """
    if architecture is not None and not (isinstance(architecture, Mapping) and "name" in architecture):
        raise ModelFileError(f"an architecture is a dict with a 'name' key, got {architecture!r}")
    shape = None if example_input_shape is None else [int(s) for s in example_input_shape]
    model = unwrap(model)  # a compiled or (Distributed)DataParallel model is saved as the module it wraps
    state = model.state_dict()
    payload = {
        "format": FORMAT,
        "architecture": None if architecture is None else dict(architecture),
        "plans": [Plan.coerce(p).to_dict() for p in plans],
        "input_shape": shape,
        "state_dict": {k: v.detach().cpu().clone() if isinstance(v, torch.Tensor) else v for k, v in state.items()},
        "sizes": size_attributes(model),
        "modules": module_kinds(model),
        "buffers": {k: v.detach().cpu().clone() for k, v in model.named_buffers() if k not in state},
        "meta": {"params": count_params(model), "flops": _eval_flops(model, shape), **dict(meta or {})},
    }
    torch.save(payload, path)


def read(path: PathOrFile, mmap: bool = False) -> dict[str, Any]:
    """The raw content of a prunable file (plain data), read with ``weights_only=True``.

    Keys: ``format``, ``architecture``, ``plans`` (list of ``{group: [indices]}``),
    ``input_shape``, ``state_dict``, ``meta``. ``mmap=True`` maps the tensors
    instead of reading them (file names only).

    Raises
    ------
    UnsafeFileError, ModelFileError
        As :func:`load`.

    Example
    -------
    >>> read("missing.pt")
    Traceback (most recent call last):
    ...
    prunable.io.ModelFileError: no such model file: 'missing.pt'
    """
    if isinstance(path, (str, os.PathLike)) and not os.path.isfile(path):
        raise ModelFileError(f"no such model file: {os.fspath(path)!r}")
    if mmap and not (isinstance(path, (str, os.PathLike)) and zipfile.is_zipfile(path)):
        mmap = False  # only the zip format can be memory-mapped; read others the plain way
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # "Detected pickle protocol 4": we refuse it anyway
            payload = torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except pickle.UnpicklingError as exc:
        detail = _unpickling_detail(str(exc))
        if "GLOBAL" in str(exc):
            raise UnsafeFileError(f"refused to load {_name(path)}: it holds pickled code or objects, "
                                  f"not plain data ({detail}); nothing was run") from exc
        raise ModelFileError(f"{_name(path)} is not a prunable model file ({detail}); nothing was run") from exc
    except OSError as exc:
        raise ModelFileError(f"cannot read {_name(path)}: {str(exc).splitlines()[0] if str(exc) else exc!r}") from exc
    except Exception as exc:  # noqa: BLE001 - a text file, an empty or truncated file: torch raises anything
        detail = type(exc).__name__ + (f": {str(exc).splitlines()[0]}" if str(exc).strip() else "")
        raise ModelFileError(f"{_name(path)} is not a prunable model file ({detail})") from exc
    return _validate(payload, path)


def _unpickling_detail(text: str) -> str:
    """The informative line of torch's weights-only refusal (not its banner or its advice)."""
    boring = ("Weights only load failed", "Check the documentation", "Please file an issue")
    lines = [line.strip() for line in text.splitlines() if line.strip() and not line.strip().startswith(boring)]
    return lines[0] if lines else "unreadable pickle"


def _name(path: PathOrFile) -> str:
    return repr(os.fspath(path)) if isinstance(path, (str, os.PathLike)) else "the file object"


def _validate(payload: Any, path: PathOrFile) -> dict[str, Any]:
    if not isinstance(payload, dict) or "format" not in payload:
        raise ModelFileError(f"{_name(path)} is not a prunable model file (no 'format' key)")
    if payload["format"] not in READABLE:
        raise ModelFileError(f"{_name(path)} has unknown format {payload['format']!r}; this version reads {READABLE}")
    needed = {"state_dict"} if payload["format"] == FORMAT else {"architecture", "plans", "input_shape", "state_dict"}
    missing = needed - set(payload)
    if missing:
        raise ModelFileError(f"{_name(path)} lacks {sorted(missing)}")
    if not isinstance(payload["state_dict"], dict):
        raise ModelFileError(f"{_name(path)}: 'state_dict' is a {type(payload['state_dict']).__name__}, not a dict")
    for key, default in (("architecture", None), ("plans", []), ("input_shape", None), ("meta", {})):
        payload.setdefault(key, default)
    return payload


def load(path: PathOrFile, build: Callable[[dict], nn.Module] | nn.Module | None = None) -> nn.Module:
    """Rebuild a model written by :func:`save`; no code from the file is run.

    Parameters
    ----------
    path
        File name or binary file object.
    build
        The unpruned model to shrink and fill: a fresh instance of the saved
        model's architecture (any device), a callable taking the file's
        architecture dict, or ``None`` to build it from :data:`BUILDERS`
        (files saved with ``architecture=``).

    Returns
    -------
    nn.Module
        The pruned model with its weights, in eval mode (``build`` itself when
        it is a model).

    Raises
    ------
    UnsafeFileError
        If the file contains pickled objects other than plain data.
    ModelFileError
        If the file is missing or unreadable, its format or architecture is
        unknown, or the model does not fit the file (the message names the
        module and both sizes); the model given is then left unchanged.

    Example
    -------
    >>> load("missing.pt")
    Traceback (most recent call last):
    ...
    prunable.io.ModelFileError: no such model file: 'missing.pt'
    """
    payload = read(path)
    arch = payload["architecture"]
    given = _fresh_model(arch, build, path)
    model = unwrap(given)  # a wrapped fresh model: the module it wraps is shrunk and filled
    if "sizes" in payload:
        try:
            shrink_to(model, payload["state_dict"], payload["sizes"], modules=payload.get("modules"),
                      buffers=payload.get("buffers"), source=_name(path))
        except PrunableError as exc:
            raise ModelFileError(str(exc)) from exc
    else:  # the first format: replay the plans
        _replay(model, payload["plans"], payload["input_shape"], path)
    try:
        model.load_state_dict(payload["state_dict"], strict=True)
    except RuntimeError as exc:
        raise ModelFileError(
            f"the weights in {_name(path)} do not fit architecture {(arch or {}).get('name')!r} after "
            f"{len(payload['plans'])} plans: {str(exc).splitlines()[-1].strip()}") from exc
    model.eval()
    return given.eval()


def _fresh_model(arch: dict | None, build: Callable[[dict], nn.Module] | nn.Module | None,
                 path: PathOrFile) -> nn.Module:
    if isinstance(build, nn.Module):
        return build
    if arch is None and build is None:
        raise ModelFileError(f"{_name(path)} was saved without an architecture: "
                             "pass a fresh instance of the model, load(path, model)")
    return build(dict(arch or {})) if build is not None else build_model(arch)


def _replay(model: nn.Module, plans: list, input_shape: list | None, path: PathOrFile) -> None:
    """Apply ``plans`` in order to the unpruned ``model`` (files of the first format)."""
    if not plans:
        return
    if input_shape is None:
        raise ModelFileError(f"{_name(path)} holds plans but no input shape to trace them with")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "group X is not pruned" is expected here
        try:
            example = torch.zeros(*input_shape, device=model_device(model))
            pruner = Pruner(model, example, criterion=WeightNorm(), validate=False)
        except PrunableError as exc:
            raise ModelFileError(f"cannot trace the model of {_name(path)}: {exc}") from exc
        for step, plan in enumerate(plans, 1):
            try:
                pruner.prune(Plan.coerce(plan))
            except PrunableError as exc:
                raise ModelFileError(
                    f"plan {step} of {len(plans)} in {_name(path)} does not fit the model: {exc}") from exc


def info(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Describe a model file without building the model.

    Returns
    -------
    dict
        ``format``, ``architecture``, ``input_shape``, ``params`` and ``flops``
        (as saved), ``plans`` (number of plans), ``channels_removed``,
        ``history`` (channels removed per group, per plan), ``layers``
        (``{name: shape}`` of every weight), ``file_size`` (bytes) and ``meta``.

    Raises
    ------
    UnsafeFileError, ModelFileError
        As :func:`load`.

    Example
    -------
    >>> info("missing.pt")
    Traceback (most recent call last):
    ...
    prunable.io.ModelFileError: no such model file: 'missing.pt'
    """
    payload = read(path, mmap=True)
    plans = [Plan.coerce(p) for p in payload["plans"]]
    state = payload["state_dict"]
    meta = dict(payload.get("meta", {}))
    return {
        "format": payload["format"],
        "architecture": payload["architecture"],
        "input_shape": payload["input_shape"],
        "params": meta.get("params"),
        "flops": meta.get("flops"),
        "plans": len(plans),
        "channels_removed": sum(len(p) for p in plans),
        "history": [{gid: len(idx) for gid, idx in p.removals.items()} for p in plans],
        "layers": {k[: -len(".weight")]: list(v.shape) for k, v in state.items()
                   if k.endswith(".weight") and isinstance(v, torch.Tensor) and v.dim() > 1},
        "file_size": os.path.getsize(path),
        "meta": meta,
    }
