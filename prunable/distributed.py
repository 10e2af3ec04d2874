"""Keeping ranks in step under ``torch.distributed``.

Each rank accumulates importance on its own data; before ranking,
:meth:`prunable.Pruner.scores` averages the score vectors across ranks with
:func:`average_across_ranks`, so every rank removes the same channels and the
models stay identical.

After a prune, re-wrap the model: ``DistributedDataParallel`` records the
parameter shapes when it is built, so build a new one around the pruned
module (``ddp = DDP(ddp.module, ...)``) and keep using the same optimizer —
its parameters and state were sliced in place. Prune the inner module
(``ddp.module``), not the wrapper.

Example
-------
>>> import torch
>>> average_across_ranks({"conv1": torch.ones(3)})["conv1"]  # no process group: unchanged
tensor([1., 1., 1.])
"""

from __future__ import annotations

import torch
import torch.distributed as dist

__all__ = ["is_distributed", "average_across_ranks"]


def is_distributed() -> bool:
    """True inside an initialised process group with more than one rank."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def average_across_ranks(scores: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Mean of each score vector over all ranks (one all-reduce for all of them)."""
    if not is_distributed() or not scores:
        return scores
    keys = sorted(scores)
    flat = torch.cat([scores[k].detach().float().flatten() for k in keys])
    device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")
    flat = flat.to(device)
    dist.all_reduce(flat, op=dist.ReduceOp.SUM)
    flat = (flat / dist.get_world_size()).cpu()
    out, start = {}, 0
    for k in keys:
        n = scores[k].numel()
        out[k] = flat[start:start + n].view_as(scores[k])
        start += n
    return out
