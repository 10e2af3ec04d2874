"""Why a channel group is not pruned, as a value.

A :class:`SkipReason` pairs a :class:`SkipKind` (what callers test) with the
detail text (what people read). Code decides on the kind, never on the text.

Example
-------
>>> reason = SkipReason(SkipKind.UNSUPPORTED_OP, "used by matmul")
>>> str(reason), reason.kind is SkipKind.UNSUPPORTED_OP
('used by matmul', True)
>>> str(SkipReason(SkipKind.MODEL_OUTPUT))
'model output'
>>> [str(r) for r in sorted({reason, SkipReason(SkipKind.MODEL_OUTPUT)})]
['model output', 'used by matmul']
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

__all__ = ["SkipKind", "SkipReason"]


class SkipKind(enum.Enum):
    """The kinds of reasons a group is left alone; the value is the default message."""

    MODEL_OUTPUT = "model output"
    IGNORED = "ignored layer"
    MIN_CHANNELS = "at min_channels"
    LAST_CHANNEL = "every channel left is the last one of some layer"
    TRIAL_FAILED = "trial prune failed"
    UNSUPPORTED_OP = "an operation that cannot be pruned"
    MIXED = "channels mixed with other dimensions"
    FIXED_INPUT = "tied to a fixed-size tensor"
    NO_HANDLER = "no handler"
    UNSUPPORTED_LAYER = "a layer configuration that cannot be pruned"
    BLOCKS = "equal-size blocks that cannot be kept equal"
    SIZE_ATTRIBUTE = "a size that may be a module attribute"

    @property
    def expected(self) -> bool:
        """True for reasons that need no warning (the model output, ignored or exhausted layers)."""
        return self in (SkipKind.MODEL_OUTPUT, SkipKind.IGNORED, SkipKind.MIN_CHANNELS, SkipKind.LAST_CHANNEL)


@dataclass(frozen=True)
class SkipReason:
    """Why a group is not pruned: a :class:`SkipKind` and the detail text.

    ``str(reason)`` is the message: the detail, or the kind's default text.
    """

    kind: SkipKind
    detail: str = ""

    def __str__(self) -> str:
        return self.detail or self.kind.value

    def __lt__(self, other: "SkipReason") -> bool:
        """Reasons sort by their message (``sorted(set(pruner.skipped.values()))``)."""
        if not isinstance(other, SkipReason):
            return NotImplemented
        return (str(self), self.kind.name) < (str(other), other.kind.name)

    def __contains__(self, text: str) -> bool:
        """``"kdim" in reason``: a substring of the message (for people and tests, not for decisions)."""
        return text in str(self)
