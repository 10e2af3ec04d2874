"""Exceptions raised by prunable.

Every error the library raises on purpose derives from :class:`PrunableError`,
so ``except prunable.PrunableError`` catches all of them. Errors caused by a bad
argument also derive from :class:`ValueError` so plain Python code can handle
them the usual way.
"""

from __future__ import annotations

__all__ = ["PrunableError", "PruningValueError", "SurgeryError", "EstimationError"]


class PrunableError(Exception):
    """Base class of every error raised by prunable."""


class PruningValueError(PrunableError, ValueError):
    """An argument names a layer, channel or amount that cannot be pruned.

    The message names the layer and the offending value; the model is unchanged.
    """


class SurgeryError(PrunableError, RuntimeError):
    """Applying a plan failed; the model and optimizer were left as they were."""


class EstimationError(PrunableError, RuntimeError):
    """Importance scores are missing or invalid (no backward pass, NaN, inf)."""
