"""The ``prunable`` command: ``demo``, ``prune`` and ``info``.

User errors (a missing or unsafe file, a bad value, an unknown criterion)
print one line ``prunable: error: ...`` on stderr and exit with status 2.

Example
-------
>>> main(["demo", "--flops", "2"])
2
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Sequence
from typing import Any, NoReturn

from .errors import PrunableError

__all__ = ["main", "build_parser", "format_info"]

_CRITERIA = ("taylor", "taylor-bn", "taylor-weight", "l1", "l2", "bn-scale", "mean-activation", "apoz", "random")


class _UsageError(Exception):
    """Raised instead of argparse's print-usage-and-exit."""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        raise _UsageError(message)


def _fraction(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number in (0, 1), got {text!r}") from None
    if not 0 < value < 1:
        raise argparse.ArgumentTypeError(f"expected a fraction in (0, 1) (0.1 = 10x fewer FLOPs), got {text!r}")
    return value


def _natural(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a non-negative integer, got {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected a non-negative integer, got {text!r}")
    return value


def _positive(text: str) -> int:
    value = _natural(text)
    if value == 0:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return value


def _step(text: str) -> int | float:
    try:
        return _positive(text)
    except argparse.ArgumentTypeError:
        pass
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not 0 < value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer or a fraction in (0, 1), got {text!r}")
    return value


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of ``prunable`` (errors raise instead of exiting).

    Example
    -------
    >>> build_parser().parse_args(["info", "model.pt"]).file
    'model.pt'
    """
    parser = _Parser(prog="prunable", description="Channel pruning for PyTorch CNNs (Molchanov et al. 2017).")
    sub = parser.add_subparsers(dest="command", required=True, metavar="{demo,prune,info}")
    demo = sub.add_parser("demo", help="train, prune and fine-tune a CharNet on built-in Japanese characters")
    demo.add_argument("--quick", action="store_true", help="a smoke run of under 2 minutes")
    demo.add_argument("--out", default="demo-out", help="output folder (default: demo-out)")
    demo.add_argument("--readme", metavar="FILE", help="rewrite the demo block of this README from the run "
                      "(`make demo` passes README.md)")
    _common(demo)
    prune = sub.add_parser("prune", help="prune a model saved by prunable, on the built-in data")
    prune.add_argument("model", help="a file written by prunable.io.save (e.g. the demo's baseline.pt)")
    prune.add_argument("--out", required=True, help="where to write the pruned model")
    prune.add_argument("--steps-between", type=_positive, default=10,
                       help="training batches between pruning steps (default: 10)")
    prune.add_argument("--step", type=_step, default=0.05,
                       help="channels removed per step: a count, or a fraction of those left (default: 0.05)")
    prune.add_argument("--finetune-epochs", type=_natural, default=2, help="fine-tuning epochs after pruning")
    _common(prune)
    info = sub.add_parser("info", help="describe a saved model: layers, params, FLOPs, pruning history")
    info.add_argument("file")
    info.add_argument("--json", action="store_true", help="print JSON")
    return parser


def _common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--flops", type=_fraction, default=0.1,
                        help="target FLOPs as a fraction of the model's (default: 0.1, i.e. 10x fewer)")
    parser.add_argument("--criterion", choices=_CRITERIA, default="taylor", help="importance criterion")
    parser.add_argument("--seed", type=_natural, default=0, help="random seed (default: 0)")
    parser.add_argument("--threads", type=_positive, default=2,
                        help="torch CPU threads (default: 2; on a busy machine use 1 or OMP_WAIT_POLICY=PASSIVE)")
    parser.add_argument("--no-progress", action="store_true", help="hide progress bars")


def _demo(args: argparse.Namespace) -> int:
    from .demo import run_demo

    result = run_demo(args.out, quick=args.quick, flops=args.flops, criterion=args.criterion, seed=args.seed,
                      threads=args.threads, progress=not args.no_progress, readme=args.readme)
    print(result.table)
    print(f"\nwall time {result.wall_time:.0f} s; results, plot and models in {args.out}/")
    return 0


def _prune(args: argparse.Namespace) -> int:
    from .demo import prune_file

    result = prune_file(args.model, args.out, flops=args.flops, criterion=args.criterion, seed=args.seed,
                        prune_every=args.steps_between, prune_step=args.step,
                        finetune_epochs=args.finetune_epochs, threads=args.threads, progress=not args.no_progress)
    print(result.table)
    print(f"\nsaved {args.out}")
    return 0


def format_info(data: dict[str, Any], path: str) -> str:
    """Human-readable text of :func:`prunable.io.info`.

    Example
    -------
    >>> text = format_info({"format": "prunable/1", "architecture": {"name": "CharNet"}, "input_shape": [1, 1, 8, 8],
    ...     "params": 10, "flops": None, "plans": 0, "channels_removed": 0, "history": [], "layers": {},
    ...     "file_size": 2048, "meta": {}}, "m.pt")
    >>> text.splitlines()[0]
    'm.pt: prunable/1, 2.0 KiB'
    """
    arch = ", ".join(f"{k}={v}" for k, v in data["architecture"].items() if k != "name")
    flops = "unknown" if data["flops"] is None else f"{data['flops'] / 1e6:.2f} M"
    params = "unknown" if data["params"] is None else f"{data['params']:,}"
    lines = [f"{path}: {data['format']}, {data['file_size'] / 1024:.1f} KiB",
             f"architecture: {data['architecture'].get('name')}({arch})",
             f"input shape: {data['input_shape']}", f"params: {params}", f"FLOPs: {flops}", "layers (weight shapes):"]
    lines += [f"  {name:<24} {shape}" for name, shape in data["layers"].items()]
    lines.append(f"pruning history: {data['plans']} plans, {data['channels_removed']} channels removed")
    for i, plan in enumerate(data["history"], 1):
        lines.append(f"  {i:3d}: " + ", ".join(f"{gid} -{n}" for gid, n in plan.items()))
    return "\n".join(lines)


def _info(args: argparse.Namespace) -> int:
    from . import io

    data = io.info(args.file)
    print(json.dumps(data, indent=1) if args.json else format_info(data, args.file))
    return 0


def _fail(message: str, code: int = 2) -> int:
    first = str(message).strip().splitlines()
    print(f"prunable: error: {first[0] if first else 'failed'}", file=sys.stderr)
    return code


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; returns the exit status.

    Parameters
    ----------
    argv
        Arguments without the program name; ``sys.argv[1:]`` by default.

    Returns
    -------
    int
        0 on success, 2 on a user error (one line on stderr), 1 if a needed
        package is missing.
    """
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except _UsageError as exc:
        return _fail(str(exc))
    except SystemExit as exc:  # --help
        return int(exc.code or 0)
    commands = {"demo": _demo, "prune": _prune, "info": _info}
    try:
        return commands[args.command](args)
    except BrokenPipeError:  # e.g. `prunable info FILE | head`
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1
    except (PrunableError, OSError) as exc:  # OSError: an unwritable --out, a full disk
        return _fail(str(exc))
    except ImportError as exc:
        return _fail(f"missing dependency: {exc}", code=1)
    except KeyboardInterrupt:
        return _fail("interrupted", code=130)


if __name__ == "__main__":
    sys.exit(main())
