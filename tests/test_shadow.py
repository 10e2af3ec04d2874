"""Shadows and the trace's shortcuts: each shortcut must give what the plain computation gives.

The tracer keeps channel labels as broadcast views of their smallest core and takes shortcuts
where the core is known (a layer's fresh slots, a permutation, a concatenation): the cores they
produce are compared with :func:`canonical` of the materialised labels, and union edges with a
plain union-find over every labelled pair.
"""

import pytest
import torch
from hypothesis import given, settings, strategies as st
from torch import nn

from prunable import DependencyGraph
from helpers import smallest_per_component
from prunable.rules import cat_cores
from prunable.shadow import (
    FIXED, Trace, canonical, components, core_of, expand_shadow, labels_along, lay_along, moved,
)


def _materialised(shadow):
    """The same labels as a plain tensor, with nothing remembered about them."""
    return shadow.contiguous().clone()


def _assert_same_shadow(fast, shape):
    assert tuple(fast.shape) == tuple(shape)
    plain = canonical(_materialised(fast))
    assert torch.equal(fast, plain.expand(shape))
    assert core_of(fast).shape == core_of(plain).shape  # the smallest core, as canonical finds it
    assert torch.equal(core_of(fast), core_of(plain))
    for d in range(len(shape)):  # and the label vector it may remember
        along, expected = labels_along(fast, d), labels_along(plain, d)
        assert (along is None) == (expected is None) and (along is None or torch.equal(along, expected))


@st.composite
def shadows(draw, rank=None, low=-2, high=6):
    """A canonical shadow: labels drawn on a random core, broadcast to a random shape."""
    rank = draw(st.integers(1, 4)) if rank is None else rank
    shape = draw(st.lists(st.integers(1, 4), min_size=rank, max_size=rank))
    core_shape = [n if draw(st.booleans()) else 1 for n in shape]
    values = draw(st.lists(st.integers(low, high), min_size=1, max_size=1))[0]
    g = torch.Generator().manual_seed(draw(st.integers(0, 10_000)))
    core = torch.randint(low, high + 1, core_shape, generator=g) if draw(st.booleans()) else \
        torch.full(core_shape, values, dtype=torch.long)
    return canonical(core.expand(shape))


@settings(max_examples=200, deadline=None)
@given(st.integers(1, 4).flatmap(lambda r: st.tuples(st.lists(shadows(rank=r), min_size=1, max_size=4),
                                                     st.integers(0, r - 1), st.integers(0, 99))))
def test_concatenated_cores_equal_the_canonical_core(case):
    """The concatenation's core is the smallest one (fails when every part counts as varying)."""
    parts, dim, seed = case
    shape = list(parts[0].shape)
    g = torch.Generator().manual_seed(seed)
    parts = [expand_shadow(p, torch.Size(shape[:dim] + [p.shape[dim]] + shape[dim + 1:]))
             if all(p.shape[d] in (1, shape[d]) for d in range(len(shape)) if d != dim) else None
             for p in parts]
    parts = [p for p in parts if p is not None] or [canonical(torch.randint(0, 5, shape, generator=g))]
    fast = cat_cores(parts, dim)
    _assert_same_shadow(fast, torch.cat([_materialised(p) for p in parts], dim).shape)


@settings(max_examples=200, deadline=None)
@given(shadows(), st.randoms(use_true_random=False))
def test_moved_core_equals_the_canonical_core(shadow, rnd):
    """A permutation applied to the core gives the permuted labels' smallest core."""
    order = list(range(shadow.dim()))
    rnd.shuffle(order)
    varying = [d for d, n in enumerate(core_of(shadow).shape) if n > 1]
    if len(varying) == 1:  # as a layer's output: its label vector remembered
        shadow = lay_along(core_of(shadow).reshape(-1).clone(), varying[0], shadow.shape)
    fast = moved(shadow, lambda t: t.permute(order), shadow.permute(order).shape)
    _assert_same_shadow(fast, shadow.permute(order).shape)


def test_a_layer_output_keeps_its_label_vector_through_moves_and_broadcasts():
    """The remembered label vector follows its dim (fails if a move or broadcast kept the old dim)."""
    slots = Trace().new_slots(5)
    s = lay_along(slots, 1, torch.Size([2, 5, 3, 3]))
    assert labels_along(s, 1) is slots  # no copy
    assert labels_along(s, 2) is None
    t = moved(s, lambda c: c.permute(0, 2, 3, 1), torch.Size([2, 3, 3, 5]))
    assert labels_along(t, 3).tolist() == slots.tolist() and labels_along(t, 1) is None
    wide = expand_shadow(t, torch.Size([4, 2, 3, 3, 5]))
    assert labels_along(wide, 4).tolist() == slots.tolist() and labels_along(wide, 3) is None
    _assert_same_shadow(wide, wide.shape)


