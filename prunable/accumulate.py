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

import math

import torch

__all__ = ["ScoreAccumulator", "taylor_per_example"]


#: elements of ``activation * grad`` formed at a time: a block small enough to stay in the cache
CHUNK_ELEMENTS = 1 << 18


def taylor_per_example(activation: torch.Tensor, grad: torch.Tensor, channel_dim: int = 1) -> torch.Tensor:
    """Signed per-example, per-channel spatial mean of ``activation * grad``.

    The product is formed a few examples at a time into one small buffer that
    stays in the cache, and summed there without moving the channel dim (no
    copy of a ``(N, T, C)`` token tensor), so the full-size product is never
    allocated; the sums are divided by the number of positions at the end.

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

    Example
    -------
    >>> a = torch.ones(2, 3, 4); g = torch.full((2, 3, 4), 0.5)
    >>> taylor_per_example(a, g, channel_dim=-1)
    tensor([[0.5000, 0.5000, 0.5000, 0.5000],
            [0.5000, 0.5000, 0.5000, 0.5000]])
    """
    a, g = activation.detach(), grad.detach()
    if a.dim() <= 2:  # (N, C): nothing to average
        return a.float() * g.float()
    dim = channel_dim % a.dim()
    reduced = tuple(d for d in range(1, a.dim()) if d != dim)
    n, positions = a.shape[0], math.prod(a.shape[d] for d in reduced)
    out = torch.empty(n, a.shape[dim], dtype=torch.float32, device=a.device)
    step = max(1, CHUNK_ELEMENTS // max(positions * a.shape[dim], 1))
    if step >= n or a.device.type != "cpu":  # one block (a GPU reads it in one kernel)
        torch.sum(a.float() * g.float(), reduced, out=out)
    else:
        block = torch.empty((step,) + a.shape[1:], dtype=torch.float32, device=a.device)
        for i in range(0, n, step):
            j = min(n, i + step)
            torch.mul(a[i:j].float(), g[i:j].float(), out=block[: j - i])
            torch.sum(block[: j - i], reduced, out=out[i:j])
    return out.div_(positions)


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
            batch = per_example.mean(0).abs_().mul_(n)
        else:
            batch = per_example.abs().sum(0)
        self.add_total(batch, n)

    def add_total(self, total: torch.Tensor, count: int) -> None:
        """Accumulate an already summed score of ``count`` examples (non-Taylor criteria).

        In place and on the device: no host synchronisation, and no new running
        tensors per batch once the first batch is in.
        """
        total = total.detach().float()
        bad = torch.isfinite(total).all().logical_not_()
        if self.total is None:
            self.total = torch.zeros_like(total)
            self._bad = torch.zeros((), dtype=torch.long, device=total.device)
            self._bad_batches = torch.zeros((), dtype=torch.long, device=total.device)
        self.total.add_(total.masked_fill(bad, 0))
        self._bad.add_(bad, alpha=count)
        self._bad_batches.add_(bad)
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
