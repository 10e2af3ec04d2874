"""Selection: importance scores and constraints → a :class:`~prunable.plan.Plan`.

Pure: a :class:`Selector` sees groups only as :class:`GroupLayout` records (how
many indices of each member every channel of a group holds, and the equal-size
blocks a group must lose channels from evenly) plus one score per channel, so it
is tested without a model. It keeps every member (a layer side or a parameter
axis, possibly shared by several groups) at one index at least, every group
within its cap (``min_channels``, ``round_to``, ``max_ratio``) and every block of
a group losing the same number of channels.

Example
-------
>>> import torch
>>> a = GroupLayout("a", members=(0,), counts=torch.ones(1, 4, dtype=torch.long))
>>> b = GroupLayout("b", members=(1,), counts=torch.ones(1, 3, dtype=torch.long))
>>> selector = Selector([a, b], sizes=[4, 3], caps={"a": 3, "b": 1})
>>> scores = {"a": torch.tensor([4.0, 1.0, 3.0, 2.0]), "b": torch.tensor([0.0, 0.5, 9.0])}
>>> print(selector.plan(scores, 3))
Plan: 3 channels from 2 groups
  b: remove 0
  a: remove 1, 3
"""

from __future__ import annotations

import enum
import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from .constraints import Constraints, capacity, resolve_max_ratio
from .errors import PruningValueError
from .plan import Plan

__all__ = [
    "Constraints", "GroupLayout", "Scope", "Selector", "capacity", "count_tables", "layouts_of", "parse_scope",
    "removal_count", "resolve_max_ratio",
]


class Scope(enum.Enum):
    """How ``Pruner.step(n)`` spends ``n``."""

    GLOBAL = "global"  #: the n least important channels over all groups
    LAYER = "layer"  #: the n least important channels of every group


def parse_scope(scope: Any) -> Scope:
    """``scope`` as a :class:`Scope`; a :class:`PruningValueError` listing the choices otherwise.

    Example
    -------
    >>> parse_scope("layer")
    <Scope.LAYER: 'layer'>
    """
    try:
        return Scope(scope)
    except ValueError:
        choices = ", ".join(repr(s.value) for s in Scope)
        raise PruningValueError(f"scope={scope!r} is not a scope; choose one of {choices}") from None


@dataclass(frozen=True, eq=False)
class GroupLayout:
    """What selection needs to know of one channel group.

    ``counts[r, k]`` is how many indices of member ``members[r]`` (a slot of the
    selector's member table) channel ``k`` of the group holds; a callable is
    evaluated the first time the group is asked about. ``blocks``: ``(rows, k)``
    channel indices; every row must lose as many channels as every other row.
    """

    id: str
    members: tuple[int, ...]
    counts: torch.Tensor | Callable[[], torch.Tensor]
    channels: int | None = None
    blocks: torch.Tensor | None = None
    blocks_of: str = ""

    @property
    def size(self) -> int:
        """Number of channels of the group."""
        if self.channels is not None:
            return self.channels
        return int(self.counts.shape[1]) if isinstance(self.counts, torch.Tensor) else 0


def _counts_of(groups: Sequence[Any]) -> Callable[[int], Callable[[], torch.Tensor]]:
    """``i → counts of groups[i]`` as a callable: the tables of every group are counted
    together, once, the first time one is asked for (see :func:`count_tables`)."""
    done: list[list[torch.Tensor]] = []

    def of(i: int) -> Callable[[], torch.Tensor]:
        def count() -> torch.Tensor:
            if not done:
                done.append(count_tables(groups))
            return done[0][i]
        return count

    return of


