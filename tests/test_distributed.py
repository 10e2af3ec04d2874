"""Two CPU processes (gloo): both ranks must remove the same channels, and fail together."""

import copy
import warnings

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from prunable import EstimationError, Pruner
from prunable.distributed import unwrap
from prunable.graph import trace_model

pytestmark = pytest.mark.skipif(not dist.is_available(), reason="torch.distributed unavailable")


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
        _leave()


def _leave() -> None:
    """Tear the group down only when every rank is done with it: without the barrier gloo can abort
    (SIGABRT, "terminate called without an active exception") a rank still tearing down while the
    other has exited, under load."""
    dist.barrier()
    dist.destroy_process_group()


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


def _nan_worker(rank: int, world: int, init: str, out: str, poison: str) -> None:
    from datetime import timedelta

    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=world, timeout=timedelta(seconds=30))
    try:
        model = _model()
        x, y = torch.randn(8, 3, 6, 6), torch.randint(0, 4, (8,))
        pruner = Pruner(model, x[:1], criterion="l1" if poison == "weights" else None)
        with pruner.estimate():
            nn.functional.cross_entropy(model(x), y).backward()
        if rank == 1 and poison == "weights":  # a NaN weight: its L1 score is NaN on this rank only
            with torch.no_grad():
                model[0].weight[0, 0, 0, 0] = float("nan")
        if rank == 1 and poison == "missing":  # this rank never ran a backward
            pruner.criterion.reset()
        before = [p.shape for p in model.parameters()]
        try:
            pruner.step(2)
            result = "pruned"
        except EstimationError as exc:
            result = f"EstimationError: {exc}"
        unchanged = before == [p.shape for p in model.parameters()]
        with open(f"{out}/rank{rank}.txt", "w") as f:
            f.write(f"{unchanged}\n{result}")
    finally:
        _leave()


@pytest.mark.parametrize("poison", ["weights", "missing"])
def test_one_rank_fails_every_rank_raises(tmp_path, poison):
    init = f"file://{tmp_path}/store"
    ctx = mp.start_processes(_nan_worker, args=(2, init, str(tmp_path), poison), nprocs=2, join=False,
                             start_method="spawn")
    deadline = 120.0
    import time
    start = time.monotonic()
    while not ctx.join(timeout=1.0):
        if time.monotonic() - start > deadline:
            for p in ctx.processes:
                p.kill()
            pytest.fail("a rank hung in the collective")
    texts = [(tmp_path / f"rank{r}.txt").read_text().splitlines() for r in range(2)]
    for unchanged, result in texts:
        assert unchanged == "True"
        assert result.startswith("EstimationError: rank(s) [1] of 2 could not score"), result
    assert "non-finite" in texts[1][1] or "no estimates" in texts[1][1]


def test_unwrap_nested_wrappers():
    net = _model()
    assert unwrap(net) is net
    assert unwrap(nn.DataParallel(nn.DataParallel(net))) is net
    compiled = torch.compile(nn.DataParallel(net))
    assert unwrap(compiled) is net


@pytest.fixture
def single_process_group(tmp_path):
    if dist.is_initialized():
        pytest.skip("a process group is already initialised")
    dist.init_process_group("gloo", init_method=f"file://{tmp_path}/store", rank=0, world_size=1)
    try:
        yield
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("own_group", [False, True])
def test_sync_batchnorm_traced_and_pruned_like_batchnorm(single_process_group, own_group):
    """Under an initialised group SyncBatchNorm cannot run on meta (nor on CPU in train mode):
    meta copies use its local equivalent, so the groups are those of the BatchNorm model."""
    torchvision = pytest.importorskip("torchvision")
    torch.manual_seed(0)
    plain = torchvision.models.resnet18(num_classes=10)
    group = dist.new_group([0]) if own_group else None
    synced = nn.SyncBatchNorm.convert_sync_batchnorm(copy.deepcopy(plain), process_group=group)
    assert any(isinstance(m, nn.SyncBatchNorm) for m in synced.modules())
    x = torch.randn(2, 3, 32, 32)
    assert trace_model(synced, x).clone is not None  # meta copy, no fall back to a deep copy
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        a, b = Pruner(plain, x, criterion="l1"), Pruner(synced, x, criterion="l1")
    assert [str(g) for g in a.groups] == [str(g) for g in b.groups] and len(b.groups) >= 12
    plan = a.step(40)
    b.prune(plan)
    assert synced.bn1.num_features == synced.bn1.running_mean.numel() == plain.bn1.num_features
    assert isinstance(synced.bn1, nn.SyncBatchNorm) and synced.bn1.process_group is group
    plain.eval(), synced.eval()  # SyncBatchNorm runs on CPU in eval mode only
    torch.testing.assert_close(plain(x), synced(x))


