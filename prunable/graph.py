"""Dependency graph: which channels of a model must be removed together.

:class:`DependencyGraph` traces one forward pass of a model (see
:mod:`prunable.trace`) on a parameter-free ``meta`` copy, so the model's
parameters, buffers and train/eval mode are never touched, and Python control
flow in ``forward`` is simply followed. It returns :class:`ChannelGroup` s:
a conv's outputs with its BatchNorm and every consumer's inputs, all residual
partners of a ResNet stage, concatenation offsets, the Linear after a flatten,
depthwise pairs, squeeze-excitation scales, layer-scale parameters …

Example
-------
>>> import torch
>>> from torch import nn
>>> net = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU(),
...                     nn.Conv2d(8, 4, 3))
>>> graph = DependencyGraph(net, torch.randn(1, 3, 8, 8))
>>> print(graph.groups[0])
0.out ⇄ 1 ⇄ 3.in  (8 channels)
"""

from __future__ import annotations

import copy
import itertools
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from torch.utils._pytree import tree_flatten

from .errors import PruningValueError
from .inputs import call_model, first_failing_op, input_tensors, inputs_to
from .attention import AttentionHandler
from .copies import meta_clone
from .reasons import SkipKind, SkipReason
from .surgery import Cut, Role, apply_cuts, check_copyable, handler_for
from .shadow import classes_of, components, distinct, producer_components
from .trace import ChannelTracer, Target, Trace

__all__ = ["DependencyGraph", "ChannelGroup", "Member", "positions"]


@dataclass
class Member:
    """One target of a group with the class of each of its indices along the cut axis."""

    target: Target
    classes: torch.Tensor
    producer: bool

    def __str__(self) -> str:
        if self.target.role is not None and self.target.module is not None and self.channelwise:
            return self.target.name
        return self.target.label()

    @property
    def channelwise(self) -> bool:
        """An input side whose outputs are the same channels (its handler says so: norms, PReLU)."""
        handler = handler_for(self.target.module) if self.target.role is Role.IN else None
        return handler is not None and handler.channelwise


@dataclass
class ChannelGroup:
    """Channels that are removed together, across every module that holds them.

    ``id`` is the qualified name of the group's first producer; channel ``k``
    of the group is ``classes[k]``. ``skip_reason`` (a :class:`~prunable.reasons.SkipReason`)
    is set when the group cannot be pruned.
    """

    id: str
    classes: torch.Tensor
    members: list[Member]
    skip_reason: SkipReason | None = None
    measure: list[tuple[str, int | None, torch.Tensor]] = field(default_factory=list)
    #: ``(rows, k)`` group indices; each row must lose as many channels as every other row
    #: (attention heads, GroupNorm groups); :attr:`blocks_of` says what the rows are
    blocks: torch.Tensor | None = None
    blocks_of: str = ""

    @property
    def channels(self) -> int:
        """Number of channels of the group."""
        return len(self.classes)

    @property
    def producers(self) -> list[Member]:
        return [m for m in self.members if m.producer]

    def __str__(self) -> str:
        names = [str(m) for m in self.members]
        text = " ⇄ ".join(dict.fromkeys(names))
        note = f"; skipped: {self.skip_reason}" if self.skip_reason else ""
        return f"{text}  ({self.channels} channels{note})"

    __repr__ = __str__


def _owners(named: list[tuple[str, nn.Module]]) -> tuple[dict[int, str], dict[int, tuple[nn.Module, str, str]]]:
    """Module names by id, and the owner ``(module, module name, attribute)`` of each tensor,
    from ``named_modules(remove_duplicate=False)``."""
    names = {id(m): n for n, m in named}
    owners: dict[int, tuple[nn.Module, str, str]] = {}
    for mname, module in named:
        for attr, t in itertools.chain(module._parameters.items(), module._buffers.items()):
            if t is not None:
                owners.setdefault(id(t), (module, mname, attr))
    return names, owners


