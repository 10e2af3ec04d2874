"""Accumulation of per-example channel scores over minibatches.

The per-batch machinery behind the data-driven criteria of
:mod:`prunable.importance` and the seed's layers (:mod:`prunable.nn`):
:func:`taylor_per_example` turns an activation and its gradient into signed
per-example, per-channel values, and a :class:`ScoreAccumulator` keeps their
running mean in float32, leaving out batches whose scores are not finite.

Example
-------
>>> import torch
>>> a = torch.randn(4, 3, 5, 5); g = torch.randn(4, 3, 5, 5)
>>> acc = ScoreAccumulator()
>>> acc.add(taylor_per_example(a, g))
>>> acc.value().shape
torch.Size([3])
"""

from __future__ import annotations

import torch

__all__ = ["ScoreAccumulator", "taylor_per_example"]


def taylor_per_example(activation: torch.Tensor, grad: torch.Tensor, channel_dim: int = 1) -> torch.Tensor:
    """Signed per-example, per-channel spatial mean of ``activation * grad``.

    Parameters
    ----------
    activation, grad
        Tensors of equal shape; dim 0 indexes examples and ``channel_dim`` the
        channels. Every other dimension is averaged (spatial positions, tokens).
    channel_dim
        The channel dimension.

    Returns
    -------
    torch.Tensor
        Shape ``(N, C)`` in float32. Take ``abs()`` before averaging over N for
        the paper's Eq. 8.
    """
    prod = activation.detach().float() * grad.detach().float()
    prod = prod.movedim(channel_dim, 1)
    return prod.flatten(2).mean(2) if prod.dim() > 2 else prod


class ScoreAccumulator:
    """Running mean over examples of per-channel scores, in float32.

    ``add`` takes per-example signed values ``(N, C)``. With
    ``abs_after_batch_mean=False`` (the paper) it accumulates ``|x|`` per
    example; with ``True`` (the 2018 seed code) it accumulates ``|mean_N x|``
    weighted by N. ``value()`` is the mean over all examples seen, so two
    batches accumulate exactly like their concatenation.

    A batch whose contribution is not finite (``inf``/``NaN`` gradients from an
    overflowed mixed-precision backward, which ``GradScaler`` skips too) is left
    out and counted in :attr:`skipped`. The check runs on the device: adding a
    batch never waits for the GPU; only reading :attr:`count`, :attr:`skipped`
    or :meth:`value` does. Scores are summed in float32 whatever the model's
    dtype, so half-precision models neither overflow nor lose small scores.

    Loss scaling: gradients of a loss scaled by ``S`` are ``S`` times larger, so
    every Taylor score of a layer is ``S`` (activation criteria) or ``S²``
    (parameter criteria) times larger. A scale that is constant while estimating
    cancels in the per-layer L2 normalisation (``θ / ||θ||₂``) used to rank
    across layers. A scale that changes in the window (``GradScaler`` grows it
    every ``growth_interval`` steps, halves it on overflow) weights the batches
    by their scale; estimate over a window of steady scale for exact averages.

    Example
    -------
    >>> acc = ScoreAccumulator()
    >>> acc.add(torch.tensor([[1.0, -2.0]]))
    >>> acc.add(torch.tensor([[float("inf"), 0.0]]))  # skipped, like an overflowed step
    >>> acc.value(), acc.count, acc.skipped
    (tensor([1., 2.]), 1, 1)
    """

    def __init__(self, abs_after_batch_mean: bool = False) -> None:
        self.abs_after_batch_mean = abs_after_batch_mean
        self.reset()

    def add(self, per_example: torch.Tensor) -> None:
        """Accumulate a batch of signed per-example scores of shape ``(N, C)``."""
        n = per_example.shape[0]
        per_example = per_example.float()
        if self.abs_after_batch_mean:
            batch = per_example.mean(0).abs() * n
        else:
            batch = per_example.abs().sum(0)
        self.add_total(batch, n)

    def add_total(self, total: torch.Tensor, count: int) -> None:
        """Accumulate an already summed score of ``count`` examples (non-Taylor criteria)."""
        total = total.detach().float()
        finite = torch.isfinite(total).all()
        total = torch.where(finite, total, torch.zeros((), device=total.device))
        bad = (~finite).long()
        self.total = total if self.total is None else self.total + total
        self._bad = bad * count if self._bad is None else self._bad + bad * count
        self._bad_batches = bad if self._bad_batches is None else self._bad_batches + bad
        self._offered += count

    @property
    def count(self) -> int:
        """Examples accumulated (those of skipped batches not included)."""
        return self._offered - (int(self._bad) if self._bad is not None else 0)

    @property
    def skipped(self) -> int:
        """Batches left out because their scores were not finite."""
        return int(self._bad_batches) if self._bad_batches is not None else 0

    def value(self, size: int | None = None, device: torch.device | None = None) -> torch.Tensor:
        """Mean score per channel; zeros of length ``size`` when nothing was seen."""
        count = self.count
        if self.total is None or count == 0:
            return torch.zeros(size or 0, device=device)
        return self.total / count

    def reset(self) -> None:
        """Forget everything accumulated."""
        self.total: torch.Tensor | None = None
        self._offered = 0
        self._bad: torch.Tensor | None = None
        self._bad_batches: torch.Tensor | None = None

    def keep(self, keep: torch.Tensor) -> None:
        """Drop the entries of removed channels, keeping indices ``keep``."""
        if self.total is not None:
            self.total = self.total.index_select(0, keep.to(self.total.device))
