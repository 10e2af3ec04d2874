"""Prune an unmodified torchvision ResNet-18 to half its FLOPs, fine-tuning between steps.

Run: python examples/resnet_auto.py   (random data; swap in your loader)
"""

import torch
import torchvision
from torch import nn

import prunable


def main() -> None:
    torch.manual_seed(0)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model = torchvision.models.resnet18(num_classes=10).to(device)
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    x, y = torch.randn(16, 3, 64, 64, device=device), torch.randint(0, 10, (16,), device=device)

    def fine_tune() -> float:
        loss = nn.functional.cross_entropy(model(x), y)
        loss.backward()
        opt.step()
        opt.zero_grad()
        return loss.item()

    pruner = prunable.Pruner(model, x[:1], optimizer=opt)
    print(pruner.groups[0])
    history = pruner.prune_to(flops=0.5, fine_tune=fine_tune, channels_per_step=64)
    last = history[-1]
    print(f"{last['step']} steps: FLOPs {last['flops']:.2f}, params {last['params']:.2f}, loss {last['metric']:.3f}")
    print(pruner.history[0])


if __name__ == "__main__":
    main()
