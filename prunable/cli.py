"""Command line interface: ``prunable demo``."""

from __future__ import annotations

import argparse
import sys

import torch

from .models import CharNet


def _demo(args: argparse.Namespace) -> int:
    torch.manual_seed(0)
    net = CharNet(10, config=[32, "M", 64, "M", 96, "M"], input_size=32, hidden=128)
    x, y = torch.randn(64, 1, 32, 32), torch.randint(0, 10, (64,))
    opt = torch.optim.SGD(net.parameters(), lr=0.01, momentum=0.9)
    before = sum(p.numel() for p in net.parameters())
    with net.pruning(True):
        for step in range(args.steps):
            loss = torch.nn.functional.cross_entropy(net(x), y)
            loss.backward()
            opt.step()
            opt.zero_grad()
            layer, index = net.prune(optimizer=opt)
            net.reset_estimates()
            print(f"step {step + 1:3d}  loss {loss.item():.3f}  removed {layer}[{index}]")
    after = sum(p.numel() for p in net.parameters())
    print(f"params {before} -> {after} ({after / before:.1%})")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="prunable", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser("demo", help="prune a CharNet end to end")
    demo.add_argument("--steps", type=int, default=20)
    args = parser.parse_args(argv)
    return _demo(args)


if __name__ == "__main__":
    sys.exit(main())
