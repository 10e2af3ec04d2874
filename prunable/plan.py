"""Plans: which channels leave which group. Pure data.

A :class:`Plan` maps a group id (the qualified name of the group's first
producer, e.g. ``"layer1.0.conv1"``) to the channel indices to remove. It is
printable, JSON-serialisable and replayable on a fresh copy of the same
architecture with :meth:`prunable.Pruner.prune`.

Example
-------
>>> plan = Plan({"conv1": (3, 7)})
>>> Plan.from_json(plan.to_json()) == plan
True
>>> print(plan)
Plan: 2 channels from 1 group
  conv1: remove 3, 7
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

__all__ = ["Plan"]


@dataclass(frozen=True)
class Plan:
    """Channel indices to remove, by group id."""

    removals: Mapping[str, tuple[int, ...]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        clean = {str(k): tuple(sorted({int(i) for i in v})) for k, v in self.removals.items() if len(v)}
        object.__setattr__(self, "removals", clean)

    def __len__(self) -> int:
        return sum(len(v) for v in self.removals.values())

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Plan) and dict(self.removals) == dict(other.removals)

    def __hash__(self) -> int:
        return hash(tuple(sorted(self.removals.items())))

    def __str__(self) -> str:
        lines = [f"Plan: {len(self)} channels from {len(self.removals)} group{'s' * (len(self.removals) != 1)}"]
        lines += [f"  {gid}: remove {', '.join(map(str, idx))}" for gid, idx in self.removals.items()]
        return "\n".join(lines)

    def to_dict(self) -> dict[str, list[int]]:
        """Plain ``{group id: [indices]}``."""
        return {k: list(v) for k, v in self.removals.items()}

    def to_json(self) -> str:
        """JSON text of :meth:`to_dict`."""
        return json.dumps(self.to_dict(), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> "Plan":
        """Inverse of :meth:`to_json`."""
        data = json.loads(text)
        if not isinstance(data, dict):
            raise ValueError(f"a plan is a JSON object of lists, got {type(data).__name__}")
        return cls(data)

    @classmethod
    def coerce(cls, plan: "Plan | Mapping[str, Iterable[int]]") -> "Plan":
        """A :class:`Plan` from a plan or a mapping."""
        return plan if isinstance(plan, Plan) else cls({k: tuple(v) for k, v in plan.items()})
