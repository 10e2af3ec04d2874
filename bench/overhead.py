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
- **plain, a second copy**: the plain step again on its own copy of the model
  (an A/A comparison): its ratio to plain shows how small a difference this
  run can resolve; it should read 1.00× with a narrow interval.

The same timing runs on a small ViT (torchvision ``VisionTransformer``:
64×64 images, 8×8 patches, 4 layers, 4 heads, width 192, MLP 768, 10
classes; batch 32), whose estimation hooks sit on the Linear layers and
attention blocks (time only; memory is measured on ResNet-18).

Time: every configuration has its own copy of the model (same initial
weights). After warm-up, each round runs one step of every configuration on
**one torch thread**, then one on two, in an order shuffled every time
(seeded). On one thread the CPU time of the process (``time.process_time``,
user + system time, so page faults count) measures the step's work and
barely depends on what else the machine runs; with two threads it also
counts the threads' waiting, which the load changes. Two threads are what a
user of this bench's setting runs, and there the hooks' small operations
gain less from the second thread than the step does, so the two-thread wall
ratio is shown too. "median step" is the median one-thread wall time with
the range of the rounds; "time vs plain" (one-thread CPU time) and "wall vs
plain, 2 threads" are the median of the round-by-round ratios to the plain
step of the same round, with a 95 % bootstrap confidence interval of that
median in brackets (2000 resamples of the rounds). A ratio whose interval
lies below 1.03 meets a ≤ 1.03× goal; the A/A row shows the resolution.
Memory: each configuration runs again in a fresh Python process (two threads);
the kernel's peak-RSS mark (``VmHWM``) is reset just before the training steps
(``/proc/self/clear_refs``) and read after them, so "peak" excludes imports and
graph building; "added" is peak minus the resident size before the steps.

Run: ``python bench/overhead.py [--quick]``
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import random
import statistics
import sys
import time
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
import torchvision

import common
from common import fmt_ratio, fmt_seconds, markdown_table

CONFIGS = ("plain", "ours", "tp_sum", "tp_every")
#: the timed configurations: CONFIGS and the A/A control (a second plain copy, time only)
TIMED = (*CONFIGS, "plain_again")
LABELS = {
    "plain": "plain training step",
    "ours": "ours: TaylorActivation estimate() on",
    "tp_sum": "TP Taylor: grads summed per step",
    "tp_every": "TP Taylor: importance every step",
    "plain_again": "plain, a second copy (A/A: the resolution)",
}
#: torch threads of the timed steps: one (stable CPU time; see the module docstring), and the bench's two
THREAD_COUNTS = (1, common.THREADS)
#: bootstrap resamples of the rounds for the confidence interval of a median ratio
RESAMPLES = 2000
#: issue #14's goal for the estimation overhead: ours ≤ this × the plain step (CPU time, one thread)
GOAL = 1.03
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

    _setup_plain_again = _setup_plain

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


class Steps:
    """Wall and CPU seconds of one configuration's timed steps, one entry per round."""

    def __init__(self) -> None:
        self.wall: list[float] = []
        self.cpu: list[float] = []

    def run(self, step: Callable[[], None]) -> None:
        wall, cpu = time.perf_counter(), time.process_time()
        step()
        self.cpu.append(time.process_time() - cpu)
        self.wall.append(time.perf_counter() - wall)


def paired_ratio(num: list[float], den: list[float], *, resamples: int = RESAMPLES,
                 seed: int = 0) -> tuple[float, float, float]:
    """Median of the round-by-round ratios ``num[i] / den[i]`` and a 95 % bootstrap CI of that median.

    Example
    -------
    >>> paired_ratio([2.0, 2.2, 1.8], [1.0, 1.1, 0.9])
    (2.0, 2.0, 2.0)
    """
    ratios = [a / b for a, b in zip(num, den) if b > 0]
    if not ratios:
        return float("nan"), float("nan"), float("nan")
    rng = random.Random(seed)
    medians = sorted(statistics.median(rng.choices(ratios, k=len(ratios))) for _ in range(resamples))
    return statistics.median(ratios), medians[int(0.025 * resamples)], medians[int(0.975 * resamples) - 1]


def fmt_paired(num: list[float], den: list[float]) -> str:
    """``1.02× (1.01–1.03)``: :func:`paired_ratio`'s median and 95 % interval."""
    mid, low, high = paired_ratio(num, den)
    return "—" if mid != mid else f"{mid:.2f}× ({low:.2f}–{high:.2f})"


def verdict(num: list[float], den: list[float], goal: float = GOAL) -> str:
    """The goal read off :func:`paired_ratio` to three decimals: met only when the whole interval lies below it.

    Example
    -------
    >>> verdict([1.01, 1.02, 1.015], [1.0, 1.0, 1.0])
    '1.015× (95 % interval 1.010–1.020): the interval lies below 1.03, the ≤ 1.03× goal is met'
    """
    mid, low, high = paired_ratio(num, den)
    where = (f"the interval lies below {goal:.2f}, the ≤ {goal:.2f}× goal is met" if high < goal else
             f"the interval reaches {high:.3f}, the ≤ {goal:.2f}× goal is not shown to be met")
    return f"{mid:.3f}× (95 % interval {low:.3f}–{high:.3f}): {where}"


