"""Attention written with operations: ``F.scaled_dot_product_attention`` and ``q @ k.transpose(-2, -1)``.

Most transformers (timm, hand-written blocks) compute attention from tensors,
not through an attention module: a Linear produces q, k and v, a reshape splits
its channels into ``(3, heads, head_dim)``, and ``scaled_dot_product_attention``
(or ``q @ k.transpose(-2, -1)``, ``softmax``, ``@ v``) mixes the tokens. The
rules here let the tracer (:mod:`prunable.trace`) follow the channels through:

- the query and key dims are contracted together: dim ``d`` of head ``h`` of q is
  the same channel as dim ``d`` of head ``h`` of k;
- the output carries the value's channels, which go on to the output projection;
- the reshape that split the channels (``(3, heads, head_dim)``) couples its outer
  parts by position, except the heads: each head keeps its own dims and every head
  loses as many (``ChannelGroup.blocks``), so ``num_heads`` is kept. The heads are
  coupled by position too when positions matter: a later reshape merges them out
  of order, a reduction crosses them, or one size attribute sizes several reshapes
  (:meth:`AttentionRules.finish`). A size attribute given to the splitting or
  merging reshape (``self.head_dim``, ``self.attn_dim``) follows its channels;
- grouped-query attention (``enable_gqa``): the q heads sharing a k/v head have its
  dims; one block per k/v head;
- ``scaled_dot_product_attention`` with its default scale ``1/sqrt(head_dim)``:
  the layer producing q is rescaled by ``sqrt(head_dim' / head_dim)`` on pruning
  (:class:`QueryScale`), so the softmax temperature of the remaining dims is kept
  and the pruned model computes what the original computes with those dims
  zeroed. A ``scale=`` argument or a multiplication by a stored number is a
  constant: nothing to rescale. Queries that are not a layer's output up to
  reshapes and constant factors, or that are also used elsewhere, are skipped
  with a reason.

Example
-------
>>> import torch, torch.nn.functional as F
>>> from torch import nn
>>> from prunable import Pruner
>>> class Block(nn.Module):
...     def __init__(self, dim=16, heads=2):
...         super().__init__()
...         self.num_heads, self.head_dim = heads, dim // heads
...         self.qkv, self.proj = nn.Linear(dim, 3 * dim), nn.Linear(dim, dim)
...     def forward(self, x):
...         B, N, _ = x.shape
...         q, k, v = self.qkv(x).reshape(B, N, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
...         return self.proj(F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(B, N, -1))
>>> model = nn.Sequential(nn.Linear(4, 16), Block(), nn.Linear(16, 3))
>>> pruner = Pruner(model, torch.randn(2, 5, 4), criterion="l1")
>>> inner = next(g for g in pruner.groups if g.id == "1.qkv")
>>> inner.channels, inner.blocks.shape               # dim d of q, k, v of each head, proj inputs
(16, torch.Size([2, 8]))
>>> pruner.prune({"1.qkv": [0, 5, 9, 10]})          # two dims of each head, not the same ones
>>> model[1].head_dim, model[1].num_heads, model[1].qkv.out_features
(6, 2, 36)
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from .meta import arg, broadcast
from .reasons import SkipKind, SkipReason
from .shadow import Target, core_of, labels_along, varying_dims
from .surgery import Role, handler_for, parametrized, resolve
from .temperature import SCALING, QueryScale, derived_scales, scalar_operand

__all__ = ["QueryScale", "AttentionRules", "OuterSplit", "HOMOGENEOUS"]  # QueryScale: from prunable.temperature

#: operations after which a layer's output, scaled by c, is still scaled by c (q's path to the attention)
HOMOGENEOUS = {"dropout", "mul", "__mul__", "__rmul__", "div", "__truediv__", "mul_", "div_", "__imul__",
               "__itruediv__", "alpha_dropout", "feature_alpha_dropout"}


#: operations whose output may merge channel dims of their input (checked against released heads)
_RESHAPES = {"view", "reshape", "unflatten", "flatten", "view_as", "reshape_as"}


@dataclass
class OuterSplit:
    """The outer dim ``dim`` of a channel dim split by a reshape (labels ``core``): its rows
    shrink together by position, unless they are the heads of an attention (``heads``: the
    rows of the attention operands, each a block that loses as many channels as the others)."""

    core: torch.Tensor
    dim: int
    heads: list[tuple[torch.Tensor, str]] = field(default_factory=list)
    _rows: tuple | None = field(default=None, repr=False)

    def rows(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The split's labels, sorted, and the row (index along :attr:`dim`) of each (see :func:`_row_ids`)."""
        if self._rows is None:
            lines = self.core.movedim(self.dim, 0).reshape(self.core.shape[self.dim], -1)
            index = torch.arange(len(lines)).unsqueeze(1).expand_as(lines)
            inside = lines >= 0
            labels, order = torch.sort(lines[inside])
            self._rows = (labels, index[inside][order])
        return self._rows

    def couple(self, trace: Any) -> None:
        trace.union(self.core, self.core.narrow(self.dim, 0, 1).expand(self.core.shape))


