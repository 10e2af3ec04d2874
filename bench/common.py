"""Helpers shared by the benchmark scripts: setup, timing, memory, data, training, pruning.

Every script in ``bench/`` imports this module (``bench/`` is on ``sys.path``
when a script runs as ``python bench/<name>.py``). Nothing here asserts on a
measurement; everything returns numbers for the tables.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import datetime
import json
import os
import platform
import random
import resource
import statistics
import subprocess
import sys
import time
import warnings
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

BENCH_DIR = Path(__file__).resolve().parent
REPO = BENCH_DIR.parent
THREADS = 2


def _passive_openmp() -> None:
    """Re-run a bench script with ``OMP_WAIT_POLICY=PASSIVE`` unless the user chose a policy.

    With the default (spinning) policy, two OpenMP threads on a machine that
    other processes also load wait for each other at every barrier: a small
    CNN's training step measured 0.54 s with 2 threads against 0.07 s with 1.
    Passive waiting removes that pathology and costs little on an idle
    machine. The variable is read when the OpenMP runtime loads, hence the re-exec.
    """
    if "OMP_WAIT_POLICY" in os.environ or not sys.argv or not sys.argv[0]:
        return
    script = Path(sys.argv[0]).resolve()
    if script.parent == BENCH_DIR and script.suffix == ".py":
        os.environ["OMP_WAIT_POLICY"] = "PASSIVE"
        os.execv(sys.executable, [sys.executable, *sys.argv])


_passive_openmp()

Data = tuple[torch.Tensor, torch.Tensor]


# -- setup and command line ---------------------------------------------------
def setup(seed: int = 0) -> None:
    """Two intra-op threads, every generator seeded, Python warnings of the libraries silenced."""
    torch.set_num_threads(THREADS)
    seed_all(seed)
    warnings.filterwarnings("ignore")


def seed_all(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def parse_args(doc: str | None) -> argparse.Namespace:
    """``--quick``: a smaller, faster version of the table."""
    parser = argparse.ArgumentParser(description=(doc or "").strip().splitlines()[0] if doc else None)
    parser.add_argument("--quick", action="store_true", help="smaller configuration, for a smoke run")
    return parser.parse_args()


def run_script(main: Callable[..., str], doc: str | None) -> None:
    """Entry point of every script: parse ``--quick``, run ``main``, print its markdown and wall time."""
    args = parse_args(doc)
    start = time.perf_counter()
    print(main(quick=args.quick))
    print(f"\n_{Path(sys.argv[0]).name}: {time.perf_counter() - start:.0f} s wall time_", file=sys.stderr)


# -- formatting ----------------------------------------------------------------
def markdown_table(headers: Sequence[str], rows: Iterable[Sequence[Any]]) -> str:
    """A GitHub markdown table; cells are ``str()``-ed, ``|`` inside a cell escaped."""
    cell = lambda c: str(c).replace("|", "\\|")  # noqa: E731
    lines = ["| " + " | ".join(map(cell, headers)) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    lines += ["| " + " | ".join(cell(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def fmt_seconds(x: float | None) -> str:
    if x is None or x != x:
        return "—"
    return f"{x * 1e3:.1f} ms" if x < 1 else f"{x:.2f} s"


def fmt_ratio(num: float | None, den: float | None) -> str:
    if num is None or den is None or num != num or den != den or den == 0:
        return "—"
    return f"{num / den:.2f}×"


def fmt_mean_std(values: Sequence[float], scale: float = 1.0, digits: int = 1) -> str:
    vals = [v * scale for v in values if v == v]
    if not vals:
        return "—"
    std = statistics.stdev(vals) if len(vals) > 1 else 0.0
    return f"{statistics.mean(vals):.{digits}f} ± {std:.{digits}f}"


def short_error(exc: BaseException) -> str:
    """``ExceptionType: first line of the message`` (truncated), for a table cell."""
    text = str(exc).splitlines()[0] if str(exc) else ""
    return f"{type(exc).__name__}: {text[:80]}" if text else type(exc).__name__


# -- timing ----------------------------------------------------------------------
#: timed runs behind every time shown in a table (each cell: their median and range)
REPEATS = 3


def timed(fn: Callable[[], Any]) -> tuple[float, Any]:
    """Wall time of one call and its result."""
    start = time.perf_counter()
    result = fn()
    return time.perf_counter() - start, result


@dataclasses.dataclass(frozen=True)
class Runs:
    """Wall times (seconds) of repeated runs of one measurement; a cell shows the median and the range."""

    times: tuple[float, ...]

    @property
    def median(self) -> float:
        return statistics.median(self.times) if self.times else float("nan")

    def __add__(self, other: "Runs") -> "Runs":
        """Run-by-run sum (build + step of the same repetition)."""
        return Runs(tuple(a + b for a, b in zip(self.times, other.times)))


def fmt_runs(runs: Runs | None) -> str:
    """``median (min–max)`` of the runs, or ``x (1 run)``: e.g. ``12.3 ms (11.9–13.0)``."""
    if runs is None or not runs.times:
        return "—"
    if len(runs.times) == 1:
        return f"{fmt_seconds(runs.times[0])} (1 run)"
    low, high = min(runs.times), max(runs.times)
    unit = (lambda v: f"{v * 1e3:.1f}") if runs.median < 1 else (lambda v: f"{v:.2f}")  # noqa: E731
    return f"{fmt_seconds(runs.median)} ({unit(low)}–{unit(high)})"


def fmt_ratio_runs(num: Runs | None, den: Runs | None) -> str:
    """Median and range of the run-by-run ratios ``num[i] / den[i]`` (runs interleaved).

    E.g. ``0.53× (0.50–0.57)``; ``(1 run)`` when there is a single pair.
    """
    if num is None or den is None or not num.times or not den.times:
        return "—"
    ratios = [a / b for a, b in zip(num.times, den.times) if b > 0]
    if not ratios:
        return "—"
    if len(ratios) == 1:
        return f"{ratios[0]:.2f}× (1 run)"
    return f"{statistics.median(ratios):.2f}× ({min(ratios):.2f}–{max(ratios):.2f})"


def interleaved_runs(fns: Sequence[Callable[[], Any]], warmup: int = 2, repeats: int = 7) -> list[Runs]:
    """Wall times of each function, their calls interleaved (A, B, A, B, …) after warm-up.

    Interleaving exposes every function to the same background load, so the
    ratios between them (run by run, :func:`fmt_ratio_runs`) stay meaningful on a shared machine.
    """
    for _ in range(warmup):
        for fn in fns:
            fn()
    times: list[list[float]] = [[] for _ in fns]
    for _ in range(max(repeats, REPEATS)):
        for i, fn in enumerate(fns):
            times[i].append(timed(fn)[0])
    return [Runs(tuple(t)) for t in times]


def interleaved_medians(fns: Sequence[Callable[[], Any]], warmup: int = 2, repeats: int = 7) -> list[float]:
    """The medians of :func:`interleaved_runs`."""
    return [r.median for r in interleaved_runs(fns, warmup, repeats)]


@torch.no_grad()
def paired_latency_runs(models: Sequence[nn.Module], x: torch.Tensor, warmup: int = 2,
                        repeats: int = 7) -> list[Runs]:
    """Eval-mode forward times of each model on ``x``, the models' runs interleaved."""
    for m in models:
        m.eval()
    return interleaved_runs([lambda m=m: m(x) for m in models], warmup, repeats)


