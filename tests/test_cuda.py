"""CUDA-only checks (skipped without a GPU; ``bench/gpu_check.py`` runs them with ``-k cuda``)."""

import warnings

import pytest
import torch
import torch.distributed as dist
from torch import nn

import prunable.flops as flops
from prunable import Pruner, TaylorActivation, WeightNorm, measure_latency
from prunable.staging import SurgeryStats
from prunable.surgery import apply_cuts

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


def _net():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU(),
                         nn.Conv2d(32, 64, 3, padding=1), nn.BatchNorm2d(64), nn.ReLU(),
                         nn.Conv2d(64, 64, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1),
                         nn.Flatten(), nn.Linear(64, 10)).cuda()


def _batch(n=8):
    return torch.randn(n, 3, 16, 16, device="cuda"), torch.randint(0, 10, (n,), device="cuda")


def test_cuda_fp16_gradscaler_overflow_is_skipped():
    model = _net()
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    scaler = torch.amp.GradScaler("cuda", init_scale=2.0 ** 40)
    pruner = Pruner(model, _batch(1)[0], optimizer=opt)
    overflows = 0
    with pruner.estimate():
        for _ in range(40):
            x, y = _batch()
            with torch.autocast("cuda", dtype=torch.float16):
                loss = nn.functional.cross_entropy(model(x), y)
            scaler.scale(loss).backward()
            scaler.step(opt)
            before = scaler.get_scale()
            scaler.update()
            overflows += scaler.get_scale() < before
            opt.zero_grad()
    assert overflows > 0
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        skipped = pruner.criterion.skipped()
        assert 0 < max(skipped.values()) <= overflows
        assert all(acc.total.dtype == torch.float32 for acc in pruner.criterion.accumulators.values())
        pruner.step(8)
    with torch.autocast("cuda", dtype=torch.float16):
        assert model(_batch()[0]).shape == (8, 10)


def test_cuda_surgery_allocator_peak_is_one_module():
    model = _net()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    x, y = _batch()
    nn.functional.cross_entropy(model(x), y).backward()
    opt.step()
    pruner = Pruner(model, x[:1], criterion=WeightNorm(), optimizer=opt)
    cuts = pruner.graph.cuts({g.id: list(range(0, g.channels, 4)) for g in pruner.groups})
    stats = SurgeryStats()
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    apply_cuts(cuts, opt, stats=stats)
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated() - base
    assert stats.peak_bytes < stats.total_bytes / 2
    # the allocator rounds blocks up to 512 bytes and holds index tensors and one removed slice too
    assert peak <= stats.peak_bytes * 2 + 2 ** 20, (peak, stats)
    nn.functional.cross_entropy(model(x), y).backward()
    opt.step()


def test_cuda_measure_latency_syncs_the_devices_in_use(monkeypatch):
    model = _net().eval()
    seen = []
    monkeypatch.setattr(flops, "_synchronize", lambda devices: seen.append(list(devices)))
    inputs = (_batch(2)[0],)
    measure_latency(model, inputs, warmup=1, repeats=2)
    assert seen and all(d == [torch.device("cuda", torch.cuda.current_device())] for d in seen)
    cpu_model = nn.Linear(4, 4)
    assert flops.devices_to_sync(cpu_model, {"a": [torch.zeros(1, device="cuda")]}) == [torch.device("cuda", 0)]


def test_cuda_sync_batchnorm_estimates_and_prunes(tmp_path):
    if dist.is_initialized():
        pytest.skip("a process group is already initialised")
    dist.init_process_group("gloo", init_method=f"file://{tmp_path}/store", rank=0, world_size=1)
    try:
        model = nn.SyncBatchNorm.convert_sync_batchnorm(_net())
        x, y = _batch()
        pruner = Pruner(model, x[:2], criterion=TaylorActivation())
        assert len(pruner.groups) == 3
        with pruner.estimate():
            nn.functional.cross_entropy(model(x), y).backward()  # SyncBatchNorm runs on CUDA in train mode
        pruner.step(16)
        assert model(x).shape == (8, 10)
    finally:
        dist.destroy_process_group()
