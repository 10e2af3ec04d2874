"""``prunable demo``: train, prune and fine-tune a CharNet on built-in Japanese characters.

The story of the seed's capstone, on data we ship: a CharNet learns the 92
kana of :class:`~prunable.data.JapaneseCharacters`, then :class:`~prunable.Pruner`
removes channels, ranked by the Taylor criterion of Molchanov et al. (2017)
with their FLOPs regularisation, a few at a time with a few training batches
between steps (the hidden Linear layer is pruned too, so the classifier does
not end up dominating the model), until the FLOPs are at most ``flops`` times
the original; a short fine-tuning follows. Every stage is measured: test
accuracy, parameters, FLOPs, CPU latency (median, batch 1 and 32) and size on
disk.

The default model is sized for a 2-core CPU (see :data:`DEFAULT`): 32×32
inputs and ``config=(32, "M", 64, "M", 128, "M", 256, "M")``, ``hidden=256``
instead of the capstone's 96×96 and ``(96, ..., 384)``, ``hidden=1024`` —
kana at 32×32 are still easy to tell apart.

Output folder: ``results.md`` (the table), ``results.json``, ``pruning.png``
(accuracy vs FLOPs over the pruning steps, channels per layer before and
after), ``baseline.pt`` and ``pruned.pt`` (:func:`prunable.io.save` files).

Example
-------
>>> result = run_demo("demo-out", quick=True)      # doctest: +SKIP
>>> print(result.table)                            # doctest: +SKIP
"""

from __future__ import annotations

import dataclasses
import io as _io
import json
import math
import time
import types
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from . import io
from .errors import PruningValueError
from .flops import count_flops, count_params, measure_latency
from .importance import (
    APoZ, BNScale, Criterion, MeanActivation, Random, TaylorActivation, TaylorBN, TaylorWeight, WeightNorm,
)
from .models import CharNet
from .pruner import Pruner

__all__ = ["CRITERIA", "DemoSettings", "DEFAULT", "QUICK", "DemoResult", "make_criterion", "run_demo"]

#: ``--criterion`` names → criterion factories taking the seed.
CRITERIA: types.MappingProxyType[str, Callable[[int], Criterion]] = types.MappingProxyType({
    "taylor": lambda seed: TaylorActivation(),
    "taylor-bn": lambda seed: TaylorBN(),
    "taylor-weight": lambda seed: TaylorWeight(),
    "l1": lambda seed: WeightNorm(1.0),
    "l2": lambda seed: WeightNorm(2.0),
    "bn-scale": lambda seed: BNScale(),
    "mean-activation": lambda seed: MeanActivation(),
    "apoz": lambda seed: APoZ(),
    "random": lambda seed: Random(seed),
})


def make_criterion(name: str, seed: int = 0) -> Criterion:
    """The criterion called ``name`` (a key of :data:`CRITERIA`).

    Example
    -------
    >>> type(make_criterion("taylor")).__name__
    'TaylorActivation'
    """
    if name not in CRITERIA:
        raise PruningValueError(f"unknown criterion {name!r}; choose from {', '.join(CRITERIA)}")
    return CRITERIA[name](seed)


@dataclasses.dataclass(frozen=True)
class DemoSettings:
    """Model, data and schedule of a demo run.

    ``prune_every`` training batches (estimating importance) precede each
    pruning step, which removes ``channels_per_step`` channels globally.

    Example
    -------
    >>> dataclasses.replace(QUICK, epochs=1).epochs
    1
    """

    size: int = 32
    config: tuple[int | str, ...] = (32, "M", 64, "M", 128, "M", 256, "M")
    hidden: int = 256
    classes: str = "kana"
    train_per_class: int = 60
    eval_per_class: int = 20
    batch_size: int = 64
    epochs: int = 6
    lr: float = 0.1
    prune_lr: float = 0.01
    prune_every: int = 10
    channels_per_step: int = 8
    flops_regularization: float = 1e-3
    finetune_epochs: int = 3
    finetune_lr: float = 0.02
    latency_repeats: int = 30


