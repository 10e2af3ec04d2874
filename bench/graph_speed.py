"""Table 1: graph build + one 50 % channel step, prunable vs Torch-Pruning.

Both libraries get the same torchvision model (random weights, seed 0, eval
mode) and the same 1×3×224×224 example input. "Build" is the constructor
(prunable: ``Pruner(model, x, criterion=WeightNorm())``, which traces the graph
on a meta copy and, when the trace holds an operation through which a cut could
fail unseen by the graph, trial-prunes every group there; Torch-Pruning: ``BasePruner`` with
``MagnitudeImportance(p=1)``, which builds its ``DependencyGraph``). "Step"
removes the 50 % lowest-L1 channels of every group (prunable:
``plan(0.5, scope="layer")`` + ``prune(plan)``, which first runs the plan on a
meta copy, then cuts the real tensors; the graph of the pruned model is traced
when next needed, so a second step pays it; Torch-Pruning: ``pruner.step()`` with
``pruning_ratio=0.5``). The global-ranking variant removes the 50 % lowest
channels of the whole model, ranked across layers (prunable:
``plan(0.5, scope="global")``; Torch-Pruning: ``global_pruning=True``).
"Ours rebuild" is that deferred trace and graph of the pruned model, timed on its
own right after the step (it is paid by the next ``plan``/``step``, not by a
one-shot prune; Torch-Pruning's graph needs none), and "total + rebuild" adds it
to our side of the ratio. The classifier's outputs are kept by both; Torch-Pruning's groups are counted
outside the timed calls. Every time is the median of 3 runs (range in
brackets), each on a fresh deep copy of the model, the two libraries
alternating; ratios are the median (range) of the run-by-run ratios. An untimed
warm-up of both libraries on a small ResNet-18 comes first.

Run: ``python bench/graph_speed.py [--quick]``
"""

from __future__ import annotations

import copy
import gc
from typing import Any

import torch
import torchvision

import common
from common import REPEATS, Runs, fmt_ratio_runs, fmt_runs, markdown_table, short_error, timed

#: table label → (torchvision name, input side)
MODELS = {
    "ResNet-50": ("resnet50", 224),
    "MobileNetV2": ("mobilenet_v2", 224),
    "DenseNet-121": ("densenet121", 224),
    "EfficientNet-B0": ("efficientnet_b0", 224),
    "ConvNeXt-T": ("convnext_tiny", 224),
    "ViT-B/16": ("vit_b_16", 224),
}
QUICK = ("ResNet-50", "MobileNetV2")
NUM_CLASSES = 1000


def _model(name: str) -> torch.nn.Module:
    common.seed_all(0)
    return torchvision.models.get_model(name, num_classes=NUM_CLASSES).eval()


def _half_plan(pruner: Any, scope: str) -> Any:
    """Half of the channels, lowest L1 first: of every group (``"layer"``; attention heads:
    half of each head) or of the whole model, ranked across layers (``"global"``)."""
    return pruner.plan(0.5, scope=scope)


def run_ours(model: torch.nn.Module, x: torch.Tensor, scope: str = "layer") -> dict[str, Any]:
    from prunable import Pruner, WeightNorm

    with common.quiet():
        build, pruner = timed(lambda: Pruner(model, x, criterion=WeightNorm()))
        groups = len(pruner.groups)
        step, _ = timed(lambda: pruner.prune(_half_plan(pruner, scope)))
        rebuild, _ = timed(lambda: pruner.graph)  # the pruned model's graph, deferred to its next use
    return {"build": build, "step": step, "rebuild": rebuild, "groups": groups}


def run_theirs(model: torch.nn.Module, x: torch.Tensor, scope: str = "layer") -> dict[str, Any]:
    import torch_pruning as tp

    with common.quiet():
        build, pruner = timed(lambda: common.tp_pruner(
            model, x, tp.importance.MagnitudeImportance(p=1), 0.5, NUM_CLASSES,
            global_pruning=scope == "global"))
        groups = sum(1 for _ in pruner.DG.get_all_groups(ignored_layers=pruner.ignored_layers,
                                                          root_module_types=pruner.root_module_types))
        step, _ = timed(pruner.step)
    return {"build": build, "step": step, "groups": groups}