def test_pruner_on_ddp_prunes_the_module_inside(single_process_group):
    net = _model()
    ddp = nn.parallel.DistributedDataParallel(net)
    x = torch.randn(2, 3, 6, 6)
    pruner = Pruner(ddp, x, criterion="l1")
    assert pruner.model is net
    pruner.step(3)
    assert net[0].out_channels + net[3].out_channels == 20 - 3
    del ddp  # the old wrapper holds the parameters' gradient accumulators with the old shapes
    ddp = nn.parallel.DistributedDataParallel(net)  # rebuilt around the pruned module
    ddp(x).sum().backward()


def _shard(net):
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh("cpu", (dist.get_world_size(),))
    fully_shard(net[0], mesh=mesh)
    fully_shard(net[3], mesh=mesh)
    return fully_shard(net, mesh=mesh)


def _adamw(params):
    return torch.optim.AdamW(params, lr=1e-2)


def _fsdp_worker(rank: int, world: int, init: str, out: str) -> None:
    from prunable.distributed import gather_unsharded, reshard

    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=world)
    try:
        warnings.simplefilter("ignore")
        model = _shard(_model())
        opt = _adamw(model.parameters())
        torch.manual_seed(rank)  # every rank its own data
        x, y = torch.randn(8, 3, 6, 6), torch.randint(0, 4, (8,))
        for _ in range(2):
            nn.functional.cross_entropy(model(x), y).backward()
            opt.step()
            opt.zero_grad()
        plain, plain_opt = gather_unsharded(model, _model, opt, _adamw)
        reference = copy.deepcopy(plain)  # the full model before pruning, for the zeroed-copy check
        pruner = Pruner(plain, x[:1], optimizer=plain_opt)
        with pruner.estimate():  # a few batches on the gathered copy
            nn.functional.cross_entropy(plain(x), y).backward()
        plain.zero_grad()
        plan = pruner.step(5)
        expected = plain.eval()(x).detach()
        plain.train()
        moments = {n: plain_opt.state[p]["exp_avg"].clone() for n, p in plain.named_parameters()}
        del model, opt
        model, opt = reshard(plain, _shard, plain_opt, _adamw)
        model.eval()
        got = model(x).detach()
        model.train()
        nn.functional.cross_entropy(model(x), y).backward()  # and it trains on
        opt.step()
        shapes = {n: tuple(p.full_tensor().shape) for n, p in model.named_parameters()}
        torch.save({"plan": plan.to_json(), "shapes": shapes, "expected": expected, "got": got,
                    "moments": {n: tuple(m.shape) for n, m in moments.items()},
                    "reference": {n: tuple(p.shape) for n, p in reference.named_parameters()}},
                   f"{out}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_fsdp2_gather_prune_reshard(tmp_path):
    pytest.importorskip("torch.distributed.fsdp").fully_shard
    mp.spawn(_fsdp_worker, args=(2, f"file://{tmp_path}/store", str(tmp_path)), nprocs=2, join=True)
    a = torch.load(tmp_path / "rank0.pt", weights_only=True)
    b = torch.load(tmp_path / "rank1.pt", weights_only=True)
    assert a["plan"] == b["plan"] and a["shapes"] == b["shapes"]
    assert a["shapes"] == a["moments"]  # the Adam moments were pruned with the parameters
    assert sum(a["shapes"][k][0] for k in ("0.weight", "3.weight")) == 20 - 5
    assert a["reference"]["0.weight"][0] + a["reference"]["3.weight"][0] == 20
    for r in (a, b):
        torch.testing.assert_close(r["got"], r["expected"])  # the re-sharded model computes the pruned one


def test_collective_runs_on_the_models_device(monkeypatch):
    """Under NCCL the all-reduce must use the model's device, not torch.cuda.current_device()
    (a rank that never called set_device would talk through cuda:0). Simulated in-process."""
    import prunable.distributed as pd

    model = _model()
    pruner = Pruner(model, torch.randn(1, 3, 6, 6), criterion="l1")
    local = pruner.scores()
    seen = []
    monkeypatch.setattr(pd, "is_distributed", lambda: True)
    monkeypatch.setattr(dist, "get_world_size", lambda *a, **k: 2)
    monkeypatch.setattr(dist, "get_rank", lambda *a, **k: 0)
    monkeypatch.setattr(dist, "get_backend", lambda *a, **k: "nccl")
    monkeypatch.setattr(dist, "all_reduce", lambda t, *a, **k: seen.append(t.device) or t.mul_(2))
    scores = pruner.scores()
    assert seen == [next(model.parameters()).device]  # one all-reduce, where the model lives
    for gid in scores:  # the two (simulated) ranks agree: the mean is the local score
        torch.testing.assert_close(scores[gid], local[gid])