#: The default run: ≤ 10 minutes on 2 CPU cores.
DEFAULT = DemoSettings()
#: ``--quick``: a smoke run of well under 2 minutes.
QUICK = DemoSettings(
    config=(16, "M", 32, "M", 64, "M", 128, "M"), hidden=128, train_per_class=20, eval_per_class=5,
    epochs=3, prune_every=4, channels_per_step=16, finetune_epochs=1, latency_repeats=10,
)


@dataclasses.dataclass
class DemoResult:
    """What :func:`run_demo` measured and wrote."""

    rows: list[dict[str, Any]]
    steps: list[dict[str, float]]
    table: str
    wall_time: float
    files: dict[str, Path]
    accuracy: float


@dataclasses.dataclass
class _Data:
    train: tuple[torch.Tensor, torch.Tensor]
    val: tuple[torch.Tensor, torch.Tensor]
    test: tuple[torch.Tensor, torch.Tensor]
    num_classes: int


def _load_data(s: DemoSettings, seed: int, root: str | Path | None) -> _Data:
    from .data import JapaneseCharacters

    def split(name: str, n: int) -> tuple[torch.Tensor, torch.Tensor]:
        ds = JapaneseCharacters(name, s.classes, s.size, n, seed, root)
        return ds.data.float().div_(255), ds.targets

    train = JapaneseCharacters("train", s.classes, s.size, s.train_per_class, seed, root)
    return _Data((train.data.float().div_(255), train.targets), split("val", s.eval_per_class),
                 split("test", s.eval_per_class), train.num_classes)