def count_tables(groups: Sequence[Any]) -> list[torch.Tensor]:
    """``(members, channels)`` table of every group: how many indices of each member of a
    :class:`~prunable.graph.ChannelGroup` hold each of its channels (labels of other groups,
    and negative ones, count for none), all groups in one pass.

    Example
    -------
    >>> from types import SimpleNamespace as NS
    >>> g = NS(classes=torch.tensor([5, 7]), channels=2,
    ...        members=[NS(classes=torch.tensor([5, 7])), NS(classes=torch.tensor([7, 7, 9, -1]))])
    >>> count_tables([g])[0].tolist()
    [[1, 1], [0, 2]]
    """
    if not groups:
        return []
    sizes = torch.tensor([g.channels for g in groups])
    rows = torch.tensor([len(g.members) for g in groups])
    classes = torch.cat([g.classes for g in groups])
    channel = torch.full((int(classes.max()) + 1,), -1, dtype=torch.long)  # label → channel of all groups
    channel[classes] = torch.arange(len(classes))
    group_of = torch.repeat_interleave(torch.arange(len(groups)), sizes)  # channel → its group
    labels = [m.classes.reshape(-1) for g in groups for m in g.members]
    lengths = torch.tensor([len(x) for x in labels])
    group_of_row = torch.repeat_interleave(torch.arange(len(groups)), rows)
    tables = rows * sizes
    # where row r's table starts in the flat counts, less its group's first channel (per row, then per label)
    offset = ((torch.cumsum(tables, 0) - tables - torch.cumsum(sizes, 0) + sizes)[group_of_row]
              + (torch.arange(len(labels)) - (torch.cumsum(rows, 0) - rows)[group_of_row]) * sizes[group_of_row])
    flat = torch.cat(labels)
    # no boolean-mask indexing (each costs a nonzero and a gather): a label that counts for none
    # (negative, of no group, of another group) is sent to one spare slot past the tables
    at = torch.where((flat >= 0) & (flat < len(channel)), channel[flat.clamp(0, len(channel) - 1)], -1)
    ok = (at >= 0) & (group_of[at.clamp(min=0)] == torch.repeat_interleave(group_of_row, lengths))
    total = int(tables.sum())
    index = torch.where(ok, torch.repeat_interleave(offset, lengths) + at, total)
    counts = torch.bincount(index, minlength=total + 1)[:total]
    return [t.view(r, n) for t, r, n in zip(counts.split(tables.tolist()), rows.tolist(), sizes.tolist())]


def layouts_of(groups: Iterable[Any]) -> tuple[list[GroupLayout], list[float], list[str]]:
    """Layouts of :class:`~prunable.graph.ChannelGroup` s, with the member table:
    the number of indices of every member (``inf`` when some are not channels) and its label."""
    sizes: list[float] = []
    labels: list[str] = []
    index: dict[tuple, int] = {}
    layouts = []
    groups = list(groups)
    counts = _counts_of(groups)
    for i, g in enumerate(groups):
        slots = []
        for m in g.members:
            key = (m.target.uid, m.target.role, m.target.param, m.target.axis)
            if key not in index:
                index[key] = len(sizes)
                sizes.append(math.inf if bool((m.classes < 0).any()) else len(m.classes))
                labels.append("")
            labels[index[key]] = m.target.label()
            slots.append(index[key])
        layouts.append(GroupLayout(g.id, tuple(slots), counts(i), g.channels, g.blocks, g.blocks_of))
    return layouts, sizes, labels


def removal_count(n: Any, scope: Scope, sizes: Sequence[int], available: int) -> Callable[[int], int]:
    """Validate ``n`` (a count, or a fraction in (0, 1)); channels to remove as a function
    of a group's size (with the global scope, the total whatever the size).

    Example
    -------
    >>> removal_count(0.25, Scope.LAYER, [8, 4], 10)(8)
    2
    """
    if isinstance(n, float):
        if not 0 < n < 1:
            raise PruningValueError(f"n={n!r}: a pruning ratio must be in (0, 1) (or give a count >= 1)")
        if scope is Scope.LAYER:
            return lambda channels: int(round(n * channels))
        total = max(1, int(round(n * sum(sizes))))
        return lambda channels: min(total, available)
    if not isinstance(n, int) or isinstance(n, bool) or n < 1:
        raise PruningValueError(f"n={n!r}: give a positive int (a channel count) or a ratio in (0, 1)")
    if scope is Scope.GLOBAL and n > available:
        raise PruningValueError(f"n={n} exceeds the {available} channels that can still be pruned")
    return lambda channels: n


