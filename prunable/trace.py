"""Channel tracing: which channels of which tensors are the same channel.

One forward pass runs under a :class:`torch.overrides.TorchFunctionMode`. Every
tensor gets a *shadow*: an integer tensor of the same shape whose entries are
channel labels ("slots"). A convolution or Linear creates fresh slots for its
output channels; shape operations (view, permute, cat, chunk, getitem …) are
replayed on the shadows, so labels follow the data through any reshaping;
elementwise operations (residual adds, squeeze-excitation multiplies) record
that their operands' labels must be pruned together. The result is a set of
union edges between slots, the slot ranges of every producer, and the label
vector seen by every consumer — :mod:`prunable.graph` turns it into groups.

Labels ``FREE`` (-1) mark constants that never constrain pruning; ``FIXED``
(-2) marks data whose size cannot change (model inputs, outputs of operations
prunable does not understand); an elementwise pairing of a slot with ``FIXED``
blocks that slot.
"""

from __future__ import annotations

import weakref
from typing import Any

import torch
from torch import nn
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_flatten, tree_map

from .attention import AttentionHandler
from .meta import _arg, _broadcast, _call
from .shadow import (
    FIXED, FREE, Target, Trace, _core, canonical, core_of, expand_shadow, labels_along, varying_dims,
)
from .surgery import Role, handler_for, is_depthwise

_IDENTITY = {
    "to", "float", "half", "double", "bfloat16", "type", "type_as", "cpu", "cuda", "detach",
    "clone", "contiguous", "requires_grad_", "detach_", "pin_memory", "__deepcopy__",
}
_INDEX = {
    "view", "reshape", "flatten", "unflatten", "permute", "transpose", "t", "squeeze",
    "unsqueeze", "expand", "expand_as", "cat", "concat", "concatenate", "stack", "unbind",
    "__getitem__", "narrow", "select", "movedim", "moveaxis", "roll", "flip", "view_as",
    "reshape_as", "swapaxes", "swapdims", "repeat", "tile", "hstack", "vstack",
    "pixel_shuffle", "pixel_unshuffle", "channel_shuffle", "native_channel_shuffle",
    "split_with_sizes", "tensor_split",
}
_SPLITS = {"view", "reshape", "unflatten", "stack"}
_REDUCE = {"mean", "sum", "amax", "amin", "max", "min", "std", "var", "norm", "logsumexp", "prod", "nansum"}
_BLOCK = {
    "matmul", "bmm", "mm", "__matmul__", "__rmatmul__", "einsum", "baddbmm", "addmm", "addbmm",
    "scaled_dot_product_attention", "multi_head_attention_forward", "bilinear", "__setitem__",
    "index_put_", "index_put", "scatter", "scatter_", "gather", "masked_scatter", "split",
}
#: tensor factories called as methods: the result holds no channels of the tensor
_CREATE = {"new_zeros", "new_ones", "new_empty", "new_full", "new_tensor"}
_CONV = {"conv1d", "conv2d", "conv3d"}
_CONV_T = {"conv_transpose1d", "conv_transpose2d", "conv_transpose3d"}


#: what ``tree_flatten`` looks into (pytree containers) among the arguments of an operation
_CONTAINERS = (list, tuple, dict)


def _tensors(tree: Any) -> list[torch.Tensor]:
    """The tensors of a pytree, in ``tree_flatten`` order."""
    return [t for t in tree_flatten(tree)[0] if isinstance(t, torch.Tensor)]


def _func_name(func: Any) -> str:
    name = getattr(func, "__name__", "")
    if name == "__get__":
        return "property:" + getattr(getattr(func, "__self__", None), "__name__", "")
    return name


def _same_rank(parts: Any) -> bool:
    return isinstance(parts, (list, tuple)) and len(parts) > 0 and len({p.dim() for p in parts}) == 1


