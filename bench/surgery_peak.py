"""Surgery memory: bytes staged at once by one prune of a ResNet-50 with AdamW state.

Before the per-module transactions, ``apply_cuts`` built every new parameter,
gradient and optimizer moment before swapping any in: the extra memory at the
peak was all of them (``total``). Now one module is staged at a time (``peak``);
the removed slices kept to undo a failure live in host memory (``undo``).
Counted by :class:`prunable.staging.SurgeryStats` (sums of tensor sizes); on a
GPU, ``bench/gpu_check.py`` measures the allocator's real peak too.

    python bench/surgery_peak.py [--quick]
"""

from __future__ import annotations

import argparse
import time
import warnings

import torch
import torchvision

from prunable import Pruner, WeightNorm
from prunable.staging import SurgeryStats
from prunable.surgery import apply_cuts


def _mib(n: int) -> str:
    return f"{n / 2**20:.1f}"


def measure(ratio: float, size: int = 64) -> dict:
    """One prune removing ``ratio`` of the channels of a ResNet-50 after an AdamW step."""
    torch.manual_seed(0)
    model = torchvision.models.resnet50(num_classes=100)
    x = torch.randn(2, 3, size, size)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model(x).logsumexp(1).mean().backward()
    opt.step()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pruner = Pruner(model, x, criterion=WeightNorm(), optimizer=opt)
    plan = pruner.plan(ratio, scope="layer")  # every group loses the same fraction
    cuts = pruner.graph.cuts({k: list(v) for k, v in plan.removals.items()})
    stats = SurgeryStats()
    start = time.perf_counter()
    apply_cuts(cuts, opt, stats=stats)
    seconds = time.perf_counter() - start
    model(x).logsumexp(1).mean().backward()
    opt.step()  # the optimizer still steps on the pruned model
    return {"ratio": ratio, "stats": stats, "seconds": seconds}


def main(quick: bool = False) -> str:
    rows = ["| channels removed per group | all staged at once (MiB) | staged peak now (MiB) | peak ratio | "
            "undo log, host (MiB) | surgery time (s) |", "|---:|---:|---:|---:|---:|---:|"]
    for ratio in ((0.1,) if quick else (0.05, 0.1, 0.5)):
        r = measure(ratio)
        s = r["stats"]
        rows.append(f"| {ratio:.0%} | {_mib(s.total_bytes)} | {_mib(s.peak_bytes)} | "
                    f"{s.peak_bytes / s.total_bytes:.3f} | {_mib(s.undo_bytes)} | {r['seconds']:.2f} |")
    table = "\n".join(rows)
    print("ResNet-50 (100 classes), AdamW state and gradients present, every group loses the fraction shown:\n")
    print(table)
    return table


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    main(parser.parse_args().quick)