class Selector:
    """Chooses channels to remove, keeping every member of every group non-empty.

    Parameters
    ----------
    layouts
        The groups that may lose channels.
    sizes
        Indices of every member (slot of :attr:`GroupLayout.members`); ``inf`` for none to guard.
    caps
        Group id → channels the group may still lose (see :func:`capacity`); all by default.
    labels
        Member labels, for error messages.
    """

    def __init__(self, layouts: Iterable[GroupLayout], sizes: Sequence[float],
                 caps: Mapping[str, int] | None = None, labels: Sequence[str] | None = None) -> None:
        self.layouts = {g.id: g for g in layouts}
        self.sizes = list(sizes)
        self.labels = list(labels) if labels is not None else [f"member {i}" for i in range(len(self.sizes))]
        self.caps = {gid: g.size if caps is None else caps.get(gid, 0) for gid, g in self.layouts.items()}
        self._counts: dict[str, torch.Tensor] = {}

    def counts(self, gid: str) -> torch.Tensor:
        """``(members, channels)`` index counts of group ``gid`` (evaluated once)."""
        if gid not in self._counts:
            c = self.layouts[gid].counts
            self._counts[gid] = c if isinstance(c, torch.Tensor) else c()
        return self._counts[gid]

    def guard(self) -> "MemberGuard":
        """A fresh :class:`MemberGuard` with every member full."""
        return MemberGuard(self)

    def available(self) -> int:
        """Channels that may still leave, over all groups."""
        return sum(self.caps.values())

    def without(self, skipped: Iterable[str]) -> "Selector":
        """This selector without the groups ``skipped`` (what was counted is shared)."""
        skipped = set(skipped)
        out = Selector([g for gid, g in self.layouts.items() if gid not in skipped], self.sizes, self.caps,
                       self.labels)
        out._counts = self._counts
        return out

    def only(self, wanted: Iterable[str] | str, known: Iterable[str]) -> "Selector":
        """This selector restricted to the groups ``wanted``; a :class:`PruningValueError` for an id
        not in ``known`` (every group of the model, skipped ones included, which are left out)."""
        wanted = {wanted} if isinstance(wanted, str) else set(wanted)
        unknown = sorted(wanted - set(known))
        if unknown:
            raise PruningValueError(f"groups={unknown}: no such group; groups are {list(self.layouts)[:8]}")
        return self.without(set(self.layouts) - wanted)

    def plan(self, scores: Mapping[str, torch.Tensor], n: int | float = 1, scope: Scope = Scope.GLOBAL,
             round_to: int | None = None) -> Plan:
        """The ``n`` lowest-scoring channels (see :func:`removal_count`) that may go."""
        scope = parse_scope(scope)
        per_group = removal_count(n, scope, [g.size for g in self.layouts.values()], self.available())
        guard = self.guard()
        order = {gid: s.argsort().tolist() for gid, s in scores.items() if gid in self.layouts}
        if scope is Scope.LAYER:
            chosen = {gid: guard.take(gid, order[gid], min(per_group(self.layouts[gid].size), self.caps[gid]))
                      for gid in order}
        else:
            chosen = guard.take_ranked({gid: scores[gid] for gid in order}, self.caps, per_group(0))
        if round_to:
            for gid, idx in list(chosen.items()):
                target = self._rounded(gid, len(idx), round_to) if idx else 0
                if target != len(idx):
                    guard.release(gid, idx)
                    chosen[gid] = guard.take(gid, order[gid], target)
        for gid, idx in list(chosen.items()):  # attention heads, GroupNorm groups: the same number from each
            blocks = self.layouts[gid].blocks
            if blocks is not None and idx:
                guard.release(gid, idx)
                per_block = min(int(round(len(idx) / len(blocks))), self.caps[gid] // len(blocks))
                chosen[gid] = guard.take_per_block(gid, blocks, order[gid], per_block)
        return Plan({gid: tuple(idx) for gid, idx in chosen.items() if idx})

    def _rounded(self, gid: str, k: int, round_to: int) -> int:
        """Channels to remove instead of ``k`` so that a multiple of ``round_to`` is kept."""
        channels, cap = self.layouts[gid].size, self.caps[gid]
        remove = channels - max(round_to, ((channels - k) // round_to) * round_to)
        if remove > cap:
            remove -= math.ceil((remove - cap) / round_to) * round_to
        return max(remove, 0)

    def probe(self) -> tuple[dict[str, list[int]], list[str]]:
        """One channel of every group (one per block for blocked groups), the last that can
        go, to try removing; and the groups where every channel is the last of some member."""
        guard, probe, stuck = self.guard(), {}, []
        for gid, g in self.layouts.items():
            backwards = list(reversed(range(g.size)))
            if g.blocks is not None:
                idx = guard.take_per_block(gid, g.blocks, backwards, 1)
            else:
                idx = guard.take(gid, backwards, 1)
            if idx:
                probe[gid] = idx
            else:
                stuck.append(gid)
        return probe, stuck

    def check(self, removals: Mapping[str, Sequence[int]], skipped: Mapping[str, str] | None = None,
              min_channels: int = 1) -> None:
        """Raise :class:`PruningValueError` naming the group if ``removals`` names an unknown or
        ``skipped`` group, an index out of range, blocks losing unequal numbers, leaves fewer
        than ``min_channels``, exceeds a cap or empties a member."""
        for gid, idx in removals.items():
            _check_group(self.layouts.get(gid), gid, idx, skipped or {}, min_channels, list(self.layouts))
            if len(idx) > self.caps.get(gid, 0):
                raise PruningValueError(
                    f"group {gid}: removing {len(idx)} channels exceeds the {self.caps.get(gid, 0)} it may "
                    "still lose (min_channels, round_to, max_ratio)")
        guard = self.guard()
        if guard.fits(removals):
            return
        for gid, idx in removals.items():
            for i in idx:
                emptied = guard.emptied_by(gid, i)
                if emptied:
                    raise PruningValueError(f"group {gid}: removing channel {i} leaves {emptied} with no channels")
                guard.remove(gid, i)


class MemberGuard:
    """Channels left in every member while a plan is chosen, so no layer inside a group
    (one branch of a concat tied to others) is emptied."""

    def __init__(self, selector: Selector) -> None:
        self.selector = selector
        self.left = list(selector.sizes)
        self._hits: dict[str, list[tuple[int, list[int]]]] = {}

    def hits(self, gid: str) -> list[tuple[int, list[int]]]:
        """(member slot, indices of the member held by each channel of ``gid``) per member."""
        if gid not in self._hits:
            counts = self.selector.counts(gid).tolist()
            self._hits[gid] = list(zip(self.selector.layouts[gid].members, counts))
        return self._hits[gid]

    def emptied_by(self, gid: str, i: int) -> str | None:
        """Label of a member that removing channel ``i`` of ``gid`` would empty."""
        left = self.left
        return next((self.selector.labels[slot] for slot, counts in self.hits(gid)
                     if counts[i] and left[slot] - counts[i] < 1), None)

    def remove(self, gid: str, i: int) -> None:
        for slot, counts in self.hits(gid):
            self.left[slot] -= counts[i]

    def release(self, gid: str, idx: Iterable[int]) -> None:
        """Give back channels ``idx`` of ``gid`` taken before."""
        idx = list(idx)
        if idx:
            for slot, k in self._taken(gid, idx):
                self.left[slot] += k

    def _taken(self, gid: str, idx: Iterable[int]) -> list[tuple[int, int]]:
        taken = self.selector.counts(gid)[:, torch.as_tensor(list(idx), dtype=torch.long)].sum(1)
        return list(zip(self.selector.layouts[gid].members, taken.tolist()))

    def fits(self, removals: Mapping[str, Iterable[int]]) -> bool:
        """True if removing every channel of ``removals`` at once leaves each member
        at least one index (then no single removal on the way empties one either)."""
        return self._fits(self._taken_all(removals))

    def _taken_all(self, removals: Mapping[str, Iterable[int]]) -> dict[int, int]:
        """Member slot → indices ``removals`` takes from it."""
        taken: dict[int, int] = {}
        for gid, idx in removals.items():
            for slot, k in self._taken(gid, idx):
                taken[slot] = taken.get(slot, 0) + k
        return taken

    def _admit(self, chosen: Mapping[str, Iterable[int]]) -> bool:
        """Take ``chosen`` at once if that empties no member (True); else change nothing (False)."""
        taken = self._taken_all(chosen)
        if not self._fits(taken):
            return False
        for slot, k in taken.items():
            self.left[slot] -= k
        return True

    def _fits(self, taken: Mapping[int, int]) -> bool:
        # every member holds one index at least (the guard never takes the last), so only those touched can fail
        left = self.left
        return all(left[slot] - k >= 1 for slot, k in taken.items())

    def take(self, gid: str, order: list[int], k: int) -> list[int]:
        """The first ``k`` channels of ``order`` that can go."""
        if k <= 0:
            return []
        first = {gid: list(order[:k])}
        if self._admit(first):  # the usual case: the first k empty no member
            return first[gid]
        return self.take_global([(gid, i) for i in order], {gid: k}, k).get(gid, [])

    def take_per_block(self, gid: str, blocks: torch.Tensor, order: list[int], k: int) -> list[int]:
        """``k`` channels of every row of ``blocks``, first in ``order``; fewer if some row
        cannot give ``k`` (the same number from each row), none if ``k`` is 0."""
        rank = {c: r for r, c in enumerate(order)}
        rows = [sorted(row, key=lambda c: rank.get(c, len(rank))) for row in blocks.tolist()]
        k = min(k, blocks.shape[1] - 1)
        while k > 0:
            taken = [self.take(gid, row, k) for row in rows]
            if all(len(t) == k for t in taken):
                return sorted(i for t in taken for i in t)
            for t in taken:
                self.release(gid, t)
            k -= 1
        return []

    def take_ranked(self, scores: Mapping[str, torch.Tensor], caps: Mapping[str, int], n: int,
                    ) -> dict[str, list[int]]:
        """:meth:`take_global` over every channel of ``scores`` (group id → scores), lowest score
        first; ties in group-id order, then channel order."""
        ranked = _ranked(scores)
        chosen = _first_ranked(*ranked, caps, n)
        if self._admit(chosen):  # the usual case: no member emptied, no channel skipped
            return chosen
        gids, owner, channel = ranked
        return self.take_global([(gids[g], c) for g, c in zip(owner.tolist(), channel.tolist())], caps, n)

    def take_global(self, order: list[tuple[str, int]], caps: Mapping[str, int], n: int) -> dict[str, list[int]]:
        """Walk ``order``; take up to ``n`` channels, at most ``caps[g]`` per group."""
        chosen = _first(order, caps, n)
        if self._admit(chosen):  # the usual case: no member emptied, no channel skipped
            return chosen
        chosen = {}
        for gid, i in order:
            if n <= 0:
                break
            if len(chosen.setdefault(gid, [])) < caps.get(gid, 0) and self.emptied_by(gid, i) is None:
                self.remove(gid, i)
                chosen[gid].append(i)
                n -= 1
        return {gid: idx for gid, idx in chosen.items() if idx}


def _ranked(scores: Mapping[str, torch.Tensor]) -> tuple[list[str], torch.Tensor, torch.Tensor]:
    """Every channel of ``scores``, lowest score first (ties: group id, then channel):
    the group ids, and per channel its group's position among them and its index."""
    gids = sorted(scores)
    values = [scores[g].detach().float().cpu().flatten() for g in gids]
    sizes = torch.tensor([len(v) for v in values], dtype=torch.long)
    owner = torch.repeat_interleave(torch.arange(len(gids)), sizes)
    channel = torch.cat([torch.arange(len(v)) for v in values]) if values else owner
    perm = torch.sort(torch.cat(values) if values else owner.float(), stable=True).indices
    return gids, owner[perm], channel[perm]


def _first_ranked(gids: list[str], owner: torch.Tensor, channel: torch.Tensor, caps: Mapping[str, int], n: int,
                  ) -> dict[str, list[int]]:
    """:func:`_first` of the order ``zip(owner, channel)`` (``owner``: positions in ``gids``), vectorised."""
    if n <= 0 or not len(owner):
        return {}
    by_group = torch.sort(owner, stable=True)  # each group's entries together, in order
    sizes = torch.bincount(owner, minlength=len(gids))
    starts = torch.cumsum(sizes, 0) - sizes
    rank = torch.empty_like(owner)  # how many entries of its group come before each entry
    rank[by_group.indices] = torch.arange(len(owner)) - starts[by_group.values]
    cap = torch.tensor([caps.get(g, 0) for g in gids], dtype=torch.long)
    picked = (rank < cap[owner]).nonzero().flatten()[:n]
    owner, channel = owner[picked], channel[picked]
    out: dict[str, list[int]] = {}
    for g in torch.unique_consecutive(owner).tolist():  # groups in the order of their first pick
        if gids[g] not in out:
            out[gids[g]] = channel[owner == g].tolist()
    return out


def _first(order: list[tuple[str, int]], caps: Mapping[str, int], n: int) -> dict[str, list[int]]:
    """The first ``n`` entries of ``order``, at most ``caps[g]`` per group."""
    chosen: dict[str, list[int]] = {}
    for gid, i in order:
        if n <= 0:
            break
        taken = chosen.setdefault(gid, [])
        if len(taken) < caps.get(gid, 0):
            taken.append(i)
            n -= 1
    return {gid: idx for gid, idx in chosen.items() if idx}


def _check_group(g: GroupLayout | None, gid: str, idx: Sequence[int], skipped: Mapping[str, str],
                 min_channels: int, known: list[str]) -> None:
    if g is None:
        raise PruningValueError(f"unknown group {gid!r}; groups are {known[:8]}...")
    if gid in skipped:
        raise PruningValueError(f"group {gid} cannot be pruned: {skipped[gid]}")
    if idx and not (0 <= min(idx) and max(idx) < g.size):
        bad = next(i for i in idx if not 0 <= i < g.size)
        raise PruningValueError(f"group {gid}: channel index {bad} out of range [0, {g.size})")
    if g.size - len(idx) < min_channels:
        raise PruningValueError(f"group {gid}: removing {len(idx)} of {g.size} channels leaves fewer than "
                                f"min_channels={min_channels}")
    if g.blocks is not None:
        counts = torch.isin(g.blocks, torch.as_tensor(list(idx), dtype=torch.long)).sum(1).tolist()
        if len(set(counts)) > 1 or counts[0] >= g.blocks.shape[1]:
            raise PruningValueError(
                f"group {gid}: {g.blocks_of} must each lose the same number of their "
                f"{g.blocks.shape[1]} channels, and keep at least one; the plan removes {counts}")