def run_traced(model: nn.Module, example_inputs: Any) -> tuple[ChannelTracer, Any]:
    """Run ``model`` once under a :class:`ChannelTracer`; returns tracer and output.

    ``example_inputs`` follows :func:`prunable.inputs.split_inputs` (a tensor, a tuple
    of positional inputs, a dict of keyword inputs or an ``(args, kwargs)`` pair).
    """
    named = list(model.named_modules(remove_duplicate=False))  # one walk of the module tree
    names, owners = _owners(named)
    tracer = ChannelTracer(names, owners)
    # two hooks common to all modules (the tracer keeps to the model's own): one pair per
    # module costs more to add and remove than the forward pass spends in them
    hooks = [nn.modules.module.register_module_forward_pre_hook(tracer.enter),
             nn.modules.module.register_module_forward_hook(tracer.leave)]
    # keyword arguments only where a handler traces its module as one operation (a global hook
    # with them needs torch >= 2.5, and its handle leaves a flag behind that torch.compile warns of)
    hooks += [m.register_forward_hook(tracer.leave_opaque, with_kwargs=True) for m in {id(m): m for _, m in named}.values()
              if getattr(handler_for(m), "trace_module", None) is not None]
    try:
        for t in input_tensors(example_inputs):
            tracer.mark_input(t)
        with torch.no_grad(), tracer:
            out = call_model(model, example_inputs)
        tracer.finish()
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor):
                tracer.trace.block(tracer.shadow(t), SkipReason(SkipKind.MODEL_OUTPUT))
    finally:
        for h in hooks:
            h.remove()
        tracer.forget_shadows()
    return tracer, out


@dataclass
class Traced:
    """One traced forward pass of a model.

    ``mapping`` maps the module ids of the traced copy to the real modules;
    ``clone`` is that copy when it lives on ``meta`` (``None`` when tracing
    needed a real copy). The copy is left as the model was: it can serve one
    trial run (:meth:`prunable.Pruner._trial`) instead of a fresh copy.
    ``real`` says why the forward pass could not run on ``meta`` (the operation
    that needs real values, see :func:`prunable.inputs.first_failing_op`); None
    when it did.
    """

    trace: Trace
    mapping: dict[int, nn.Module]
    clone: nn.Module | None = None
    real: str | None = None


def _module_map(clone: nn.Module, model: nn.Module) -> dict[int, nn.Module]:
    """``id`` of each module of ``clone`` → the module of ``model`` with the same name."""
    real = dict(model.named_modules(remove_duplicate=False))
    return {id(m): real[n] for n, m in clone.named_modules(remove_duplicate=False)}


def _to_meta(inputs: Any) -> Any:
    return inputs_to(inputs, "meta")


def trace_model(model: nn.Module, example_inputs: Any) -> Traced:
    """Trace on a meta copy; when the forward pass needs real values (data-dependent
    operations: ``nonzero``, boolean masks, non-maximum suppression, ``.item()``), on a
    real copy, and :attr:`Traced.real` says which operation forced it."""
    check_copyable(model)
    try:
        return trace_clone(meta_clone(model), model, example_inputs)
    except Exception as meta_exc:  # noqa: BLE001 - data-dependent code needs real values
        clone = copy.deepcopy(model)
        try:
            tracer, _ = run_traced(clone, example_inputs)
        except Exception as exc:
            if clone.training:  # e.g. BatchNorm1d refuses a batch of one in train mode
                try:
                    inner = trace_model(clone.eval(), example_inputs)
                except PruningValueError:
                    pass
                else:
                    names = {id(m): n for n, m in clone.named_modules(remove_duplicate=False)}
                    real = dict(model.named_modules(remove_duplicate=False))
                    mapping = {k: real[names[id(v)]] for k, v in inner.mapping.items()}
                    return Traced(inner.trace, mapping, real=inner.real)
            shapes = [tuple(t.shape) for t in input_tensors(example_inputs)]
            raise PruningValueError(
                f"example_inputs {shapes}: the model's forward failed on them: {type(exc).__name__}: {exc}"
            ) from exc
        return Traced(tracer.trace, _module_map(clone, model), real=first_failing_op(meta_exc))


def trace_clone(clone: nn.Module, model: nn.Module, example_inputs: Any) -> Traced:
    """The trace of ``model`` from ``clone``, a meta copy of it (:func:`~prunable.copies.meta_clone`,
    cut as ``model`` is now); ``model`` is not run."""
    tracer, _ = run_traced(clone, _to_meta(example_inputs))
    return Traced(tracer.trace, _module_map(clone, model), clone)


def cut_copy(model: nn.Module, cuts: list[Cut], clone: nn.Module | None = None,
             real: str | None = None) -> nn.Module:
    """A copy of ``model`` with ``cuts`` applied: ``clone`` (a copy to cut), else a meta copy,
    else (``real`` says why the forward pass needs real values) a real one."""
    if clone is None:
        clone = meta_clone(model) if real is None else copy.deepcopy(model)
    twin = dict(zip((id(m) for m in model.modules()), clone.modules()))
    apply_cuts([Cut(twin[id(c.module)], c.role, c.keep, c.param, c.axis, c.name) for c in cuts])
    return clone


