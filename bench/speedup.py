"""Table 3: real CPU speed-up of pruned ResNet-50 and MobileNetV2 against their FLOPs reduction.

Each model (torchvision, random weights, seed 0; latency does not depend on
the weight values) is pruned to 50 % and 25 % of its FLOPs (counted at
1×3×224×224), with and without ``round_to=8``:

- **ours**: ``Pruner(model, x, criterion=WeightNorm(), round_to=...)``;
  ``pruner.plan(fraction, scope="layer")`` (the same fraction of every
  group's channels, lowest L1 norm first; with ``round_to`` the kept counts
  are multiples of 8), the fraction found by bisection on FLOPs of meta
  copies, then ``pruner.prune``.
- **TP**: Torch-Pruning ``BasePruner`` + ``MagnitudeImportance(p=1)`` with its
  default per-layer ratio (and its ``round_to``); the ratio that reaches the
  target is searched on copies (a few trials), so its FLOPs land near, not
  exactly at, the target.

Both use per-layer (uniform) ratios: with random weights a global ranking
would say nothing about trained networks (the accuracy table uses global
ranking on trained models).

Latency: median (range) of eval-mode forward passes with ``torch.set_num_threads(2)``,
batch 1 at 224×224 and batch 32 at 112×112 (a smaller side keeps the run
short; the model is fully convolutional up to global pooling). Each pruned
model's runs are interleaved with the unpruned model's, and its speed-up is
the median (range) of the run-by-run ratios, so background load affects both alike.
"eff." is speed-up ÷ FLOPs reduction (1.0 = latency falls as much as FLOPs;
the issue's target is ≥ 0.8).

Run: ``python bench/speedup.py [--quick]``
"""

from __future__ import annotations

import copy
import gc
import statistics
from typing import Any

import torch
import torchvision

import common
from common import markdown_table, short_error

MODELS = {"ResNet-50": "resnet50", "MobileNetV2": "mobilenet_v2"}
TARGETS = (0.5, 0.25)
ROUNDS = (None, 8)
NUM_CLASSES = 1000
SIDE = 224


def _inputs(quick: bool) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    big = (8, 112) if quick else (32, 112)
    return {"b1": torch.randn(1, 3, SIDE, SIDE, generator=gen),
            "b32": torch.randn(big[0], 3, big[1], big[1], generator=gen)}


def _latency(models: list[torch.nn.Module], inputs: dict[str, torch.Tensor], quick: bool) -> dict[str, list[Any]]:
    """Latencies (:class:`common.Runs`) per input of each model, the models interleaved."""
    reps = {"b1": (2, 5 if quick else 9), "b32": (1, 3)}
    return {k: common.paired_latency_runs(models, x, *reps[k]) for k, x in inputs.items()}


def prune_ours(model: torch.nn.Module, x: torch.Tensor, targets: tuple[float, ...],
               round_to: int | None) -> dict[float, torch.nn.Module]:
    """One pruned copy per FLOPs target, all planned from one ``Pruner``."""
    from prunable import Pruner, WeightNorm, count_flops

    base = count_flops(model, x)
    with common.quiet():
        pruner = Pruner(copy.deepcopy(model), x, criterion=WeightNorm(), round_to=round_to)
        out = {}
        for target in targets:
            plan = common.uniform_plan_for_flops(pruner, target * base)
            twin = copy.deepcopy(pruner)  # model and graph copied together
            twin.prune(plan)
            out[target] = twin.model
    return out


def prune_theirs(model: torch.nn.Module, x: torch.Tensor, target: float, round_to: int | None,
                 quick: bool) -> torch.nn.Module:
    import torch_pruning as tp

    from prunable import count_flops

    pruned = copy.deepcopy(model)
    with common.quiet():
        common.tp_prune_to_flops(pruned, x, lambda: tp.importance.MagnitudeImportance(p=1),
                                 target * count_flops(model, x), NUM_CLASSES, round_to=round_to,
                                 tolerance=0.03, max_trials=2 if quick else 3)
    return pruned


def _row(model_label: str, who: str, target: Any, round_to: Any, model: torch.nn.Module | None,
         base: dict[str, Any], inputs: dict[str, torch.Tensor], quick: bool, error: str = "") -> list[str]:
    from prunable import count_flops, count_params

    if model is None:
        return [model_label, who, target, round_to, f"failed: {error}", "", "", "", "", "", ""]
    flops = count_flops(model, inputs["b1"]) / base["flops"]
    params = count_params(model) / base["params"]
    lat = _latency([base["model"], model], inputs, quick)
    cells = [model_label, who, target, round_to, f"{flops:.1%}", f"{params:.1%}"]
    for key in ("b1", "b32"):
        unpruned, pruned = lat[key]
        speedup = statistics.median(u / p for u, p in zip(unpruned.times, pruned.times))
        cells += [common.fmt_runs(pruned), f"{common.fmt_ratio_runs(unpruned, pruned)}, eff. {speedup * flops:.2f}"]
    cells.append(f"{1 / flops:.2f}×")
    return cells


def main(quick: bool = False) -> str:
    from prunable import count_flops, count_params

    common.setup(0)
    inputs = _inputs(quick)
    x = inputs["b1"][:1]
    rows = []
    models = {"MobileNetV2": MODELS["MobileNetV2"]} if quick else MODELS
    targets = TARGETS[:1] if quick else TARGETS
    for label, name in models.items():
        common.seed_all(0)
        model = torchvision.models.get_model(name, num_classes=NUM_CLASSES).eval()
        base = {"flops": count_flops(model, x), "params": count_params(model), "model": model}
        lat = _latency([model], inputs, quick)
        rows.append([label, "unpruned", "100 %", "—", "100.0%", "100.0%",
                     common.fmt_runs(lat["b1"][0]), "1.00×", common.fmt_runs(lat["b32"][0]), "1.00×", "1.00×"])
        for round_to in ROUNDS:
            try:
                ours = prune_ours(model, x, targets, round_to)
            except Exception as exc:  # noqa: BLE001 - reported in the table
                ours = {t: exc for t in targets}
            for target in targets:
                for who in ("ours", "TP"):
                    pruned, error = ours.get(target) if who == "ours" else None, ""
                    if who == "TP":
                        try:
                            pruned = prune_theirs(model, x, target, round_to, quick)
                        except Exception as exc:  # noqa: BLE001 - reported in the table
                            pruned = exc
                    if isinstance(pruned, Exception):
                        pruned, error = None, short_error(pruned)
                    rows.append(_row(label, who, f"{target:.0%}", round_to or "—", pruned, base, inputs,
                                     quick, error))
                    del pruned
                    gc.collect()
    b32 = inputs["b32"].shape
    headers = ["model", "pruned by", "FLOPs target", "round_to", "FLOPs left", "params left",
               "latency b1", "speed-up b1", f"latency b{b32[0]} ({b32[2]}²)", f"speed-up b{b32[0]}",
               "FLOPs reduction"]
    return markdown_table(headers, rows)


if __name__ == "__main__":
    common.run_script(main, __doc__)
