"""A small Japanese OCR model, pruned to a quarter of its FLOPs, saved and reloaded.

Trains a CharNet on the built-in kana + kanji (192 classes, rendered from the font
shipped with japanize-matplotlib; no download), prunes it with the Taylor
criterion and fine-tuning between steps (``Pruner.prune_to`` with a validation
callback), fine-tunes, saves the result as plain data and loads it back.

Run: python examples/jp_ocr.py   (a few minutes on 2 CPU cores)
"""

import tempfile
from pathlib import Path

import torch
from torch import nn

import prunable
from prunable.data.japanese import loaders


def accuracy(model: nn.Module, loader) -> float:
    model.eval()
    with torch.no_grad():
        hits = sum(int((model(x).argmax(1) == y).sum()) for x, y in loader)
    return hits / len(loader.dataset)


def main() -> None:
    torch.manual_seed(0)
    train, val, test = loaders(batch_size=64, classes="kana+kanji", size=32)
    classes = len(train.dataset.classes)
    config = (32, "M", 64, "M", 128, "M", 256, "M")  # the demo's network
    model = prunable.CharNet(num_classes=classes, config=config, input_size=32, hidden=256)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=5e-4)

    def epoch() -> None:
        model.train()
        for x, y in train:
            opt.zero_grad()
            nn.functional.cross_entropy(model(x), y).backward()
            opt.step()

    for _ in range(3):
        epoch()
    one = next(iter(test))[0][:1]
    print(f"trained: {accuracy(model, test):.1%} test accuracy, {prunable.count_flops(model, one) / 1e6:.1f} MFLOPs")

    batches = iter(())

    def fine_tune() -> float:  # one training minibatch, inside pruner.estimate()
        nonlocal batches
        x, y = next(batches, (None, None))
        if x is None:
            batches = iter(train)
            x, y = next(batches)
        model.train()
        loss = nn.functional.cross_entropy(model(x), y)
        loss.backward()
        opt.step()
        opt.zero_grad()
        return loss.item()

    pruner = prunable.Pruner(model, next(iter(train))[0][:2], optimizer=opt)
    pruner.prune_to(flops=0.25, fine_tune=fine_tune, prune_every=10, channels_per_step=32,
                    on_step=lambda record: {"val_accuracy": accuracy(model, val)})
    epoch()
    print(pruner.report())
    print(f"pruned + fine-tuned: {accuracy(model, test):.1%} test accuracy")

    path = Path(tempfile.mkdtemp()) / "jp_ocr.pt"
    prunable.save(model, path, plans=pruner.history, example_input_shape=tuple(one.shape),
                  architecture={"name": "CharNet", "num_classes": classes, "config": list(config),
                                "input_size": 32, "hidden": 256})
    loaded = prunable.load(path)
    print(f"reloaded from {path}: {accuracy(loaded, test):.1%} test accuracy")


if __name__ == "__main__":
    main()
