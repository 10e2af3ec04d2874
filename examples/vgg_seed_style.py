"""The seed's way: a VGG of prunable layers, Taylor estimates, one map at a time.

Run: python examples/vgg_seed_style.py
"""

import torch
from torch import nn

import prunable


def main() -> None:
    torch.manual_seed(0)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    net = prunable.vgg([16, "M", 32, "M", 64, "M"], num_classes=10, input_size=32).to(device)
    opt = torch.optim.SGD(net.parameters(), lr=0.01, momentum=0.9)
    x, y = torch.randn(64, 3, 32, 32, device=device), torch.randint(0, 10, (64,), device=device)
    params = prunable.count_params(net)
    with net.pruning(True):
        for step in range(10):
            for _ in range(3):  # a little fine-tuning between prunes, estimates accumulate
                nn.functional.cross_entropy(net(x), y).backward()
                opt.step()
                opt.zero_grad()
            layer, index = net.prune(optimizer=opt)
            net.reset_estimates()
            print(f"step {step}: removed feature map {index} of {layer}")
    print(f"params {params} -> {prunable.count_params(net)}")


if __name__ == "__main__":
    main()