def _batches(data: tuple[torch.Tensor, torch.Tensor], batch_size: int,
             generator: torch.Generator) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Shuffled minibatches, epoch after epoch, forever."""
    x, y = data
    while True:
        order = torch.randperm(len(x), generator=generator)
        for start in range(0, len(x) - batch_size + 1, batch_size):
            idx = order[start:start + batch_size]
            yield x[idx], y[idx]


def _train_step(model: nn.Module, optimizer: torch.optim.Optimizer, x: torch.Tensor, y: torch.Tensor) -> float:
    model.train()
    loss = F.cross_entropy(model(x), y, label_smoothing=0.1)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    return float(loss)


def _bar(total: int, desc: str, progress: bool) -> Any:
    try:
        from tqdm.auto import tqdm
    except ImportError:
        progress = False
    if not progress:
        return _NoBar()
    return tqdm(total=total, desc=desc, unit="batch", leave=False, dynamic_ncols=True)


class _NoBar:
    """Stand-in for a tqdm bar when progress bars are off or tqdm is missing."""

    def update(self, n: int = 1) -> None:
        pass

    def set_postfix(self, **kwargs: Any) -> None:
        pass

    def close(self) -> None:
        pass


def _train(model: nn.Module, data: _Data, epochs: int, lr: float, s: DemoSettings,
           generator: torch.Generator, desc: str, progress: bool, one_cycle: bool) -> None:
    """SGD (Nesterov) for ``epochs`` epochs: one-cycle schedule, or cosine decay from ``lr``."""
    steps_per_epoch = max(1, len(data.train[0]) // s.batch_size)
    total = max(1, epochs * steps_per_epoch)
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9, nesterov=True, weight_decay=5e-4)
    if one_cycle:
        sched: Any = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=total, pct_start=0.2)
    else:
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=total)
    batches = _batches(data.train, min(s.batch_size, len(data.train[0])), generator)
    bar = _bar(total, desc, progress)
    for step in range(total):
        loss = _train_step(model, opt, *next(batches))
        sched.step()
        bar.update()
        if step % 10 == 0:
            bar.set_postfix(loss=f"{loss:.3f}")
    bar.close()


@torch.no_grad()
def accuracy(model: nn.Module, data: tuple[torch.Tensor, torch.Tensor], batch_size: int = 500) -> float:
    """Top-1 accuracy of ``model`` in eval mode on ``(images, labels)``; the mode is restored.

    Example
    -------
    >>> net = CharNet(3, config=[4], input_size=8, hidden=8)
    >>> 0.0 <= accuracy(net, (torch.rand(6, 1, 8, 8), torch.arange(6) % 3)) <= 1.0
    True
    """
    was_training = model.training
    model.eval()
    x, y = data
    correct = sum(int((model(x[i:i + batch_size]).argmax(1) == y[i:i + batch_size]).sum())
                  for i in range(0, len(x), batch_size))
    model.train(was_training)
    return correct / max(len(x), 1)


def _eval_flops(model: nn.Module, size: int) -> int:
    was_training = model.training
    model.eval()  # BatchNorm1d refuses a batch of 1 in train mode
    try:
        return count_flops(model, torch.zeros(1, 1, size, size))
    finally:
        model.train(was_training)


def _architecture(s: DemoSettings, num_classes: int) -> dict[str, Any]:
    return {"name": "CharNet", "num_classes": num_classes, "config": list(s.config), "in_channels": 1,
            "input_size": s.size, "hidden": s.hidden}


def _channels(model: nn.Module) -> dict[str, int]:
    """Output channels of every convolution and Linear layer, by name."""
    return {name: m.weight.shape[0] for name, m in model.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))}


def _measure(stage: str, model: nn.Module, data: _Data, s: DemoSettings, saved: Callable[[], int]) -> dict[str, Any]:
    """One row of the results table."""
    x1, x32 = torch.rand(1, 1, s.size, s.size), torch.rand(32, 1, s.size, s.size)
    return {
        "stage": stage,
        "test_accuracy": accuracy(model, data.test),
        "params": count_params(model),
        "flops": _eval_flops(model, s.size),
        "latency_b1_ms": 1e3 * measure_latency(model, x1, warmup=5, repeats=s.latency_repeats),
        "latency_b32_ms": 1e3 * measure_latency(model, x32, warmup=2, repeats=max(3, s.latency_repeats // 3)),
        "size_bytes": saved(),
    }


def _prune(model: nn.Module, data: _Data, s: DemoSettings, criterion: Criterion, target: float,
           generator: torch.Generator, progress: bool) -> tuple[Pruner, list[dict[str, float]]]:
    """Prune to ``target`` × the original FLOPs with training batches between steps.

    Drives ``estimate()``/``step()`` itself (as ``Pruner.prune_to`` does) so that the
    validation accuracy can be measured after each step without the criterion's hooks.
    """
    opt = torch.optim.SGD(model.parameters(), lr=s.prune_lr, momentum=0.9, weight_decay=5e-4)
    example = data.train[0][:2]  # batch 2: BatchNorm1d needs more than one sample in train mode
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pruner = Pruner(model, example, criterion=criterion, optimizer=opt,
                        flops_regularization=s.flops_regularization)
    start = _eval_flops(model, s.size)
    steps = [{"step": 0, "flops": 1.0, "val_accuracy": accuracy(model, data.val)}]
    batches = _batches(data.train, min(s.batch_size, len(data.train[0])), generator)
    expected = max(1, math.ceil(sum(_channels(model).values()) * (1 - math.sqrt(target)) / s.channels_per_step))
    bar = _bar(expected, "pruning", progress)
    while steps[-1]["flops"] > target:
        with pruner.estimate():
            for _ in range(s.prune_every):
                _train_step(model, opt, *next(batches))
        try:
            pruner.step(s.channels_per_step)
        except PruningValueError:  # every group at its minimum
            warnings.warn(f"prunable demo: stopped at {steps[-1]['flops']:.3f} of the FLOPs", stacklevel=2)
            break
        steps.append({"step": len(steps), "flops": _eval_flops(model, s.size) / start,
                      "val_accuracy": accuracy(model, data.val)})
        bar.update()
        bar.set_postfix(flops=f"{steps[-1]['flops']:.3f}", val_acc=f"{steps[-1]['val_accuracy']:.3f}")
    bar.close()
    return pruner, steps


def format_table(rows: list[dict[str, Any]]) -> str:
    """The results as a markdown table.

    Example
    -------
    >>> row = {"stage": "x", "test_accuracy": 0.5, "params": 10, "flops": 2e6,
    ...        "latency_b1_ms": 1.0, "latency_b32_ms": 3.0, "size_bytes": 2048}
    >>> print(format_table([row]).splitlines()[2])
    | x | 50.00 % | 10 | 2.00 M | 1.00 | 3.00 | 2.0 KiB |
    """
    lines = ["| stage | test accuracy | params | FLOPs | latency b1 (ms) | latency b32 (ms) | size on disk |",
             "|---|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['stage']} | {100 * r['test_accuracy']:.2f} % | {r['params']:,} | "
                     f"{r['flops'] / 1e6:.2f} M | {r['latency_b1_ms']:.2f} | {r['latency_b32_ms']:.2f} | "
                     f"{r['size_bytes'] / 1024:.1f} KiB |")
    return "\n".join(lines)


def _summary(rows: list[dict[str, Any]]) -> str:
    base, last = rows[0], rows[-1]
    return (f"FLOPs ÷{base['flops'] / last['flops']:.1f}, params ÷{base['params'] / last['params']:.1f}, "
            f"accuracy {100 * (last['test_accuracy'] - base['test_accuracy']):+.2f} points, "
            f"CPU speed-up ×{base['latency_b1_ms'] / last['latency_b1_ms']:.2f} (batch 1), "
            f"×{base['latency_b32_ms'] / last['latency_b32_ms']:.2f} (batch 32)")


def _plot(steps: list[dict[str, float]], before: dict[str, int], after: dict[str, int], path: Path) -> None:
    from matplotlib.figure import Figure  # no pyplot: no global backend or figure state; PNG via Agg

    fig = Figure(figsize=(11, 4.2), layout="constrained")
    ax, bars = fig.subplots(1, 2)
    ax.plot([100 * r["flops"] for r in steps], [100 * r["val_accuracy"] for r in steps], "o-", ms=3)
    ax.set(xlabel="FLOPs (% of the trained model)", ylabel="validation accuracy (%)",
           title="Accuracy over the pruning steps")
    ax.invert_xaxis()
    ax.grid(alpha=0.3)
    names = list(before)
    pos = torch.arange(len(names)).tolist()
    bars.bar([p - 0.2 for p in pos], [before[n] for n in names], 0.4, label="before")
    bars.bar([p + 0.2 for p in pos], [after.get(n, 0) for n in names], 0.4, label="after")
    bars.set_xticks(pos, names, rotation=30, ha="right")
    bars.set(ylabel="output channels", title="Channels per layer")
    bars.legend()
    fig.savefig(path, dpi=110)


def _saver(model: nn.Module, arch: dict[str, Any], pruner: Pruner | None, size: int,
           path: Path | None) -> Callable[[], int]:
    """A function that saves the model (to ``path`` or memory) and returns the size in bytes."""
    def save() -> int:
        target: Any = path if path is not None else _io.BytesIO()
        io.save(model, target, plans=pruner.history if pruner else (), architecture=arch,
                example_input_shape=(1, 1, size, size))
        return path.stat().st_size if path is not None else target.getbuffer().nbytes
    return save


def _write(out: Path, result: DemoResult, settings: DemoSettings, flops: float, criterion: str, seed: int) -> None:
    text = [f"# prunable demo (criterion {criterion}, target {flops:g} of the FLOPs, seed {seed})", "",
            result.table, "", _summary(result.rows), "",
            f"Wall time: {result.wall_time:.0f} s with {torch.get_num_threads()} CPU threads. "
            f"Latency is the median of repeated runs on this CPU. Settings: {settings}.", ""]
    (out / "results.md").write_text("\n".join(text), encoding="utf-8")
    blob = {"rows": result.rows, "steps": result.steps, "wall_time_s": result.wall_time,
            "settings": dataclasses.asdict(settings), "criterion": criterion, "flops_target": flops, "seed": seed}
    (out / "results.json").write_text(json.dumps(blob, indent=1), encoding="utf-8")


def run_demo(
    out_dir: str | Path, quick: bool = False, flops: float = 0.1, criterion: str = "taylor", seed: int = 0, *,
    settings: DemoSettings | None = None, threads: int | None = 2, data_root: str | Path | None = None,
    progress: bool = True,
) -> DemoResult:
    """Train a CharNet, prune it to ``flops`` × its FLOPs, fine-tune it, measure each stage.

    Parameters
    ----------
    out_dir
        Output folder (created): results.md/.json, pruning.png, baseline.pt, pruned.pt.
    quick
        Use :data:`QUICK` (a smoke run) instead of :data:`DEFAULT`.
    flops
        Target FLOPs as a fraction of the trained model's, in (0, 1): 0.1 is 10× fewer.
    criterion
        A key of :data:`CRITERIA`.
    seed
        Seeds the data, the initialisation and the batch order: a run is reproducible.
    settings
        Overrides ``quick`` (tests use tiny settings).
    threads
        Torch CPU threads during the run (restored afterwards); ``None`` leaves them.
    data_root
        Cache folder of the generated data (see :class:`~prunable.data.JapaneseCharacters`).
    progress
        Show tqdm progress bars.

    Returns
    -------
    DemoResult
        Table rows (baseline, after pruning, after fine-tuning), per-step records and file paths.

    Example
    -------
    >>> run_demo("out", flops=1.5)
    Traceback (most recent call last):
    ...
    prunable.errors.PruningValueError: flops must be a fraction in (0, 1), got 1.5
    """
    if isinstance(flops, bool) or not isinstance(flops, (int, float)) or not 0 < flops < 1:
        raise PruningValueError(f"flops must be a fraction in (0, 1), got {flops!r}")
    make_criterion(criterion, seed)  # fail fast on a bad name
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise PruningValueError(f"seed must be an int >= 0, got {seed!r}")
    old_threads = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(threads)
    try:
        return _run(Path(out_dir), settings or (QUICK if quick else DEFAULT), float(flops), criterion, seed,
                    data_root, progress)
    finally:
        torch.set_num_threads(old_threads)


def _run(out: Path, s: DemoSettings, flops: float, criterion: str, seed: int,
         data_root: str | Path | None, progress: bool) -> DemoResult:
    start = time.perf_counter()
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    generator = torch.Generator().manual_seed(seed)
    data = _load_data(s, seed, data_root)
    arch = _architecture(s, data.num_classes)
    model = io.build_model(arch)
    _train(model, data, s.epochs, s.lr, s, generator, "training", progress, one_cycle=True)
    rows = [_measure("trained baseline", model, data, s, _saver(model, arch, None, s.size, out / "baseline.pt"))]
    before = _channels(model)
    pruner, steps = _prune(model, data, s, make_criterion(criterion, seed), flops, generator, progress)
    rows.append(_measure("after pruning", model, data, s, _saver(model, arch, pruner, s.size, None)))
    _train(model, data, s.finetune_epochs, s.finetune_lr, s, generator, "fine-tuning", progress, one_cycle=False)
    rows.append(_measure("after fine-tuning", model, data, s, _saver(model, arch, pruner, s.size, out / "pruned.pt")))
    _plot(steps, before, _channels(model), out / "pruning.png")
    files = {name: out / name for name in ("results.md", "results.json", "pruning.png", "baseline.pt", "pruned.pt")}
    result = DemoResult(rows, steps, format_table(rows), time.perf_counter() - start, files,
                        rows[-1]["test_accuracy"])
    _write(out, result, s, flops, criterion, seed)
    return result
