"""Fast ``meta`` runs: shape-only versions of operations whose meta kernels are slow.

Tracing (:mod:`prunable.trace`) and the trial prunes of :class:`prunable.Pruner`
run the model on ``meta`` tensors, where only shapes matter. Several meta
kernels are Python decompositions that cost more than the tracing itself
(normalisations, activations, ``linear``, ``conv2d``, elementwise arithmetic,
adaptive pooling). :func:`call` returns an empty meta tensor of the right
shape for the plain cases and calls the real kernel for everything unusual —
and for every invalid call, so error messages are unchanged.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

__all__ = ["MetaShortcuts", "call", "arg", "broadcast", "RNN_KERNELS", "rnn_meta"]


def arg(args: tuple, kwargs: dict, index: int, key: str, default: Any = None) -> Any:
    """Argument ``index`` (positional) or ``key`` (keyword) of a call, else ``default``."""
    if len(args) > index:
        return args[index]
    return kwargs.get(key, default)


_SAME_SHAPE = {"batch_norm", "instance_norm", "layer_norm", "group_norm"}
#: functionals whose meta kernels are slow Python decompositions → position of their ``inplace`` argument
_ACTIVATIONS = {"relu": 1, "relu6": 1, "hardtanh": 3, "hardswish": 1, "hardsigmoid": 1, "gelu": None,
                "elu": 2, "leaky_relu": 2, "mish": 1, "silu": 1}
_UNARY = {torch.sigmoid, torch.Tensor.sigmoid, torch.tanh, torch.Tensor.tanh}


_ARITH = {"add", "sub", "mul", "div", "__add__", "__radd__", "__sub__", "__rsub__", "__mul__", "__rmul__",
          "__truediv__", "__rtruediv__"}
_ARITH_INPLACE = {"add_", "sub_", "mul_", "div_", "__iadd__", "__isub__", "__imul__", "__itruediv__"}
_ARITH_FUNCS = {f for n in _ARITH | _ARITH_INPLACE
                for f in (getattr(torch, n, None), getattr(torch.Tensor, n, None)) if f}


def broadcast(shapes: list[torch.Size]) -> torch.Size | None:
    """``torch.broadcast_shapes(*shapes)``, or None where they do not broadcast."""
    if all(s == shapes[0] for s in shapes):
        return torch.Size(shapes[0])
    out = [1] * max(len(s) for s in shapes)
    for s in shapes:
        for i, n in enumerate(s, len(out) - len(s)):
            if n != 1:
                if out[i] not in (1, n):
                    return None
                out[i] = n
    return torch.Size(out)


def call(func: Any, args: tuple, kwargs: dict, *, counted: bool = False) -> Any:
    """``func(*args, **kwargs)``, skipping the (slow, decomposed) arithmetic of
    normalisations, activations and ``linear`` on ``meta`` tensors, whose output
    shapes follow from the input shapes.

    ``counted=True`` (under a ``FlopCounterMode``) runs every operation that has
    FLOPs (``linear``, convolutions, recurrent kernels) for real, so none is hidden
    from the counter; only FLOP-free ones (norms, activations, elementwise
    arithmetic, adaptive pooling, concatenation) take the shortcut.
    """
    name = getattr(func, "__name__", "")
    linear = name == "linear" and not counted
    fast = name in _SAME_SHAPE or ((name in _ACTIVATIONS or linear) and func is getattr(F, name, None))
    if fast and args and isinstance(args[0], torch.Tensor) and args[0].is_meta and "out" not in kwargs:
        if name in _SAME_SHAPE:
            return _meta_norm(name, args, kwargs, func)
        if name == "linear":
            return _meta_linear(args, kwargs, func)
        return _meta_activation(name, args, kwargs, func)
    if func in _ARITH_FUNCS and len(args) == 2 and set(kwargs) <= {"alpha"}:
        return _meta_arith(name, args, kwargs, func)
    if func in _UNARY and len(args) == 1 and not kwargs and _plain_meta(args[0]):
        return _meta_like(args[0])
    if func is F.adaptive_avg_pool2d and len(args) + len(kwargs) == 2 and _plain_meta(args[0]):
        return _meta_adaptive_pool(args, kwargs, func)
    if func in _CATS and args and isinstance(args[0], (list, tuple)) and args[0]:
        return _meta_cat(args, kwargs, func)
    if counted:
        return func(*args, **kwargs)
    if func is F.multi_head_attention_forward and args and isinstance(args[0], torch.Tensor) and args[0].is_meta \
            and args[0].is_floating_point():  # it has FLOPs: not when counted
        return _meta_mha(args, kwargs, func)
    if func is F.scaled_dot_product_attention and args and isinstance(args[0], torch.Tensor) and args[0].is_meta:
        return _meta_sdpa(args, kwargs, func)
    if func is torch.conv2d and args and _plain_meta(args[0]):
        return _meta_conv2d(args, kwargs, func)
    if func in RNN_KERNELS:
        fast = rnn_meta(func, args, kwargs)
        return fast[0] if fast is not None else func(*args, **kwargs)
    return func(*args, **kwargs)


#: position and keyword of the per-channel tensors of each normalisation
_NORM_TENSORS = {
    "batch_norm": ((1, "running_mean"), (2, "running_var"), (3, "weight"), (4, "bias")),
    "instance_norm": ((1, "running_mean"), (2, "running_var"), (3, "weight"), (4, "bias")),
    "group_norm": ((2, "weight"), (3, "bias")),
    "layer_norm": ((2, "weight"), (3, "bias")),
}


def _meta_norm(name: str, args: tuple, kwargs: dict, func: Any) -> torch.Tensor:
    """A normalisation's output on meta when its per-channel tensors fit the input the way
    the real kernel requires; anything else (a norm left at another width) runs the real kernel."""
    x = args[0]
    if name == "layer_norm":
        shape = arg(args, kwargs, 1, "normalized_shape")
        shape = (shape,) if type(shape) is int else tuple(shape) if isinstance(shape, (tuple, list)) else None
        ok = shape is not None and len(shape) <= x.dim() and tuple(x.shape[x.dim() - len(shape):]) == shape
        numel = 1
        for n in shape or ():
            numel *= n
        want = shape
    else:
        ok, channels = x.dim() >= 2, x.shape[1] if x.dim() >= 2 else 0
        if name == "group_norm":
            groups = arg(args, kwargs, 1, "num_groups")
            ok = ok and type(groups) is int and groups > 0 and channels % groups == 0
        want, numel = None, channels
    for index, key in _NORM_TENSORS[name]:
        t = arg(args, kwargs, index, key)
        if not ok:
            break
        if t is not None:
            ok = isinstance(t, torch.Tensor) and t.is_meta and (
                tuple(t.shape) == want if want is not None else t.dim() == 1 and t.numel() == numel)
    return _meta_like(x) if ok else func(*args, **kwargs)


def _pair(value: Any) -> tuple | None:
    """An int or a pair of ints as a pair, else None."""
    pair = (value, value) if type(value) is int else tuple(value) if isinstance(value, (tuple, list)) else ()
    return pair if len(pair) == 2 and all(type(v) is int for v in pair) else None


def _meta_conv2d(args: tuple, kwargs: dict, func: Any) -> torch.Tensor:
    """``conv2d`` of contiguous 4-D meta tensors without its slow meta kernel; every
    unusual or invalid call (so every error message) goes to the real one."""
    names = ("input", "weight", "bias", "stride", "padding", "dilation", "groups")
    defaults = (None, None, None, 1, 0, 1, 1)
    if len(args) > len(names) or set(kwargs) - set(names):
        return func(*args, **kwargs)
    x, w, bias, stride, padding, dilation, groups = (arg(args, kwargs, i, n, d) for i, (n, d) in
                                                     enumerate(zip(names, defaults)))
    stride, padding, dilation = _pair(stride), _pair(padding), _pair(dilation)
    ok = (isinstance(w, torch.Tensor) and _plain_meta(w) and w.dim() == 4 and x.dim() == 4 and w.dtype == x.dtype
          and type(groups) is int and groups >= 1 and None not in (stride, padding, dilation) and x.shape[0] > 0
          and min(stride) > 0 and min(dilation) > 0 and min(padding) >= 0 and w.shape[0] > 0
          and w.shape[0] % groups == 0 and x.shape[1] == w.shape[1] * groups)
    if ok and bias is not None:
        ok = isinstance(bias, torch.Tensor) and bias.is_meta and bias.dtype == x.dtype and bias.shape == w.shape[:1]
    size = [(x.shape[2 + i] + 2 * padding[i] - dilation[i] * (w.shape[2 + i] - 1) - 1) // stride[i] + 1
            for i in range(2)] if ok else []
    if not ok or min(size) < 1:
        return func(*args, **kwargs)
    return torch.empty(x.shape[0], w.shape[0], *size, dtype=x.dtype, device="meta")


_CATS = {torch.cat, torch.concat, torch.concatenate}


def _meta_cat(args: tuple, kwargs: dict, func: Any) -> Any:
    """``torch.cat`` of contiguous meta tensors of one dtype and rank whose other sizes match,
    without its meta kernel; anything else (and every invalid call) runs for real."""
    parts, dim = args[0], arg(args, kwargs, 1, "dim", 0)
    if len(args) > 2 or set(kwargs) - {"dim"} or type(dim) is not int or not _plain_meta(parts[0]):
        return func(*args, **kwargs)
    first = parts[0]
    rank, dtype = first.dim(), first.dtype
    if not -rank <= dim < rank or rank == 0:
        return func(*args, **kwargs)
    dim %= rank
    shape = list(first.shape)
    for t in parts[1:]:
        if not (_plain_meta(t) and t.dtype == dtype and t.dim() == rank):
            return func(*args, **kwargs)
        for d in range(rank):
            if d != dim and t.shape[d] != shape[d]:
                return func(*args, **kwargs)
        shape[dim] += t.shape[dim]
    return torch.empty(shape, dtype=dtype, device="meta")


#: arguments of ``F.multi_head_attention_forward``: name, default (None for the required ones) and the values
#: :func:`_meta_mha` takes the shortcut for (None: any value)
_MHA_ARGS = (("query", None, None), ("key", None, None), ("value", None, None), ("embed_dim_to_check", None, None),
             ("num_heads", None, None), ("in_proj_weight", None, None), ("in_proj_bias", None, None),
             ("bias_k", None, (None,)), ("bias_v", None, (None,)), ("add_zero_attn", None, (False,)),
             ("dropout_p", None, None), ("out_proj_weight", None, None), ("out_proj_bias", None, None),
             ("training", True, None), ("key_padding_mask", None, (None,)), ("need_weights", True, (True, False)),
             ("attn_mask", None, (None,)), ("use_separate_proj_weight", False, (False,)),
             ("q_proj_weight", None, (None,)), ("k_proj_weight", None, (None,)), ("v_proj_weight", None, (None,)),
             ("static_k", None, (None,)), ("static_v", None, (None,)), ("average_attn_weights", True, (True, False)),
             ("is_causal", False, (False,)))


def _meta_mha(args: tuple, kwargs: dict, func: Any) -> Any:
    """``multi_head_attention_forward`` of batched meta inputs with one packed in-projection and no
    masks, from the shapes alone (its meta run decomposes every kernel); anything else runs for real."""
    names = [n for n, _, _ in _MHA_ARGS]
    if len(args) > len(names) or set(kwargs) - set(names):
        return func(*args, **kwargs)
    values = {n: arg(args, kwargs, i, n, default) for i, (n, default, _) in enumerate(_MHA_ARGS)}
    if any(allowed is not None and not any(values[n] is a for a in allowed) for n, _, allowed in _MHA_ARGS):
        return func(*args, **kwargs)
    q, k, v, w, b, out_w, out_b = (values[n] for n in ("query", "key", "value", "in_proj_weight", "in_proj_bias",
                                                        "out_proj_weight", "out_proj_bias"))
    heads, width = values["num_heads"], values["embed_dim_to_check"]
    inputs = [t for t in (q, k, v) if isinstance(t, torch.Tensor) and t.is_meta and t.dtype == q.dtype]
    tensors = [t for t in (w, out_w) if _plain_meta(t) and t.dtype == q.dtype]  # inputs may be transposed
    ok = (len(inputs) == 3 and len(tensors) == 2 and q.dim() == k.dim() == v.dim() == 3
          and type(heads) is int and type(width) is int and heads > 0 and width % heads == 0
          and q.shape[2] == k.shape[2] == v.shape[2] == width
          and k.shape == v.shape and q.shape[1] == k.shape[1] and min(q.shape) > 0 and k.shape[0] > 0
          and w.shape == (3 * width, width) and out_w.dim() == 2 and out_w.shape[1] == width and out_w.shape[0] > 0)
    for bias, n in ((b, 3 * width), (out_b, out_w.shape[0] if ok else 0)):
        ok = ok and (bias is None or (isinstance(bias, torch.Tensor) and bias.is_meta and bias.dtype == q.dtype
                                      and bias.shape == (n,)))
    if not ok:
        return func(*args, **kwargs)
    (tgt, batch, _), src = q.shape, k.shape[0]
    out = torch.empty(tgt, batch, out_w.shape[0], dtype=q.dtype, device="meta")
    if not values["need_weights"]:
        return out, None
    shape = (batch, tgt, src) if values["average_attn_weights"] else (batch, heads, tgt, src)
    return out, torch.empty(shape, dtype=q.dtype, device="meta")


_SDPA_ARGS = ("query", "key", "value", "attn_mask", "dropout_p", "is_causal", "scale", "enable_gqa")


def _meta_sdpa(args: tuple, kwargs: dict, func: Any) -> Any:
    """``scaled_dot_product_attention`` of meta q, k, v of one floating dtype whose batch and head
    sizes match, without a mask, dropout or grouped-query heads, from the shapes alone (its meta
    run decomposes the whole attention); anything else runs for real."""
    if len(args) > len(_SDPA_ARGS) or set(kwargs) - set(_SDPA_ARGS):
        return func(*args, **kwargs)
    q, k, v, mask, dropout, causal, scale, gqa = (arg(args, kwargs, i, n, d) for i, (n, d) in enumerate(
        zip(_SDPA_ARGS, (None, None, None, None, 0.0, False, None, False))))
    tensors = [t for t in (q, k, v) if isinstance(t, torch.Tensor) and t.is_meta and t.dtype == q.dtype]
    ok = (len(tensors) == 3 and q.is_floating_point() and q.dim() == k.dim() == v.dim() and q.dim() in (3, 4)
          and q.shape[:-2] == k.shape[:-2] == v.shape[:-2] and k.shape[-2] == v.shape[-2]
          and q.shape[-1] == k.shape[-1] and min(*q.shape, *k.shape, *v.shape) > 0 and mask is None
          and type(dropout) in (int, float) and dropout == 0 and causal is False and gqa is False
          and (scale is None or type(scale) in (int, float)))
    if not ok:
        return func(*args, **kwargs)
    return torch.empty(*q.shape[:-1], v.shape[-1], dtype=q.dtype, device="meta")


def _plain_meta(x: Any) -> bool:
    return isinstance(x, torch.Tensor) and x.is_meta and x.is_floating_point() and x.is_contiguous()


def _meta_adaptive_pool(args: tuple, kwargs: dict, func: Any) -> torch.Tensor:
    """``adaptive_avg_pool2d`` of a contiguous meta tensor, without its slow meta kernel."""
    x, size = args[0], arg(args, kwargs, 1, "output_size")
    size = (size, size) if isinstance(size, int) else tuple(size) if isinstance(size, (tuple, list)) else ()
    out = tuple(x.shape[i - 2] if n is None else n for i, n in enumerate(size))
    if x.dim() not in (3, 4) or 0 in x.shape[1:] or len(out) != 2 or not all(type(n) is int and n > 0 for n in out):
        return func(*args, **kwargs)
    return torch.empty(x.shape[:-2] + out, dtype=x.dtype, device="meta")


def _meta_arith(name: str, args: tuple, kwargs: dict, func: Any) -> Any:
    """Binary arithmetic on contiguous meta tensors of one floating dtype (or a Python
    number) without the slow elementwise meta kernel; anything else runs for real."""
    a, b = args
    plain = isinstance(a, torch.Tensor) and a.is_meta and a.is_floating_point() and a.is_contiguous()
    if plain and isinstance(b, torch.Tensor):
        plain = b.is_meta and b.dtype == a.dtype and b.is_contiguous()
    elif plain:
        plain = type(b) in (int, float)
    shape = broadcast([a.shape, b.shape] if isinstance(b, torch.Tensor) else [a.shape]) if plain else None
    if shape is None or (name in _ARITH_INPLACE and shape != a.shape):
        return func(*args, **kwargs)
    return a if name in _ARITH_INPLACE else torch.empty(shape, dtype=a.dtype, device="meta")


def _meta_activation(name: str, args: tuple, kwargs: dict, func: Any) -> torch.Tensor:
    if not args[0].is_floating_point():
        return func(*args, **kwargs)
    at = _ACTIVATIONS[name]
    inplace = at is not None and bool(arg(args, kwargs, at, "inplace", False))
    return args[0] if inplace else _meta_like(args[0])


def _meta_like(x: torch.Tensor) -> torch.Tensor:
    """``torch.empty_like(x)`` for a meta ``x``; much faster for contiguous ones."""
    return torch.empty(x.shape, dtype=x.dtype, device="meta") if x.is_contiguous() else torch.empty_like(x)


def _meta_linear(args: tuple, kwargs: dict, func: Any) -> torch.Tensor:
    """``linear`` on meta tensors without its arithmetic; anything unusual (and every
    shape mismatch, so errors read the same) goes to the real kernel."""
    x, weight, bias = args[0], arg(args, kwargs, 1, "weight"), arg(args, kwargs, 2, "bias")
    plain = (isinstance(weight, torch.Tensor) and weight.dim() == 2 and x.dim() >= 1 and x.dtype == weight.dtype
             and x.shape[-1] == weight.shape[1] and x.is_floating_point())
    if plain and bias is not None:
        plain = isinstance(bias, torch.Tensor) and bias.shape == weight.shape[:1] and bias.dtype == x.dtype
    if not plain:
        return func(*args, **kwargs)
    return torch.empty(*x.shape[:-1], weight.shape[0], dtype=x.dtype, device="meta")


class MetaShortcuts(TorchFunctionMode):
    """Run a meta model faster: every operation goes through :func:`call`."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        return call(func, args, kwargs or {})


