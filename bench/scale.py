"""Scale: graph build + one 50 % step, time and memory against model size.

Each model runs in its own fresh process (``python bench/scale.py --worker
LABEL``). Real-weight models are torchvision architectures (ViT-S/16:
``VisionTransformer`` with patch 16, 12 layers, 6 heads, width 384) built on
``meta`` and then given real CPU tensors filled with seeded uniform noise (the
values only feed the L1 scores); the example input is 1×3×224×224. "Build" is
``Pruner(model, x, criterion=WeightNorm())`` (trace on a meta copy, + per-group
trial runs there when the trace is fragile); "step" is ``prune(plan(0.5,
scope="layer"))`` (the plan's trial run on a meta copy, then the real tensors
cut; the pruned model's graph is traced when next needed). The LLaMA-style model
(``transformers`` ``LlamaConfig``: hidden 2048, 22 layers, intermediate 5632,
32 query and 4 key/value heads, vocabulary 32000 — TinyLlama's shape) is built
under ``torch.device("meta")`` and never gets weights: criterion ``"random"``
(values cannot be read on meta), input 1×128 token ids on meta; its "step" is
the same call, cutting meta tensors — what a plan made for the real weights
costs. Times are the median of 3 runs, each on a freshly built model, with
their range in brackets. Memory is the
peak resident set size of the first run's build + step, reset just before it
(``/proc/self/clear_refs``): "added" is that peak minus the memory held before
(imports, the model's own weights); "process peak" includes them. The fits
are least-squares lines of total time (build + step) against parameters and
against modules with parameters, with R², over the real-weight rows and per
family. When some
operation of the forward pass could break a cut unseen by the graph (a reshape
with sizes, a read channel count: the transformers here), the build
validates every group with a trial prune on a meta copy; groups whose trial
fails are found by bisection, each trial a whole forward pass, so a model with
one failing group per layer (the LLaMA-style model's key projections) pays
about layers² trial layers at build; a failing group is not tried again at
later steps.

Run: ``python bench/scale.py [--quick]``
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import warnings
from typing import Any

import torch

import common
from common import Runs, fmt_runs, markdown_table, short_error, timed

#: label → (builder key, argument): torchvision name, or the LLaMA layer count
MODELS = {
    "ResNet-18": ("torchvision", "resnet18"), "ResNet-34": ("torchvision", "resnet34"),
    "ResNet-50": ("torchvision", "resnet50"), "ResNet-101": ("torchvision", "resnet101"),
    "ResNet-152": ("torchvision", "resnet152"), "DenseNet-121": ("torchvision", "densenet121"),
    "DenseNet-169": ("torchvision", "densenet169"), "DenseNet-201": ("torchvision", "densenet201"),
    "ViT-S/16": ("vit_s", None), "ViT-B/16": ("torchvision", "vit_b_16"), "ViT-L/16": ("torchvision", "vit_l_16"),
    "LLaMA-1.1B (meta)": ("llama", 22),
}
QUICK = {"ResNet-18": MODELS["ResNet-18"], "ResNet-50": MODELS["ResNet-50"], "ViT-S/16": MODELS["ViT-S/16"],
         "LLaMA, 2 layers (meta)": ("llama", 2)}
SIDE, TOKENS, REPEATS = 224, 128, 3


def _vit_s() -> torch.nn.Module:
    from torchvision.models.vision_transformer import VisionTransformer

    return VisionTransformer(image_size=SIDE, patch_size=16, num_layers=12, num_heads=6, hidden_dim=384,
                             mlp_dim=1536, num_classes=1000)


def _llama(layers: int) -> torch.nn.Module:
    import transformers

    config = transformers.LlamaConfig(vocab_size=32000, hidden_size=2048, intermediate_size=5632,
                                      num_hidden_layers=layers, num_attention_heads=32, num_key_value_heads=4,
                                      max_position_embeddings=2048)
    with torch.device("meta"):
        return transformers.LlamaForCausalLM(config)


def build(kind: str, arg: Any) -> tuple[torch.nn.Module, Any]:
    """The model (real CPU tensors, seeded; LLaMA: on meta) and its example input."""
    if kind == "llama":
        return _llama(arg), torch.zeros(1, TOKENS, dtype=torch.long, device="meta")
    import torchvision

    with torch.device("meta"):
        model = _vit_s() if kind == "vit_s" else torchvision.models.get_model(arg, num_classes=1000)
    model = model.to_empty(device="cpu").eval()
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            p.uniform_(-0.1, 0.1, generator=generator)
        for b in model.buffers():
            b.fill_(1)
    return model, torch.randn(1, 3, SIDE, SIDE, generator=generator)


def _run(kind: str, model: torch.nn.Module, x: Any) -> tuple[float, float, Any]:
    """Build + 50 % step on ``model``: (build s, step s, pruner)."""
    from prunable import Pruner, WeightNorm

    criterion = "random" if kind == "llama" else WeightNorm()
    build_s, pruner = timed(lambda: Pruner(model, x, criterion=criterion))
    step_s, _ = timed(lambda: pruner.prune(pruner.plan(0.5, scope="layer")))
    return build_s, step_s, pruner


def worker(label: str, quick: bool) -> dict[str, Any]:
    """One model's measurements, in this (fresh) process."""
    from prunable import count_flops, count_params

    common.setup(0)
    warnings.filterwarnings("ignore")
    kind, arg = (QUICK if quick else MODELS)[label]
    model, x = build(kind, arg)
    info = {"params": count_params(model), "flops": count_flops(model, x),
            "modules": sum(1 for m in model.modules() if next(m.parameters(recurse=False), None) is not None)}
    with common.PeakRSS() as mem:
        build_s, step_s, pruner = _run(kind, model, x)
    info.update(groups=len(pruner.groups), params_after=count_params(model))
    del pruner, model
    builds, steps = [build_s], [step_s]
    while len(builds) < REPEATS:
        b, s, _ = _run(kind, *build(kind, arg))
        builds.append(b)
        steps.append(s)
    return {**info, "build": builds, "step": steps, "peak": mem.peak, "added": mem.delta, "method": mem.method,
            "meta": kind == "llama"}