def _cat_cores(parts: list[torch.Tensor], dim: int) -> torch.Tensor:
    """``torch.cat(parts, dim)`` of shadows, concatenating their cores: dims along
    which every part is constant are never materialised."""
    dim %= parts[0].dim()
    cores = [core_of(p) for p in parts]
    small = [1 if all(c.shape[d] == 1 for c in cores) else parts[0].shape[d] for d in range(parts[0].dim())]
    pieces = [c.expand([p.shape[d] if d == dim else small[d] for d in range(p.dim())]) for c, p in zip(cores, parts)]
    out = torch.cat(pieces, dim)
    return out.expand([out.shape[d] if d == dim else parts[0].shape[d] for d in range(out.dim())])


class ChannelTracer(TorchFunctionMode):
    """Record channel labels for one forward pass of ``model``.

    ``names`` maps ``id(module)`` to qualified names and ``owners`` maps
    ``id(tensor)`` of every parameter/buffer to ``(module, module_name, attr)``.
    """

    def __init__(self, names: dict[int, str], owners: dict[int, tuple[nn.Module, str, str]]) -> None:
        super().__init__()
        self.trace = Trace()
        self.names = names
        self.owners = owners
        self.stack: list[nn.Module] = []
        self._opaque: nn.Module | None = None  # an attention module being run as one operation
        self._shadows: dict[int, tuple[weakref.ref, torch.Tensor]] = {}
        self._made_by: dict[int, tuple] = {}

    # -- shadows -------------------------------------------------------------
    def shadow(self, t: torch.Tensor) -> torch.Tensor:
        entry = self._shadows.get(id(t))
        if entry is not None and entry[0]() is t:
            return entry[1]
        if id(t) in self.owners and t.is_floating_point():
            return self._param_shadow(t)
        return torch.tensor(FREE).expand(t.shape)

    def has_labels(self, t: torch.Tensor) -> bool:
        entry = self._shadows.get(id(t))
        return entry is not None and entry[0]() is t

    def set_shadow(self, t: torch.Tensor, s: torch.Tensor) -> None:
        key = id(t)
        self._shadows[key] = (weakref.ref(t, lambda _r, k=key, d=self._shadows: d.pop(k, None)), canonical(s))

    def forget_shadows(self) -> None:
        """Drop every shadow (the trace stays); breaks the table's reference cycle
        through its weak-reference callbacks, so it is freed without the garbage collector."""
        self._shadows.clear()
        self._made_by.clear()

    def mark_input(self, t: torch.Tensor) -> None:
        self.set_shadow(t, torch.tensor(FIXED).expand(t.shape))

    def _param_shadow(self, p: torch.Tensor) -> torch.Tensor:
        if id(p) not in self.trace.params:
            module, mname, attr = self.owners[id(p)]
            slots = self.trace.new_slots(p.numel()).view(p.shape)
            self.trace.params[id(p)] = (Target(module, mname, None, attr, 0, id(module)), slots)
        return self.trace.params[id(p)][1]

    # -- modules -------------------------------------------------------------
    def enter(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        """Forward pre-hook: track the module stack; attention modules run as one operation."""
        self.stack.append(module)
        if self._opaque is None and isinstance(handler_for(module), AttentionHandler):
            self._opaque = module

    def leave(self, module: nn.Module, args: tuple, kwargs: dict, output: Any) -> None:
        """Forward hook: pop the stack; label the output of an attention module."""
        self.stack.pop()
        if module is self._opaque:
            try:  # still opaque: the bookkeeping below must not be traced itself
                self._attention(module, handler_for(module), args, kwargs, output)
            finally:
                self._opaque = None

    def _attention(self, module: nn.Module, handler: AttentionHandler, args: tuple, kwargs: dict, output: Any) -> None:
        """Input channel i, inner q/k/v dim i and output-projection input i are one channel;
        the heads' partition of the inner dims is recorded for equal-per-head pruning."""
        name = self.names.get(id(module), "")
        streams, out = handler.streams(module, args, kwargs), handler.output(output)
        labels = [self._in_labels(x, x.dim() - 1, name) for x in streams]
        reason = handler.unsupported(module, args, kwargs)
        if reason is None and (not streams or any(lab is None for lab in labels)):
            reason = "inputs whose channels are mixed with other dimensions"
        width, heads = handler.width(module), handler.num_heads(module)
        if reason is None and (any(len(lab) != width for lab in labels) or width % heads):
            reason = f"inner width {width} differs from the input width or is not a multiple of {heads} heads"
        proj = handler.out_proj(module)
        if reason is not None:
            for x in streams:
                self.trace.block(self.shadow(x), f"{name}: attention with {reason}")
            return self.mark_input(out)
        for other in labels[1:]:
            self.trace.union(labels[0], other)
        target = Target(module, name, Role.IN, uid=id(module))
        self._consume(target, labels[0])
        inner = self._produce(Target(module, name, Role.OUT, uid=id(module)), 3 * width)
        for part in inner.view(3, width):
            self.trace.union(part, labels[0])
        pname = self.names.get(id(proj), "")
        self._consume(Target(proj, pname, Role.IN, uid=id(proj)), inner[:width])
        slots = self._produce(Target(proj, pname, Role.OUT, uid=id(proj)), out.shape[-1])
        if handler.tied_output:
            self.trace.union(slots, labels[0])
        self.trace.blocks.append((inner[:width].view(heads, width // heads), f"the {heads} heads of {name}"))
        self.trace.measure[(id(proj), Role.OUT)] = (name, -1)
        self._made_by[id(out)] = (weakref.ref(out), (id(proj), Role.OUT), out.dim() - 1)
        self._out_shadow(out, slots, out.dim() - 1)

    # -- dispatch ------------------------------------------------------------
    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = _call(func, args, kwargs)
        if self._opaque is not None:
            return out
        name = _func_name(func)
        if name in ("size", "dim", "numel", "__len__", "property:shape", "property:dtype", "property:device"):
            return out
        outs = [out] if isinstance(out, torch.Tensor) else _tensors(out)
        if name == "__setitem__":
            return self._setitem(args)
        if not outs:
            ins = self._tensors_in(args, kwargs)
            if name in _BLOCK:
                for t in ins:
                    if self.has_labels(t):
                        self.trace.block(self.shadow(t), f"{name} is not supported")
            return out
        self._dispatch(name, args, kwargs, out, outs)
        return out

    def _dispatch(self, name: str, args: tuple, kwargs: dict, out: Any, outs: list) -> None:
        rule = {
            "linear": self._linear, "batch_norm": self._norm, "instance_norm": self._norm,
            "layer_norm": self._layer_norm, "group_norm": self._group_norm, "prelu": self._prelu,
            "embedding": self._embedding, "chunk": self._chunk, "roi_align": self._roi, "roi_pool": self._roi,
        }.get(name)
        if name in _CONV or name in _CONV_T:
            rule = self._conv
        if rule is not None:
            rule(name, args, kwargs, out)
        elif name in _CREATE:
            return
        elif name in _IDENTITY or name == "property:data":
            self.set_shadow(outs[0], self.shadow(args[0]))
        elif name in _INDEX or name.startswith("property:"):
            self._index(name, args, kwargs, out)
        elif name in _BLOCK or name == "split":
            self._block_all(name, args, kwargs, outs)
        elif name in _REDUCE and _arg(args, kwargs, 1, "dim") is not None:
            self._reduce(args, kwargs, out)
        else:
            self._generic(name, args, kwargs, out, outs)

    def _tensors_in(self, args: tuple, kwargs: dict) -> list[torch.Tensor]:
        if any(isinstance(a, _CONTAINERS) for a in args) or any(isinstance(a, _CONTAINERS) for a in kwargs.values()):
            return _tensors((args, kwargs))
        return [a for a in (*args, *kwargs.values()) if isinstance(a, torch.Tensor)]

    def _block_all(self, name: str, args: tuple, kwargs: dict, outs: list) -> None:
        for t in self._tensors_in(args, kwargs):
            if self.has_labels(t) or id(t) in self.trace.params:  # weights consumed here need no labels
                self.trace.block(self.shadow(t), f"used by {name}")
        for t in outs:
            self.mark_input(t)

    # -- weighted operations -------------------------------------------------
    def _owner_target(self, weight: Any, role: Role, fallback: bool = False) -> tuple[Target | None, str]:
        """The module side owning ``weight``, or ``(None, reason)`` if it cannot be cut."""
        owner = self.owners.get(id(weight)) if isinstance(weight, torch.Tensor) else None
        if owner is None:
            module = self.stack[-1] if fallback and self.stack else None
            if module is None:
                return None, "weight is not a parameter of any module"
            owner = (module, self.names.get(id(module), ""), "weight")
        module, mname, attr = owner
        handler = handler_for(module)
        if handler is None:
            return None, f"{mname} ({type(module).__name__}) has no handler; use prunable.register_handler"
        if attr not in handler.params(module, Role.IN) and attr not in handler.params(module, Role.OUT) and attr != "weight":
            return None, f"{mname}.{attr} is used outside its module"
        return Target(module, mname, role, uid=id(module)), ""

    def _produce(self, target: Target, n: int) -> torch.Tensor:
        key = (target.uid, Role.OUT)
        if key not in self.trace.producers:
            self.trace.producers[key] = (target, self.trace.new_slots(n))
        return self.trace.producers[key][1]

    def _consume(self, target: Target, labels: torch.Tensor) -> None:
        key = (target.uid, Role.IN)
        if key in self.trace.consumers:
            old = self.trace.consumers[key][1]
            if old.shape != labels.shape:
                self.trace.block(torch.cat([old, labels]), f"{target.name} sees inputs of different sizes")
                return
            self.trace.union(old, labels)
        else:
            self.trace.consumers[key] = (target, labels)

    def _in_labels(self, x: torch.Tensor, dim: int, who: str) -> torch.Tensor | None:
        s = self.shadow(x)
        labels = labels_along(s, dim)
        if labels is None:
            self.trace.block(s, f"{who}: input channels are mixed with other dimensions")
        return labels

    def _out_shadow(self, out: torch.Tensor, slots: torch.Tensor, dim: int) -> None:
        shape = [1] * out.dim()
        shape[dim] = -1
        self.set_shadow(out, slots.view(shape).expand(out.shape))

    def _conv(self, name: str, args: tuple, kwargs: dict, out: torch.Tensor) -> None:
        x, weight = args[0], _arg(args, kwargs, 1, "weight")
        groups = int(_arg(args, kwargs, 6 if name in _CONV else 7, "groups", 1) or 1)
        ch = 1 if x.dim() == weight.dim() else 0
        target, why = self._owner_target(weight, Role.OUT)
        labels = self._in_labels(x, ch, name)
        cout = out.shape[ch]
        if target is None or labels is None:
            self.trace.block(self.shadow(x), why or "mixed input")
            return self.mark_input(out)
        module = target.module
        depthwise = groups > 1 and is_depthwise(module) and groups == x.shape[ch]
        if groups > 1 and not depthwise and (name in _CONV_T or bool((labels < 0).any())):
            self.trace.block(labels, f"{target.name}: grouped convolution (groups={groups})")
            return self.mark_input(out)
        slots = self._produce(target, cout)
        self._consume(Target(module, target.name, Role.IN, uid=id(module)), labels)
        if groups > 1 and not depthwise:  # grouped: the same position leaves every group
            for part in (labels.view(groups, -1), slots.view(groups, -1)):
                self.trace.union(part, part[:1].expand_as(part))
        elif groups > 1:  # depthwise: output o comes from input o // multiplier
            mult = cout // groups
            if bool((labels < 0).any()):
                reason = f"{target.name}: depthwise convolution of a fixed input"
                self.trace.block(slots, reason)
                self.trace.block(labels, reason)
            else:
                self.trace.union(slots, labels.repeat_interleave(mult))
        self._made_by[id(out)] = (weakref.ref(out), (target.uid, Role.OUT), ch)
        self.trace.measure[(target.uid, Role.OUT)] = (target.name, ch)
        self._out_shadow(out, slots, ch)

    def _linear(self, name: str, args: tuple, kwargs: dict, out: torch.Tensor) -> None:
        x, weight = args[0], _arg(args, kwargs, 1, "weight")
        target, why = self._owner_target(weight, Role.OUT)
        labels = self._in_labels(x, x.dim() - 1, name)
        if target is None or labels is None:
            self.trace.block(self.shadow(x), why or "mixed input")
            return self.mark_input(out)
        slots = self._produce(target, out.shape[-1])
        self._consume(Target(target.module, target.name, Role.IN, uid=target.uid), labels)
        self._made_by[id(out)] = (weakref.ref(out), (target.uid, Role.OUT), out.dim() - 1)
        self.trace.measure[(target.uid, Role.OUT)] = (target.name, -1)
        self._out_shadow(out, slots, out.dim() - 1)

    def _channelwise(self, name: str, x: torch.Tensor, weight: Any, out: torch.Tensor, dim: int) -> None:
        """A per-channel module (norm, PReLU): consumer of its input, output = input labels."""
        s = self.shadow(x)
        self.set_shadow(out, s)
        target, why = self._owner_target(weight, Role.IN, fallback=True)
        labels = labels_along(s, dim)
        if target is None or labels is None:
            return self.trace.block(s, why or f"{name}: mixed channels")
        self._consume(target, labels)
        made = self._made_by.get(id(x))
        if made is not None and made[0]() is x and (dim % x.dim()) == made[2] % x.dim():
            self.trace.measure[made[1]] = (target.name, made[2])  # ids are reused: check liveness

    def _norm(self, name: str, args: tuple, kwargs: dict, out: torch.Tensor) -> None:
        x = args[0]
        weight = _arg(args, kwargs, 3, "weight") if name == "batch_norm" else _arg(args, kwargs, 3, "weight")
        if weight is None:
            weight = _arg(args, kwargs, 1, "running_mean")
        self._channelwise(name, x, weight, out, 1 if x.dim() > 1 else 0)

    def _layer_norm(self, name: str, args: tuple, kwargs: dict, out: torch.Tensor) -> None:
        x, shape = args[0], tuple(_arg(args, kwargs, 1, "normalized_shape"))
        if len(shape) != 1:
            self.set_shadow(out, self.shadow(x))
            return self.trace.block(self.shadow(x), f"{name} over {len(shape)} dims")
        self._channelwise(name, x, _arg(args, kwargs, 2, "weight"), out, x.dim() - 1)

    def _group_norm(self, name: str, args: tuple, kwargs: dict, out: torch.Tensor) -> None:
        x, groups = args[0], int(_arg(args, kwargs, 1, "num_groups"))
        self._channelwise(name, x, _arg(args, kwargs, 2, "weight"), out, 1)
        labels = labels_along(self.shadow(x), 1)
        if 1 < groups < x.shape[1] and labels is not None:  # every group keeps the same size
            who = self.names.get(id(self.stack[-1]), "") if self.stack else ""
            self.trace.blocks.append((labels.view(groups, -1), f"the {groups} groups of GroupNorm {who}"))

    def _prelu(self, name: str, args: tuple, kwargs: dict, out: torch.Tensor) -> None:
        x, weight = args[0], args[1]
        if weight.numel() == 1:
            return self.set_shadow(out, self.shadow(x))
        self._channelwise(name, x, weight, out, 1 if x.dim() > 1 else 0)

    def _embedding(self, name: str, args: tuple, kwargs: dict, out: torch.Tensor) -> None:
        target, why = self._owner_target(_arg(args, kwargs, 1, "weight"), Role.OUT)
        if target is None:
            return self.mark_input(out)
        self.trace.measure[(target.uid, Role.OUT)] = (target.name, -1)
        self._out_shadow(out, self._produce(target, out.shape[-1]), out.dim() - 1)

    def _roi(self, name: str, args: tuple, kwargs: dict, out: Any) -> None:
        """``roi_align(features, boxes, …)`` / ``roi_pool``: the pooled regions keep the
        features' channels (dim 1); the boxes are coordinates, not channels."""
        out = out[0] if isinstance(out, tuple) else out
        labels = labels_along(self.shadow(args[0]), 1)
        if labels is None or out.dim() != args[0].dim() or out.shape[1] != len(labels):
            return self._block_all(name, args, kwargs, [out])
        self._out_shadow(out, labels, 1)

    def _setitem(self, args: tuple) -> None:
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
            return self._block_all("__setitem__", args, {}, [])
        if not part.numel():  # nothing written (an empty level of detections)
            return
        self.trace.union(part, values, "written into a fixed-size tensor")
        core = core_of(values)
        if part.dim() == target.dim() and all(core.shape[d] == 1 or part.shape[d] == target.shape[d]
                                              for d in range(target.dim())):
            if not bool((core_of(self.shadow(target)) >= 0).any()):
                self.set_shadow(target, core.expand(target.shape))
        else:
            self._block_all("__setitem__", args, {}, [])

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
        sargs = (*tree_map(lambda a: convert(a, True), args[:1]), *tree_map(convert, args[1:]))
        skwargs = tree_map(convert, kwargs)
        if "value" in skwargs:
            skwargs["value"] = FREE
        return sargs, skwargs

    def _index(self, name: str, args: tuple, kwargs: dict, out: Any) -> None:
        try:
            sargs, skwargs = self._shadow_args(args, kwargs)
            func = getattr(torch.Tensor, name.split(":")[-1], None)
            if name.startswith("property:"):
                sout = getattr(sargs[0], name.split(":")[1])
            elif name == "__getitem__" and isinstance(out, torch.Tensor):
                sout = self._indexed(args[0], args[1], out.shape)
            elif name in ("cat", "concat", "concatenate") and _same_rank(sargs[0]):
                sout = _cat_cores(sargs[0], _arg(sargs, skwargs, 1, "dim", 0))
            elif isinstance(args[0], torch.Tensor) and func is not None:
                # shadows may be non-contiguous where the real tensor is not: reshape, never view
                method = {"view": "reshape", "view_as": "reshape_as"}.get(name, name)
                sout = getattr(torch.Tensor, method)(*sargs, **skwargs)
            else:
                sout = getattr(torch, name)(*sargs, **skwargs)
        except Exception:  # noqa: BLE001 - unknown shape op: be conservative
            return self._block_all(name, args, kwargs, [t for t in tree_flatten(out)[0] if isinstance(t, torch.Tensor)])
        if name in ("cat", "concat", "concatenate"):
            sout = self._token_concat(sargs, skwargs, sout)
        real, shadow = tree_flatten(out)[0], tree_flatten(sout)[0]
        if name in ("view", "reshape") and isinstance(sout, torch.Tensor):
            self._size_attribute(args, sargs[0], sout)
        for t, s in zip(real, shadow):
            if isinstance(t, torch.Tensor) and isinstance(s, torch.Tensor) and t.shape == s.shape:
                if name in _SPLITS:
                    self._couple_outer(s)
                self.set_shadow(t, s)
            elif isinstance(t, torch.Tensor):
                self._block_all(name, args, kwargs, [t])

    def _size_attribute(self, args: tuple, before: torch.Tensor, after: torch.Tensor) -> None:
        """``x.reshape(n, self.hidden_dim, -1)``: a channel count passed as a literal size.

        If the reshape keeps one channel dim whole and the size given for it equals
        exactly one ``int`` attribute of the module running it, that attribute is
        recorded so pruning keeps it equal to the channel count.
        """
        sizes = args[1] if len(args) == 2 and isinstance(args[1], (tuple, list, torch.Size)) else args[1:]
        dims, old = varying_dims(after), varying_dims(before)
        if len(dims) != 1 or len(old) != 1 or len(sizes) != after.dim() or not self.stack:
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
        if len(attrs) == 1:
            self.trace.sizes.append((module, self.names.get(id(module), ""), attrs[0], labels))

    def _token_concat(self, sargs: tuple, skwargs: dict, sout: torch.Tensor) -> torch.Tensor:
        """Concatenating along a dim that holds no channels (a class token joining
        the patch tokens): the parts' channels are the same channels."""
        parts, dim = sargs[0], _arg(sargs, skwargs, 1, "dim", 0)
        firsts = [p.narrow(dim, 0, 1) for p in parts if p.shape[dim] > 0]
        varying = [varying_dims(p) for p in parts]
        if len(firsts) < 2 or any(dim % p.dim() in v or not v for p, v in zip(parts, varying)):
            return sout
        if any(not bool((_core(f) >= 0).any()) for f in firsts):
            return sout
        for f in firsts[1:]:
            self.trace.union(firsts[0], f)
        return firsts[0].expand(sout.shape)

    def _couple_outer(self, s: torch.Tensor) -> None:
        """A channel dim split into (outer, inner): outer parts must shrink together."""
        dims = varying_dims(s)
        for d in dims[:-1]:
            self.trace.union(s, s.narrow(d, 0, 1).expand(s.shape))

    def _chunk(self, name: str, args: tuple, kwargs: dict, out: Any) -> None:
        x, dim = args[0], int(_arg(args, kwargs, 2, "dim", 0))
        s = self.shadow(x)
        parts = s.chunk(int(_arg(args, kwargs, 1, "chunks")), dim)
        for t, p in zip(out, parts):
            self.set_shadow(t, p)
        if len(set(p.shape[dim] for p in parts)) == 1:
            for p in parts[1:]:
                self.trace.union(parts[0], p)
        else:
            self.trace.block(s, "uneven chunk")

    def _reduce(self, args: tuple, kwargs: dict, out: Any) -> None:
        x, dim = args[0], _arg(args, kwargs, 1, "dim")
        keepdim = bool(_arg(args, kwargs, 2, "keepdim", False))
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
        shape = _broadcast([t.shape for t in ins])
        if shape is not None and all(t.shape == shape for t in outs):
            return self._elementwise(ins, outs, shape)
        labelled = [t for t in ins if self.has_labels(t)]
        if len(labelled) == 1 and all(t.dim() == labelled[0].dim() for t in outs):
            return self._resize(labelled[0], outs, name)
        self._block_all(name, args, kwargs, outs)

    def _elementwise(self, ins: list, outs: list, shape: torch.Size) -> None:
        ops = [self.shadow(t) for t in ins]
        full = [expand_shadow(s, shape) for s in ops]
        if len(full) == 1:  # unary: the output has the input's labels
            for t in outs:
                self.set_shadow(t, full[0])
            return
        bcast = [{d for d in range(len(shape)) if (d - len(shape) + s.dim() < 0 or
                  s.shape[d - len(shape) + s.dim()] == 1) and shape[d] > 1} for s in ops]
        order = sorted(range(len(ops)), key=lambda i: (len(bcast[i]) > 0, not bool((core_of(ops[i]) >= 0).any())))
        p = order[0]
        vary_p = set(varying_dims(full[p]))
        for i in order[1:]:
            if bcast[i] & vary_p or bcast[p] & set(varying_dims(full[i])):
                continue
            self.trace.union(full[p], full[i])
        for t in outs:
            self.set_shadow(t, full[p])

    def _resize(self, x: torch.Tensor, outs: list, name: str) -> None:
        """Pooling, interpolation: dims whose size changed hold no channel labels."""
        s = self.shadow(x)
        changed = [d for d in range(x.dim()) if x.shape[d] != outs[0].shape[d]]
        if set(changed) & set(varying_dims(s)):
            self.trace.block(s, f"{name} changes a channel dimension")
            for t in outs:
                self.mark_input(t)
            return
        for d in changed:
            s = s.narrow(d, 0, 1)
        for t in outs:
            self.set_shadow(t, s.expand(t.shape))