#: recurrent kernels (as ``nn.RNNBase`` calls them) → gate blocks per weight
RNN_KERNELS = {torch.lstm: 4, torch.gru: 3, torch.rnn_tanh: 1, torch.rnn_relu: 1}


def rnn_meta(func: Any, args: tuple, kwargs: dict) -> tuple[tuple, int] | None:
    """Outputs and matrix-product FLOPs of a recurrent kernel (:data:`RNN_KERNELS`) called on a
    padded meta sequence, from the shapes alone: their meta kernels run every time step (seconds
    for a long sequence). Every weight and state shape is checked first; None when the call is
    unusual or wrong (packed input, projections, a weight cut to another size): then the real
    kernel must run, so errors are unchanged. FLOPs are counted as ``FlopCounterMode`` counts
    the kernel (``2·N·T·gates·H·(inputs + H)`` per layer and direction).

    Example
    -------
    >>> rnn = torch.nn.GRU(5, 4, batch_first=True, device="meta")
    >>> x = torch.empty(2, 7, 5, device="meta")
    >>> args = (x, torch.empty(1, 2, 4, device="meta"), rnn._flat_weights, True, 1, 0.0, False, False, True)
    >>> out, flops = rnn_meta(torch.gru, args, {})
    >>> tuple(out[0].shape), tuple(out[1].shape), flops
    ((2, 7, 4), (1, 2, 4), 3024)
    """
    if kwargs or len(args) != 9 or not isinstance(args[2], (list, tuple)) or type(args[4]) is not int or args[4] < 1:
        return None
    x, hx, params, bias, layers, _, _, bidirectional, batch_first = args
    states = list(hx) if isinstance(hx, (list, tuple)) else [hx]
    dirs, per = (2 if bidirectional else 1), (4 if bias else 2)
    if not (isinstance(x, torch.Tensor) and x.is_meta and x.is_floating_point() and x.dim() == 3) or \
            len(params) != layers * dirs * per or len(states) != (2 if func is torch.lstm else 1):
        return None
    hidden, batch = params[1].shape[-1], x.shape[0 if batch_first else 1]
    rows = RNN_KERNELS[func] * hidden
    if not _rnn_weights_fit(params, per, dirs, rows, (x.shape[-1], dirs * hidden), x.dtype):
        return None
    fits = [isinstance(h, torch.Tensor) and h.is_meta and h.dtype == x.dtype for h in states]
    if not all(fits) or any(h.shape != (layers * dirs, batch, hidden) for h in states):
        return None
    out = torch.empty(*x.shape[:2], dirs * hidden, dtype=x.dtype, device="meta")
    reads = x.shape[-1] + hidden + (layers - 1) * (dirs * hidden + hidden)  # inputs + H, summed over layers
    flops = 2 * x.shape[0] * x.shape[1] * rows * reads * dirs
    return (out, *(torch.empty(h.shape, dtype=x.dtype, device="meta") for h in states)), flops


def _rnn_weights_fit(params: Any, per: int, dirs: int, rows: int, sizes: tuple[int, int], dtype: torch.dtype) -> bool:
    """Every ``(w_ih, w_hh[, b_ih, b_hh])`` of ``params`` (``per`` tensors, ``dirs`` directions a
    layer) has ``rows`` rows, ``w_ih`` reads ``sizes[0]`` features in the first layer and
    ``sizes[1]`` after it, and ``w_hh`` reads the first ``w_hh``'s width; all meta of ``dtype``."""
    hidden = params[1].shape[-1]
    for k in range(0, len(params), per):
        inputs = sizes[0] if k < per * dirs else sizes[1]
        want = [(rows, inputs), (rows, hidden), (rows,), (rows,)][:per]
        for t, shape in zip(params[k:k + per], want):
            if not (isinstance(t, torch.Tensor) and t.is_meta and t.dtype == dtype and tuple(t.shape) == shape):
                return False
    return True
