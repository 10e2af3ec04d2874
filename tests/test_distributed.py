"""Two CPU processes (gloo): both ranks must remove the same channels."""

import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from prunable import Pruner


def _model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 12, 3, padding=1), nn.BatchNorm2d(12), nn.ReLU(),
                         nn.Conv2d(12, 8, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1),
                         nn.Flatten(), nn.Linear(8, 4))


def _worker(rank: int, world: int, init: str, out: str) -> None:
    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=world)
    try:
        model = _model()
        torch.manual_seed(100 + rank)  # every rank sees different data
        x, y = torch.randn(8, 3, 6, 6), torch.randint(0, 4, (8,))
        pruner = Pruner(model, x[:1])
        with pruner.estimate():
            nn.functional.cross_entropy(model(x), y).backward()
        local = pruner.criterion.accumulators["1"].value().clone()
        plan = pruner.step(5)
        params = {k: v.detach().clone() for k, v in model.named_parameters()}
        torch.save({"params": params, "local": local, "plan": plan.to_json()}, f"{out}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


@pytest.mark.skipif(not dist.is_available(), reason="torch.distributed unavailable")
def test_two_ranks_prune_identically(tmp_path):
    init = f"file://{tmp_path}/store"
    mp.spawn(_worker, args=(2, init, str(tmp_path)), nprocs=2, join=True)
    a = torch.load(tmp_path / "rank0.pt", weights_only=True)
    b = torch.load(tmp_path / "rank1.pt", weights_only=True)
    assert not torch.allclose(a["local"], b["local"])  # each rank's own estimate differs
    assert a["plan"] == b["plan"]
    pa, pb = a["params"], b["params"]
    assert pa.keys() == pb.keys()
    for k in pa:
        assert pa[k].shape == pb[k].shape and torch.equal(pa[k], pb[k]), k
    assert pa["0.weight"].shape[0] + pa["3.weight"].shape[0] == 20 - 5
