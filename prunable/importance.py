"""Channel importance: the Taylor criterion and the accumulators behind it.

The first-order Taylor estimate of Molchanov et al. (2017, Eq. 8) for feature
map ``k`` is, for each example, the absolute value of the spatial mean of
``a * dL/da`` over that map, averaged over examples. Scores are accumulated over
minibatches and, when compared across layers, L2-normalised per layer.

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

__all__ = ["taylor_per_example", "ScoreAccumulator", "l2_normalize"]


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
    """Running mean over examples of per-channel scores.

    ``add`` takes per-example signed values ``(N, C)``. With
    ``abs_after_batch_mean=False`` (the paper) it accumulates ``|x|`` per
    example; with ``True`` (the 2018 seed code) it accumulates ``|mean_N x|``
    weighted by N. ``value()`` is the mean over all examples seen, so two
    batches accumulate exactly like their concatenation.
    """

    def __init__(self, abs_after_batch_mean: bool = False) -> None:
        self.abs_after_batch_mean = abs_after_batch_mean
        self.total: torch.Tensor | None = None
        self.count = 0

    def add(self, per_example: torch.Tensor) -> None:
        """Accumulate a batch of signed per-example scores of shape ``(N, C)``."""
        n = per_example.shape[0]
        if self.abs_after_batch_mean:
            batch = per_example.mean(0).abs() * n
        else:
            batch = per_example.abs().sum(0)
        self.total = batch if self.total is None else self.total + batch
        self.count += n

    def add_total(self, total: torch.Tensor, count: int) -> None:
        """Accumulate an already summed score (used by non-Taylor criteria)."""
        self.total = total if self.total is None else self.total + total
        self.count += count

    def value(self, size: int | None = None, device: torch.device | None = None) -> torch.Tensor:
        """Mean score per channel; zeros of length ``size`` when nothing was seen."""
        if self.total is None or self.count == 0:
            return torch.zeros(size or 0, device=device)
        return self.total / self.count

    def reset(self) -> None:
        """Forget everything accumulated."""
        self.total = None
        self.count = 0

    def keep(self, keep: torch.Tensor) -> None:
        """Drop the entries of removed channels, keeping indices ``keep``."""
        if self.total is not None:
            self.total = self.total.index_select(0, keep.to(self.total.device))


def l2_normalize(scores: torch.Tensor, eps: float = 1e-12) -> torch.Tensor:
    """``scores / ||scores||_2``; an all-zero vector stays zero (no NaN)."""
    norm = torch.linalg.vector_norm(scores.float())
    return scores.float() / norm if norm > eps else torch.zeros_like(scores, dtype=torch.float32)
