"""Progress of a pruning run: a tqdm bar on a terminal, otherwise one log line per step.

:class:`Progress` shows the records :func:`prunable.schedule.prune_to` makes: a
tqdm bar when stderr is an interactive terminal (and tqdm is installed), else one
INFO line per step on the ``"prunable"`` logger, so log files hold no carriage
returns.

Example
-------
>>> bar = Progress(enabled=False)
>>> bar.update({"step": 1, "removed": 8, "flops": 0.9})   # an INFO line on the "prunable" logger
>>> bar.close()
"""

from __future__ import annotations

import logging
import sys
from typing import Any

__all__ = ["Progress", "stderr_is_terminal"]

logger = logging.getLogger("prunable")


def stderr_is_terminal() -> bool:
    """True when ``sys.stderr`` is an interactive terminal (progress bars belong there only)."""
    stream = sys.stderr
    return stream is not None and hasattr(stream, "isatty") and stream.isatty()


class Progress:
    """A tqdm bar when ``enabled``, tqdm is installed and stderr is a terminal;
    otherwise one INFO line per step on the ``"prunable"`` logger."""

    def __init__(self, enabled: bool = True) -> None:
        self.bar = None
        if enabled and stderr_is_terminal():
            try:
                from tqdm.auto import tqdm
            except ImportError:
                return
            self.bar = tqdm(desc="pruning", unit="step", file=sys.stderr)

    def update(self, record: dict[str, Any]) -> None:
        numbers_ = {k: v for k, v in record.items() if k not in ("step", "removed") and isinstance(v, float)}
        if self.bar is not None:
            self.bar.update(1)
            self.bar.set_postfix({k: f"{v:.3f}" for k, v in numbers_.items()})
            return
        logger.info("pruning step %d: %d channels removed; %s", record["step"], record["removed"],
                    ", ".join(f"{k} {v:.4f}" for k, v in numbers_.items()))

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
