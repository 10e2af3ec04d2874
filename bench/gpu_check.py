"""GPU check: what only a CUDA device can show, in one run, as a markdown table.

On a machine with CUDA it runs, each check reported ok / failed with a figure:

1. the CUDA tests of the suite (``pytest -k cuda`` and the GPU-only ones);
2. fp16 autocast + ``GradScaler`` estimation (an overflowing first scale: skipped
   batches are counted, the step prunes) and bf16 autocast estimation;
3. AdamW (``foreach`` and ``fused``) through a prune, stepping before and after;
4. ``prunable.load`` of a saved pruned model onto a model built on the GPU;
5. latency with CUDA events next to :func:`prunable.measure_latency`;
6. estimation through a ``torch.compile``d model (inductor), which then runs pruned;
7. peak GPU memory of one ViT-B/16 training step and of one prune step with AdamW
   state (the allocator's peak above the model's own memory, next to
   :class:`~prunable.staging.SurgeryStats`).

On a machine without CUDA it says so and exits 0. ``--device cpu`` runs the same
checks on small inputs on the CPU (a smoke test of this script, not a GPU check).

    python bench/gpu_check.py [--device cpu] [--skip-tests]
"""

from __future__ import annotations

import argparse
import io as _io
import subprocess
import sys
import time
import traceback
import warnings
from collections.abc import Callable
from pathlib import Path

import torch
import torchvision
from torch import nn

import prunable
from prunable.staging import SurgeryStats
from prunable.surgery import apply_cuts

REPO = Path(__file__).resolve().parent.parent


def _resnet(device: torch.device, classes: int = 10) -> nn.Module:
    torch.manual_seed(0)
    return torchvision.models.resnet18(num_classes=classes).to(device)


def _batch(device: torch.device, n: int = 8, size: int = 64) -> tuple[torch.Tensor, torch.Tensor]:
    size = size if device.type == "cuda" else 32
    n = n if device.type == "cuda" else 2
    return torch.randn(n, 3, size, size, device=device), torch.randint(0, 10, (n,), device=device)


def check_tests(device: torch.device) -> str:
    """The suite's CUDA tests, in a subprocess."""
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-k", "cuda", "tests/"]  # test_cuda.py & co
    done = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=900)
    last = (done.stdout.strip().splitlines() or ["no output"])[-1]
    if done.returncode:
        raise RuntimeError(last)
    return last


def check_autocast(device: torch.device) -> str:
    """fp16 + GradScaler with an overflowing scale, then bf16: both estimate and prune."""
    out = []
    for dtype, scaler in ((torch.float16, True), (torch.bfloat16, False)):
        model = _resnet(device)
        opt = torch.optim.SGD(model.parameters(), lr=0.01)
        scale = 2.0 ** 30 if device.type == "cuda" else 1.0  # CUDA: the first steps overflow
        grad_scaler = torch.amp.GradScaler(device.type, init_scale=scale, enabled=scaler)
        x, y = _batch(device)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            pruner = prunable.Pruner(model, x[:1], optimizer=opt)
            with pruner.estimate():
                for _ in range(30 if device.type == "cuda" else 3):
                    with torch.autocast(device.type, dtype=dtype):
                        loss = nn.functional.cross_entropy(model(x), y)
                    grad_scaler.scale(loss).backward()
                    grad_scaler.step(opt)
                    grad_scaler.update()
                    opt.zero_grad()
            skipped = max(pruner.criterion.skipped().values(), default=0)
            pruner.step(32)
        with torch.autocast(device.type, dtype=dtype):
            model(x)
        out.append(f"{str(dtype)[6:]}: {skipped} batch(es) skipped")
    return "; ".join(out)


def check_adamw(device: torch.device) -> str:
    """AdamW with foreach and fused kernels steps before and after a prune."""
    out = []
    for kind in ("foreach", "fused"):
        if kind == "fused" and device.type == "cpu" and not hasattr(torch._C, "_fused_adamw_"):
            continue
        model = _resnet(device)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-3, **{kind: True})
        x, y = _batch(device)
        for _ in range(2):
            nn.functional.cross_entropy(model(x), y).backward()
            opt.step()
            opt.zero_grad()
        prunable.Pruner(model, x[:1], criterion="l1", optimizer=opt).step(64)
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
        ok = all(v.shape == p.shape for p in model.parameters() for v in opt.state[p].values() if v.dim())
        if not ok:
            raise RuntimeError(f"{kind}: optimizer state shapes differ from the parameters")
        out.append(f"{kind} ok")
    return ", ".join(out)


def check_io_load(device: torch.device) -> str:
    """Save a pruned model, load it onto a model built on the device; same outputs."""
    model = _resnet(device).eval()
    x, _ = _batch(device, 2)
    pruner = prunable.Pruner(model, x[:1], criterion="l1")
    pruner.step(64)
    buffer = _io.BytesIO()
    arch = {"name": "resnet18", "num_classes": 10}
    prunable.save(model, buffer, plans=pruner.history, architecture=arch, example_input_shape=tuple(x[:1].shape))
    buffer.seek(0)
    loaded = prunable.load(buffer, build=_resnet(device)).eval()
    diff = float((loaded(x) - model(x)).abs().max())
    if diff > 1e-4:
        raise RuntimeError(f"outputs differ by {diff:.2e}")
    return f"on {next(loaded.parameters()).device}, max diff {diff:.1e}"


