"""``prunable demo``: train, prune and fine-tune a CharNet on built-in Japanese characters.

A CharNet learns the 92 kana of :class:`~prunable.data.JapaneseCharacters`;
:class:`~prunable.Pruner` removes channels ranked by the Taylor criterion with
FLOPs regularisation (Molchanov et al. 2017), with training batches between
steps and the hidden Linear layer included, until the FLOPs are at most
``flops`` times the original; a short fine-tuning follows. Each stage is
measured: test accuracy, params, FLOPs, CPU latency (batch 1 and 32), size on disk.

The default model is sized for a 2-core CPU (see :data:`DEFAULT`): 32×32
inputs and ``config=(32, "M", 64, "M", 128, "M", 256, "M")``, ``hidden=256``
instead of the capstone's 96×96 and ``(96, ..., 384)``, ``hidden=1024`` —
kana at 32×32 are still easy to tell apart.

Output folder: ``results.md`` (the table), ``results.json``, ``pruning.png``
(accuracy vs FLOPs over the pruning steps, channels per layer before and
after), ``baseline.pt`` and ``pruned.pt`` (:func:`prunable.io.save` files).
With ``readme=``, the block of README.md between :data:`README_START` and
:data:`README_END` is rewritten from the run (``make demo`` does this).

Example
-------
>>> DEFAULT.size, DEFAULT.epochs, QUICK.epochs
(32, 6, 4)
>>> dataclasses.replace(QUICK, epochs=1).epochs   # tests/test_demo.py runs a tiny DemoSettings
1
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import io as _io
import json
import os
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
from .demo_report import README_END, README_START, format_readme, format_table, summary, write_readme
from .flops import count_flops, count_params, measure_latency
from .importance import (
    APoZ, BNScale, Criterion, MeanActivation, Random, TaylorActivation, TaylorBN, TaylorWeight, WeightNorm,
)
from .pruner import Pruner
from .surgery import Role, handler_for

__all__ = [
    "CRITERIA", "DemoSettings", "DEFAULT", "QUICK", "DemoResult", "make_criterion", "run_demo", "prune_file",
    "accuracy", "format_table", "README_START", "README_END", "format_readme", "write_readme",
]


#: ``--criterion`` names → criterion classes (``Random`` also takes the seed).
CRITERIA: types.MappingProxyType[str, Callable[..., Criterion]] = types.MappingProxyType({
    "taylor": TaylorActivation, "taylor-bn": TaylorBN, "taylor-weight": TaylorWeight,
    "l1": functools.partial(WeightNorm, 1.0), "l2": functools.partial(WeightNorm, 2.0), "bn-scale": BNScale,
    "mean-activation": MeanActivation, "apoz": APoZ, "random": Random,
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
    return CRITERIA[name](seed) if CRITERIA[name] is Random else CRITERIA[name]()


@dataclasses.dataclass(frozen=True)
class DemoSettings:
    """Model, data and schedule of a demo run.

    ``prune_every`` training batches (estimating importance) precede each
    pruning step, which removes the ``prune_step`` least important channels over
    all layers: a count, or a float in (0, 1), that fraction of the remaining channels.

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
    prune_step: int | float = 0.05
    flops_regularization: float = 1e-3
    finetune_epochs: int = 3
    finetune_lr: float = 0.02
    latency_repeats: int = 30


#: The default run: ≤ 10 minutes on 2 CPU cores.
DEFAULT = DemoSettings()
#: ``--quick``: a smoke run of well under 2 minutes.
QUICK = DemoSettings(
    config=(16, "M", 32, "M", 64, "M", 128, "M"), hidden=128, train_per_class=40, eval_per_class=10,
    epochs=4, prune_every=5, prune_step=0.08, finetune_epochs=4, latency_repeats=20,
)