def _row_ids(rows: tuple[torch.Tensor, torch.Tensor], labels: torch.Tensor) -> torch.Tensor:
    """Row of each of ``labels`` in a split (:meth:`OuterSplit.rows`), -1 for labels outside it."""
    sorted_labels, row = rows
    if not len(sorted_labels):
        return torch.full(labels.shape, -1, dtype=torch.long)
    at = torch.searchsorted(sorted_labels, labels.contiguous()).clamp(max=len(sorted_labels) - 1)
    return torch.where(sorted_labels[at] == labels, row[at], -1)


def _span(core: torch.Tensor) -> tuple[int, int]:
    """Smallest and largest label of ``core`` (labels below zero ignored)."""
    labels = core[core >= 0]
    return (int(labels.min()), int(labels.max())) if labels.numel() else (0, -1)


def _lines(rows: torch.Tensor, dim: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The row ids (-1 outside dropped) of every line along ``dim``, all lines at once: the ids in
    line order, the line of each, and how many distinct ids each line holds."""
    lines = rows.movedim(dim, -1).reshape(-1, rows.shape[dim])
    line, at = torch.nonzero(lines >= 0, as_tuple=True)  # row-major: each line's ids stay in order
    ids = lines[line, at]
    width = int(ids.max()) + 1 if len(ids) else 1
    pairs = torch.unique(line * width + ids)
    return ids, line, torch.bincount(pairs // width, minlength=len(lines))


def _contiguous(rows: torch.Tensor, dim: int) -> bool:
    """Along ``dim`` of ``rows`` (row ids, -1 outside), does every row occupy one run?"""
    ids, line, distinct_ids = _lines(rows, dim)
    changes = (ids[1:] != ids[:-1]) & (line[1:] == line[:-1])  # a new run inside a line
    runs = torch.bincount(line[1:][changes], minlength=len(distinct_ids)) + (distinct_ids > 0).long()
    return bool((runs == distinct_ids).all())


def _mixes_rows(rows: torch.Tensor, dim: int) -> bool:
    """Does a line along ``dim`` hold more than one row (a reduction over it combines heads)?"""
    return bool((_lines(rows, dim)[2] > 1).any())


def _query_group(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, gqa: bool) -> int | None:
    """How many query heads share each key/value head (1 without grouped-query attention), or
    None when the shapes do not pair heads that way."""
    if q.shape[:-2] == k.shape[:-2] == v.shape[:-2]:
        return 1
    if not gqa or q.dim() < 3 or k.shape[:-2] != v.shape[:-2] or q.shape[:-3] != k.shape[:-3]:
        return None
    heads, shared = q.shape[-3], k.shape[-3]
    return heads // shared if shared and heads % shared == 0 else None


def _rows_along_out(module: nn.Module, n: int) -> bool:
    """Can :class:`QueryScale` rescale ``module``'s ``n`` output channels: plain tensors (no
    parametrization), each with ``n`` entries along the axis its handler names?"""
    handler = handler_for(module)
    if handler is None or parametrized(module, "weight"):
        return False
    for name, axis in handler.params(module, Role.OUT).items():
        owner, attr = resolve(module, name)
        t = getattr(owner, attr, None)
        if not isinstance(t, torch.Tensor) or parametrized(owner, attr) or t.shape[axis] != n:
            return False
    return True


def _attention_reason(detail: str) -> SkipReason:
    return SkipReason(SkipKind.UNSUPPORTED_OP, detail)


class AttentionRules:
    """Trace rules of :class:`prunable.trace.ChannelTracer` for attention written with operations
    (a mixin: it uses the tracer's shadows and trace)."""

    trace: Any
    _sources: dict
    _outer: list
    _escaped: list
    _split_span: tuple[int, int]
    _collapsed: list
    _reshaped: list
    _made_by: dict
    _shape_sizes: dict
    _scalars: list
    _head_dims: set
    stack: list
    names: dict
    owners: dict

    # -- the layer whose output a tensor is, through shape operations only --------------------------
    def source_of(self, t: Any) -> tuple | None:
        """``(uid, Role.OUT)`` of the layer whose output ``t`` is, up to shape operations and constant factors."""
        if not isinstance(t, torch.Tensor):
            return None
        for table in (self._sources, self._made_by):
            entry = table.get(id(t))
            if entry is not None and entry[0]() is t:
                return entry[1]
        return None

    def set_source(self, t: torch.Tensor, key: tuple) -> None:
        self._sources[id(t)] = (weakref.ref(t), key)

    def after_rule(self, name: str, rule: str, args: tuple, kwargs: dict, outs: list) -> None:
        """Bookkeeping after every traced operation: the producing layer of shape operations'
        outputs; reshapes and reductions that could merge the rows of a split (see :meth:`finish`);
        Python numbers scaling tensors (:func:`prunable.temperature.derived_scales`)."""
        if name in SCALING:
            value = scalar_operand(name, args, kwargs)
            if value is not None:
                self._scalars.append((self.stack[-1] if self.stack else None, value))
        if self._outer and rule == "reduce" and isinstance(args[0], torch.Tensor) and self.has_labels(args[0]):
            dim = arg(args, kwargs, 1, "dim")
            core = core_of(self.shadow(args[0]))
            for d in [dim] if isinstance(dim, int) else dim:
                if core.shape[d] > 1 and self._near_split(core):
                    self._collapsed.append((core, d % core.dim(), *_span(core)))
        if self._outer and name in _RESHAPES:  # labels reach a reshape only after their split
            for t in outs:
                core = core_of(self.shadow(t))
                if self.has_labels(t) and varying_dims(core) and self._near_split(core):
                    self._reshaped.append((core, *_span(core)))
        tensors = [a for a in (*args, *kwargs.values()) if isinstance(a, torch.Tensor)]
        if rule in ("index", "reshape", "identity", "split"):
            key = self.source_of(args[0]) if args else None
        elif name in HOMOGENEOUS and len(tensors) == 1:
            key = self.source_of(tensors[0])
        else:  # a layer's output used by anything else: rescaling its queries would show there
            query = arg(args, kwargs, 0, "query") if rule == "sdpa" else None
            sources, made = self._sources, self._made_by  # most operands (weights) are in neither
            self._escaped += [core_of(self.shadow(t)) for t in tensors if t is not query
                              and (id(t) in sources or id(t) in made) and self.source_of(t)]
            return
        if key is not None:
            for t in outs:
                self.set_source(t, key)

    # -- heads: outer dims of a split that become the heads of an attention ----------------------------
    def outer_split(self, s: torch.Tensor, dim: int) -> None:
        """Rows along ``dim`` of the split shadow ``s`` shrink together (decided in :meth:`finish`)."""
        split = OuterSplit(core_of(s), dim)
        self._outer.append(split)
        first, last = _span(split.core)
        self._split_span = (min(first, self._split_span[0]), max(last, self._split_span[1]))

    def _near_split(self, core: torch.Tensor) -> bool:
        """Could ``core`` hold labels of a split (its label range meets theirs)? Cheap filter."""
        first, last = _span(core)
        return first <= self._split_span[1] and last >= self._split_span[0]

    def _heads(self, core: torch.Tensor, group: int = 1) -> None:
        """``core`` (labels ``(..., heads, 1, E)``) is an attention operand: a split whose rows are
        its heads lets each head keep its own dims (equal counts). With ``group`` > 1 (grouped-query
        attention), consecutive heads share their dims: one block per ``group`` heads."""
        batch = [i for i in range(core.dim() - 2) if core.shape[i] > 1]
        if len(batch) != 1 or core.shape[-2] != 1:
            return
        rows = core.movedim(batch[0], 0).reshape(core.shape[batch[0]], -1)
        if not bool((rows >= 0).all()) or len(rows) < 2 * group:
            return
        for split in self._outer:
            ids = _row_ids(split.rows(), rows)
            if bool((ids >= 0).all()) and bool((ids == ids[:, :1]).all()) and len(ids[:, 0].unique()) == len(ids):
                split.heads.append((rows[::group], f"the {len(rows) // group} heads of {self._who()}"))

    def finish(self) -> None:
        """After the forward pass: splits whose rows are attention heads, never merged out of order
        nor reduced across, record equal-size blocks; every other split couples its rows by position."""
        self._check_query_scales()
        read = {n: labels for n, labels in self._shape_sizes.items() if n in self._head_dims}
        for labels, reason in derived_scales(self.trace.sizes, read, self._scalars):
            self.trace.block(labels, reason)
        self._scalars.clear()
        shared = self._shared_attributes()
        for split in self._outer:
            if split.heads and self._free(split, shared):
                self.trace.blocks.extend(split.heads)
            else:
                split.couple(self.trace)
        self._outer.clear()

    def _free(self, split: OuterSplit, shared: torch.Tensor) -> bool:
        rows = split.rows()
        if bool((_row_ids(rows, shared) >= 0).any()):
            return False
        lo, hi = int(rows[0][0]), int(rows[0][-1])
        for core, d, first, last in self._collapsed:
            if first <= hi and last >= lo and _mixes_rows(_row_ids(rows, core), d):
                return False
        for core, first, last in self._reshaped:
            if first > hi or last < lo:
                continue
            ids = _row_ids(rows, core)
            if bool((ids >= 0).any()) and not all(_contiguous(ids, d) for d in varying_dims(core)):
                return False
        return True

    def _check_query_scales(self) -> None:
        """Rescaled query rows must feed the attention only: any other use of them would change."""
        rescaled = [(target, slots) for target, slots in self.trace.producers.values() if target.rescale is not None]
        if not rescaled:  # no attention with the default scale: nothing to check
            return
        used = [core[core >= 0] for core in self._escaped]
        used = torch.cat(used) if used else torch.empty(0, dtype=torch.long)
        for target, slots in rescaled:
            if bool(torch.isin(slots[target.rescale.rows], used).any()):
                self.trace.block(slots, _attention_reason(
                    f"{target.name}: queries of an attention with the default scale are also read by a layer "
                    "or an operation (rescaling them to keep the softmax temperature would change it)"))

    def _shared_attributes(self) -> torch.Tensor:
        """One size attribute given to several reshapes: their channels keep equal counts (coupled
        by position); returns their labels."""
        seen: dict[tuple, torch.Tensor] = {}
        shared = [torch.empty(0, dtype=torch.long)]
        for module, name, attr, labels in self.trace.sizes:
            first = seen.setdefault((id(module), attr), labels)
            if first is labels:
                continue
            if len(first) == len(labels):
                self.trace.union(first, labels)
            else:
                self.trace.block(torch.cat([first, labels]), SkipReason(SkipKind.SIZE_ATTRIBUTE, (
                    f"{name or '<model>'}: the attribute {attr} sizes reshapes of different channel counts")))
            shared += [first, labels]
        return torch.cat(shared)

    # -- scaled_dot_product_attention ------------------------------------------------------------------
    def _sdpa(self, name: str, args: tuple, kwargs: dict, out: Any, outs: list) -> None:
        """``scaled_dot_product_attention(q, k, v, attn_mask, dropout_p, is_causal, scale, enable_gqa)``."""
        q, k, v = (arg(args, kwargs, i, n) for i, n in enumerate(("query", "key", "value")))
        mask, scale = arg(args, kwargs, 3, "attn_mask"), arg(args, kwargs, 6, "scale")
        who = self._who()
        group = _query_group(q, k, v, bool(arg(args, kwargs, 7, "enable_gqa", False)))
        if group is None:
            reason = _attention_reason(f"{who}: {name} with query, key and value heads that do not match "
                                       f"{tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}")
            return self._block(name, args, kwargs, out, outs, reason)
        if isinstance(mask, torch.Tensor) and self.has_labels(mask):
            self.trace.block(self.shadow(mask), _attention_reason(f"{who}: channels used as an attention mask"))
        cores = [core_of(self.shadow(t)) for t in (q, k, v)]
        if any(c.dim() >= 2 and c.shape[-2] > 1 for c in cores):
            reason = SkipReason(SkipKind.MIXED, f"{who}: {name} with channels mixed into the tokens")
            return self._block(name, args, kwargs, out, outs, reason)
        shared = [c.repeat_interleave(group, dim=-3) if group > 1 and c.shape[-3] > 1 else c for c in cores[1:]]
        self._contract(cores[0], shared[0].transpose(-2, -1), q.shape[:-2])
        self._heads(cores[0], group)  # grouped-query: the q heads sharing a k/v head have its dims
        for core in cores[1:]:
            self._heads(core)
        self.set_shadow(outs[0], shared[1].expand(outs[0].shape))
        if scale is None:
            self._keep_temperature(q, who, (cores[0], cores[1]))

    def _contract(self, a: torch.Tensor, b: torch.Tensor, batch: torch.Size) -> None:
        """Dim ``e`` of ``a``'s last axis and ``b``'s second last are one channel (per batch index)."""
        shape = (*batch, 1, a.shape[-1] if a.shape[-1] > 1 else b.shape[-2])
        self._head_dims.add(int(shape[-1]))  # a scale computed from this size would be a temperature
        self.trace.union(a.expand(shape), b.transpose(-2, -1).expand(shape))

    def _keep_temperature(self, q: torch.Tensor, who: str, cores: tuple) -> None:
        """The default scale ``1/sqrt(q.shape[-1])`` follows the pruning: rescale the layer producing q."""
        labels = cores[0][cores[0] >= 0]
        if labels.numel() == 0:
            return
        key = self.source_of(q)
        entry = self.trace.producers.get(key) if key is not None else None
        if entry is not None and not bool(torch.isin(labels, entry[1]).all()):
            entry = None
        if entry is not None and not _rows_along_out(entry[0].module, len(entry[1])):
            entry = None
        if entry is None:
            reason = _attention_reason(f"{who}: the queries of scaled_dot_product_attention with its default "
                                       "scale are not the output of a layer (up to reshapes): the softmax "
                                       "temperature could not be kept")
            for core in cores:
                self.trace.block(core, reason)
            return
        target, slots = entry
        rows = torch.isin(slots, labels)
        old = target.rescale.rows if target.rescale is not None else None
        if old is not None and not torch.equal(old, rows):
            reason = _attention_reason(f"{target.name}: queries of several attentions with different layouts")
            self.trace.block(slots, reason)
            return
        self.trace.producers[key] = (Target(target.module, target.name, target.role, target.param, target.axis,
                                            target.uid, QueryScale(rows)), slots)

    # -- q @ k.transpose(-2, -1), attn @ v ----------------------------------------------------------------
    def _matmul(self, name: str, args: tuple, kwargs: dict, out: Any, outs: list) -> None:
        """``a @ b`` of activations: a contraction over channels (``q @ kᵀ``: the scores hold no
        channels) or over tokens (``attn @ v``: the output carries ``v``'s channels)."""
        a, b = (args[1], args[0]) if name == "__rmatmul__" else (args[0], args[1])
        tensors = isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor)
        if (not tensors or a.dim() < 2 or b.dim() < 2 or len(outs) != 1
                or any(id(t) in self.owners or id(t) in self.trace.params for t in (a, b))):
            return self._block(name, args, kwargs, out, outs)
        ca, cb = core_of(self.shadow(a)), core_of(self.shadow(b))
        batch = broadcast([a.shape[:-2], b.shape[:-2]])
        if ca.shape[-1] > 1 or cb.shape[-2] > 1:  # the contracted dim holds channels
            if ca.shape[-2] > 1 or cb.shape[-1] > 1:
                reason = SkipReason(SkipKind.MIXED, f"{self._who()}: {name} of channels mixed with tokens")
                return self._block(name, args, kwargs, out, outs, reason)
            self._contract(ca, cb, batch)
            self._heads(ca)
            self._heads(cb.transpose(-2, -1))
            return self.mark_input(outs[0])
        rows, cols = ca.narrow(-1, 0, 1), cb.narrow(-2, 0, 1)
        if bool((rows >= 0).any()) and bool((cols >= 0).any()):
            reason = SkipReason(SkipKind.MIXED, f"{self._who()}: {name} of two operands carrying channels")
            return self._block(name, args, kwargs, out, outs, reason)
        if bool((cols >= 0).any()):
            self._heads(cols)
            return self.set_shadow(outs[0], cols.expand(outs[0].shape))
        if bool((rows >= 0).any()):
            return self.set_shadow(outs[0], rows.expand(outs[0].shape))
        self.mark_input(outs[0])

    # -- size attributes of reshapes that split or merge channel dims ----------------------------------
    def split_size_attribute(self, sizes: Any, before: torch.Tensor, after: torch.Tensor) -> None:
        """``x.reshape(B, N, 3, self.num_heads, self.head_dim)`` or ``y.reshape(B, N, self.attn_dim)``.

        The innermost channel dim after the reshape, given as a literal ``int`` equal to exactly one
        ``int`` attribute of the running module, links that attribute to the channels of one
        row (every row keeps as many, see :meth:`ChannelTracer._couple_outer`). A size also read
        through ``.shape`` of the same channels may come from there: those channels are kept.
        """
        dims, old = varying_dims(after), varying_dims(before)
        if not dims or not self.stack or len(sizes) != after.dim() or not old:
            return
        merge = len(dims) == 1 and len(old) > 1
        split = len(old) == 1 and len(dims) > 1 and dims == list(range(dims[0], dims[-1] + 1))
        d = dims[-1]
        value = sizes[d]
        if not (merge or split) or type(value) is not int or value != after.shape[d]:
            return
        row = core_of(after)
        for other in dims[:-1]:
            row = row.narrow(other, 0, 1)
        labels = labels_along(row, d)
        if labels is None or not bool((labels >= 0).all()):
            return
        module = self.stack[-1]
        attrs = [k for k, v in vars(module).items() if type(v) is int and v == value and not k.startswith("_")]
        if len(attrs) != 1:
            return
        name = self.names.get(id(module), "")
        read = [r for r in self._shape_sizes.get(value, ()) if r is None or bool(torch.isin(r, labels).any())]
        if read:
            self.trace.block(labels, SkipReason(SkipKind.SIZE_ATTRIBUTE, (
                f"{name or '<model>'}: the size {value} given to a reshape may be the attribute {attrs[0]} or a "
                "channel count read from a tensor's shape")))
        else:
            self.trace.sizes.append((module, name, attrs[0], labels))

    def _who(self) -> str:
        module = self.stack[-1] if self.stack else None
        return self.names.get(id(module), "") or "<model>"