def measure(src: torch.nn.Module, x: torch.Tensor, before: int, runner, scope: str = "layer") -> dict[str, Any]:
    """Build + step with ``runner`` on a deep copy of ``src``; then check the forward pass and the FLOPs left."""
    from prunable import count_flops

    model = copy.deepcopy(src)
    try:
        result = runner(model, x, scope)
        with torch.no_grad():
            shape = tuple(model(x).shape)
        result["flops_left"] = count_flops(model, x) / before
        result["ok"] = shape == (1, NUM_CLASSES)
    except Exception as exc:  # noqa: BLE001 - reported in the table
        result = {"error": short_error(exc)}
    del model
    gc.collect()
    return result


def measure_both(name: str, size: int, scope: str = "layer") -> tuple[dict[str, Any], dict[str, Any]]:
    """``REPEATS`` runs of each library, alternating; build and step times as :class:`Runs`."""
    from prunable import count_flops

    src = _model(name)
    x = torch.randn(1, 3, size, size, generator=torch.Generator().manual_seed(0))
    before = count_flops(src, x)
    runs: dict[Any, list[dict[str, Any]]] = {run_ours: [], run_theirs: []}
    for _ in range(REPEATS):
        for runner, done in runs.items():
            if not done or "error" not in done[-1]:  # a library that failed is not run again
                done.append(measure(src, x, before, runner, scope))
    del src
    gc.collect()
    return _combine(runs[run_ours]), _combine(runs[run_theirs])


def _combine(results: list[dict[str, Any]]) -> dict[str, Any]:
    if "error" in results[-1]:
        return results[-1]
    return {**{key: Runs(tuple(r[key] for r in results)) for key in ("build", "step", "rebuild") if key in results[0]},
            "groups": results[0]["groups"], "flops_left": results[0]["flops_left"],
            "ok": all(r["ok"] for r in results)}


def warm_up() -> None:
    """Pay one-time costs (imports, first dispatch, allocator) of both libraries, untimed."""
    for runner in (run_ours, run_theirs):
        model = torchvision.models.resnet18(num_classes=10).eval()
        with common.quiet():
            runner(model, torch.randn(1, 3, 64, 64))


def _cells(r: dict[str, Any]) -> list[str]:
    if "error" in r:
        return ["failed", "", "", r["error"]]
    note = f"{r['groups']} groups, {r['flops_left']:.0%} FLOPs left" + ("" if r["ok"] else ", BAD OUTPUT")
    return [fmt_runs(r["build"]), fmt_runs(r["step"]), fmt_runs(r["build"] + r["step"]), note]


def _ratio(ours: dict[str, Any], theirs: dict[str, Any], key: str) -> str:
    if "error" in ours or "error" in theirs:
        return "—"
    totals = {"total": lambda r: r["build"] + r["step"],
              "total + rebuild": lambda r: r["build"] + r["step"] + r["rebuild"] if "rebuild" in r else r["build"] + r["step"]}
    runs = totals.get(key, lambda r: r[key])
    return fmt_ratio_runs(runs(ours), runs(theirs))


def _table(models: tuple[str, ...], scope: str) -> str:
    rows = []
    for label in models:
        name, size = MODELS[label]
        ours, theirs = measure_both(name, size, scope)
        rows.append([f"{label} ({size}²)", *_cells(ours), *_cells(theirs),
                     _ratio(ours, theirs, "build"), _ratio(ours, theirs, "step"), _ratio(ours, theirs, "total"),
                     "—" if "error" in ours else fmt_runs(ours["rebuild"]),
                     _ratio(ours, theirs, "total + rebuild")])
    headers = ["model", "ours build", "ours step", "ours total", "ours result",
               "TP build", "TP step", "TP total", "TP result",
               "build ours/TP", "step ours/TP", "total ours/TP", "ours rebuild", "total + rebuild ours/TP"]
    return markdown_table(headers, rows)


def main(quick: bool = False) -> str:
    common.setup(0)
    warm_up()
    models = QUICK if quick else tuple(MODELS)
    per_layer = _table(models, "layer")
    ranked = _table(models, "global")
    return (f"{per_layer}\n\n**Global ranking** (50 % of all channels, ranked across layers: "
            f"ours `plan(0.5, scope=\"global\")`, TP `global_pruning=True`):\n\n{ranked}")


if __name__ == "__main__":
    common.run_script(main, __doc__)
