"""Table 2: cost of importance estimation during training, prunable vs Torch-Pruning.

A torchvision ResNet-18 (10 classes) trains with SGD on a fixed random batch
of 32×3×64×64 on the CPU. A step is ``zero_grad → forward → cross-entropy →
backward → optimizer.step``. Configurations:

- **plain**: the step alone.
- **ours TaylorActivation**: the step inside ``with pruner.estimate():``
  (hooks on every measured activation accumulate the 2017 Taylor score).
- **TP Taylor, grads summed**: Torch-Pruning's ``TaylorImportance`` reads
  ``.grad``; to estimate over many minibatches one sums the gradients after
  every backward (a buffer per parameter) and calls the importance once at
  the end (that one-off call is timed separately, in the note column).
- **TP Taylor, every step**: ``TaylorImportance`` called on every group after
  every backward and summed (a per-step accumulation like ours).

The same timing runs on a small ViT (torchvision ``VisionTransformer``:
64×64 images, 8×8 patches, 4 layers, 4 heads, width 192, MLP 768, 10
classes; batch 32), whose estimation hooks sit on the Linear layers and
attention blocks (time only; memory is measured on ResNet-18).

Time: every configuration has its own copy of the model (same initial
weights); steps are interleaved round-robin after warm-up; the median step
time is reported with the range of the runs, and "time vs plain" is the median
(range) of the step-by-step ratios to the plain step of the same round.
Memory: each configuration runs again in a fresh Python process; the kernel's
peak-RSS mark (``VmHWM``) is reset just before the training steps
(``/proc/self/clear_refs``) and read after them, so "peak" excludes imports and
graph building; "added" is peak minus the resident size before the steps.

Run: ``python bench/overhead.py [--quick]``
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
import torchvision

import common
from common import fmt_ratio, fmt_seconds, markdown_table

CONFIGS = ("plain", "ours", "tp_sum", "tp_every")
LABELS = {
    "plain": "plain training step",
    "ours": "ours: TaylorActivation estimate() on",
    "tp_sum": "TP Taylor: grads summed per step",
    "tp_every": "TP Taylor: importance every step",
}
BATCH, SIZE, CLASSES = 32, 64, 10
#: model label → builder (random weights; seeded by :class:`Setup`)
MODELS: dict[str, Callable[[], torch.nn.Module]] = {
    "ResNet-18": lambda: torchvision.models.resnet18(num_classes=CLASSES),
    "ViT (64², patch 8, 4×192)": lambda: torchvision.models.VisionTransformer(
        image_size=SIZE, patch_size=8, num_layers=4, num_heads=4, hidden_dim=192, mlp_dim=768,
        num_classes=CLASSES),
}
RESNET, VIT = tuple(MODELS)


class Setup:
    """One configuration: its own model, optimizer, and per-step extra work."""

    def __init__(self, config: str, model: str = RESNET) -> None:
        common.seed_all(0)
        self.model = MODELS[model]()
        gen = torch.Generator().manual_seed(1)
        self.x = torch.randn(BATCH, 3, SIZE, SIZE, generator=gen)
        self.y = torch.randint(0, CLASSES, (BATCH,), generator=gen)
        self.opt = torch.optim.SGD(self.model.parameters(), lr=0.01, momentum=0.9)
        self.after_backward: Callable[[], None] = lambda: None
        self.finish: Callable[[], Any] = lambda: None
        self.context = contextlib.ExitStack()
        getattr(self, f"_setup_{config}")()

    def _setup_plain(self) -> None:
        pass

    def _setup_ours(self) -> None:
        from prunable import Pruner, TaylorActivation

        with common.quiet():
            self.pruner = Pruner(self.model, self.x[:1], criterion=TaylorActivation())
        self.context.enter_context(self.pruner.estimate())
        self.finish = self.pruner.scores

    def _tp_groups(self) -> tuple[Any, list]:
        import torch_pruning as tp

        with common.quiet():
            pruner = common.tp_pruner(self.model, self.x[:1], tp.importance.TaylorImportance(), 0.5, CLASSES)
        groups = list(pruner.DG.get_all_groups(ignored_layers=pruner.ignored_layers,
                                               root_module_types=pruner.root_module_types))
        return tp.importance.TaylorImportance(), groups

    def _setup_tp_sum(self) -> None:
        imp, groups = self._tp_groups()
        params = [p for p in self.model.parameters() if p.requires_grad]
        sums = [torch.zeros_like(p) for p in params]

        def accumulate() -> None:
            for p, s in zip(params, sums):
                s.add_(p.grad)

        def finish() -> list:
            for p, s in zip(params, sums):
                p.grad = s
            return [imp(g) for g in groups]

        self.after_backward, self.finish = accumulate, finish

    def _setup_tp_every(self) -> None:
        imp, groups = self._tp_groups()
        totals: list[Any] = [None] * len(groups)

        def accumulate() -> None:
            for i, g in enumerate(groups):
                score = imp(g)
                if score is not None:
                    totals[i] = score if totals[i] is None else totals[i] + score

        self.after_backward, self.finish = accumulate, lambda: totals

    def step(self) -> None:
        self.opt.zero_grad(set_to_none=True)
        F.cross_entropy(self.model(self.x), self.y).backward()
        self.after_backward()
        self.opt.step()


def time_configs(warmup: int, repeats: int, model: str = RESNET) -> dict[str, dict[str, Any]]:
    """Step times per configuration (:class:`common.Runs`), steps interleaved round-robin."""
    setups = {c: Setup(c, model) for c in CONFIGS}
    runs = common.interleaved_runs([s.step for s in setups.values()], warmup, repeats)
    out = {}
    for (c, s), step in zip(setups.items(), runs):
        finish, _ = common.timed(s.finish)
        s.context.close()
        out[c] = {"step": step, "finish": finish}
    return out


def worker(config: str, steps: int) -> dict[str, float]:
    """Peak memory of ``steps`` training steps of one configuration (run in a fresh process)."""
    common.setup(0)
    setup = Setup(config)
    with common.PeakRSS() as mem:
        for _ in range(steps):
            setup.step()
        setup.finish()
    setup.context.close()
    return {"peak": mem.peak, "delta": mem.delta, "method": mem.method}


def main(quick: bool = False) -> str:
    common.setup(0)
    warmup, repeats, mem_steps = (2, 5, 3) if quick else (2, 11, 4)
    timing = time_configs(warmup, repeats)
    vit = time_configs(warmup, repeats, VIT)
    memory = {c: common.run_worker(__file__, ["--worker", c, "--steps", str(mem_steps)]) for c in CONFIGS}
    base_t, base_m = timing["plain"]["step"], memory["plain"]
    rows = []
    for c in CONFIGS:
        t, m = timing[c], memory[c]
        note = {"ours": f"scores(): {fmt_seconds(t['finish'])}",
                "tp_sum": f"one importance call at the end: {fmt_seconds(t['finish'])}"}.get(c, "")
        rows.append([LABELS[c], common.fmt_runs(t["step"]), common.fmt_ratio_runs(t["step"], base_t),
                     f"{m['peak']:.0f} MiB", fmt_ratio(m["peak"], base_m["peak"]),
                     f"{m['delta']:.0f} MiB", fmt_ratio(m["delta"], base_m["delta"]), note])
    headers = ["configuration", "median step", "time vs plain", "peak RSS", "peak vs plain",
               "added by steps", "added vs plain", "note"]
    table = markdown_table(headers, rows)
    vit_base = vit["plain"]["step"]
    vit_rows = [[LABELS[c], common.fmt_runs(vit[c]["step"]), common.fmt_ratio_runs(vit[c]["step"], vit_base)]
                for c in CONFIGS]
    vit_table = markdown_table(["configuration", "median step", "time vs plain"], vit_rows)
    return (f"{table}\n\nResNet-18, batch {BATCH}×3×{SIZE}×{SIZE}, {repeats} timed steps per configuration "
            f"(median and range, after {warmup} warm-up), memory over {mem_steps} steps in a fresh process "
            f"({memory['plain']['method']}).\n\n**{VIT}**, batch {BATCH}×3×{SIZE}×{SIZE}, time only, "
            f"same protocol:\n\n{vit_table}")


if __name__ == "__main__":
    if "--worker" in sys.argv:
        parser = argparse.ArgumentParser()
        parser.add_argument("--worker", choices=CONFIGS)
        parser.add_argument("--steps", type=int, default=5)
        args = parser.parse_args()
        print(json.dumps(worker(args.worker, args.steps)))
    else:
        common.run_script(main, __doc__)
