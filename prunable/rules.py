"""The tracer's rules for operations that move channel labels without weights.

:data:`RULES` is the one table, keyed by operation name, of how channel labels flow
through an operation: the rule names a method ``_<rule>`` of the tracer. This module
holds the table and the shape rules (views, reshapes, concatenations, splits,
reductions, elementwise ops, pooling) as :class:`ShapeRules`, a mixin of
:class:`prunable.trace.ChannelTracer`, which adds the rules of weighted layers
(conv, linear, norms, embedding) and of attention modules.
"""

from __future__ import annotations

from typing import Any

import torch
from torch.utils._pytree import tree_flatten, tree_map

from .meta import arg, broadcast
from .reasons import SkipKind, SkipReason
from .shadow import FREE, core_of, core_view, expand_core, expand_shadow, has_slots, labels_along, moved, varying_dims

__all__ = ["RULES", "SIZE_FREE", "cat_cores", "rule_of", "ShapeRules", "tensors_of", "func_name", "mixed", "unsupported"]

#: how channel labels flow through each operation: ONE table, operation name → rule
#: (the method ``_<rule>`` of :class:`~prunable.trace.ChannelTracer`); an operation not listed
#: is elementwise when its operands broadcast to its output, a resize (pooling) when one
#: operand carries labels and only sizes change, and blocks its operands otherwise
RULES: dict[str, str] = {
    **dict.fromkeys(("dim", "numel", "__len__", "property:dtype", "property:device"), "ignore"),
    **dict.fromkeys(("size", "property:shape"), "shape_read"),
    **dict.fromkeys((
        "to", "float", "half", "double", "bfloat16", "type", "type_as", "cpu", "cuda", "detach", "clone",
        "contiguous", "requires_grad_", "detach_", "pin_memory", "__deepcopy__", "property:data"), "identity"),
    **dict.fromkeys((
        "flatten", "permute", "transpose", "t", "squeeze", "unsqueeze", "expand", "expand_as", "cat", "concat",
        "concatenate", "unbind", "__getitem__", "narrow", "select", "movedim", "moveaxis", "roll", "flip",
        "view_as", "reshape_as", "swapaxes", "swapdims", "repeat", "tile", "hstack", "vstack", "pixel_unshuffle",
        "channel_shuffle", "native_channel_shuffle"), "index"),
    #: a channel dim split into (outer, inner): outer parts shrink together
    **dict.fromkeys(("view", "reshape", "unflatten", "stack"), "reshape"),
    **dict.fromkeys(("split", "chunk", "split_with_sizes", "tensor_split"), "split"),
    **dict.fromkeys(("mean", "sum", "amax", "amin", "max", "min", "std", "var", "norm", "logsumexp", "prod",
                     "nansum"), "reduce"),
    **dict.fromkeys((
        "einsum", "baddbmm", "addmm", "addbmm", "multi_head_attention_forward", "bilinear", "index_put_",
        "index_put", "scatter", "scatter_", "gather", "masked_scatter"), "block"),
    #: tensor factories called as methods: the result holds no channels of the tensor
    **dict.fromkeys(("new_zeros", "new_ones", "new_empty", "new_full", "new_tensor"), "create"),
    **dict.fromkeys(("conv1d", "conv2d", "conv3d", "conv_transpose1d", "conv_transpose2d", "conv_transpose3d"),
                    "conv"),
    **dict.fromkeys(("batch_norm", "instance_norm"), "norm"),
    **dict.fromkeys(("embedding", "embedding_bag"), "embedding"),
    "linear": "linear", "layer_norm": "layer_norm", "rms_norm": "layer_norm", "group_norm": "group_norm", "prelu": "prelu",
    "pixel_shuffle": "pixel_shuffle",
    #: attention written with operations (:class:`prunable.sdpa.AttentionRules`)
    "scaled_dot_product_attention": "sdpa",
    **dict.fromkeys(("matmul", "bmm", "mm", "__matmul__", "__rmatmul__"), "matmul"),
    #: torchvision's RoI pooling keeps the features' channels; ``t[i] = v`` writes v's channels into t
    "roi_align": "roi", "roi_pool": "roi", "__setitem__": "setitem",
}
#: operations that only reorder dims: applied to a shadow's core, they give the result's core
_DIM_MOVES = frozenset(("permute", "transpose", "t", "movedim", "moveaxis", "swapaxes", "swapdims"))

