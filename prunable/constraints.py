"""Constraints: how many channels a group may still lose.

A group keeps ``min_channels`` (and a multiple of ``round_to``) and loses at most
``max_ratio`` of the channels it had at the start, the strictest ratio of its
layers. :class:`Constraints` answers with a count (:meth:`Constraints.cap`) or,
when the answer is none, with the reason as a value (:meth:`Constraints.skip`).
Pure: no model needed.

Example
-------
>>> rules = Constraints(min_channels=2, layer_ratios={"conv": 0.5})
>>> rules.cap(16, 16, ["conv"]), str(rules.skip(8, 16, ["conv"]))
(8, 'max_ratio=0.5 of layer conv reached')
"""

from __future__ import annotations

import difflib
import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from .errors import PruningValueError
from .reasons import SkipKind, SkipReason

__all__ = ["Constraints", "capacity", "resolve_max_ratio"]


@dataclass(frozen=True)
class Constraints:
    """How many channels a group may lose: it keeps ``min_channels`` (and ``round_to``
    when it has that many), and loses at most ``max_ratio`` of its original channels,
    the strictest of ``layer_ratios`` (layer name → ratio) of its layers.

    Example
    -------
    >>> rules = Constraints(min_channels=2, layer_ratios={"conv": 0.25})
    >>> rules.cap(16, 16, ["conv", "bn"]), rules.cap(16, 16, ["other"])
    (4, 14)
    >>> rules.reason(12, 16, ["conv"])
    'max_ratio=0.25 of layer conv reached'
    """

    min_channels: int = 1
    round_to: int | None = None
    max_ratio: float = 1.0
    layer_ratios: Mapping[str, float] = field(default_factory=dict)

    def floor(self, channels: int) -> int:
        """Channels a group of ``channels`` keeps at least."""
        return max(self.min_channels, min(channels, self.round_to)) if self.round_to else self.min_channels

    def ratio(self, names: Iterable[str]) -> tuple[float, str | None]:
        """The strictest ratio of the layers ``names``, and the layer that sets it (None: the default)."""
        own = [n for n in names if n in self.layer_ratios]
        name = min(own, key=self.layer_ratios.__getitem__, default=None)
        if name is not None and self.layer_ratios[name] < self.max_ratio:
            return self.layer_ratios[name], name
        return self.max_ratio, None

    def cap(self, channels: int, original: int, names: Iterable[str] = ()) -> int:
        """Channels a group of ``channels`` (``original`` at the start) of layers ``names`` may still lose."""
        return capacity(channels, original, min_channels=self.min_channels, round_to=self.round_to,
                        max_ratio=self.ratio(names)[0])

    def reason(self, channels: int, original: int, names: Iterable[str] = ()) -> str | None:
        """Why such a group may lose no channel (None if it may)."""
        skip = self.skip(channels, original, names)
        return None if skip is None else str(skip)

    def skip(self, channels: int, original: int, names: Iterable[str] = ()) -> SkipReason | None:
        """:meth:`reason` as a :class:`~prunable.reasons.SkipReason` (``MIN_CHANNELS`` or ``MAX_RATIO``)."""
        names = list(names)
        if channels <= self.min_channels:
            return SkipReason(SkipKind.MIN_CHANNELS, f"{channels} channel(s) left, min_channels={self.min_channels}")
        if self.cap(channels, original, names):
            return None
        if channels <= self.floor(channels):
            return SkipReason(SkipKind.MIN_CHANNELS, f"{channels} channel(s) left, round_to={self.round_to}")
        ratio, layer = self.ratio(names)
        return SkipReason(SkipKind.MAX_RATIO, f"max_ratio={ratio:g}" + (f" of layer {layer}" if layer else "")
                          + " reached")

    def limits(self, groups: Iterable[Any], original: Mapping[str, int], failed: Mapping[str, SkipReason],
               ignored: Iterable[str]) -> tuple[dict[str, int], dict[str, SkipReason]]:
        """Channels each of ``groups`` (:class:`~prunable.graph.ChannelGroup` s) may still lose, and why
        the others may lose none: the graph's reason, a real cut that ``failed``, a producer in
        ``ignored``, or these constraints (``original``: channels of each group at the start).

        Example
        -------
        >>> from types import SimpleNamespace as NS
        >>> layer = lambda name: NS(target=NS(name=name))
        >>> group = lambda gid, n: NS(id=gid, channels=n, skip_reason=None, members=[layer(gid)],
        ...                           producers=[layer(gid)])
        >>> caps, skipped = Constraints(max_ratio=0.5).limits([group("a", 8), group("b", 4)], {"a": 8, "b": 8},
        ...                                                   {}, ignored={"a"})
        >>> caps, {gid: str(r) for gid, r in skipped.items()}
        ({'a': 4, 'b': 0}, {'a': 'ignored layer a', 'b': 'max_ratio=0.5 reached'})
        """
        ignored = set(ignored)
        caps, skipped = {}, {}
        for g in groups:
            names, start = [m.target.name for m in g.members], original.get(g.id, g.channels)
            caps[g.id] = self.cap(g.channels, start, names)
            layer = next((m.target.name for m in g.producers if m.target.name in ignored), None)
            reason = (g.skip_reason or failed.get(g.id)
                      or (SkipReason(SkipKind.IGNORED, f"ignored layer {layer}") if layer is not None else None)
                      or self.skip(g.channels, start, names))
            if reason is not None:
                skipped[g.id] = reason
        return caps, skipped