def trace_cut(model: nn.Module, example_inputs: Any, cuts: list[Cut], *, real: str | None = None) -> Traced:
    """Trace ``model`` as it will be after ``cuts``, on a meta copy (a real copy when
    ``real`` says why the forward pass needs one); ``model`` is not touched.

    Raises whatever applying the cuts or the forward pass of the cut copy raises.
    The result is the trace of the model once the same cuts are applied to it.
    """
    clone = cut_copy(model, cuts, real=real)
    if real is None:
        return trace_clone(clone, model, example_inputs)
    tracer, _ = run_traced(clone, example_inputs)
    return Traced(tracer.trace, _module_map(clone, model), None, real)


class DependencyGraph:
    """Channel groups of ``model``, found by tracing one forward pass.

    Parameters
    ----------
    model
        Any ``nn.Module``; it is not modified (tracing runs on a meta copy).
    example_inputs
        A tensor, a tuple of positional inputs, a dict of keyword inputs or an
        ``(args, kwargs)`` pair (see :mod:`prunable.inputs`).
    traced
        A trace of ``model`` already made (:func:`trace_model`, :func:`trace_cut`);
        ``example_inputs`` is then not run again.

    Attributes
    ----------
    groups : list[ChannelGroup]
        Every group, prunable or not (``skip_reason``).
    """

    def __init__(self, model: nn.Module, example_inputs: Any, traced: Traced | None = None) -> None:
        self.model = model
        traced = trace_model(model, example_inputs) if traced is None else traced
        self._build(traced.trace, traced.mapping)

    def _retarget(self, t: Target, mapping: dict[int, nn.Module]) -> Target:
        module = mapping[t.uid]
        return Target(module, t.name, t.role, t.param, t.axis, id(module), t.rescale)

    def _build(self, trace: Trace, mapping: dict[int, nn.Module]) -> None:
        root = components(trace.n_slots, trace.edges)
        blocked = _Blocked(trace.n_slots)
        for labels, reason in trace.blocked:
            blocked.add(root[labels], reason)
        producers, consumers = list(trace.producers.values()), list(trace.consumers.values())
        sizes = [Target(module, name, None, attr, 0, id(module)) for module, name, attr, _ in trace.sizes]
        # the classes of every producer, consumer and size attribute in one pass (and one flat
        # tensor, which grouping the members reads again)
        flat, classes = classes_of(root, [s for _, s in producers] + [labels for _, labels in consumers]
                                 + [entry[3] for entry in trace.sizes])
        members = [Member(self._retarget(t, mapping), c, i < len(producers))
                   for i, (t, c) in enumerate(zip([t for t, _ in producers + consumers] + sizes, classes))]
        params = self._param_members(trace, root, mapping, blocked, classes[:len(producers)])
        if params:  # members in the order producers, consumers, parameters, size attributes
            at = len(producers) + len(consumers)
            cut = sum(c.numel() for c in classes[:at])
            flat = torch.cat([flat[:cut], *(m.classes.reshape(-1) for m in params), flat[cut:]])
            members[at:at] = params
        self.groups = self._group(members, flat, blocked, trace, mapping)
        self._attach_blocks(trace, root)

    def _attach_blocks(self, trace: Trace, root: torch.Tensor) -> None:
        """Record each equal-size partition (attention heads, GroupNorm groups) on its group."""
        if not trace.blocks:  # most CNNs: skip the per-channel table below
            return
        owner = torch.full((len(root),), -1, dtype=torch.long)  # class → index of its group
        for i, g in enumerate(self.groups):
            owner[g.classes] = i
        for slots, what in trace.blocks:
            classes = root[slots]
            at = int(owner[classes[0, 0]])
            if at < 0:
                continue
            group = self.groups[at]
            if bool((classes == classes[:1]).all()):  # rows coupled by position (one rotary table): equal anyway
                continue
            rows = positions(group.classes, classes)
            if bool((rows < 0).any()) or len(rows.unique()) != rows.numel():
                group.skip_reason = group.skip_reason or SkipReason(
                    SkipKind.BLOCKS, f"{what} share channels with each other")
            elif group.blocks is None:
                group.blocks, group.blocks_of = rows, what
            elif not torch.equal(group.blocks, rows):
                group.skip_reason = group.skip_reason or SkipReason(
                    SkipKind.BLOCKS, f"{group.blocks_of} and {what} split the channels differently")

    def _param_members(self, trace, root, mapping, blocked, produced_classes) -> list[Member]:
        """Bare parameters (layer scale, class token): find the axis holding channels."""
        if not trace.params:
            return []
        produced = torch.zeros(len(root), dtype=torch.bool)
        if produced_classes:
            produced[torch.cat(produced_classes)] = True
        out = []
        for t, slots in trace.params.values():
            classes = root[slots]
            if not bool(produced[classes].any()):
                continue
            axis = next((d for d in range(classes.dim()) if _only_varies_along(classes, d)), None)
            if axis is None:
                present = distinct(classes)
                blocked.add(present[produced[present]], SkipReason(SkipKind.MIXED, f"{t.label()} mixes channels over "
                                                                   "several axes"))
                continue
            line = classes.movedim(axis, 0).reshape(classes.shape[axis], -1)[:, 0]
            out.append(Member(self._retarget(Target(t.module, t.name, None, t.param, axis, t.uid), mapping), line, False))
        return out

    def _group(self, members, flat, blocked, trace, mapping) -> list[ChannelGroup]:
        """``flat``: the classes of every member, one member after the other."""
        producers = [m for m in members if m.producer]
        if not producers:
            return []
        produced = torch.cat([m.classes for m in producers])
        # torch.unique(produced, return_inverse=True) through a table over the classes: no sort
        held = torch.zeros(int(produced.max()) + 1, dtype=torch.bool)
        held[produced] = True
        values = torch.nonzero(held).flatten()
        lookup = torch.where(held, torch.cumsum(held, 0) - 1, -1)  # class → index in values, -1: none
        inverse = lookup[produced]
        comp = producer_components(inverse, torch.tensor([m.classes.numel() for m in producers]), len(values))
        by_group = self._members_by_group(members, flat, lookup, comp)
        # a group's channels: its classes in order of first appearance among the producers
        first = torch.full((len(values),), len(produced), dtype=torch.long)
        first.scatter_reduce_(0, inverse, torch.arange(len(produced)), reduce="amin")
        order = torch.argsort(comp * (len(produced) + 1) + first)
        ordered, owner = values[order], comp[order]
        sizes = torch.bincount(owner, minlength=len(values))
        start = torch.cumsum(sizes, 0) - sizes
        position = torch.full_like(lookup, -1)
        position[ordered] = torch.arange(len(ordered)) - start[owner]
        chunks = dict(zip(torch.unique_consecutive(owner).tolist(), torch.split(ordered, sizes[sizes > 0].tolist())))
        measure = {trace.producers[k][0].name: v for k, v in trace.measure.items() if k in trace.producers}
        reasons = self._first_blocked(ordered, owner, blocked)
        groups = []  # in order of their smallest class: a group's id g (comp) is its smallest class already
        for g, ms in by_group.items():
            ms.sort(key=lambda m: (not m.producer, m.target.role is not Role.IN, m.target.name))
            group = ChannelGroup(ms[0].target.name, chunks[g], ms, reasons.get(g))
            group.measure = [(*_measure_point(m, measure), position[m.classes]) for m in group.producers]
            groups.append((g, group))
        return [group for _, group in sorted(groups, key=lambda item: item[0])]

    @staticmethod
    def _members_by_group(members: list[Member], flat: torch.Tensor, lookup: torch.Tensor,
                          comp: torch.Tensor) -> dict[int, list[Member]]:
        """Group (component) → the members holding one of its classes, in member order
        (``flat``: the classes of every member, one after the other)."""
        sizes = torch.tensor([m.classes.numel() for m in members])
        # class → its group; FIXED, FREE (shifted to 0, 1) and classes no producer holds → -1
        table = torch.cat([torch.full((2,), -1, dtype=torch.long), torch.where(lookup >= 0, comp[lookup], -1),
                           torch.full((1,), -1, dtype=torch.long)])
        group = table[(flat + 2).clamp(0, len(table) - 1)]  # no boolean indexing: masks are slow
        # runs of one group within one member: their first entries are all the pairs there are
        starts = torch.cumsum(sizes, 0) - sizes
        edge = torch.ones(len(group), dtype=torch.bool)
        edge[1:] = group[1:] != group[:-1]
        edge[starts[sizes > 0]] = True
        at = torch.nonzero(edge).flatten()
        owner = torch.searchsorted(starts, at, right=True) - 1  # the member of each run
        pairs = distinct(torch.where(group[at] >= 0, owner * len(comp) + group[at], -1)).tolist()
        pairs = pairs[1:] if pairs and pairs[0] < 0 else pairs
        by_group: dict[int, list[Member]] = {}
        n = len(comp)  # a tensor's len() is a Python call: not in the loop
        for pair in pairs:
            by_group.setdefault(pair % n, []).append(members[pair // n])
        return by_group

    @staticmethod
    def _first_blocked(ordered: torch.Tensor, owner: torch.Tensor, blocked: "_Blocked") -> dict[int, SkipReason]:
        """Group → the reason of its first blocked channel, for groups with one (``owner``: the
        group of each class of ``ordered``, non-decreasing)."""
        at = blocked.at[ordered]
        hit = torch.nonzero(at >= 0).flatten()
        if not len(hit):
            return {}
        group = owner[hit]
        first = torch.ones(len(hit), dtype=torch.bool)  # the first hit of each group
        first[1:] = group[1:] != group[:-1]
        return {g: blocked.reasons[r] for g, r in zip(group[first].tolist(), at[hit][first].tolist())}

    # -- pruning -----------------------------------------------------------
    def cuts(self, removals: dict[str, Iterable[int]]) -> list[Cut]:
        """Cuts removing channel indices ``removals[group_id]`` of the named groups."""
        by_id = {g.id: g for g in self.groups}
        removed = [by_id[gid].classes[torch.as_tensor(list(idx), dtype=torch.long)] for gid, idx in removals.items()]
        gone = _mask(torch.cat(removed) if removed else torch.empty(0, dtype=torch.long))
        members: dict[tuple, Member] = {}
        for gid in removals:
            for m in by_id[gid].members:
                t = m.target  # the role by identity: an enum member's hash is a Python call
                members.setdefault((t.uid, id(t.role), t.param, t.axis), m)
        if not members:
            return []
        labels = [m.classes.reshape(-1) for m in members.values()]
        sizes = torch.tensor([x.numel() for x in labels])
        ends = torch.cumsum(sizes, 0)
        flat = torch.cat(labels)
        drop = gone[(flat + 1).clamp(0, len(gone) - 1)]
        # per member: indices dropped (a difference of running counts), and the indices kept, in order
        running = torch.cat([torch.zeros(1, dtype=torch.long), torch.cumsum(drop, 0)])
        dropped = (running[ends] - running[ends - sizes]).tolist()
        local = torch.arange(len(flat)) - torch.repeat_interleave(ends - sizes, sizes)
        keeps = torch.split(local[~drop], [n - d for n, d in zip(sizes.tolist(), dropped)])
        return [Cut(m.target.module, m.target.role, keep, m.target.param, m.target.axis, m.target.label(),
                    m.target.rescale)
                for m, n, keep in zip(members.values(), dropped, keeps) if n]


class _Blocked:
    """Class → why it cannot be pruned (the first reason given for it), as one table.

    Example
    -------
    >>> b = _Blocked(4)
    >>> b.add(torch.tensor([1, 2]), "first"); b.add(torch.tensor([2, 3]), "second")
    >>> b.at.tolist(), b.reasons
    ([-1, 0, 0, 1], ['first', 'second'])
    """

    def __init__(self, classes: int) -> None:
        self.at = torch.full((classes,), -1, dtype=torch.long)  # class → index in reasons, -1: none
        self.reasons: list[Any] = []

    def add(self, classes: torch.Tensor, reason: Any) -> None:
        """Block ``classes`` for ``reason``, but those blocked before."""
        fresh = classes[self.at[classes] < 0]
        if fresh.numel():
            self.at[fresh] = len(self.reasons)
            self.reasons.append(reason)


def _mask(classes: torch.Tensor) -> torch.Tensor:
    """Boolean lookup table: entry ``c + 1`` is True for every class ``c`` in ``classes``.

    Entry 0 stands for every label below zero and every class beyond the last
    one, so ``mask[(labels + 1).clamp(0, len(mask) - 1)]`` tests any labels.
    """
    mask = torch.zeros(int(classes.max()) + 3 if classes.numel() else 1, dtype=torch.bool)
    mask[classes[classes >= 0] + 1] = True
    return mask


def _measure_point(member: Member, measure: dict[str, tuple[str, int]]) -> tuple[str, int | None]:
    """(module name, channel dim) where a producer's activations are observed; dim is None
    for a producer with no observable output (an attention layer's inner q/k/v)."""
    name = member.target.name
    if name not in measure and isinstance(handler_for(member.target.module), AttentionHandler):
        return name, None
    return measure.get(name, (name, 1))


def _only_varies_along(classes: torch.Tensor, axis: int) -> bool:
    moved = classes.movedim(axis, 0).reshape(classes.shape[axis], -1)
    return bool((moved == moved[:, :1]).all())


def positions(classes: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Index in ``classes`` (distinct values) of each entry of ``labels``; -1 where absent."""
    if not len(classes):
        return torch.full(labels.shape, -1, dtype=torch.long)
    order = torch.argsort(classes)
    ordered = classes[order]
    at = torch.searchsorted(ordered, labels).clamp(max=len(ordered) - 1)
    return torch.where(ordered[at] == labels, order[at], -1)
