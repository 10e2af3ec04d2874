"""Channel labels ("shadows"), the raw record of a trace, and the components of its union edges.

A shadow is an integer tensor shaped like an activation whose entries name the
channel each element belongs to. Shadows are stored as broadcast views of the
smallest tensor holding them, so their cost follows the number of channels.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from .reasons import SkipKind, SkipReason
from .surgery import Role

__all__ = [
    "FREE", "FIXED", "Target", "Trace", "all_slots", "canonical", "classes_of", "components", "core_of", "core_view",
    "distinct", "expand_core", "expand_shadow", "has_slots", "labels_along", "lay_along", "moved",
    "producer_components", "varying_dims",
]

FREE, FIXED = -1, -2


@dataclass(frozen=True)
class Target:
    """One sliceable thing: a module side (``role``) or one parameter axis."""

    module: nn.Module = field(compare=False, hash=False)
    name: str
    role: Role | None = None
    param: str | None = None
    axis: int = 0
    uid: int = 0
    #: what else a cut of this target must do (keep a softmax temperature: :class:`prunable.sdpa.QueryScale`)
    rescale: Any = field(default=None, compare=False, hash=False)

    def label(self) -> str:
        if self.param is not None:
            return f"{self.name}.{self.param}" if self.name else self.param
        return f"{self.name or '<model>'}.{self.role.value}"


@dataclass
class Trace:
    """Raw result of tracing: slots, union edges, producers and consumers."""

    n_slots: int = 0
    #: ``(u, v)``: label vectors of one length; ``u[i]`` and ``v[i]`` are the same channel
    edges: list[tuple[torch.Tensor, torch.Tensor]] = field(default_factory=list)
    blocked: list[tuple[torch.Tensor, SkipReason]] = field(default_factory=list)
    producers: dict[tuple, tuple[Target, torch.Tensor]] = field(default_factory=dict)
    consumers: dict[tuple, tuple[Target, torch.Tensor]] = field(default_factory=dict)
    params: dict[int, tuple[Target, torch.Tensor]] = field(default_factory=dict)
    measure: dict[tuple, tuple[str, int]] = field(default_factory=dict)
    #: (slots as rows, what the rows are): every row must lose as many channels as the others
    #: (the heads of an attention layer, the groups of a GroupNorm)
    blocks: list[tuple[torch.Tensor, str]] = field(default_factory=list)
    #: (module, module name, int attribute, labels): a size attribute used as a literal shape
    sizes: list[tuple[nn.Module, str, str, torch.Tensor]] = field(default_factory=list)
    #: the first operation through which a cut could break the forward pass in a way the graph
    #: does not see (a size read, a reshape, a fixed-size operand, an operation outside
    #: :data:`~prunable.rules.SIZE_FREE`): then a trial run must try each group; None when every
    #: operation on channels is one whose effect the graph follows exactly
    fragile: str | None = None

    def mark_fragile(self, why: str) -> None:
        """Record ``why`` a trial run must try each group (the first reason is kept)."""
        if self.fragile is None:
            self.fragile = why

    def new_slots(self, n: int, shape: tuple[int, ...] | None = None) -> torch.Tensor:
        """``n`` fresh slots (shaped ``shape``, default a vector), known to :func:`all_slots`."""
        slots = torch.arange(self.n_slots, self.n_slots + n)
        if shape is not None:
            slots = slots.view(shape)
        slots.__dict__[_SLOTS] = True
        self.n_slots += n
        return slots

    def union(self, a: torch.Tensor, b: torch.Tensor,
              reason: SkipReason = SkipReason(SkipKind.FIXED_INPUT, "fixed-size operand")) -> None:
        """Record that labels ``a`` and ``b`` (same shape) are the same channel."""
        if a.dim() != 1 or a.shape != b.shape:
            a, b = _compress(a, b)
        labelled = all_slots(a) and all_slots(b) if a.numel() else False
        if labelled and sum(n > 1 for n in a.shape) <= 1:  # two label vectors paired position by position
            self.edges.append((a.reshape(-1), b.reshape(-1)))
            return
        both = None if labelled else (a >= 0) & (b >= 0)
        if labelled or both.any():
            x, y = (a.reshape(-1), b.reshape(-1)) if labelled else (a[both], b[both])
            # pairs with distinct fresh slots (a parameter's) are distinct already
            if len(x) > 64 and not (labelled and (_fresh(a) or _fresh(b))):
                # deduplicate through one 1-D key: much faster than unique(dim=0)
                base = int(y.max()) + 1
                key = distinct(x * base + y)
                x, y = key // base, key % base
            self.edges.append((x, y))
        for x, y in ((a, b), (b, a)) if not labelled else ():
            hit = (x >= 0) & (y == FIXED)
            if hit.any():
                self.block(x[hit], reason)

    def block(self, labels: torch.Tensor, reason: SkipReason | str) -> None:
        """Labels ``labels`` cannot be pruned, for ``reason`` (a text is an unsupported operation)."""
        if not isinstance(reason, SkipReason):
            reason = SkipReason(SkipKind.UNSUPPORTED_OP, str(reason))
        labels = core_of(labels) if labels.dim() else labels
        labels = labels[labels >= 0]
        if labels.numel():
            self.blocked.append((distinct(labels), reason))


def distinct(values: torch.Tensor) -> torch.Tensor:
    """``torch.unique(values)`` (sorted, flattened); a run of equal or increasing values (slots
    in creation order, labels constant along rows) skips the sort.

    Example
    -------
    >>> distinct(torch.tensor([[3, 3, 5], [5, 7, 7]])).tolist(), distinct(torch.tensor([4, 1, 4])).tolist()
    ([3, 5, 7], [1, 4])
    """
    if values.numel() < 4096:  # small: one sort is cheaper than the check
        return torch.unique(values)
    runs = torch.unique_consecutive(values.reshape(-1))
    if len(runs) < 2 or bool((runs[1:] > runs[:-1]).all()):
        return runs
    return torch.unique(runs)


#: attribute of a canonical shadow holding its core (shadows are never modified in place)
_CORE = "_prunable_core"
#: attribute of a canonical shadow holding ``(dim, labels)``: its labels vary along ``dim`` only
_ALONG = "_prunable_along"
#: attribute of a label vector made by :meth:`Trace.new_slots`: every entry is a slot (no ``FREE``, ``FIXED``)
_SLOTS = "_prunable_slots"


def all_slots(labels: torch.Tensor) -> bool:
    """True when every entry of ``labels`` is a slot (none is ``FREE`` or ``FIXED``); free for
    the vectors of :meth:`Trace.new_slots`.

    Example
    -------
    >>> all_slots(Trace().new_slots(3)), all_slots(torch.tensor([4, FREE]))
    (True, False)
    """
    return _fresh(labels) or bool((labels >= 0).all())


def has_slots(shadow: torch.Tensor) -> bool:
    """True when some label of ``shadow`` is a slot (it holds channels, not only ``FREE``/``FIXED``)."""
    core = core_of(shadow)
    return _fresh(core) or bool((core >= 0).any())


def lay_along(labels: torch.Tensor, dim: int, shape: torch.Size) -> torch.Tensor:
    """A canonical shadow of ``shape`` holding the distinct ``labels`` along ``dim`` (a layer's
    fresh output slots): its core is known, and :func:`labels_along` answers without a copy.

    Example
    -------
    >>> s = lay_along(torch.arange(3), 1, torch.Size([2, 3, 4]))
    >>> core_of(s).shape == (1, 3, 1), labels_along(s, 1).tolist()
    (True, [0, 1, 2])
    """
    dim %= len(shape)
    size = [1] * len(shape)
    size[dim] = -1
    core = labels.view(size)
    if _fresh(labels):
        core.__dict__[_SLOTS] = True
    return expand_core(core, shape, (dim, labels))


def moved(shadow: torch.Tensor, move: Any, shape: torch.Size) -> torch.Tensor:
    """``move(shadow)`` (of size ``shape``) for a ``move`` that only reorders dims (permute,
    transpose …), computed on the core of ``shadow``: canonical, with no copy or check.

    Example
    -------
    >>> s = lay_along(torch.arange(3), 1, torch.Size([2, 3, 4]))
    >>> s = moved(s, lambda t: t.transpose(1, 2), torch.Size([2, 4, 3]))
    >>> core_of(s).shape == (1, 1, 3), labels_along(s, 2).tolist()
    (True, [0, 1, 2])
    """
    core = move(core_of(shadow))
    along = shadow.__dict__.get(_ALONG)
    if along is not None:  # the one dim along which the labels vary, moved
        dims = [d for d, n in enumerate(core.shape) if n > 1]
        along = (dims[0], along[1]) if len(dims) == 1 else None
    return expand_core(core, shape, along)


def _fresh(labels: torch.Tensor) -> bool:
    """``labels`` is a tensor of :meth:`Trace.new_slots`: distinct slots."""
    return bool(labels.__dict__.get(_SLOTS))


def core_view(shadow: torch.Tensor) -> torch.Tensor:
    """``shadow`` with every broadcast (stride-0) dim narrowed to size one: a cheap view."""
    stride, shape = shadow.stride(), shadow.shape
    # an empty broadcast dim (no detection kept) still has its labels in the storage
    empty = shadow.untyped_storage().nbytes() == 0
    if all(st or n == 1 or (n == 0 and empty) for st, n in zip(stride, shape)):
        return shadow
    size = [1 if st == 0 and n != 1 and not (n == 0 and empty) else n for st, n in zip(stride, shape)]
    return shadow.as_strided(size, stride, shadow.storage_offset())


def canonical(shadow: torch.Tensor) -> torch.Tensor:
    """The same labels as a broadcast view of the smallest tensor holding them.

    Shadows are mostly constant along batch and spatial dims; storing them as
    ``expand``-ed views keeps every later check proportional to the number of
    channels, not to the activation size. The result remembers its core, so
    canonicalising it again is free.
    """
    if _CORE in shadow.__dict__:
        return shadow
    core = core_view(shadow)
    for d in sorted(range(core.dim()), key=lambda i: -core.shape[i]):
        if core.shape[d] > 1 and torch.equal(core, core.narrow(d, 0, 1).expand(core.shape)):
            core = core.narrow(d, 0, 1)
    out = core.expand(shadow.shape)
    out.__dict__[_CORE] = core
    return out


def expand_core(core: torch.Tensor, shape: torch.Size, along: tuple[int, torch.Tensor] | None = None) -> torch.Tensor:
    """``core.expand(shape)`` as a canonical shadow, for a ``core`` known to be the smallest
    (labels that differ along each of its dims longer than one: a layer's fresh slots).
    ``along`` = ``(dim, labels)`` when ``core`` is the vector ``labels`` laid along ``dim``
    (:func:`labels_along` then answers without a copy).

    Example
    -------
    >>> s = expand_core(torch.arange(3).view(1, 3, 1), torch.Size([2, 3, 4]))
    >>> tuple(s.shape), core_of(s).shape == (1, 3, 1)
    ((2, 3, 4), True)
    """
    out = core.expand(shape)
    out.__dict__[_CORE] = core
    if along is not None:
        out.__dict__[_ALONG] = along
    return out


def core_of(shadow: torch.Tensor) -> torch.Tensor:
    """``core_view(canonical(shadow))``: the smallest tensor holding the labels, broadcastable to them."""
    core = shadow.__dict__.get(_CORE)
    return core if core is not None else canonical(shadow).__dict__[_CORE]


def expand_shadow(shadow: torch.Tensor, shape: torch.Size) -> torch.Tensor:
    """``shadow.expand(shape)``, canonical (and known to be) when ``shadow`` is."""
    if shadow.shape == shape:
        return shadow
    out = shadow.expand(shape)
    core = shadow.__dict__.get(_CORE)
    if core is not None:
        extra = len(shape) - core.dim()
        out.__dict__[_CORE] = core.reshape((1,) * extra + tuple(core.shape)) if extra else core
        along = shadow.__dict__.get(_ALONG)
        if along is not None:
            out.__dict__[_ALONG] = (along[0] + extra, along[1])
    return out


def _compress(*shadows: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """Narrow dims along which every shadow is constant to size one."""
    cores = [core_of(s) for s in shadows]
    if all(c.shape == cores[0].shape for c in cores[1:]):  # the usual case: nothing to expand
        return tuple(cores)
    # an empty dim (no detections left) stays empty: there is nothing to relate along it
    shape = [min(sizes) if 0 in sizes else max(sizes) for sizes in zip(*(c.shape for c in cores))]
    return tuple(c if list(c.shape) == shape else c.expand(shape) for c in cores)


def varying_dims(shadow: torch.Tensor) -> list[int]:
    """Dims along which the labels of ``shadow`` change."""
    core = core_of(shadow)
    return [d for d in range(core.dim()) if core.shape[d] > 1]


def labels_along(shadow: torch.Tensor, dim: int) -> torch.Tensor | None:
    """Label of each index of ``dim`` if labels are constant along other dims, else None
    (not a copy: shadows and label vectors are never modified in place)."""
    along = shadow.__dict__.get(_ALONG)
    if along is not None and along[0] == dim % shadow.dim():
        return along[1]
    core = core_of(shadow)
    if any(core.shape[d] > 1 for d in range(core.dim()) if d != dim % core.dim()) or not core.numel():
        return None  # mixed, or an empty tensor whose labels were not kept
    return core.reshape(-1).expand(shadow.shape[dim]).clone()


def components(n: int, edges: list[tuple[torch.Tensor, torch.Tensor]]) -> torch.Tensor:
    """Connected-component representative (smallest id) of each of ``n`` nodes.

    A node on one edge only (a slot of a parameter such as a position embedding, tied
    to one channel) is left out of the propagation and joins its neighbour's component
    at the end: most of a transformer's edges are such leaves.

    Example
    -------
    >>> components(6, [(torch.tensor([4, 1]), torch.tensor([1, 5])), (torch.tensor([3]), torch.tensor([2]))]).tolist()
    [0, 1, 2, 2, 1, 1]
    """
    label = torch.arange(n)
    if not edges or n == 0:
        return label
    u, v = torch.cat([x for x, _ in edges]), torch.cat([y for _, y in edges])
    degree = torch.bincount(u, minlength=n) + torch.bincount(v, minlength=n)
    leaf_u, leaf_v = degree[u] == 1, degree[v] == 1
    attached = leaf_u | leaf_v
    if not bool(attached.any()):
        return _propagate(label, u, v)
    core = ~attached
    label = _propagate(label, u[core], v[core])
    leaf, other = torch.where(leaf_u, u, v)[attached], torch.where(leaf_u, v, u)[attached]
    low = label.clone()  # component root → smallest id among it and its leaves
    low.scatter_reduce_(0, label[other], leaf, reduce="amin")
    out = low[label]
    out[leaf] = low[label[other]]
    return out


def _propagate(label: torch.Tensor, u: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Smallest id reachable over edges ``u[i]``–``v[i]``, from the initial ``label`` (``arange``).
    Runs over the nodes on an edge only, renumbered in order (so the smallest stays the smallest)."""
    if not len(u):
        return label
    on = torch.zeros(len(label), dtype=torch.bool)
    on[u] = True
    on[v] = True
    nodes = torch.nonzero(on).flatten()
    if len(nodes) < len(label):
        local = torch.cumsum(on, 0) - 1
        label = label.clone()
        label[nodes] = nodes[_propagate(torch.arange(len(nodes)), local[u], local[v])]
        return label
    while True:
        m = torch.minimum(label[u], label[v])
        new = label.clone()
        new.scatter_reduce_(0, u, m, reduce="amin")
        new.scatter_reduce_(0, v, m, reduce="amin")
        new = new[new]
        while True:
            jumped = new[new]
            if torch.equal(jumped, new):
                break
            new = jumped
        if torch.equal(new, label):
            return label
        label = new


def producer_components(inverse: torch.Tensor, counts: torch.Tensor, n: int) -> torch.Tensor:
    """:func:`components` of ``n`` classes where each producer's classes (``counts[p]`` entries of
    ``inverse`` each, in order) are one set: the sets are merged over the producers (a few dozen)
    instead of over every class."""
    p = len(counts)
    owner = torch.repeat_interleave(torch.arange(p), counts)
    low = torch.full((n,), p, dtype=torch.long).scatter_reduce_(0, inverse, owner, reduce="amin")  # first holder
    parent = list(range(p))

    def find(a: int) -> int:
        while parent[a] != a:
            parent[a] = parent[parent[a]]
            a = parent[a]
        return a

    for link in distinct(owner * p + low[inverse]).tolist():  # producer, first producer of one of its classes
        a, b = find(link // p), find(link % p)
        parent[max(a, b)] = min(a, b)
    group = torch.tensor([find(a) for a in range(p)], dtype=torch.long)[low]  # of each class
    smallest = torch.full((p,), n, dtype=torch.long).scatter_reduce_(0, group, torch.arange(n), reduce="amin")
    return smallest[group]  # the smallest class of its component, as components() labels it


def classes_of(root: torch.Tensor, labels: list[torch.Tensor]) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """The class (component root) of every label of each of ``labels``, flattened one after the
    other and as one tensor per entry of ``labels``; labels below zero (``FREE``, ``FIXED``) are
    kept. One pass over all of them instead of one per member."""
    if not labels:
        return torch.empty(0, dtype=torch.long), []
    flat = torch.cat([x.reshape(-1) for x in labels])
    classes = torch.where(flat >= 0, root[flat.clamp(min=0)], flat)
    parts = torch.split(classes, [x.numel() for x in labels])
    return classes, [c if x.dim() == 1 else c.view(x.shape) for c, x in zip(parts, labels)]