#: operations whose effect on channels the graph follows exactly, taking no sizes and no channel
#: count: cutting channels consistently through them cannot break the forward pass. Any other
#: operation on a tensor with channels (a reshape with sizes, a split, a size read, an unknown
#: function …) marks the trace fragile (:attr:`~prunable.shadow.Trace.fragile`): then the
#: Pruner's build tries removing a channel of each group on a meta copy. Grouped convolutions
#: and operands of a fixed size along the channels are checked where they occur.
SIZE_FREE: frozenset[str] = frozenset(
    # layers with handlers, reductions over given dims, attribute reads (a read of a channel count
    # is marked by its rule)
    name for name, rule in RULES.items()
    if rule in ("conv", "norm", "linear", "layer_norm", "reduce", "ignore", "shape_read")
) | frozenset((
    # the same tensor under another type or device
    "to", "float", "half", "double", "bfloat16", "type", "type_as", "cpu", "cuda", "detach", "clone",
    "contiguous", "requires_grad_", "detach_", "property:data",
    # moving dims, concatenating
    *_DIM_MOVES, "flatten", "squeeze", "unsqueeze", "cat", "concat", "concatenate",
    # elementwise: activations, arithmetic, dropout (an operand of a fixed size is checked)
    "relu", "relu_", "relu6", "hardtanh", "hardtanh_", "gelu", "silu", "silu_", "sigmoid", "sigmoid_", "tanh",
    "tanh_", "hardswish", "hardswish_", "hardsigmoid", "hardsigmoid_", "mish", "elu", "elu_", "selu", "celu",
    "leaky_relu", "leaky_relu_", "softplus", "exp", "log", "sqrt", "rsqrt", "abs", "neg", "clamp", "clamp_",
    "clip", "add", "add_", "sub", "sub_", "mul", "mul_", "div", "div_", "__add__", "__iadd__", "__radd__",
    "__sub__", "__isub__", "__rsub__", "__mul__", "__imul__", "__rmul__", "__truediv__", "__itruediv__",
    "__rtruediv__", "__neg__", "dropout", "dropout_", "dropout1d", "dropout2d", "dropout3d", "alpha_dropout",
    "feature_alpha_dropout",
    # pooling over spatial dims (a pooling that changes the channels blocks them)
    "adaptive_avg_pool1d", "adaptive_avg_pool2d", "adaptive_avg_pool3d", "adaptive_max_pool1d",
    "adaptive_max_pool2d", "adaptive_max_pool3d", "avg_pool1d", "avg_pool2d", "avg_pool3d", "max_pool1d",
    "max_pool2d", "max_pool3d", "max_pool1d_with_indices", "max_pool2d_with_indices", "max_pool3d_with_indices",
))

#: splits whose sizes follow the tensor (chunk(n), tensor_split(n)): even parts along channels stay equal
ADAPTIVE_SPLITS = {"chunk", "tensor_split"}


def rule_of(name: str) -> str:
    """The rule of operation ``name`` in the table (``generic`` when not listed)."""
    rule = RULES.get(name)
    if rule is None:
        rule = "index" if name.startswith("property:") else "generic"
    return rule


def mixed(detail: str) -> SkipReason:
    """Channels mixed with other dimensions (a reshape that merges them, a pixel shuffle of a mixed input)."""
    return SkipReason(SkipKind.MIXED, detail)