def check_latency(device: torch.device) -> str:
    """``measure_latency`` next to CUDA events, ResNet-50 batch 32 at 112², before and after a 50 % prune."""
    model = torchvision.models.resnet50().to(device).eval()
    x = torch.randn(32, 3, 112, 112, device=device) if device.type == "cuda" else torch.randn(1, 3, 64, 64)
    out = []
    for stage in ("dense", "pruned"):
        wall = prunable.measure_latency(model, x, warmup=3, repeats=10)
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            times = []
            with torch.no_grad():
                for _ in range(10):
                    start.record()
                    model(x)
                    end.record()
                    torch.cuda.synchronize(device)
                    times.append(start.elapsed_time(end))
            out.append(f"{stage}: {wall * 1e3:.2f} ms wall, {sorted(times)[5]:.2f} ms events")
        else:
            out.append(f"{stage}: {wall * 1e3:.2f} ms wall")
        if stage == "dense":
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                prunable.Pruner(model, x[:1], criterion="l1").step(0.5)
    return "; ".join(out)


def check_compile(device: torch.device) -> str:
    """Estimate through a compiled model (inductor), prune, run the compiled model again."""
    model = _resnet(device)
    compiled = torch.compile(model, backend="inductor" if device.type == "cuda" else "eager")  # CPU: a smoke run
    x, y = _batch(device)
    start = time.perf_counter()
    nn.functional.cross_entropy(compiled(x), y).backward()
    model.zero_grad()
    first = time.perf_counter() - start
    pruner = prunable.Pruner(compiled, x[:1])
    with pruner.estimate():
        nn.functional.cross_entropy(compiled(x), y).backward()
    pruner.step(64)
    model.eval()
    diff = float((compiled(x) - model(x)).abs().max())
    if diff > 1e-3:
        raise RuntimeError(f"compiled and eager outputs differ by {diff:.2e}")
    return f"first compile {first:.0f} s; after pruning, compiled = eager within {diff:.1e}"


def check_vit_peak(device: torch.device) -> str:
    """Peak memory of one ViT-B/16 training step and of one prune (AdamW state present)."""
    torch.manual_seed(0)
    size, n = (224, 32) if device.type == "cuda" else (32, 2)
    model = torchvision.models.vit_b_16(image_size=size, num_classes=100).to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    x, y = torch.randn(n, 3, size, size, device=device), torch.randint(0, 100, (n,), device=device)
    peak = _peak(device, lambda: _step(model, opt, x, y))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pruner = prunable.Pruner(model, x[:1], criterion="l1", optimizer=opt)
    cuts = pruner.graph.cuts({k: list(v) for k, v in pruner.plan(0.1, scope="layer").removals.items()})
    stats = SurgeryStats()
    prune_peak = _peak(device, lambda: apply_cuts(cuts, opt, stats=stats))
    _step(model, opt, x, y)
    mib = 2 ** 20
    return (f"train step +{peak / mib:.0f} MiB; prune 10 %/group +{prune_peak / mib:.0f} MiB allocator peak, "
            f"staged peak {stats.peak_bytes / mib:.0f} MiB of {stats.total_bytes / mib:.0f} MiB touched")


def _step(model: nn.Module, opt: torch.optim.Optimizer, x: torch.Tensor, y: torch.Tensor) -> None:
    nn.functional.cross_entropy(model(x), y).backward()
    opt.step()


def _peak(device: torch.device, fn: Callable[[], object]) -> int:
    """Bytes allocated at the peak of ``fn()`` above what was allocated before (0 on CPU)."""
    if device.type != "cuda":
        fn()
        return 0
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    base = torch.cuda.memory_allocated(device)
    fn()
    torch.cuda.synchronize(device)
    return torch.cuda.max_memory_allocated(device) - base


CHECKS = {
    "CUDA tests": check_tests, "autocast fp16 + GradScaler, bf16": check_autocast, "AdamW through a prune": check_adamw,
    "io.load on the device": check_io_load, "latency": check_latency, "torch.compile estimation": check_compile,
    "ViT-B/16 peak memory": check_vit_peak,
}


def main(device: str | None = None, skip_tests: bool = False) -> str:
    if device is None and not torch.cuda.is_available():
        print("bench/gpu_check.py needs a CUDA device; none is available here (use --device cpu for a smoke run).")
        return ""
    dev = torch.device(device or "cuda")
    rows = ["| check | result | detail |", "|---|---|---|"]
    for name, check in CHECKS.items():
        if skip_tests and check is check_tests:
            continue
        start = time.perf_counter()
        try:
            detail, result = check(dev), "ok"
        except Exception as exc:  # noqa: BLE001 - every failure is a row of the table
            traceback.print_exc()
            detail, result = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}", "FAILED"
        rows.append(f"| {name} | {result} | {detail} ({time.perf_counter() - start:.0f} s) |")
        print(rows[-1], flush=True)
    gpu = torch.cuda.get_device_name(dev) if dev.type == "cuda" else "CPU"
    table = f"{gpu}, torch {torch.__version__}\n\n" + "\n".join(rows)
    print("\n" + table)
    return table


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default=None, help="run on this device (default: cuda, if present)")
    parser.add_argument("--skip-tests", action="store_true", help="leave out the pytest run")
    args = parser.parse_args()
    main(args.device, args.skip_tests)
