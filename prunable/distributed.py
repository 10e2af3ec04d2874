"""Keeping ranks in step under ``torch.distributed``, and the wrappers around a model.

Each rank accumulates importance on its own data; before ranking,
:meth:`prunable.Pruner.scores` averages the score vectors across ranks with
:func:`reduce_scores`, so every rank removes the same channels and the models
stay identical. A rank that cannot score (no estimates, a non-finite score)
does not raise before the collective: it joins it with a failure flag, and then
every rank raises the same :class:`~prunable.errors.EstimationError`, so no
rank is left waiting in a collective until the watchdog kills the job. The
collective runs on the model's device (``cuda:<local rank>`` under NCCL), not
on ``torch.cuda.current_device()``.

After a prune, re-wrap the model: ``DistributedDataParallel`` records the
parameter shapes when it is built, so build a new one around the pruned
module and keep using the same optimizer — its parameters and state were sliced
in place. Drop the old wrapper first (``module = ddp.module; del ddp;
ddp = DDP(module, ...)``): while it lives it holds the parameters' gradient
accumulators, which keep the old shapes, and the new wrapper would reuse them. ``Pruner`` accepts the wrapper
and prunes the module inside (:func:`unwrap`).

Example
-------
>>> import torch
>>> average_across_ranks({"conv1": torch.ones(3)})["conv1"]  # no process group: unchanged
tensor([1., 1., 1.])
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import torch
import torch.distributed as dist
from torch import nn

from .errors import EstimationError

__all__ = [
    "is_distributed", "average_across_ranks", "reduce_scores", "unwrap", "gather_unsharded", "reshard",
]


def is_distributed() -> bool:
    """True inside an initialised process group with more than one rank."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def unwrap(model: nn.Module) -> nn.Module:
    """The module inside ``torch.compile``, ``DataParallel`` and ``DistributedDataParallel``
    wrappers (nested in any order); ``model`` itself when it is not wrapped.

    The wrappers share the inner module's parameters, so pruning the inner
    module prunes what the wrapper runs. A compiled wrapper recompiles for the
    new shapes on its next call; a (Distributed)DataParallel one must be rebuilt.

    Example
    -------
    >>> net = nn.Linear(2, 2)
    >>> unwrap(nn.DataParallel(net)) is net
    True
    """
    while True:
        inner = getattr(model, "_orig_mod", None)  # torch.compile's OptimizedModule
        if inner is None and isinstance(model, (nn.DataParallel, nn.parallel.DistributedDataParallel)):
            inner = model.module
        if not isinstance(inner, nn.Module):
            return model
        model = inner


def _collective_device(device: torch.device | None) -> torch.device:
    if device is not None:
        return torch.device(device)
    if "nccl" in str(dist.get_backend()):
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def average_across_ranks(
    scores: dict[str, torch.Tensor], *, device: torch.device | None = None
) -> dict[str, torch.Tensor]:
    """Mean of each score vector over all ranks (one all-reduce for all of them).

    ``device`` is where the collective runs: the model's device (NCCL needs the
    rank's own GPU). By default: CPU for gloo, the current CUDA device for NCCL.
    """
    return reduce_scores(scores, device=device)


def reduce_scores(
    scores: dict[str, torch.Tensor], *, device: torch.device | None = None, error: str | None = None
) -> dict[str, torch.Tensor]:
    """Average ``scores`` over ranks; raise on every rank if any rank reports an ``error``.

    Every rank must call it with the same keys and shapes (a failed rank sends
    placeholders, e.g. NaN) and its own ``error`` (None when it scored). The
    failure flags travel in the same all-reduce as the scores, then every rank
    raises :class:`EstimationError` naming the failed ranks. Outside a process
    group ``error`` is raised at once and ``scores`` returned unchanged.

    Example
    -------
    >>> reduce_scores({"a": torch.zeros(2)})
    {'a': tensor([0., 0.])}
    """
    if not is_distributed():
        if error is not None:
            raise EstimationError(error)
        return scores
    world, rank = dist.get_world_size(), dist.get_rank()
    keys = sorted(scores)
    flags = torch.zeros(world)
    flags[rank] = float(error is not None)
    flat = torch.cat([scores[k].detach().float().flatten() for k in keys] + [flags])
    flat = flat.to(_collective_device(device))
    dist.all_reduce(flat, op=dist.ReduceOp.SUM)
    flat = flat.cpu()
    failed = [r for r, f in enumerate(flat[-world:].tolist()) if f > 0]
    if failed:
        detail = f": {error}" if error is not None else " (see their errors)"
        raise EstimationError(f"rank(s) {failed} of {world} could not score the channels{detail}; "
                              "no rank pruned")
    flat = flat[:-world] / world
    out, start = {}, 0
    for k in keys:
        n = scores[k].numel()
        out[k] = flat[start:start + n].view_as(scores[k])
        start += n
    return out


def gather_unsharded(
    sharded: nn.Module, build: Callable[[], nn.Module], optimizer: torch.optim.Optimizer | None = None,
    make_optimizer: Callable[[Iterable[nn.Parameter]], torch.optim.Optimizer] | None = None,
) -> tuple[nn.Module, torch.optim.Optimizer | None]:
    """A plain copy of a ``fully_shard`` (FSDP2) model on every rank, to prune between steps.

    ``build()`` makes the unsharded architecture; the full state dict (and the
    optimizer's, when ``optimizer`` and ``make_optimizer`` are given) is
    gathered from the shards into it on every rank, so every rank prunes the
    same model. Prune the copy with :class:`~prunable.Pruner` (``optimizer=`` the
    returned optimizer to slice its moments), then :func:`reshard` it. Every rank
    must call it (it runs collectives). See ``docs/howto/fsdp.md``.
    """
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions, get_model_state_dict, get_optimizer_state_dict, set_optimizer_state_dict,
    )

    full = StateDictOptions(full_state_dict=True)
    plain = build()
    plain.load_state_dict(get_model_state_dict(sharded, options=full))
    plain_optimizer = None
    if optimizer is not None and make_optimizer is not None:
        state = get_optimizer_state_dict(sharded, optimizer, options=full)
        plain_optimizer = make_optimizer(plain.parameters())
        set_optimizer_state_dict(plain, plain_optimizer, optim_state_dict=state)
    return plain, plain_optimizer


def reshard(
    plain: nn.Module, shard: Callable[[nn.Module], nn.Module], plain_optimizer: torch.optim.Optimizer | None = None,
    make_optimizer: Callable[[Iterable[nn.Parameter]], torch.optim.Optimizer] | None = None,
) -> tuple[nn.Module, torch.optim.Optimizer | None]:
    """Shard a pruned plain model again with ``shard(plain)`` (the user's ``fully_shard`` calls),
    and move ``plain_optimizer``'s (pruned) state into a new optimizer on the shards."""
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions, get_optimizer_state_dict, set_optimizer_state_dict,
    )

    state = None
    if plain_optimizer is not None and make_optimizer is not None:
        state = get_optimizer_state_dict(plain, plain_optimizer)
    model = shard(plain)
    optimizer = None
    if state is not None:
        optimizer = make_optimizer(model.parameters())
        set_optimizer_state_dict(model, optimizer, optim_state_dict=state,
                                 options=StateDictOptions(full_state_dict=True))
    return model, optimizer
