"""Shared test helpers: the reference 'zeroed copy' of a plan, BN randomisation, fraction plans."""

import torch
from torch import nn

from prunable.graph import DependencyGraph
from prunable.surgery import Role, handler_for


def zero_plan(model: nn.Module, graph: DependencyGraph, removals: dict) -> None:
    """Zero, in ``model`` (a copy of ``graph.model``), every consumer weight that
    reads a channel of ``removals``: its outputs then equal those of the pruned model."""
    by_id = {g.id: g for g in graph.groups}
    removed = torch.cat([by_id[gid].classes[torch.as_tensor(idx)] for gid, idx in removals.items()])
    modules = dict(model.named_modules())
    for g in graph.groups:
        for m in g.members:
            t = m.target
            module = modules.get(t.name)
            if t.role is not Role.IN or not isinstance(module, (nn.Conv2d, nn.Linear)):
                continue
            mask = torch.isin(m.classes, removed)
            if not mask.any():
                continue
            groups = module.groups if isinstance(module, nn.Conv2d) else 1
            depthwise = groups > 1 and groups == module.in_channels
            with torch.no_grad():
                if groups > 1 and not depthwise:
                    cin_g, cout_g = module.in_channels // groups, module.out_channels // groups
                    for c in torch.nonzero(mask).flatten().tolist():
                        i = c // cin_g
                        module.weight[i * cout_g:(i + 1) * cout_g, c % cin_g] = 0
                elif depthwise:
                    module.weight[mask] = 0
                    if module.bias is not None:
                        module.bias[mask] = 0
                else:
                    module.weight[:, mask] = 0


class Opaque(nn.Module):
    """A custom module calling a functional conv on its own weight (no handler registered)."""

    def __init__(self, c: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(c, c, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return nn.functional.conv2d(x, self.weight)


def randomize_bn(model: nn.Module) -> None:
    """BatchNorm far from the identity, so a wrongly sliced BN changes the output."""
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.running_mean.uniform_(-0.5, 0.5)
                m.running_var.uniform_(0.5, 1.5)
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.5, 0.5)


def fraction_plan(pruner, fraction: float = 0.3) -> dict[str, list[int]]:
    """The lowest-scoring ``fraction`` of every prunable group (each keeps one channel)."""
    scores = pruner.scores()
    plan = {}
    for g in pruner.groups:
        k = min(int(g.channels * fraction), g.channels - 1)
        if g.blocks is not None:  # attention heads, GroupNorm groups: the same number from each
            per_head = min(k // len(g.blocks), g.blocks.shape[1] - 1)
            rows = [row[scores[g.id][row].argsort()[:per_head]] for row in g.blocks]
            k, plan[g.id] = per_head, sorted(torch.cat(rows).tolist())
        elif k > 0:
            plan[g.id] = scores[g.id].argsort()[:k].tolist()
        if k <= 0:
            plan.pop(g.id, None)
    return plan


def hand_per_example(a: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """Per example and channel: the mean over positions of ``a·g``, by explicit loops (the
    paper's Eq. 8 before the absolute value), as the reference the criteria are tested against."""
    n, c = a.shape[:2]
    out = torch.zeros(n, c)
    for i in range(n):
        for k in range(c):
            out[i, k] = float((a[i, k] * g[i, k]).sum()) / a[i, k].numel()
    return out


def zero_producers(model: nn.Module, pruner, removals: dict) -> None:
    """In ``model`` (a copy), zero the producer rows of the removed channels and every consumer column."""
    modules = dict(model.named_modules())
    by_id = {g.id: g for g in pruner.groups}
    for gid, idx in removals.items():
        removed = by_id[gid].classes[torch.as_tensor(idx)]
        with torch.no_grad():
            for m in by_id[gid].producers:
                module = modules[m.target.name]
                mask = torch.isin(m.classes, removed)
                for name, axis in handler_for(module).params(module, Role.OUT).items():
                    getattr(module, name).index_fill_(axis, torch.nonzero(mask).flatten(), 0.0)
    zero_plan(model, pruner.graph, removals)


def smallest_per_component(n, pairs):
    """Plain union-find: the smallest node of each node's component (the oracle)."""
    parent = list(range(n))

    def find(a):
        while parent[a] != a:
            parent[a] = parent[parent[a]]
            a = parent[a]
        return a

    for a, b in pairs:
        ra, rb = find(a), find(b)
        parent[max(ra, rb)] = min(ra, rb)
    return [find(a) for a in range(n)]