@dataclasses.dataclass
class DemoResult:
    """What :func:`run_demo` measured and wrote."""

    rows: list[dict[str, Any]]  #: one per stage: test_accuracy, params, flops, latency_b1_ms, ...
    steps: list[dict[str, float]]  #: one per pruning step: FLOPs fraction, validation accuracy
    table: str  #: ``rows`` as markdown
    wall_time: float  #: seconds
    files: dict[str, Path]
    channels: dict[str, tuple[int, int]]  #: output channels per layer, before and after pruning
    record: dict[str, Any] = dataclasses.field(default_factory=dict)  #: what :func:`format_readme` reads


@dataclasses.dataclass
class _Data:
    train: tuple[torch.Tensor, torch.Tensor]
    val: tuple[torch.Tensor, torch.Tensor]
    test: tuple[torch.Tensor, torch.Tensor]
    num_classes: int


def _load_data(s: DemoSettings, seed: int, root: str | Path | None) -> _Data:
    from .data import JapaneseCharacters

    sizes = {"train": s.train_per_class, "val": s.eval_per_class, "test": s.eval_per_class}
    sets = {k: JapaneseCharacters(k, s.classes, s.size, n, seed, root) for k, n in sizes.items()}
    device = _device()
    return _Data(**{k: (v.data.float().div_(255).to(device), v.targets.to(device)) for k, v in sets.items()},
                 num_classes=sets["train"].num_classes)


def _device() -> torch.device:
    """CUDA when present (the data, model and timings live there), else the CPU."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


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
    return loss.detach().item()


def _bar(total: int, desc: str, progress: bool, unit: str = "batch") -> Any:
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, unit=unit, leave=False, dynamic_ncols=True, disable=not progress)


def _train(model: nn.Module, data: _Data, epochs: int, lr: float, s: DemoSettings,
           generator: torch.Generator, desc: str, progress: bool, one_cycle: bool) -> None:
    """SGD (Nesterov) for ``epochs`` epochs: one-cycle schedule, or cosine decay from ``lr``."""
    total = max(1, epochs * (len(data.train[0]) // s.batch_size))
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9, nesterov=True, weight_decay=5e-4)
    sched = (torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=total, pct_start=0.2) if one_cycle
             else torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=total))
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
    >>> net = io.build_model({"name": "CharNet", "num_classes": 3, "config": [4], "input_size": 8})
    >>> 0.0 <= accuracy(net, (torch.rand(6, 1, 8, 8), torch.arange(6) % 3)) <= 1.0
    True
    """
    x, y = data
    with _evaluating(model):
        correct = sum(int((model(x[i:i + batch_size]).argmax(1) == y[i:i + batch_size]).sum())
                      for i in range(0, len(x), batch_size))
    return correct / max(len(x), 1)


@contextlib.contextmanager
def _evaluating(model: nn.Module) -> Iterator[nn.Module]:
    """The block runs with ``model`` in eval mode; its mode is restored afterwards."""
    was_training = model.training
    try:
        yield model.eval()
    finally:
        model.train(was_training)


def _eval_flops(model: nn.Module, size: int) -> int:
    with _evaluating(model):  # BatchNorm1d refuses a batch of 1 in train mode
        return count_flops(model, torch.zeros(1, 1, size, size))


def _channels(model: nn.Module) -> dict[str, int]:
    """Output channels of every layer that makes channels (convolutions, Linear …), by name, as their handlers say."""
    handlers = {name: (m, handler_for(m)) for name, m in model.named_modules()}
    return {name: h.channels(m, Role.OUT) for name, (m, h) in handlers.items()
            if h is not None and not h.channelwise and h.params(m, Role.OUT)}


def _measure(stage: str, model: nn.Module, data: _Data, s: DemoSettings, size_bytes: int) -> dict[str, Any]:
    """One row of the results table."""
    device = next(model.parameters()).device
    x1, x32 = torch.rand(1, 1, s.size, s.size, device=device), torch.rand(32, 1, s.size, s.size, device=device)
    return {
        "stage": stage,
        "test_accuracy": accuracy(model, data.test),
        "params": count_params(model),
        "flops": _eval_flops(model, s.size),
        "latency_b1_ms": 1e3 * measure_latency(model, x1, warmup=5, repeats=s.latency_repeats),
        "latency_b32_ms": 1e3 * measure_latency(model, x32, warmup=2, repeats=max(3, s.latency_repeats // 3)),
        "size_bytes": size_bytes,
    }


def _prune(model: nn.Module, data: _Data, s: DemoSettings, criterion: Criterion, target: float,
           generator: torch.Generator, progress: bool) -> tuple[Pruner, list[dict[str, float]]]:
    """Prune to ``target`` × the FLOPs with ``Pruner.prune_to``: ``prune_every`` training
    batches inside ``estimate()`` before each step, validation accuracy after it."""
    opt = torch.optim.SGD(model.parameters(), lr=s.prune_lr, momentum=0.9, weight_decay=5e-4)
    example = data.train[0][:2]  # batch 2: BatchNorm1d needs more than one sample in train mode
    pruner = Pruner(model, example, criterion=criterion, optimizer=opt, flops_regularization=s.flops_regularization)
    steps = [{"step": 0, "flops": 1.0, "val_accuracy": accuracy(model, data.val)}]
    batches = _batches(data.train, min(s.batch_size, len(data.train[0])), generator)
    log = pruner.prune_to(
        flops=target, fine_tune=lambda: {"loss": _train_step(model, opt, *next(batches))},
        prune_every=s.prune_every, channels_per_step=s.prune_step, progress=progress,
        on_step=lambda record: {"val_accuracy": accuracy(model, data.val)})
    steps += [{"step": r["step"], "flops": r["flops"], "val_accuracy": r["val_accuracy"]} for r in log]
    return pruner, steps


def _plot(steps: list[dict[str, float]], rows: list[dict[str, Any]], channels: dict[str, tuple[int, int]],
          path: Path) -> None:
    from matplotlib.figure import Figure  # no pyplot: no global backend or figure state; PNG via Agg

    fig = Figure(figsize=(11, 4.2), layout="constrained")
    ax, bars = fig.subplots(1, 2)
    ax.plot([100 * r["flops"] for r in steps], [100 * r["val_accuracy"] for r in steps], "o-", ms=3,
            label="validation, after each step")
    ratio = [100 * r["flops"] / rows[0]["flops"] for r in rows]
    ax.plot(ratio[::2], [100 * r["test_accuracy"] for r in rows[::2]], "r*", ms=12, label="test: trained, fine-tuned")
    ax.set(xlabel="FLOPs (% of the trained model)", ylabel="accuracy (%)", title="Accuracy while pruning")
    ax.invert_xaxis()
    ax.grid(alpha=0.3)
    ax.legend(loc="lower left")
    pos = list(range(len(channels)))
    bars.bar([p - 0.2 for p in pos], [b for b, _ in channels.values()], 0.4, label="before")
    bars.bar([p + 0.2 for p in pos], [a for _, a in channels.values()], 0.4, label="after")
    bars.set_xticks(pos, list(channels), rotation=30, ha="right")
    bars.set(ylabel="output channels", title="Channels per layer")
    bars.legend()
    fig.savefig(path, dpi=110)


def _save(model: nn.Module, arch: dict[str, Any], plans: list, s: DemoSettings, seed: int, path: Path | None) -> int:
    """Save the model to ``path`` (or to memory when None); returns the size in bytes."""
    target: Any = path if path is not None else _io.BytesIO()
    meta = {"data": {"dataset": "JapaneseCharacters", "classes": s.classes, "size": s.size, "seed": seed}}
    io.save(model, target, plans=plans, architecture=arch, example_input_shape=(1, 1, s.size, s.size), meta=meta)
    return path.stat().st_size if path is not None else target.getbuffer().nbytes


def _write(out: Path, result: DemoResult, settings: DemoSettings, flops: float, criterion: str, seed: int) -> None:
    load = f", 1-min load average {os.getloadavg()[0]:.1f} at the end" if hasattr(os, "getloadavg") else ""
    text = [f"# prunable demo (criterion {criterion}, target {flops:g} of the FLOPs, seed {seed})", "",
            result.table, "", summary(result.rows), "",
            "Channels per layer: " + ", ".join(f"{k} {b} → {a}" for k, (b, a) in result.channels.items()), "",
            f"Wall time: {result.wall_time:.0f} s with {torch.get_num_threads()} CPU threads{load}. Latency is the "
            f"median of repeated runs on this CPU. Settings: {settings}.", ""]
    (out / "results.md").write_text("\n".join(text), encoding="utf-8")
    blob = {"rows": result.rows, "steps": result.steps, "wall_time_s": result.wall_time,
            "settings": dataclasses.asdict(settings), "criterion": criterion, "flops_target": flops, "seed": seed}
    (out / "results.json").write_text(json.dumps(blob, indent=1), encoding="utf-8")


def run_demo(
    out_dir: str | Path, quick: bool = False, flops: float = 0.1, criterion: str = "taylor", seed: int = 0, *,
    settings: DemoSettings | None = None, threads: int | None = 2, data_root: str | Path | None = None,
    progress: bool = True, readme: str | Path | None = None,
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
    readme
        A README whose demo block (between :data:`README_START` and
        :data:`README_END`) is rewritten from this run (checked before the run).

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
    _check_args(flops, criterion, seed)
    if readme is not None and README_END not in Path(readme).read_text(encoding="utf-8"):
        raise PruningValueError(f"{readme}: no {README_START} ... {README_END} block to rewrite")
    with _torch_threads(threads):
        print(f"prunable demo: seed {seed}, {torch.get_num_threads()} torch thread(s), criterion {criterion}, "
              f"target {flops:g} of the FLOPs", flush=True)
        result = _run(Path(out_dir), settings or (QUICK if quick else DEFAULT), float(flops), criterion, seed,
                      data_root, progress)
        result.record = {"rows": result.rows, "criterion": criterion, "flops_target": flops, "seed": seed,
                         "threads": torch.get_num_threads(), "wall_time_s": round(result.wall_time, 1),
                         "mode": "custom" if settings else "quick" if quick else "default"}
    if readme is not None:
        write_readme(readme, result.record)
    return result


@contextlib.contextmanager
def _torch_threads(threads: int | None) -> Iterator[None]:
    """Run the block with ``threads`` torch CPU threads, then restore the old count."""
    old = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(old)


def _check_args(flops: float, criterion: str, seed: int) -> None:
    if isinstance(flops, bool) or not isinstance(flops, (int, float)) or not 0 < flops < 1:
        raise PruningValueError(f"flops must be a fraction in (0, 1), got {flops!r}")
    make_criterion(criterion, seed)  # fail fast on a bad name
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise PruningValueError(f"seed must be an int >= 0, got {seed!r}")


def _run(out: Path, s: DemoSettings, flops: float, criterion: str, seed: int,
         data_root: str | Path | None, progress: bool) -> DemoResult:
    start = time.perf_counter()
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    generator = torch.Generator().manual_seed(seed)
    data = _load_data(s, seed, data_root)
    arch = {"name": "CharNet", "num_classes": data.num_classes, "config": list(s.config), "in_channels": 1,
            "input_size": s.size, "hidden": s.hidden}
    model = io.build_model(arch).to(_device())
    _train(model, data, s.epochs, s.lr, s, generator, "training", progress, one_cycle=True)
    rows = [_measure("trained baseline", model, data, s, _save(model, arch, [], s, seed, out / "baseline.pt"))]
    before = _channels(model)
    more, steps = _prune_and_finetune(model, data, s, arch, [], criterion, flops, seed, generator,
                                      out / "pruned.pt", progress)
    rows += more
    channels = {k: (v, _channels(model)[k]) for k, v in before.items()}
    _plot(steps, rows, channels, out / "pruning.png")
    files = {name: out / name for name in ("results.md", "results.json", "pruning.png", "baseline.pt", "pruned.pt")}
    result = DemoResult(rows, steps, format_table(rows), time.perf_counter() - start, files, channels)
    _write(out, result, s, flops, criterion, seed)
    return result


def _prune_and_finetune(
    model: nn.Module, data: _Data, s: DemoSettings, arch: dict[str, Any], plans: list, criterion: str,
    flops: float, seed: int, generator: torch.Generator, path: Path, progress: bool,
) -> tuple[list[dict[str, Any]], list[dict[str, float]]]:
    """Prune, measure, fine-tune, measure and save to ``path`` (after the earlier ``plans``)."""
    pruner, steps = _prune(model, data, s, make_criterion(criterion, seed), flops, generator, progress)
    history = list(plans) + list(pruner.history)
    rows = [_measure("after pruning", model, data, s, _save(model, arch, history, s, seed, None))]
    _train(model, data, s.finetune_epochs, s.finetune_lr, s, generator, "fine-tuning", progress, one_cycle=False)
    rows.append(_measure("after fine-tuning", model, data, s, _save(model, arch, history, s, seed, path)))
    return rows, steps


def _settings_for(record: dict[str, Any], model: nn.Module, **overrides: Any) -> DemoSettings:
    """Demo settings matching a saved model's input and classes on the built-in data."""
    from .data.japanese import CLASS_SETS

    shape = list(record["input_shape"])
    if len(shape) != 4 or shape[1] != 1 or shape[2] != shape[3]:
        raise PruningValueError(f"the built-in data are 1-channel square images; the model takes {shape}")
    with torch.no_grad():
        classes = int(model.eval()(torch.zeros(2, *shape[1:])).shape[-1])
    names = {len(v): k for k, v in CLASS_SETS.items()}
    if classes not in names:
        raise PruningValueError(f"the built-in data have {sorted(names)} classes; the model outputs {classes}")
    return dataclasses.replace(DEFAULT, size=shape[-1], classes=names[classes], **overrides)


def prune_file(
    model_path: str | Path, out_path: str | Path, *, flops: float = 0.5, criterion: str = "taylor", seed: int = 0,
    prune_every: int = 10, prune_step: int | float = 0.05, finetune_epochs: int = 2, threads: int | None = 2,
    data_root: str | Path | None = None, progress: bool = True,
) -> DemoResult:
    """Prune a model saved by :func:`prunable.io.save` further, on the built-in data.

    ``flops`` is relative to the loaded model. The new file holds the earlier
    plans followed by the new ones. Returns the loaded / pruned / fine-tuned rows.

    Example
    -------
    >>> prune_file("missing.pt", "out.pt")
    Traceback (most recent call last):
    ...
    prunable.io.ModelFileError: no such model file: 'missing.pt'
    """
    record = io.read(model_path)
    _check_args(flops, criterion, seed)
    start = time.perf_counter()
    with _torch_threads(threads):
        model = io.load(model_path)
        s = _settings_for(record, model, prune_every=prune_every, prune_step=prune_step,
                          finetune_epochs=finetune_epochs)
        torch.manual_seed(seed)
        generator = torch.Generator().manual_seed(seed)
        data = _load_data(s, seed, data_root)
        rows = [_measure("loaded", model, data, s, Path(model_path).stat().st_size)]
        before = _channels(model)
        Path(out_path).parent.mkdir(parents=True, exist_ok=True)
        more, steps = _prune_and_finetune(model, data, s, record["architecture"], record["plans"], criterion, flops,
                                          seed, generator, Path(out_path), progress)
    rows += more
    channels = {k: (v, _channels(model)[k]) for k, v in before.items()}
    return DemoResult(rows, steps, format_table(rows), time.perf_counter() - start, {"model": Path(out_path)},
                      channels)