def fit(xs: list[float], ys: list[float]) -> tuple[float, float, float]:
    """Least squares ``y = a + b·x``: (a, b, R²)."""
    mx, my = statistics.fmean(xs), statistics.fmean(ys)
    sxx = sum((x - mx) ** 2 for x in xs)
    b = sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sxx if sxx else 0.0
    a = my - b * mx
    ss = sum((y - my) ** 2 for y in ys)
    r2 = 1 - sum((y - a - b * x) ** 2 for x, y in zip(xs, ys)) / ss if ss else 1.0
    return a, b, r2


def _total(r: dict[str, Any]) -> float:
    return statistics.median(b + s for b, s in zip(r["build"], r["step"]))


def _fits(results: dict[str, dict[str, Any]]) -> list[str]:
    """Least-squares lines of total time against params: all real-weight rows, then each family of 3+."""
    real = {label: r for label, r in results.items() if "error" not in r and not r["meta"]}
    families: dict[str, list[dict[str, Any]]] = {"all real-weight rows": list(real.values())}
    for label, r in real.items():
        families.setdefault(label.split("-")[0], []).append(r)
    out = []
    for name, rows in families.items():
        if len(rows) >= 3 and (name == "all real-weight rows" or len(rows) < len(real)):
            a, b, r2 = fit([r["params"] / 1e6 for r in rows], [_total(r) for r in rows])
            am, bm, r2m = fit([float(r["modules"]) for r in rows], [_total(r) for r in rows])
            out.append(f"- {name} ({len(rows)}): total time = {_line(a, b)} × M params (R² = {r2:.2f}); "
                       f"= {_line(am, bm)} × modules with parameters (R² = {r2m:.2f})")
    if out:
        out = ["Least-squares fits of total time (build + step); the meta row is left out (no weights are cut):",
               "", *out, ""]
    return out


def _line(a: float, b: float) -> str:
    """``a s ± |b| ms`` for a fitted line (seconds, seconds per unit)."""
    return f"{a:.2f} s {'+' if b >= 0 else '−'} {abs(b) * 1e3:.2f} ms"


def _runs(times: list[float]) -> str:
    return fmt_runs(Runs(tuple(times)))


def _row(label: str, r: dict[str, Any]) -> list[str]:
    if "error" in r:
        return [label, "failed", "", "", "", "", "", "", "", r["error"]]
    total = _total(r)
    mp = r["params"] / 1e6
    where = "meta, no weights" if r["meta"] else "real weights"
    return [label, f"{mp:.1f} M", f"{r['flops'] / 1e9:.1f} G", str(r["modules"]), _runs(r["build"]),
            _runs(r["step"]), f"{r['added']:.0f} MiB ({r['peak']:.0f})", f"{total / mp * 1e3:.1f} ms",
            f"{r['groups']} groups, {r['params_after'] / r['params']:.0%} params left", where]


def main(quick: bool = False) -> str:
    common.setup(0)
    models = QUICK if quick else MODELS
    results = {}
    for label in models:
        try:
            args = ["--worker", label] + ["--quick"] * quick
            results[label] = common.run_worker(__file__, args, timeout=600)
        except Exception as exc:  # noqa: BLE001 - reported in the table
            results[label] = {"error": short_error(exc).replace("\n", " ")[-120:]}
    headers = ["model", "params", "FLOPs", "modules", "build", "step", "added memory (process peak)",
               "time per M params", "result", "weights"]
    table = markdown_table(headers, [_row(label, r) for label, r in results.items()])
    ok = [r for r in results.values() if "error" not in r]
    lines = [table, "", *_fits(results)]
    method = ok[0]["method"] if ok else "—"
    lines.append(f"Memory: {method}, in MiB; one fresh process per model.")
    return "\n".join(lines)


if __name__ == "__main__":
    if "--worker" in sys.argv:
        parser = argparse.ArgumentParser()
        parser.add_argument("--worker")
        parser.add_argument("--quick", action="store_true")
        args = parser.parse_args()
        print(json.dumps(worker(args.worker, args.quick)))
    else:
        common.run_script(main, __doc__)