def unsupported(detail: str) -> SkipReason:
    """An operation whose effect on channels prunable cannot follow."""
    return SkipReason(SkipKind.UNSUPPORTED_OP, detail)


#: what ``tree_flatten`` looks into (pytree containers) among the arguments of an operation
_CONTAINERS = (list, tuple, dict)


def tensors_of(tree: Any) -> list[torch.Tensor]:
    """The tensors of a pytree, in ``tree_flatten`` order."""
    return [t for t in tree_flatten(tree)[0] if isinstance(t, torch.Tensor)]


def func_name(func: Any) -> str:
    name = getattr(func, "__name__", "")
    if name == "__get__":
        return "property:" + getattr(getattr(func, "__self__", None), "__name__", "")
    return name


def _plain(a: Any) -> bool:
    """A list or tuple of numbers (sizes, dims): nothing in it to convert."""
    return isinstance(a, (list, tuple)) and not any(isinstance(e, (torch.Tensor, list, tuple, dict)) for e in a)


def _same_rank(parts: Any) -> bool:
    return isinstance(parts, (list, tuple)) and len(parts) > 0 and len({p.dim() for p in parts}) == 1


def cat_cores(parts: list[torch.Tensor], dim: int) -> torch.Tensor:
    """``torch.cat(parts, dim)`` of shadows, concatenating their cores: dims along
    which every part is constant are never materialised."""
    dim %= parts[0].dim()
    cores = [core_of(p) for p in parts]
    small = [1 if all(c.shape[d] == 1 for c in cores) else parts[0].shape[d] for d in range(parts[0].dim())]
    pieces = []
    for c, p in zip(cores, parts):
        size = [p.shape[d] if d == dim else small[d] for d in range(p.dim())]
        pieces.append(c if list(c.shape) == size else c.expand(size))
    out = torch.cat(pieces, dim)
    shape = [out.shape[d] if d == dim else parts[0].shape[d] for d in range(out.dim())]
    if out.numel() and any(c.shape[dim] > 1 for c in cores):
        # the smallest core already: each other dim is one or varies in some part, and a part varies along dim
        along = (dim, out.reshape(-1)) if all(n == 1 for d, n in enumerate(out.shape) if d != dim) else None
        return expand_core(out, torch.Size(shape), along)
    return out.expand(shape)

