"""The oracle ranking of Molchanov et al. (2017): the true loss change per channel.

Remove (here: silence exactly) each channel in turn, measure the loss, and
record ``|ΔL|`` against the intact model. Expensive — one evaluation of all
``batches`` per channel — and meant for small models, as the paper's yardstick
for criteria (see ``bench/oracle_correlation.py``).

Example
-------
>>> import torch
>>> from torch import nn
>>> net = nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 4 * 4, 3))
>>> batches = [(torch.randn(8, 1, 6, 6), torch.randint(0, 3, (8,)))]
>>> scores = oracle_importance(net, nn.functional.cross_entropy, batches)
>>> scores["0"].shape
torch.Size([4])
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable, Iterator, Sequence

import torch
from torch import nn

from .graph import ChannelGroup, DependencyGraph
from .surgery import Cut, Role, channel_parameters

__all__ = ["oracle_importance"]

Batch = tuple[torch.Tensor, torch.Tensor]


def _silencers(group: ChannelGroup, k: int) -> list[tuple[torch.Tensor, int, torch.Tensor]]:
    """(tensor, axis, index) triples whose zeroing removes channel ``k`` of ``group``."""
    cls = group.classes[k]
    out = []
    for m in group.members:
        hit = torch.nonzero(m.classes == cls).flatten()
        t = m.target
        if len(hit) and (t.param is not None or t.role is Role.IN):
            out += channel_parameters(Cut(t.module, t.role, hit, t.param, t.axis, t.label()))
    return out


@contextlib.contextmanager
def _silenced(parts: list[tuple[torch.Tensor, int, torch.Tensor]]) -> Iterator[None]:
    saved = [(t, axis, idx, t.detach().index_select(axis, idx.to(t.device)).clone()) for t, axis, idx in parts]
    with torch.no_grad():
        for t, axis, idx, _ in saved:
            t.index_fill_(axis, idx.to(t.device), 0)
    try:
        yield
    finally:
        with torch.no_grad():
            for t, axis, idx, old in saved:
                t.index_copy_(axis, idx.to(t.device), old)


@torch.no_grad()
def _loss(model: nn.Module, loss_fn: Callable, batches: Sequence[Batch]) -> float:
    total, count = 0.0, 0
    for x, y in batches:
        total += float(loss_fn(model(x), y)) * len(x)
        count += len(x)
    return total / max(count, 1)


def oracle_importance(
    model: nn.Module, loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    batches: Iterable[Batch], example_inputs: torch.Tensor | None = None, signed: bool = False,
) -> dict[str, torch.Tensor]:
    """``|L(without channel) − L|`` for every channel of every prunable group.

    Parameters
    ----------
    model
        Evaluated in its current mode (call ``model.eval()`` first for the paper's setting).
    loss_fn
        ``loss_fn(output, target)`` returning a scalar (mean over the batch).
    batches
        ``(input, target)`` pairs; materialised once.
    example_inputs
        For the graph; defaults to the first batch's input.
    signed
        Return ``ΔL`` instead of ``|ΔL|`` (the paper's "oracle-loss").

    Returns
    -------
    dict[str, torch.Tensor]
        Group id → one value per channel, same order as ``Pruner.scores()``.
    """
    batches = list(batches)
    graph = DependencyGraph(model, example_inputs if example_inputs is not None else batches[0][0])
    base = _loss(model, loss_fn, batches)
    out = {}
    for group in graph.groups:
        if group.skip_reason:
            continue
        deltas = torch.zeros(group.channels)
        for k in range(group.channels):
            with _silenced(_silencers(group, k)):
                deltas[k] = _loss(model, loss_fn, batches) - base
        out[group.id] = deltas if signed else deltas.abs()
    return out
