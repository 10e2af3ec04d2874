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
blocks that slot. How each operation moves labels is looked up in one table
(:data:`prunable.rules.RULES`); the rules of weighted layers live here, those of
shape and elementwise operations in :mod:`prunable.rules`.
"""

from __future__ import annotations

import weakref
from typing import Any

import torch
from torch import nn
from torch.overrides import TorchFunctionMode

from .meta import arg, call
from .reasons import SkipKind, SkipReason
from .sdpa import AttentionRules
from .rules import SIZE_FREE, ShapeRules, func_name, mixed, rule_of, tensors_of, unsupported
from .shadow import FIXED, FREE, Target, Trace, all_slots, canonical, expand_core, labels_along, lay_along
from .surgery import Role, handler_for, is_depthwise, parametrization_problem, parametrized

__all__ = ["ChannelTracer", "Target", "Trace"]


#: ``(name, rule)`` of each operation seen (``func_name`` and ``rule_of`` cost more than the lookup)
_RULE_OF: dict[Any, tuple[str, str]] = {}


def _remember(func: Any, name: str, rule: str) -> None:
    """Remember the rule of ``func`` when it is a stable, hashable function (not a bound method
    of a temporary object); a bounded table (functions made afresh per call are not kept forever)."""
    if len(_RULE_OF) >= 4096:
        return
    if getattr(func, "__self__", None) is None or name.startswith("property:") or isinstance(func.__self__, type):
        try:
            _RULE_OF[func] = (name, rule)
        except TypeError:
            pass


class ChannelTracer(AttentionRules, ShapeRules, TorchFunctionMode):
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
        self._opaque: nn.Module | None = None  # a module run as one operation (its handler's trace_module)
        self._shadows: dict[int, tuple[weakref.ref, torch.Tensor]] = {}
        self._made_by: dict[int, tuple] = {}
        #: sizes of channel dims read through .shape / .size() → the labels read
        self._shape_sizes: dict[int, list[torch.Tensor]] = {}
        self._sources: dict[int, tuple] = {}  # see AttentionRules.source_of
        self._outer: list = []  # outer dims of split channel dims, see AttentionRules.finish
        self._split_span = (0, -1)  # smallest and largest label of those splits
        self._escaped: list[torch.Tensor] = []  # labels of layer outputs used beyond shape operations
        self._collapsed: list[tuple] = []  # (labels, dim, lowest, highest label) reduced over a channel dim
        self._reshaped: list[tuple] = []  # (labels, lowest, highest label) after reshapes
        self._scalars: list[tuple] = []  # (running module, Python number) scaling a tensor: derived scales
        self._head_dims: set[int] = set()  # sizes contracted by q @ kᵀ: scales derived from them

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
        self._sources.clear()
        self._collapsed.clear()
        self._reshaped.clear()
        self._escaped.clear()

    def mark_input(self, t: torch.Tensor) -> None:
        self.set_shadow(t, torch.tensor(FIXED).expand(t.shape))

    def _param_shadow(self, p: torch.Tensor) -> torch.Tensor:
        if id(p) not in self.trace.params:
            module, mname, attr = self.owners[id(p)]
            slots = self.trace.new_slots(p.numel(), p.shape)
            if p.numel():  # distinct slots: their own smallest core
                slots = expand_core(slots, p.shape)
            self.trace.params[id(p)] = (Target(module, mname, None, attr, 0, id(module)), slots)
        return self.trace.params[id(p)][1]

    # -- modules -------------------------------------------------------------
    def enter(self, module: nn.Module, args: tuple) -> None:
        """Forward pre-hook (of every module: those outside the traced model are passed over):
        track the module stack; a module whose handler defines ``trace_module`` (attention,
        recurrent layers) runs as one operation."""
        if id(module) not in self.names:
            return
        self.stack.append(module)
        if self._opaque is None and getattr(handler_for(module), "trace_module", None) is not None:
            self._opaque = module
            self.trace.mark_fragile(f"{type(module).__name__} is traced as one operation")

    def leave(self, module: nn.Module, args: tuple, output: Any) -> None:
        """Forward hook (of every module, like :meth:`enter`): pop the stack."""
        if id(module) in self.names:
            self.stack.pop()

    def leave_opaque(self, module: nn.Module, args: tuple, kwargs: dict, output: Any) -> None:
        """Forward hook (with keyword arguments) of a module whose handler defines ``trace_module``,
        run after :meth:`leave`: when it ran as one operation, its handler labels its output."""
        if module is self._opaque:
            # the handler's bookkeeping on shadows must not be traced itself (nor pay for dispatch)
            try:
                with torch._C.DisableTorchFunction():
                    handler_for(module).trace_module(self, module, args, kwargs, output)
            finally:
                self._opaque = None

    # -- for handlers tracing their module as one operation (``trace_module``) --
    def name_of(self, module: nn.Module) -> str:
        """Qualified name of ``module`` in the traced model."""
        return self.names.get(id(module), "")

    def input_labels(self, x: torch.Tensor, dim: int, who: str) -> torch.Tensor | None:
        """Channel label of each index of ``x`` along ``dim``; None (and ``x`` blocked with a
        reason naming ``who``) when its channels are mixed with other dims."""
        return self._in_labels(x, dim, who)

    def produce(self, module: nn.Module, n: int) -> torch.Tensor:
        """The ``n`` slots (fresh the first time) of ``module``'s output channels (``Role.OUT``)."""
        return self._produce(Target(module, self.name_of(module), Role.OUT, uid=id(module)), n)

    def consume(self, module: nn.Module, labels: torch.Tensor, param: str | None = None, axis: int = 0) -> None:
        """``module`` reads channels ``labels``: on its ``Role.IN`` side, or, with ``param``,
        along ``axis`` of that one tensor of it (sliced as it is, with no handler)."""
        name = self.name_of(module)
        if param is None:
            return self._consume(Target(module, name, Role.IN, uid=id(module)), labels)
        key = (id(module), param, axis)
        if key in self.trace.consumers:
            return self.trace.union(self.trace.consumers[key][1], labels)
        self.trace.consumers[key] = (Target(module, name, None, param, axis, id(module)), labels)

    def label_output(
        self, out: torch.Tensor, labels: torch.Tensor, dim: int, producer: nn.Module | None = None,
        at: nn.Module | None = None,
    ) -> None:
        """Give ``out`` the channel ``labels`` along ``dim``. With ``producer``, activation criteria
        observe ``producer``'s output channels on the output of module ``at`` (default: the producer;
        the handler of ``at`` says which tensor, see ``ModuleHandler.activation``), or on a norm
        applied right after it when ``out`` holds exactly the producer's channels."""
        if producer is not None:
            key = (id(producer), Role.OUT)
            self.trace.measure[key] = (self.name_of(at if at is not None else producer), dim)
            if key in self.trace.producers and len(self.trace.producers[key][1]) == out.shape[dim]:
                self._made_by[id(out)] = (weakref.ref(out), key, dim)
        self._out_shadow(out, labels, dim)

    # -- dispatch ------------------------------------------------------------
    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = call(func, args, kwargs)
        if self._opaque is not None:
            return out
        try:
            name, rule = _RULE_OF[func]
        except (KeyError, TypeError):  # first call of ``func`` (or an unhashable callable)
            name = func_name(func)
            rule = rule_of(name)
            _remember(func, name, rule)
        if self.stack and self.trace.fragile is None and (name not in SIZE_FREE or rule == "conv"):
            self._check_size_free(name, rule, args, kwargs)
        if rule == "ignore":
            return out
        if rule == "shape_read":
            self._shape_read(args, kwargs)
            return out
        outs = [out] if isinstance(out, torch.Tensor) else tensors_of(out)
        if rule == "setitem":  # in place: no output
            self._setitem(name, args, kwargs, out, outs)
            return out
        if not outs:
            if rule == "block":
                for t in self._tensors_in(args, kwargs):
                    if self.has_labels(t):
                        self.trace.block(self.shadow(t), unsupported(f"{name} is not supported"))
            return out
        if rule == "reduce" and arg(args, kwargs, 1, "dim") is None:
            rule = "generic"
        if rule != "create":
            getattr(self, "_" + rule)(name, args, kwargs, out, outs)
            self.after_rule(name, rule, args, kwargs, outs)
        return out

    def _check_size_free(self, name: str, rule: str, args: tuple, kwargs: dict) -> None:
        """Mark the trace fragile when ``name`` (an operation outside :data:`~prunable.rules.SIZE_FREE`,
        or a grouped convolution that is not depthwise) reads a tensor with channels."""
        if rule == "conv":
            groups, x = arg(args, kwargs, 6, "groups", 1), args[0] if args else None
            if groups == 1 or (isinstance(x, torch.Tensor) and x.dim() > 1 and groups == x.shape[1]):
                return
        if any(self.has_labels(t) or id(t) in self.owners for t in self._tensors_in(args, kwargs)):
            self.trace.mark_fragile(f"{name} on channels")

    # -- weighted operations -------------------------------------------------
    def _owner_target(self, weight: Any, role: Role, fallback: bool = False) -> tuple[Target | None, SkipReason | None]:
        """The module side owning ``weight`` and None; ``(None, reason)`` if no module can be
        cut for it; ``(target, reason)`` for a known module that cannot be cut (a weight under
        an unsupported parametrization). A weight computed by ``torch.nn.utils.parametrize``
        belongs to the running module."""
        owner = self.owners.get(id(weight)) if isinstance(weight, torch.Tensor) else None
        if owner is None:
            module = self.stack[-1] if self.stack else None
            if module is None or not (fallback or parametrized(module, "weight")):
                return None, unsupported("weight is not a parameter of any module")
            owner = (module, self.names.get(id(module), ""), "weight")
        module, mname, attr = owner
        handler = handler_for(module)
        if handler is None:
            return None, SkipReason(SkipKind.NO_HANDLER, f"{mname} ({type(module).__name__}) has no handler; "
                                    "use prunable.register_handler")
        problem = parametrization_problem(module, attr)
        if problem is not None:  # the layer is known but cannot be cut: its channels are a skipped group
            target = Target(module, mname, role, uid=id(module))
            return target, SkipReason(SkipKind.UNSUPPORTED_LAYER, f"{mname}: {problem}")
        if attr != "weight" and all(attr not in handler.params(module, side) for side in (Role.IN, Role.OUT)):
            return None, unsupported(f"{mname}.{attr} is used outside its module")
        return Target(module, mname, role, uid=id(module)), None

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
                reason = unsupported(f"{target.name} sees inputs of different sizes")
                self.trace.block(torch.cat([old, labels]), reason)
                return
            self.trace.union(old, labels)
        else:
            self.trace.consumers[key] = (target, labels)

    def _in_labels(self, x: torch.Tensor, dim: int, who: str) -> torch.Tensor | None:
        s = self.shadow(x)
        labels = labels_along(s, dim)
        if labels is None:
            self.trace.block(s, mixed(f"{who}: input channels are mixed with other dimensions"))
        return labels

    def _out_shadow(self, out: torch.Tensor, slots: torch.Tensor, dim: int, fresh: bool = False) -> None:
        """``out`` holds labels ``slots`` along ``dim``; ``fresh`` slots (distinct: a layer's outputs)
        are known to be the shadow's smallest core."""
        if fresh:
            return self.set_shadow(out, lay_along(slots, dim, out.shape))
        shape = [1] * out.dim()
        shape[dim] = -1
        self.set_shadow(out, slots.view(shape).expand(out.shape))

    def _conv(self, name: str, args: tuple, kwargs: dict, out: torch.Tensor, outs: list) -> None:
        """conv1d/2d/3d and conv_transpose1d/2d/3d: ``groups`` is argument 6 of both."""
        x, weight = args[0], arg(args, kwargs, 1, "weight")
        groups = int(arg(args, kwargs, 6, "groups", 1) or 1)
        ch = 1 if x.dim() == weight.dim() else 0
        target, why = self._owner_target(weight, Role.OUT)
        labels = self._in_labels(x, ch, name)
        cout = out.shape[ch]
        if target is not None and why is not None:
            return self._unprunable(target, why, x, out, ch)
        if target is None or labels is None:
            self.trace.block(self.shadow(x), why or mixed(f"{name}: mixed input"))
            return self.mark_input(out)
        module = target.module
        depthwise = groups > 1 and is_depthwise(module) and groups == x.shape[ch]
        if groups > 1 and not depthwise and bool((labels < 0).any()):
            self.trace.block(labels, SkipReason(SkipKind.FIXED_INPUT, f"{target.name}: grouped convolution "
                                                f"(groups={groups}) of a fixed-size input"))
            return self.mark_input(out)
        slots = self._produce(target, cout)
        self._consume(Target(module, target.name, Role.IN, uid=id(module)), labels)
        if groups > 1 and not depthwise:  # grouped: the same position leaves every group
            for part in (labels.view(groups, -1), slots.view(groups, -1)):
                self.trace.union(part, part[:1].expand_as(part))
        elif groups > 1:  # depthwise: output o comes from input o // multiplier
            mult = cout // groups
            if not all_slots(labels):
                reason = SkipReason(SkipKind.FIXED_INPUT, f"{target.name}: depthwise convolution of a fixed input")
                self.trace.block(slots, reason)
                self.trace.block(labels, reason)
            else:
                self.trace.union(slots, labels if mult == 1 else labels.repeat_interleave(mult))
        self._made_by[id(out)] = (weakref.ref(out), (target.uid, Role.OUT), ch)
        self.trace.measure[(target.uid, Role.OUT)] = (target.name, ch)
        self._out_shadow(out, slots, ch, fresh=True)

    def _unprunable(self, target: Target, why: SkipReason, x: torch.Tensor | None, out: torch.Tensor, dim: int) -> None:
        """A known layer that cannot be cut (an unsupported parametrization): its output channels
        form a group skipped for ``why``, and the channels it reads are kept too."""
        slots = self._produce(target, out.shape[dim])
        self.trace.block(slots, why)
        if x is not None:
            self.trace.block(self.shadow(x), why)
        self._out_shadow(out, slots, dim, fresh=True)

    def _linear(self, name: str, args: tuple, kwargs: dict, out: torch.Tensor, outs: list) -> None:
        x, weight = args[0], arg(args, kwargs, 1, "weight")
        target, why = self._owner_target(weight, Role.OUT)
        labels = self._in_labels(x, x.dim() - 1, name)
        if target is not None and why is not None:
            return self._unprunable(target, why, x, out, out.dim() - 1)
        if target is None or labels is None:
            self.trace.block(self.shadow(x), why or mixed(f"{name}: mixed input"))
            return self.mark_input(out)
        slots = self._produce(target, out.shape[-1])
        self._consume(Target(target.module, target.name, Role.IN, uid=target.uid), labels)
        self._made_by[id(out)] = (weakref.ref(out), (target.uid, Role.OUT), out.dim() - 1)
        self.trace.measure[(target.uid, Role.OUT)] = (target.name, -1)
        self._out_shadow(out, slots, out.dim() - 1, fresh=True)

    def _channelwise(self, name: str, x: torch.Tensor, weight: Any, out: torch.Tensor, dim: int) -> None:
        """A per-channel module (norm, PReLU): consumer of its input, output = input labels."""
        s = self.shadow(x)
        self.set_shadow(out, s)
        target, why = self._owner_target(weight, Role.IN, fallback=True)
        labels = labels_along(s, dim)
        if target is None or labels is None or why is not None:
            return self.trace.block(s, why or mixed(f"{name}: mixed channels"))
        self._consume(target, labels)
        made = self._made_by.get(id(x))
        if made is not None and made[0]() is x and (dim % x.dim()) == made[2] % x.dim():
            self.trace.measure[made[1]] = (target.name, made[2])  # ids are reused: check liveness

    def _norm(self, name: str, args: tuple, kwargs: dict, out: torch.Tensor, outs: list) -> None:
        """batch_norm, instance_norm: (input, running_mean, running_var, weight, bias, ...)."""
        x = args[0]
        weight = arg(args, kwargs, 3, "weight")
        if weight is None:
            weight = arg(args, kwargs, 1, "running_mean")
        self._channelwise(name, x, weight, out, 1 if x.dim() > 1 else 0)

    def _layer_norm(self, name: str, args: tuple, kwargs: dict, out: torch.Tensor, outs: list) -> None:
        x, shape = args[0], tuple(arg(args, kwargs, 1, "normalized_shape"))
        if len(shape) != 1:
            self.set_shadow(out, self.shadow(x))
            return self.trace.block(self.shadow(x), unsupported(f"{name} over {len(shape)} dims"))
        self._channelwise(name, x, arg(args, kwargs, 2, "weight"), out, x.dim() - 1)

    def _group_norm(self, name: str, args: tuple, kwargs: dict, out: torch.Tensor, outs: list) -> None:
        x, groups = args[0], int(arg(args, kwargs, 1, "num_groups"))
        self._channelwise(name, x, arg(args, kwargs, 2, "weight"), out, 1)
        labels = labels_along(self.shadow(x), 1)
        if 1 < groups < x.shape[1] and labels is not None:  # every group keeps the same size
            who = self.names.get(id(self.stack[-1]), "") if self.stack else ""
            self.trace.blocks.append((labels.view(groups, -1), f"the {groups} groups of GroupNorm {who}"))

    def _prelu(self, name: str, args: tuple, kwargs: dict, out: torch.Tensor, outs: list) -> None:
        x, weight = args[0], args[1]
        if weight.numel() == 1:
            return self.set_shadow(out, self.shadow(x))
        self._channelwise(name, x, weight, out, 1 if x.dim() > 1 else 0)

    def _embedding(self, name: str, args: tuple, kwargs: dict, out: torch.Tensor, outs: list) -> None:
        """embedding, embedding_bag: the weight's columns become the output's last dim."""
        target, why = self._owner_target(arg(args, kwargs, 1, "weight"), Role.OUT)
        for t in outs[1:]:  # embedding_bag's offsets and bag sizes
            self.mark_input(t)
        if target is not None and why is not None:
            return self._unprunable(target, why, None, outs[0], outs[0].dim() - 1)
        if target is None:
            return self.mark_input(outs[0])
        self.trace.measure[(target.uid, Role.OUT)] = (target.name, -1)
        self._out_shadow(outs[0], self._produce(target, outs[0].shape[-1]), outs[0].dim() - 1, fresh=True)

    def _pixel_shuffle(self, name: str, args: tuple, kwargs: dict, out: torch.Tensor, outs: list) -> None:
        """Channel ``c`` of the output is input channels ``c·r² … c·r² + r² − 1``: those leave together."""
        x, r = args[0], int(arg(args, kwargs, 1, "upscale_factor"))
        labels = self._in_labels(x, x.dim() - 3, name)
        if labels is None:
            return self._block(name, args, kwargs, out, outs, mixed(f"{name}: mixed input"))
        block = labels.view(-1, r * r)
        self.trace.union(block, block[:, :1].expand_as(block))
        self._out_shadow(out, block[:, 0].contiguous(), out.dim() - 3)