def paired_latency(models: Sequence[nn.Module], x: torch.Tensor, warmup: int = 2, repeats: int = 7) -> list[float]:
    """Median eval-mode forward time of each model on ``x``, the models' runs interleaved."""
    return [r.median for r in paired_latency_runs(models, x, warmup, repeats)]


# -- memory: a fresh subprocess per configuration ----------------------------------
def max_rss_mib() -> float:
    """This process's peak resident set size so far (``getrusage``; KiB on Linux)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _status_kib(field: str) -> float | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return float(line.split()[1])
    except OSError:
        pass
    return None


class PeakRSS:
    """Peak resident memory of a code block, in MiB, in this process.

    On Linux the kernel's high-water mark (``VmHWM``) is reset on entry by
    writing ``5`` to ``/proc/self/clear_refs``, so ``peak`` is the block's own
    peak and ``delta`` = peak − resident memory on entry (what the block
    added). Where that is unavailable, ``getrusage`` ``ru_maxrss`` (the
    process's lifetime peak) is used and ``method`` says so. Run it in a fresh
    subprocess per configuration (:func:`run_worker`) so blocks cannot see
    each other's allocations.
    """

    def __enter__(self) -> "PeakRSS":
        try:
            Path("/proc/self/clear_refs").write_text("5")
            self.method = "VmHWM after clear_refs"
        except OSError:
            self.method = "ru_maxrss (lifetime peak)"
        self.start = (_status_kib("VmRSS") or 0) / 1024
        return self

    def __exit__(self, *exc: Any) -> None:
        hwm = _status_kib("VmHWM") if self.method.startswith("VmHWM") else None
        self.peak = hwm / 1024 if hwm is not None else max_rss_mib()
        self.delta = self.peak - self.start


def run_worker(script: str | Path, args: Sequence[str], timeout: float = 900) -> dict:
    """Run ``python <script> <args>`` in a fresh interpreter; it prints one JSON line last.

    A fresh process per configuration makes ``ru_maxrss`` (a high-water mark)
    the peak of that configuration alone.
    """
    cmd = [sys.executable, str(script), *args]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=REPO)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
    if proc.returncode != 0 or not lines:
        raise RuntimeError(f"{' '.join(cmd)} failed ({proc.returncode}): {proc.stderr[-2000:]}")
    return json.loads(lines[-1])


# -- machine -------------------------------------------------------------------------
def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine_info() -> dict[str, str]:
    import importlib.metadata as md

    def version(name: str) -> str:
        try:
            return md.version(name)
        except md.PackageNotFoundError:
            return "not installed"

    return {
        "date": datetime.datetime.now().astimezone().strftime("%Y-%m-%d %H:%M %Z"),
        "load average (1, 5, 15 min)": ", ".join(f"{v:.1f}" for v in os.getloadavg()),
        "cpu": cpu_model(),
        "cores (os.cpu_count)": str(os.cpu_count()),
        "torch threads": str(THREADS),
        "OMP_WAIT_POLICY": os.environ.get("OMP_WAIT_POLICY", "(default)"),
        "python": platform.python_version(),
        "os": f"{platform.system()} {platform.release()}",
        "torch": torch.__version__,
        "torchvision": version("torchvision"),
        "torch-pruning": version("torch-pruning"),
        "prunable": version("prunable"),
        "scikit-learn": version("scikit-learn"),
    }


# -- data ---------------------------------------------------------------------------------
def _split(n: int, test_fraction: float, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    cut = int(n * (1 - test_fraction))
    return order[:cut], order[cut:]


def digits(size: int = 32, test_fraction: float = 0.3, split_seed: int = 0) -> tuple[Data, Data]:
    """scikit-learn's ``load_digits`` (1797 real 8×8 handwritten digits) upsampled to ``size``.

    Pixels are scaled to [0, 1] and bilinearly upsampled; the split is fixed by ``split_seed``.
    """
    from sklearn.datasets import load_digits

    raw = load_digits()
    x = torch.tensor(raw.images, dtype=torch.float32).unsqueeze(1) / 16.0
    x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False)
    y = torch.tensor(raw.target, dtype=torch.long)
    train, test = _split(len(y), test_fraction, split_seed)
    return (x[train], y[train]), (x[test], y[test])


def japanese(size: int = 32, train_per_class: int = 30, test_per_class: int = 10) -> tuple[Data, Data]:
    """The built-in Japanese characters (92 kana), train and test splits as tensors."""
    from prunable.data import JapaneseCharacters

    def tensors(split: str, n: int) -> Data:
        ds = JapaneseCharacters(split, size=size, samples_per_class=n)
        return ds.data.float() / 255.0, ds.targets.long()

    return tensors("train", train_per_class), tensors("test", test_per_class)


def batches(data: Data, batch_size: int, generator: torch.Generator | None = None) -> Iterator[Data]:
    """One epoch of minibatches, shuffled when a generator is given."""
    x, y = data
    order = torch.randperm(len(y), generator=generator) if generator is not None else torch.arange(len(y))
    for i in range(0, len(y), batch_size):
        idx = order[i:i + batch_size]
        yield x[idx], y[idx]


def endless(data: Data, batch_size: int, generator: torch.Generator) -> Iterator[Data]:
    """Shuffled minibatches forever (a new order every epoch)."""
    while True:
        yield from batches(data, batch_size, generator)


# -- models and training ---------------------------------------------------------------------
def small_cnn(channels: Sequence[int], num_classes: int, in_channels: int = 1, size: int = 32) -> nn.Sequential:
    """``[Conv3×3 → BN → ReLU → MaxPool2]`` per entry of ``channels``, then one Linear."""
    layers: list[nn.Module] = []
    c = in_channels
    for width in channels:
        layers += [nn.Conv2d(c, width, 3, padding=1, bias=False), nn.BatchNorm2d(width), nn.ReLU(), nn.MaxPool2d(2)]
        c, size = width, size // 2
    layers += [nn.Flatten(), nn.Linear(c * size * size, num_classes)]
    return nn.Sequential(*layers)


def sgd(model: nn.Module, lr: float = 0.05) -> torch.optim.Optimizer:
    return torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9, weight_decay=5e-4)


def train_steps(model: nn.Module, stream: Iterator[Data], steps: int, optimizer: torch.optim.Optimizer) -> float:
    """``steps`` SGD minibatches in train mode; the last loss."""
    model.train()
    loss = torch.zeros(())
    for _ in range(steps):
        x, y = next(stream)
        optimizer.zero_grad(set_to_none=True)
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        optimizer.step()
    return float(loss)


def gradient_passes(model: nn.Module, stream: Iterator[Data], steps: int, zero_first: bool = True) -> None:
    """Forward + backward on ``steps`` minibatches, gradients summed in ``.grad``, no update.

    The data-driven criteria (ours inside ``Pruner.estimate()``, Torch-Pruning's
    Taylor reading ``.grad``) collect their statistics from these passes.
    """
    model.train()
    if zero_first:
        model.zero_grad(set_to_none=True)
    for _ in range(steps):
        x, y = next(stream)
        F.cross_entropy(model(x), y).backward()


@torch.no_grad()
def accuracy(model: nn.Module, data: Data, batch_size: int = 512) -> float:
    model.eval()
    correct = 0
    for x, y in batches(data, batch_size):
        correct += int((model(x).argmax(1) == y).sum())
    return correct / len(data[1])


def train_epochs(model: nn.Module, data: Data, epochs: int, batch_size: int, seed: int, lr: float = 0.05) -> None:
    """Plain training with cosine learning-rate decay (used for the base models)."""
    gen = torch.Generator().manual_seed(seed)
    opt = sgd(model, lr)
    steps = epochs * -(-len(data[1]) // batch_size)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps)
    model.train()
    for _ in range(epochs):
        for x, y in batches(data, batch_size, gen):
            opt.zero_grad(set_to_none=True)
            F.cross_entropy(model(x), y).backward()
            opt.step()
            sched.step()


# -- pruning to a FLOPs target ------------------------------------------------------------------
def ours_plan_for_flops(pruner: Any, target_flops: float) -> Any:
    """The smallest global plan ``pruner.plan(n)`` whose result has at most ``target_flops``.

    Bisection on ``n`` (the plan for ``n`` removes a superset of the plan for
    fewer channels). Returns the plan with the most FLOPs that is still at or
    under the target, or the largest possible plan if the target is unreachable.
    """
    from prunable import Plan

    hi = pruner.available  # every channel the constraints (min_channels, round_to, max_ratio) let go
    cache: dict[int, tuple[Any, int]] = {}

    def evaluate(n: int) -> tuple[Any, int]:
        if n not in cache:
            plan = pruner.plan(n)
            cache[n] = (plan, pruner.measure(plan if len(plan) else None)["flops"])
        return cache[n]

    if hi < 1 or evaluate(hi)[1] > target_flops:
        return evaluate(hi)[0] if hi >= 1 else Plan({})
    lo = 0
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if evaluate(mid)[1] <= target_flops:
            hi = mid
        else:
            lo = mid
    return evaluate(hi)[0]


def uniform_plan(pruner: Any, fraction: float) -> Any:
    """``pruner.plan(fraction, scope="layer")``: that fraction of every group's channels, lowest scores first.

    Per-layer ratios like Torch-Pruning's default; ``Pruner.plan`` honours
    ``min_channels`` and ``round_to``.
    """
    return pruner.plan(fraction, scope="layer") if fraction > 0 else {}


def uniform_plan_for_flops(pruner: Any, target_flops: float, iterations: int = 10) -> Any:
    """:func:`uniform_plan` with the smallest fraction whose FLOPs are at most ``target_flops`` (bisection)."""
    lo, hi = 0.0, 0.95
    best = uniform_plan(pruner, hi)
    for _ in range(iterations):
        mid = (lo + hi) / 2
        plan = uniform_plan(pruner, mid)
        if len(plan) and pruner.measure(plan)["flops"] <= target_flops:
            hi, best = mid, plan
        else:
            lo = mid
    return best


# -- Torch-Pruning ----------------------------------------------------------------------------------
def tp_ignored_layers(model: nn.Module, num_classes: int) -> list[nn.Module]:
    """The classifier (Linear or Conv whose outputs are the ``num_classes`` logits)."""
    return [m for m in model.modules()
            if (isinstance(m, nn.Linear) and m.out_features == num_classes)
            or (isinstance(m, nn.Conv2d) and m.out_channels == num_classes)]


def tp_pruner(model: nn.Module, x: torch.Tensor, importance: Any, ratio: float, num_classes: int,
              **kwargs: Any) -> Any:
    """Torch-Pruning's ``BasePruner`` with the classifier ignored and attention heads declared."""
    import torch_pruning as tp

    heads = {m: m.num_heads for m in model.modules() if isinstance(m, nn.MultiheadAttention)}
    if heads:
        kwargs.setdefault("num_heads", heads)
    return tp.pruner.BasePruner(model, x, importance=importance, pruning_ratio=ratio,
                                ignored_layers=tp_ignored_layers(model, num_classes), **kwargs)


def tp_prune_to_flops(model: nn.Module, x: torch.Tensor, make_importance: Callable[[], Any], target_flops: float,
                      num_classes: int, seed: int = 0, tolerance: float = 0.01, max_trials: int = 8,
                      **kwargs: Any) -> float:
    """Prune ``model`` in place with Torch-Pruning to about ``target_flops``; returns the ratio used.

    Torch-Pruning takes a channel ratio, not a FLOPs target, so the ratio is
    searched on deep copies (a copy gets the ``.grad`` that Taylor importance
    reads; random importance is re-seeded per trial so the final prune repeats
    the chosen trial). Each trial fits ``flops = (1 - ratio)^k`` through its
    result and aims the next trial at the target; the search stops within
    ``tolerance`` (relative) or after ``max_trials``, keeping the trial closest
    to the target among those not above it by more than ``tolerance``.
    """
    import math

    from prunable import count_flops

    base = count_flops(model, x)
    goal = target_flops / base

    def apply(target: nn.Module, ratio: float) -> None:
        with torch.random.fork_rng():
            torch.manual_seed(seed)
            tp_pruner(target, x, make_importance(), ratio, num_classes, **kwargs).step()

    def fraction_at(ratio: float) -> float:
        trial = copy.deepcopy(model)
        for src, dst in zip(model.parameters(), trial.parameters()):
            dst.grad = None if src.grad is None else src.grad.clone()
        apply(trial, ratio)
        return count_flops(trial, x) / base

    tried: dict[float, float] = {}
    ratio = 1 - math.sqrt(goal)
    for _ in range(max_trials):
        tried[ratio] = fraction_at(ratio)
        if abs(tried[ratio] - goal) <= tolerance * goal:
            break
        k = math.log(max(tried[ratio], 1e-9)) / math.log(1 - ratio) if 0 < ratio < 1 else 2.0
        nxt = round(min(0.99, max(1e-3, 1 - goal ** (1 / max(k, 1e-3)))), 6)
        if nxt in tried:
            break
        ratio = nxt
    allowed = {r: f for r, f in tried.items() if f <= goal * (1 + tolerance)} or tried
    best = min(allowed, key=lambda r: abs(allowed[r] - goal))
    apply(model, best)
    return best


@contextmanager
def quiet() -> Iterator[None]:
    """Silence warnings (both libraries warn about skipped layers)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield
