"""The seed's real job at full scale: 3,057-class Japanese OCR, pruned like the capstone.

Trains the capstone's CharNet configuration (conv 96-M-128-M-160-M-256-256-M-384-384-M,
hidden Linear 1024, BN + PReLU) on the built-in ``JapaneseCharacters(classes="jis")``
(the 92 kana + 2,965 JIS X 0208 level-1 kanji, rendered from three Noto fonts; no
download), then prunes it with the Taylor criterion — FLOPs regularisation on, the
hidden Linear included, the output classifier never pruned — a few channels at a
time with training batches in between, and fine-tunes at 50, 70, 80 and 90 % of the
feature maps removed, as the capstone did (CNet-50 … CNet-90). Every row is measured:
conv MACs, whole-net FLOPs, params, the classifier's share of the weights, CPU latency,
test accuracy and accuracy on a font never seen in training (IPAex Gothic).

Writes ``docs/OCR.md`` (the table beside the capstone's published figures) and
``docs/ocr_results.json`` (the first row with at least 70 % of the maps removed).
Uses CUDA when present.

Run: ``make ocr`` (all defaults), or ``python examples/ocr_capstone.py --quick`` for
a smoke run on the kana (minutes on 2 CPU cores). ``--help`` lists the knobs.
"""

from __future__ import annotations

import argparse
import copy
import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from torch import nn
from torch.utils.data import DataLoader

import prunable
from prunable.data import JapaneseCharacters
from prunable.models import CHARNET_CONFIG

#: The capstone's published figures (ETL2 + ETL9G, 3,156 classes, 96×96 inputs): quoted, not measured here.
CAPSTONE = {
    0: {"name": "CNet-0", "test": 99.63, "conv_macs_m": 521.0},
    80: {"name": "CNet-80", "test": 98.90, "maps_removed": 71.9, "conv_macs_m": 47.5},
    90: {"name": "CNet-90", "test": 95.73},
}
MILESTONES = (0.5, 0.7, 0.8, 0.9)


@dataclass
class Settings:
    classes: str = "jis"
    size: int = 32
    train_per_class: int = 24
    eval_per_class: int = 4
    epochs: int = 6
    finetune_epochs: int = 2
    batch_size: int = 128
    lr: float = 0.05
    channels_per_step: int = 32
    batches_per_step: int = 8
    flops_regularization: float = 1e-3
    seed: int = 0
    hidden: int = 1024
    milestones: tuple[float, ...] = MILESTONES
    config: tuple = field(default=CHARNET_CONFIG)


QUICK = Settings(classes="kana", size=32, train_per_class=12, eval_per_class=3, epochs=3, finetune_epochs=1,
                 batch_size=64, channels_per_step=24, batches_per_step=2, hidden=128,
                 config=(32, "M", 64, "M", 96, "M"))


def _device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _loader(ds: JapaneseCharacters, s: Settings, shuffle: bool) -> DataLoader:
    generator = torch.Generator().manual_seed(s.seed)
    return DataLoader(ds, s.batch_size, shuffle=shuffle, generator=generator, drop_last=shuffle)


def accuracy(model: nn.Module, loader: DataLoader, device: torch.device) -> float:
    """Top-1 accuracy in percent."""
    model.eval()
    hits = 0
    with torch.no_grad():
        for x, y in loader:
            hits += int((model(_to(x, device)).argmax(1).cpu() == y).sum())
    return 100.0 * hits / len(loader.dataset)


def _to(x: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A batch on ``device`` in channels-last layout (about 1.2x faster convs on CPU, also on CUDA)."""
    return x.to(device).contiguous(memory_format=torch.channels_last)


def train(model: nn.Module, opt: torch.optim.Optimizer, loader: DataLoader, epochs: int, lr: float,
          device: torch.device, label: str = "train") -> None:
    """``epochs`` epochs of SGD with a one-cycle schedule (the optimizer is reused across prunes).

    Prints one line per epoch (its loss and time), so a long run shows where it is."""
    steps = max(1, epochs * len(loader))
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps)
    model.train()
    for epoch in range(epochs):
        t0, total, seen = time.perf_counter(), 0.0, 0
        for x, y in loader:
            opt.zero_grad(set_to_none=True)
            loss = nn.functional.cross_entropy(model(_to(x, device)), y.to(device))
            loss.backward()
            opt.step()
            sched.step()
            total, seen = total + float(loss.detach()) * len(y), seen + len(y)
        print(f"{label} epoch {epoch + 1}/{epochs}: loss {total / max(1, seen):.4f}, "
              f"{seen / (time.perf_counter() - t0):.0f} images/s", flush=True)


def feature_maps(model: nn.Module) -> int:
    """Output channels of every conv and of the hidden Linear layers (not the classifier)."""
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    return sum(m.out_channels for m in convs) + sum(m.out_features for m in linears[:-1])


def measure(model: nn.Module, s: Settings, sets: dict[str, DataLoader], start_maps: int,
            device: torch.device) -> dict[str, float]:
    """One row of the table, measured on the model as it is now."""
    x1 = torch.zeros(1, 1, s.size, s.size)
    cpu = copy.deepcopy(model).to("cpu")  # the CPU latency, whatever device trains
    per_module = prunable.module_flops(cpu, x1)
    conv = sum(v for k, v in per_module.items() if isinstance(cpu.get_submodule(k), nn.Conv2d)) if per_module else 0
    classifier = [m for m in cpu.modules() if isinstance(m, nn.Linear)][-1]
    params = prunable.count_params(cpu)
    latency = prunable.measure_latency(cpu, x1, warmup=3, repeats=20)
    return {
        "maps_removed": 100.0 * (1 - feature_maps(model) / start_maps),
        "conv_macs_m": conv / 2e6,  # FlopCounterMode counts a multiply-add as 2 FLOPs
        "flops_m": per_module.get("", 0) / 1e6,
        "params": params,
        "classifier_share": 100.0 * classifier.weight.numel() / params,
        "latency_ms": 1e3 * latency,
        "test": accuracy(model, sets["test"], device),
        "unseen_font": accuracy(model, sets["test-unseen-font"], device),
    }


def prune_to_maps(pruner: prunable.Pruner, model: nn.Module, opt: torch.optim.Optimizer, loader: DataLoader,
                  fraction: float, start_maps: int, s: Settings, device: torch.device) -> int:
    """Taylor-prune ``channels_per_step`` maps at a time, ``batches_per_step`` training batches
    between steps, until at least ``fraction`` of the starting maps are gone; returns the steps taken."""
    steps, batches = 0, iter(())
    while 1 - feature_maps(model) / start_maps < fraction:
        with pruner.estimate():
            model.train()
            for _ in range(s.batches_per_step):
                try:
                    x, y = next(batches)
                except StopIteration:
                    batches = iter(loader)
                    x, y = next(batches)
                opt.zero_grad(set_to_none=True)
                nn.functional.cross_entropy(model(_to(x, device)), y.to(device)).backward()
                opt.step()
        left = feature_maps(model) - round((1 - fraction) * start_maps)
        pruner.step(max(1, min(s.channels_per_step, left)))
        steps += 1
    return steps


def run(s: Settings, out: Path) -> dict:
    """Train, prune to each milestone, fine-tune, measure; write the docs; return the results."""
    t0 = time.perf_counter()
    torch.manual_seed(s.seed)
    device = _device()
    data_t0 = time.perf_counter()
    sets = {split: JapaneseCharacters(split, s.classes, s.size, n, s.seed)
            for split, n in (("train", s.train_per_class), ("val", s.eval_per_class),
                             ("test", s.eval_per_class), ("test-unseen-font", s.eval_per_class))}
    data_seconds = time.perf_counter() - data_t0
    loaders = {k: _loader(v, s, shuffle=k == "train") for k, v in sets.items()}
    classes = sets["train"].num_classes
    model = prunable.CharNet(classes, config=list(s.config), input_size=s.size, hidden=s.hidden)
    model = model.to(device, memory_format=torch.channels_last)
    print(f"{classes:,} classes, {len(sets['train']):,} training images ({data_seconds:.0f} s for the data); "
          f"device {device}, {torch.get_num_threads()} threads", flush=True)
    opt = torch.optim.SGD(model.parameters(), lr=s.lr, momentum=0.9, weight_decay=5e-4, nesterov=True)
    train(model, opt, loaders["train"], s.epochs, s.lr, device)
    start_maps = feature_maps(model)
    rows = [{"stage": "CNet-0 (trained)", **measure(model, s, loaders, start_maps, device)}]
    example = torch.zeros(2, 1, s.size, s.size, device=device)
    classifier = [m for m in model.modules() if isinstance(m, nn.Linear)][-1]
    pruner = prunable.Pruner(model, example, criterion="taylor", optimizer=opt, ignored_layers=[classifier],
                             flops_regularization=s.flops_regularization)
    for fraction in s.milestones:
        t_prune = time.perf_counter()
        steps = prune_to_maps(pruner, model, opt, loaders["train"], fraction, start_maps, s, device)
        print(f"pruned to {100 * (1 - feature_maps(model) / start_maps):.1f} % of the maps removed in {steps} steps "
              f"({time.perf_counter() - t_prune:.0f} s)", flush=True)
        train(model, opt, loaders["train"], s.finetune_epochs, s.lr / 5, device, f"fine-tune {fraction:.0%}")
        row = measure(model, s, loaders, start_maps, device)
        rows.append({"stage": f"CNet-{round(100 * fraction)}", "prune_steps": steps, **row})
        print(f"{rows[-1]['stage']}: {row['maps_removed']:.1f} % maps removed, test {row['test']:.2f} %, "
              f"unseen font {row['unseen_font']:.2f} %", flush=True)
    seconds = time.perf_counter() - t0
    return write(rows, s, sets, classes, seconds, data_seconds, device, out)


def _bar_row(rows: list[dict]) -> dict:
    return next((r for r in rows[1:] if r["maps_removed"] >= 70.0), rows[-1])


def write(rows: list[dict], s: Settings, sets: dict, classes: int, seconds: float, data_seconds: float,
          device: torch.device, out: Path) -> dict:
    """docs/OCR.md and docs/ocr_results.json from the measured rows."""
    base, bar = rows[0], _bar_row(rows)
    results = {
        "classes": classes, "baseline_accuracy": base["test"], "pruned_accuracy": bar["test"],
        "pruned_stage": bar["stage"], "maps_removed_fraction": bar["maps_removed"] / 100,
        "flops_fraction": bar["flops_m"] / base["flops_m"], "unseen_font_baseline": base["unseen_font"],
        "unseen_font_pruned": bar["unseen_font"], "seconds": round(seconds, 1),
        "data_seconds": round(data_seconds, 1), "device": str(device), "threads": torch.get_num_threads(),
        "settings": asdict(s), "rows": rows,
    }
    out.mkdir(parents=True, exist_ok=True)
    (out / "ocr_results.json").write_text(json.dumps(results, indent=1, ensure_ascii=False) + "\n")
    (out / "OCR.md").write_text(format_report(results, sets))
    return results


def format_report(results: dict, sets: dict) -> str:
    """The markdown page: the measured table, then the capstone's published figures."""
    s = results["settings"]
    lines = [
        "# Japanese OCR at full scale, pruned like the capstone", "",
        "Written by `examples/ocr_capstone.py` (`make ocr`) from one run; nothing here is typed by hand.", "",
        f"{results['classes']:,} classes ({s['classes']}), {s['size']}×{s['size']} inputs, "
        f"train fonts {', '.join(sets['train'].fonts)}; unseen font {', '.join(sets['test-unseen-font'].fonts)}. "
        f"{s['train_per_class']} training and {s['eval_per_class']} test images per class. "
        f"Device {results['device']}, {results['threads']} threads; {results['seconds'] / 60:.1f} min in all "
        f"({results['data_seconds']:.0f} s for the data).", "",
        "| model | maps removed | conv MMACs | MFLOPs | params | classifier share | latency b1 | test acc. "
        "| unseen font |", "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in results["rows"]:
        lines.append(f"| {r['stage']} | {r['maps_removed']:.1f} % | {r['conv_macs_m']:.1f} | {r['flops_m']:.1f} | "
                     f"{r['params']:,} | {r['classifier_share']:.1f} % | {r['latency_ms']:.2f} ms | "
                     f"{r['test']:.2f} % | {r['unseen_font']:.2f} % |")
    lost = results["baseline_accuracy"] - results["pruned_accuracy"]
    lines += ["", f"Bar (≥ 70 % of the maps removed for ≤ 1.0 point lost): {results['pruned_stage']} removes "
              f"{100 * results['maps_removed_fraction']:.1f} % of the maps for {lost:+.2f} points lost "
              f"({'met' if results['maps_removed_fraction'] >= 0.7 and lost <= 1.0 else 'not met'}).", "",
              "The capstone's published figures (ETL2 + ETL9G, 3,156 classes, 96×96; quoted, not measured here):", "",
              "| model | maps removed | conv MMACs | test acc. |", "|---|---:|---:|---:|"]
    for c in CAPSTONE.values():
        removed = f"{c['maps_removed']:.1f} %" if "maps_removed" in c else "—"
        macs = f"{c['conv_macs_m']:.1f}" if "conv_macs_m" in c else "—"
        lines.append(f"| {c['name']} | {removed} | {macs} | {c['test']:.2f} % |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a smoke run on the kana with a small network")
    parser.add_argument("--out", type=Path, default=Path("docs"), help="folder for OCR.md and ocr_results.json")
    for name, value in asdict(Settings()).items():
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            parser.add_argument(f"--{name.replace('_', '-')}", type=type(value), default=None)
    parser.add_argument("--classes", choices=("kana", "kana+kanji", "jis"), default=None)
    args = parser.parse_args(argv)
    s = QUICK if args.quick else Settings()
    overrides = {k: v for k, v in vars(args).items() if k in asdict(s) and v is not None}
    s = Settings(**{**asdict(s), **overrides})
    results = run(s, args.out)
    print(json.dumps({k: v for k, v in results.items() if k not in ("rows", "settings")}, ensure_ascii=False))


if __name__ == "__main__":
    main()
