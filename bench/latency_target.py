"""Latency as the target: ``prune_to(latency=0.5)`` against ``prune_to(flops=0.5)`` on the CPU.

Each model (torchvision, random weights, seed 0; latency does not depend on the
weight values) is pruned twice from the same start, batch 1 at the side given:

- **latency-targeted**: ``Pruner(model, x, criterion=WeightNorm()).prune_to(latency=0.5)``:
  a per-layer latency table is measured first (every layer timed alone on its
  real input for a grid of channel counts, cached by layer signature), channels
  are ranked by L1 norm per second of latency (HALP), each step is sized from
  the table and the model is measured after it, until its latency is at most
  0.5 of the start's (measured in alternation with a copy of the start);
- **FLOPs-targeted**: the same Pruner and criterion, ``prune_to(flops=0.5)``
  (ranked by L1 norm alone, ends within one point under the FLOPs target).

Both with ``channels_per_step`` a fraction of the channels left (fewer,
larger steps). Then the unpruned and the two pruned models run in alternation
(eval mode, ``torch.set_num_threads(2)``): "latency ÷ original" is the median
(range) of the run-by-run ratios, so background load affects all alike.
Each prune is run ``REPEATS`` times from fresh copies, the two targets
alternating (the latency table is measured anew each time); "table" (the wall
time of building the latency table, part of "prune time") and "prune time" are
medians (ranges) of those runs, and the latencies are measured on the first
run's pruned models.
The issue's claim: latency-targeted ≤ 0.55 (target + 0.05), and not above the
FLOPs-targeted model's.

Run: ``python bench/latency_target.py [--quick]``
"""

from __future__ import annotations

import copy
import gc
import time
from typing import Any

import torch
import torchvision

import common
from common import Runs, markdown_table, short_error

MODELS = {"ResNet-18": "resnet18", "MobileNetV2": "mobilenet_v2"}
TARGET = 0.5
TARGETS = ("latency", "flops")  # the two prunes, in the order they alternate


def _prune(model: torch.nn.Module, x: torch.Tensor, key: str, step: float) -> tuple[torch.nn.Module, dict]:
    """A pruned copy and the wall times (the whole prune, building the latency table)."""
    from prunable import Pruner, WeightNorm

    pruned = copy.deepcopy(model)
    with common.quiet():
        start = time.perf_counter()
        pruner = Pruner(pruned, x, criterion=WeightNorm())
        pruner.prune_to(**{key: TARGET}, channels_per_step=step, progress=False)
        seconds = time.perf_counter() - start
    table = pruner.latency_table.build_seconds if pruner.latency_table is not None else 0.0
    return pruned, {"seconds": seconds, "table": table}


def _prunes(model: torch.nn.Module, x: torch.Tensor, step: float) -> dict[str, Any]:
    """``REPEATS`` prunes to each target, alternating: per target, the first run's model and the
    times of all runs, or the error that stopped it."""
    first: dict[str, Any] = {}  # target → the first run's pruned model, or the exception
    times: dict[str, dict[str, list[float]]] = {key: {"seconds": [], "table": []} for key in TARGETS}
    for _ in range(common.REPEATS):
        for key in TARGETS:
            if isinstance(first.get(key), Exception):
                continue
            try:
                pruned, spent = _prune(model, x, key, step)
            except Exception as exc:  # noqa: BLE001 - reported in the table
                first[key] = exc
                continue
            first.setdefault(key, pruned)
            for name, value in spent.items():
                times[key][name].append(value)
    return {key: found if isinstance(found, Exception) else (found, {n: Runs(tuple(t)) for n, t in times[key].items()})
            for key, found in first.items()}


def _row(label: str, side: int, model: torch.nn.Module, x: torch.Tensor, quick: bool) -> list[str]:
    from prunable import count_flops

    base = count_flops(model, x)
    out = _prunes(model, x, 0.2 if quick else 0.1)
    failed = [f"{k}: {short_error(v)}" for k, v in out.items() if isinstance(v, Exception)]
    if failed:
        return [label, f"{side}²", "; ".join(failed)] + [""] * 6
    (lat_model, lat), (flops_model, flops) = out["latency"], out["flops"]
    runs = common.paired_latency_runs([model, lat_model, flops_model], x, 2, 5 if quick else 9)
    return [label, f"{side}²", common.fmt_runs(runs[0]),
            common.fmt_ratio_runs(runs[1], runs[0]), f"{count_flops(lat_model, x) / base:.1%}",
            common.fmt_ratio_runs(runs[2], runs[0]), f"{count_flops(flops_model, x) / base:.1%}",
            common.fmt_runs(lat["table"]), f"{common.fmt_runs(lat['seconds'])} / {common.fmt_runs(flops['seconds'])}"]


def main(quick: bool = False) -> str:
    common.setup(0)
    side = 64 if quick else 160
    rows = []
    for label, name in MODELS.items():
        common.seed_all(0)
        model = torchvision.models.get_model(name, num_classes=1000).eval()
        x = torch.randn(1, 3, side, side, generator=torch.Generator().manual_seed(0))
        rows.append(_row(label, side, model, x, quick))
        del model
        gc.collect()
    headers = ["model", "input", "original latency", "latency-targeted: latency ÷ original", "its FLOPs left",
               "FLOPs-targeted: latency ÷ original", "its FLOPs left", "table", "prune time (latency / FLOPs)"]
    return markdown_table(headers, rows)


if __name__ == "__main__":
    common.run_script(main, __doc__)