@settings(max_examples=300, deadline=None)
@given(st.integers(1, 4).flatmap(lambda r: st.tuples(shadows(rank=r), shadows(rank=r))), st.booleans())
def test_union_relates_exactly_the_labelled_pairs(case, fresh):
    """Union edges and blocked labels equal those of every element pair (fails if pairs are
    formed after the two sides were narrowed differently, or if a dedup drops a pair)."""
    a, b = case
    try:
        shape = torch.Size(torch.broadcast_shapes(a.shape, b.shape))
        a, b = expand_shadow(a, shape), expand_shadow(b, shape)
    except RuntimeError:
        return
    trace = Trace()
    trace.n_slots = 7  # the drawn labels are below 7
    if fresh:  # one side a parameter's distinct fresh slots
        a = trace.new_slots(a.numel(), tuple(a.shape))
    trace.union(a, b)
    pa, pb = _materialised(a).reshape(-1).tolist(), _materialised(b).reshape(-1).tolist()
    pairs = [(x, y) for x, y in zip(pa, pb) if x >= 0 and y >= 0]
    assert components(trace.n_slots, trace.edges).tolist() == smallest_per_component(trace.n_slots, pairs)
    blocked = {x for x, y in zip(pa, pb) if x >= 0 and y == FIXED}
    blocked |= {y for x, y in zip(pa, pb) if y >= 0 and x == FIXED}
    assert sorted({v for labels, _ in trace.blocked for v in labels.tolist()}) == sorted(blocked)


def test_fresh_parameter_slots_pair_without_a_dedup_sort(monkeypatch):
    """A parameter's slots are distinct: its pairs with a layer's channels (a position
    embedding's) are kept as they are, one per element, with no sort to deduplicate them."""
    import prunable.shadow as shadow

    trace = Trace()
    x = lay_along(trace.new_slots(8), 2, torch.Size([1, 10, 8]))
    pos = expand_shadow(trace.new_slots(80, (1, 10, 8)), torch.Size([1, 10, 8]))
    monkeypatch.setattr(shadow, "distinct", lambda values: pytest.fail("deduplicated distinct pairs"))
    trace.union(pos, x)
    (u, v), = trace.edges
    assert u.tolist() == list(range(8, 88)) and v.tolist() == [i % 8 for i in range(80)]
    assert components(trace.n_slots, trace.edges)[8:].tolist() == [i % 8 for i in range(80)]


class _Reshaper(nn.Module):
    """A module with an ``int`` attribute equal to the channel count, reshaping with it."""

    def __init__(self, width):
        super().__init__()
        self.width = width

    def forward(self, x):
        return x.reshape(1, self.width, -1).view_as(x)


class _CallsAnOutsider(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 6, 3)
        self.head = nn.Conv2d(6, 4, 1)
        self.outsiders = [_Reshaper(6)]  # a module the model calls but does not register

    def forward(self, x):
        return self.head(self.outsiders[0](self.conv(x)))


def test_modules_outside_the_model_are_not_on_the_module_stack():
    """The tracer's hooks fire for every module; one that is not the model's is passed over
    (else its size attribute would be recorded for a module the graph cannot name)."""
    before = (len(nn.modules.module._global_forward_pre_hooks), len(nn.modules.module._global_forward_hooks))
    graph = DependencyGraph(_CallsAnOutsider(), torch.randn(1, 3, 8, 8))
    group = next(g for g in graph.groups if g.id == "conv")
    assert group.skip_reason is None and "head.in" in {m.target.label() for m in group.members}
    assert not any("width" in m.target.label() for g in graph.groups for m in g.members)
    assert (len(nn.modules.module._global_forward_pre_hooks), len(nn.modules.module._global_forward_hooks)) == before


class _Fails(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)

    def forward(self, x):
        raise ValueError("broken forward")


def test_the_tracer_hooks_are_removed_when_the_forward_fails():
    before = (len(nn.modules.module._global_forward_pre_hooks), len(nn.modules.module._global_forward_hooks))
    with pytest.raises(Exception):
        DependencyGraph(_Fails(), torch.randn(1, 3, 8, 8))
    assert (len(nn.modules.module._global_forward_pre_hooks), len(nn.modules.module._global_forward_hooks)) == before