def time_configs(warmup: int, rounds: int, model: str = RESNET, seed: int = 0) -> dict[str, dict[str, Any]]:
    """Wall and CPU time of every step of every configuration, one step each per round and thread count.

    Each round runs every configuration on each of :data:`THREAD_COUNTS` torch
    threads, the order shuffled every time; the garbage collector is paused
    while steps are timed. ``out[config]["steps"][threads]`` is a :class:`Steps`.
    """
    setups = {c: Setup(c, model) for c in TIMED}
    steps = {c: {t: Steps() for t in THREAD_COUNTS} for c in TIMED}
    order, rng, threads = list(TIMED), random.Random(seed), torch.get_num_threads()
    gc.collect()
    gc.disable()
    try:
        for t in THREAD_COUNTS:
            torch.set_num_threads(t)
            for _ in range(warmup):
                for s in setups.values():
                    s.step()
        for _ in range(rounds):
            for t in THREAD_COUNTS:
                torch.set_num_threads(t)
                rng.shuffle(order)
                for c in order:
                    steps[c][t].run(setups[c].step)
    finally:
        gc.enable()
        torch.set_num_threads(threads)
    out = {}
    for c, s in setups.items():
        finish, _ = common.timed(s.finish)
        s.context.close()
        out[c] = {"steps": steps[c], "finish": finish}
    return out


def _time_cells(timing: dict[str, dict[str, Any]], config: str) -> list[str]:
    """median step (one thread, wall, range), CPU time vs plain (one thread), wall vs plain (two threads)."""
    one, two = THREAD_COUNTS
    s, base = timing[config]["steps"], timing["plain"]["steps"]
    return [common.fmt_runs(common.Runs(tuple(s[one].wall))), fmt_paired(s[one].cpu, base[one].cpu),
            fmt_paired(s[two].wall, base[two].wall)]


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
    warmup, rounds, mem_steps = (1, 3, 3) if quick else (2, 16, 4)
    timing = time_configs(warmup, rounds)
    vit = time_configs(warmup, rounds, VIT)
    memory = {c: common.run_worker(__file__, ["--worker", c, "--steps", str(mem_steps)]) for c in CONFIGS}
    base_m = memory["plain"]
    rows = []
    for c in TIMED:
        m = memory.get(c)
        note = {"ours": f"scores(): {fmt_seconds(timing[c]['finish'])}",
                "tp_sum": f"one importance call at the end: {fmt_seconds(timing[c]['finish'])}"}.get(c, "")
        mem = ([f"{m['peak']:.0f} MiB", fmt_ratio(m["peak"], base_m["peak"]), f"{m['delta']:.0f} MiB",
                fmt_ratio(m["delta"], base_m["delta"])] if m is not None else ["—"] * 4)
        rows.append([LABELS[c], *_time_cells(timing, c), *mem, note])
    time_headers = ["median step", "time vs plain", f"wall vs plain, {THREAD_COUNTS[1]} threads"]
    headers = ["configuration", *time_headers, "peak RSS", "peak vs plain", "added by steps", "added vs plain", "note"]
    table = markdown_table(headers, rows)
    vit_table = markdown_table(["configuration", *time_headers], [[LABELS[c], *_time_cells(vit, c)] for c in TIMED])
    one = THREAD_COUNTS[0]
    goal = "\n".join(f"- {label}, ours vs plain (CPU time, {one} thread): "
                     f"{verdict(t['ours']['steps'][one].cpu, t['plain']['steps'][one].cpu)}"
                     for label, t in ((RESNET, timing), (VIT, vit)))
    return (f"{table}\n\nResNet-18, batch {BATCH}×3×{SIZE}×{SIZE}, {rounds} rounds after {warmup} warm-up. "
            f"\"median step\": wall time on {THREAD_COUNTS[0]} torch thread; \"time vs plain\": CPU time "
            f"(process_time) on {THREAD_COUNTS[0]} thread; \"wall vs plain\": wall time on {THREAD_COUNTS[1]} "
            f"threads; each the median of the round-by-round ratios (in brackets: the 95 % bootstrap interval "
            f"of that median). "
            f"Memory over {mem_steps} steps in a fresh process ({memory['plain']['method']}).\n\n**{VIT}**, "
            f"batch {BATCH}×3×{SIZE}×{SIZE}, time only, same protocol:\n\n{vit_table}\n\n"
            f"The goal (issue #14: ≤ {GOAL:.2f}× a plain step), to three decimals:\n\n{goal}")


if __name__ == "__main__":
    if "--worker" in sys.argv:
        parser = argparse.ArgumentParser()
        parser.add_argument("--worker", choices=CONFIGS)
        parser.add_argument("--steps", type=int, default=5)
        args = parser.parse_args()
        print(json.dumps(worker(args.worker, args.steps)))
    else:
        common.run_script(main, __doc__)