def capacity(channels: int, original: int, *, min_channels: int = 1, round_to: int | None = None,
             max_ratio: float = 1.0) -> int:
    """Channels a group of ``channels`` (``original`` at the start) may still lose.

    It keeps ``min_channels`` (and ``round_to`` when it has that many) and loses
    at most ``max_ratio`` of its original channels in all.

    Example
    -------
    >>> capacity(10, 16, max_ratio=0.5), capacity(10, 16, min_channels=4), capacity(4, 4, max_ratio=0.0)
    (2, 6, 0)
    """
    floor = max(min_channels, min(channels, round_to)) if round_to else min_channels
    budget = math.floor(max_ratio * original + 1e-9) - (original - channels)
    return max(0, min(channels - floor, budget))


def resolve_max_ratio(max_ratio: Any, modules: Mapping[str, Any]) -> tuple[float, dict[str, float]]:
    """``max_ratio`` (a float, or ``{layer name or module: float}``) as (default, per name).

    Layers not in the mapping get 1.0 (no cap beyond ``min_channels``). Raises
    :class:`PruningValueError` for a value outside [0, 1] or a key that is no
    module of ``modules`` (name → module), listing close names.

    Example
    -------
    >>> resolve_max_ratio({"conv": 0.5}, {"": None, "conv": None})
    (1.0, {'conv': 0.5})
    """
    if isinstance(max_ratio, Mapping):
        by_id = {id(m): name for name, m in modules.items()}
        out = {}
        for key, value in max_ratio.items():
            name = key if isinstance(key, str) else by_id.get(id(key))
            if name is None or name not in modules:
                shown = key if isinstance(key, str) else type(key).__name__
                close = difflib.get_close_matches(str(shown), [n for n in modules if n], n=5, cutoff=0.5)
                hint = (f"; close names: {', '.join(close)}" if close
                        else "; layers are named as in model.named_modules()")
                raise PruningValueError(f"max_ratio key {shown!r} is not a module of the model{hint}")
            out[name] = _ratio(value, f"max_ratio[{name!r}]")
        return 1.0, out
    return _ratio(max_ratio, "max_ratio"), {}


def _ratio(value: Any, what: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value <= 1:
        raise PruningValueError(f"{what}={value!r}: a fraction in [0, 1] is allowed "
                                "(0 = never pruned, 1 = no cap beyond min_channels)")
    return float(value)