class ShapeRules:
    """Rules of the shape and elementwise operations, mixed into :class:`~prunable.trace.ChannelTracer`
    (which provides ``trace``, ``shadow``, ``set_shadow``, ``has_labels``, ``mark_input``,
    ``owners``, ``names``, ``stack``, ``_shape_sizes`` and the split hooks of
    :class:`~prunable.sdpa.AttentionRules`)."""

    def _shape_read(self, args: tuple, kwargs: dict) -> None:
        """``x.shape`` / ``x.size()`` / ``x.size(d)``: remember the sizes of the channel dims
        read, which a later reshape may pass as literal sizes (see :meth:`_size_attribute`)."""
        x = args[0] if args and isinstance(args[0], torch.Tensor) else None
        if x is None or not self.has_labels(x):
            return
        s = self.shadow(x)
        asked = arg(args, kwargs, 1, "dim")
        for d in varying_dims(s) if asked is None else [int(asked) % x.dim()]:
            labels = labels_along(s, d)
            if labels is None or bool((labels >= 0).any()):
                self.trace.mark_fragile(f"the channel count {int(x.shape[d])} is read")
                read = core_of(s).reshape(-1) if labels is None else labels
                self._shape_sizes.setdefault(int(x.shape[d]), []).append(read)

    def _identity(self, name: str, args: tuple, kwargs: dict, out: Any, outs: list) -> None:
        self.set_shadow(outs[0], self.shadow(args[0]))

    def _reshape(self, name: str, args: tuple, kwargs: dict, out: Any, outs: list) -> None:
        self._index(name, args, kwargs, out, outs)

    def _tensors_in(self, args: tuple, kwargs: dict) -> list[torch.Tensor]:
        if any(isinstance(a, _CONTAINERS) for a in args) or any(isinstance(a, _CONTAINERS) for a in kwargs.values()):
            return tensors_of((args, kwargs))
        return [a for a in (*args, *kwargs.values()) if isinstance(a, torch.Tensor)]

    def _block(self, name: str, args: tuple, kwargs: dict, out: Any, outs: list,
               reason: SkipReason | None = None) -> None:
        """Operands carrying labels cannot be pruned; the outputs are fixed-size data."""
        for t in self._tensors_in(args, kwargs):
            if self.has_labels(t) or id(t) in self.trace.params:  # weights consumed here need no labels
                self.trace.block(self.shadow(t), reason or unsupported(f"used by {name}"))
        for t in outs:
            self.mark_input(t)


    # -- shape and elementwise operations ------------------------------------
    def _shadow_args(self, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        """The data (first argument: a tensor or a list of them) as shadows; integer
        tensors elsewhere are indices, used with their values (an integer tensor's
        values are never taken for labels: a detector's level ids, kept indices)."""
        def convert(a: Any, data: bool = False) -> Any:
            if not isinstance(a, torch.Tensor):
                return a
            if data or a.is_floating_point() or id(a) in self.owners:
                return self.shadow(a)
            if a.device.type == "meta":
                raise RuntimeError("index tensor without data")
            return a.cpu()
        first = args[:1]
        if first and type(first[0]) in (list, tuple) and all(isinstance(t, torch.Tensor) for t in first[0]):
            first = (type(first[0])(self.shadow(t) for t in first[0]),)  # cat, stack: tree_map's answer, faster
        elif not first or not isinstance(first[0], _CONTAINERS):
            first = tuple(convert(a, True) for a in first)
        else:
            first = tree_map(lambda a: convert(a, True), first)
        rest = args[1:]
        if any(isinstance(a, _CONTAINERS) and not _plain(a) for a in (*rest, *kwargs.values())):  # index lists
            sargs, skwargs = (*first, *tree_map(convert, rest)), tree_map(convert, kwargs)
        else:
            sargs = (*first, *(convert(a) for a in rest))
            skwargs = {k: convert(a) for k, a in kwargs.items()}
        if "value" in skwargs:
            skwargs["value"] = FREE
        return sargs, skwargs

    def _index(self, name: str, args: tuple, kwargs: dict, out: Any, outs: list | None = None) -> None:
        """Shape operations: replayed on the shadows, so labels follow the data."""
        try:
            sargs, skwargs = self._shadow_args(args, kwargs)
            func = getattr(torch.Tensor, name.split(":")[-1], None)
            if name.startswith("property:"):
                sout = getattr(sargs[0], name.split(":")[1])
            elif name == "__getitem__" and isinstance(out, torch.Tensor):
                sout = self._indexed(args[0], args[1], out.shape)
            elif name in ("cat", "concat", "concatenate") and _same_rank(sargs[0]):
                sout = cat_cores(sargs[0], arg(sargs, skwargs, 1, "dim", 0))
            elif name in _DIM_MOVES and isinstance(out, torch.Tensor):  # the core moves the same way
                move = getattr(torch.Tensor, name)
                sout = moved(sargs[0], lambda core: move(core, *sargs[1:], **skwargs), out.shape)
            elif isinstance(args[0], torch.Tensor) and func is not None:
                # shadows may be non-contiguous where the real tensor is not: reshape, never view
                method = {"view": "reshape", "view_as": "reshape_as"}.get(name, name)
                sout = getattr(torch.Tensor, method)(*sargs, **skwargs)
            else:
                sout = getattr(torch, name)(*sargs, **skwargs)
        except Exception:  # noqa: BLE001 - unknown shape op: be conservative
            return self._block(name, args, kwargs, out, tensors_of(out))
        if name in ("cat", "concat", "concatenate"):
            sout = self._token_concat(sargs, skwargs, sout)
        if isinstance(out, torch.Tensor):
            real, shadow = [out], [sout]
        else:
            real, shadow = tree_flatten(out)[0], tree_flatten(sout)[0]
        if name in ("view", "reshape") and isinstance(sout, torch.Tensor):
            self._size_attribute(args, sargs[0], sout)
        for t, s in zip(real, shadow):
            if isinstance(t, torch.Tensor) and isinstance(s, torch.Tensor) and t.shape == s.shape:
                if rule_of(name) == "reshape":
                    self._couple_outer(s)
                self.set_shadow(t, s)
            elif isinstance(t, torch.Tensor):
                self._block(name, args, kwargs, out, [t])

    def _indexed(self, x: torch.Tensor, index: Any, shape: Any) -> torch.Tensor:
        """The shadow of ``x[index]`` (of size ``shape``), indexing only the dims along
        which the labels vary: the labels of rows picked by a data-dependent index (kept
        detections) survive even when no row is picked."""
        parts = index if isinstance(index, tuple) else (index,)
        parts = tuple(p.cpu() if isinstance(p, torch.Tensor) else p for p in parts)
        parts = sum(((*p.nonzero(as_tuple=True),) if isinstance(p, torch.Tensor) and p.dtype is torch.bool
                     else (p,) for p in parts), ())
        simple = all(type(p) in (int, slice) or (isinstance(p, torch.Tensor) and not p.is_floating_point())
                     for p in parts)
        core = core_of(self.shadow(x))
        if not simple or len(parts) > x.dim():
            return self.shadow(x)[index]
        picked = core[tuple(p if core.shape[d] > 1 else (slice(None) if type(p) is slice else 0 if type(p) is int
                            else torch.zeros((1,) * p.dim(), dtype=torch.long)) for d, p in enumerate(parts))]
        return picked.expand(shape)

    def _roi(self, name: str, args: tuple, kwargs: dict, out: Any, outs: list) -> None:
        """``roi_align(features, boxes, …)`` / ``roi_pool``: the pooled regions keep the
        features' channels (dim 1); the boxes are coordinates, not channels."""
        pooled = outs[0]
        labels = labels_along(self.shadow(args[0]), 1)
        if labels is None or pooled.dim() != args[0].dim() or pooled.shape[1] != len(labels):
            return self._block(name, args, kwargs, out, outs)
        self._out_shadow(pooled, labels, 1)

    def _setitem(self, name: str, args: tuple, kwargs: dict, out: Any, outs: list) -> None:
        """``target[index] = value``: the written part and ``value`` are the same channels;
        the target takes ``value``'s labels where they broadcast over the whole target
        (a zero-filled result gathered from several pooled levels)."""
        target, index, value = args
        if not isinstance(value, torch.Tensor) or not self.has_labels(value):
            return
        try:
            part = self._indexed(target, index, value.shape)
            values = expand_shadow(self.shadow(value), part.shape)
        except Exception:  # noqa: BLE001 - an index the shadows cannot replay
            return self._block(name, args, kwargs, out, [])
        if not part.numel():  # nothing written (an empty level of detections)
            return
        self.trace.union(part, values, SkipReason(SkipKind.FIXED_INPUT, "written into a fixed-size tensor"))
        core = core_of(values)
        if part.dim() == target.dim() and all(core.shape[d] == 1 or part.shape[d] == target.shape[d]
                                              for d in range(target.dim())):
            if not bool((core_of(self.shadow(target)) >= 0).any()):
                self.set_shadow(target, core.expand(target.shape))
        else:
            self._block(name, args, kwargs, out, [])

    def _size_attribute(self, args: tuple, before: torch.Tensor, after: torch.Tensor) -> None:
        """``x.reshape(n, self.hidden_dim, -1)``: a channel count passed as a literal size.

        If the reshape keeps one channel dim whole and the size given for it equals
        exactly one ``int`` attribute of the module running it, that attribute is
        recorded so pruning keeps it equal to the channel count. A size that equals a
        channel count read through ``.shape`` / ``.size()`` may as well come from there:
        the channels are then not pruned (never guess an attribute).
        """
        sizes = args[1] if len(args) == 2 and isinstance(args[1], (tuple, list, torch.Size)) else args[1:]
        dims, old = varying_dims(after), varying_dims(before)
        if len(dims) != 1 or len(old) != 1:  # a split into heads or a merge of them
            return self.split_size_attribute(sizes, before, after)
        if len(sizes) != after.dim() or not self.stack:
            return
        d = dims[0]
        value = sizes[d]
        if type(value) is not int or value != after.shape[d] or before.shape[old[0]] != value:
            return
        labels = labels_along(after, d)
        if labels is None or not bool((labels >= 0).all()):
            return
        module = self.stack[-1]
        attrs = [k for k, v in vars(module).items() if type(v) is int and v == value and not k.startswith("_")]
        name = self.names.get(id(module), "")
        if len(attrs) == 1 and value in self._shape_sizes:  # h.reshape(h.shape[0], h.shape[1], -1) or the attribute?
            self.trace.block(labels, SkipReason(SkipKind.SIZE_ATTRIBUTE, (
                f"{name or '<model>'}: the size {value} given to a reshape may be the attribute {attrs[0]} or a "
                "channel count read from a tensor's shape")))
        elif len(attrs) == 1:
            self.trace.sizes.append((module, name, attrs[0], labels))

    def _token_concat(self, sargs: tuple, skwargs: dict, sout: torch.Tensor) -> torch.Tensor:
        """Concatenating along a dim that holds no channels (a class token joining
        the patch tokens): the parts' channels are the same channels."""
        parts, dim = sargs[0], arg(sargs, skwargs, 1, "dim", 0)
        if not _same_rank(parts):  # the legacy empty 1-d part (a key/value cache's first step)
            return sout
        if sum(p.shape[dim] > 0 for p in parts) < 2:
            return sout
        for p in parts:  # one part with channels along dim (or none at all) settles it
            v = varying_dims(p)
            if dim % p.dim() in v or not v:
                return sout
        firsts = [p.narrow(dim, 0, 1) for p in parts if p.shape[dim] > 0]
        if any(not bool((core_view(f) >= 0).any()) for f in firsts):
            return sout
        for f in firsts[1:]:
            self.trace.union(firsts[0], f)
        return firsts[0].expand(sout.shape)

    def _couple_outer(self, s: torch.Tensor) -> None:
        """A channel dim split into (outer, inner): outer parts must shrink together — by
        position, unless they become the heads of an attention (:meth:`AttentionRules.finish`)."""
        dims = varying_dims(s)
        for d in dims[:-1]:
            self.outer_split(s, d)

    def _split(self, name: str, args: tuple, kwargs: dict, out: Any, outs: list) -> None:
        """split/chunk/tensor_split: replayed on the shadows. Along a channel dim, parts whose
        size follows the tensor (``chunk(n)``, ``tensor_split(n)``) and are even stay equal;
        literal sizes would go stale after pruning: those channels are kept."""
        x, dim = args[0], arg(args, kwargs, 2, "dim", 0)
        try:
            sargs, skwargs = self._shadow_args(args, kwargs)
            parts = getattr(torch.Tensor, name)(*sargs, **skwargs)
        except Exception:  # noqa: BLE001 - unknown form: be conservative
            return self._block(name, args, kwargs, out, outs)
        s = self.shadow(x)
        for t, p in zip(outs, parts):
            self.set_shadow(t, p)
        if not isinstance(dim, int) or dim % x.dim() not in varying_dims(s):
            return
        dim %= x.dim()
        even = len({p.shape[dim] for p in parts}) == 1
        if name in ADAPTIVE_SPLITS and type(args[1]) is int and even:
            for p in parts[1:]:
                self.trace.union(parts[0], p)
        else:
            what = "uneven parts" if name in ADAPTIVE_SPLITS and type(args[1]) is int else "literal sizes"
            self.trace.block(s, unsupported(f"{name} along the channels with {what}"))

    def _reduce(self, name: str, args: tuple, kwargs: dict, out: Any, outs: list) -> None:
        x, dim = args[0], arg(args, kwargs, 1, "dim")
        keepdim = bool(arg(args, kwargs, 2, "keepdim", False))
        s = self.shadow(x)
        dims = sorted({d % x.dim() for d in ([dim] if isinstance(dim, int) else dim)}, reverse=True)
        for d in dims:
            s = s.narrow(d, 0, 1) if keepdim else s.select(d, 0)
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor) and t.shape == s.shape:
                self.set_shadow(t, s)

    def _generic(self, name: str, args: tuple, kwargs: dict, out: Any, outs: list) -> None:
        ins = self._tensors_in(args, kwargs)
        if not ins:
            return
        if len(ins) == 1 and all(t.shape == ins[0].shape for t in outs):  # unary (activations): input labels
            s = self.shadow(ins[0])
            for t in outs:
                self.set_shadow(t, s)
            return
        shape = broadcast([t.shape for t in ins])
        if shape is not None and all(t.shape == shape for t in outs):
            return self._elementwise(ins, outs, shape)
        labelled = [t for t in ins if self.has_labels(t)]
        if len(labelled) == 1 and all(t.dim() == labelled[0].dim() for t in outs):
            return self._resize(labelled[0], outs, name)
        self._block(name, args, kwargs, out, outs)

    def _elementwise(self, ins: list, outs: list, shape: torch.Size) -> None:
        ops = [self.shadow(t) for t in ins]
        full = [expand_shadow(s, shape) for s in ops]
        if len(full) == 1:  # unary: the output has the input's labels
            for t in outs:
                self.set_shadow(t, full[0])
            return
        bcast = [{d for d in range(len(shape)) if (d - len(shape) + s.dim() < 0 or
                  s.shape[d - len(shape) + s.dim()] == 1) and shape[d] > 1} for s in ops]
        free = [not has_slots(s) for s in ops]  # operands without channels
        order = sorted(range(len(ops)), key=lambda i: (len(bcast[i]) > 0, free[i]))
        p = order[0]
        vary_p = set(varying_dims(full[p]))
        if not free[p] and any(free[i] and not vary_p <= bcast[i] for i in order[1:]):
            # a tensor the graph knows nothing of spans the channels (a constant, a plain tensor attribute)
            self.trace.mark_fragile("a fixed-size operand spans the channels")
        for i in order[1:]:
            vary_i = set(varying_dims(full[i]))
            clash, shared = bcast[i] & vary_p | bcast[p] & vary_i, vary_i & vary_p
            if clash and not (shared and max(clash) < min(shared)):
                continue  # broadcast over channels (a spatial map, a per-head scale): not the same channels
            # one table for every head (rotary cos/sin over head dims): dim d of every head is its entry d
            self.trace.union(full[p], full[i])
        for t in outs:
            self.set_shadow(t, full[p])

    def _resize(self, x: torch.Tensor, outs: list, name: str) -> None:
        """Pooling, interpolation: dims whose size changed hold no channel labels."""
        s = self.shadow(x)
        changed = [d for d in range(x.dim()) if x.shape[d] != outs[0].shape[d]]
        if set(changed) & set(varying_dims(s)):
            self.trace.block(s, unsupported(f"{name} changes a channel dimension"))
            for t in outs:
                self.mark_input(t)
            return
        core = core_of(s)  # of size one along every changed dim: the outputs' core too
        for t in outs:
            self.set_shadow(t, expand_core(core, t.shape))
