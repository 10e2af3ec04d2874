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
import contextlib
import json
import os
import sys
import warnings
from collections.abc import Iterator, Sequence
from typing import Any, NoReturn

from .errors import PrunableError

__all__ = ["main", "build_parser", "format_info", "model_by_name", "needs_data", "prune_by_name"]

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
    prune = sub.add_parser("prune", help="prune a torchvision/timm model by name (data-free criteria), or a "
                                         "model file saved by prunable on the built-in data")
    prune.add_argument("model", help="a torchvision model name (resnet18), a timm name (timm:resnet10t; plain "
                                     "names not in torchvision are looked up in timm too), or a file written by "
                                     "prunable.io.save (e.g. the demo's baseline.pt)")
    prune.add_argument("--out", required=True, help="where to write the pruned model")
    prune.add_argument("--input-shape", type=_shape, default=None,
                       help="input shape for a model given by name, e.g. 1,3,224,224 (default: 1,3,S,S with S the "
                            "model's usual image size: 224 for most torchvision models, the pretrained config for "
                            "timm)")
    prune.add_argument("--num-classes", type=_positive, default=1000,
                       help="classes of a model given by name (default: 1000)")
    prune.add_argument("--steps-between", type=_positive, default=10,
                       help="training batches between pruning steps (default: 10)")
    prune.add_argument("--step", type=_step, default=0.05,
                       help="channels removed per step: a count, or a fraction of those left (default: 0.05)")
    prune.add_argument("--finetune-epochs", type=_natural, default=2, help="fine-tuning epochs after pruning")
    _common(prune, criterion=None)
    info = sub.add_parser("info", help="describe a saved model: layers, params, FLOPs, pruning history")
    info.add_argument("file")
    info.add_argument("--json", action="store_true", help="print JSON")
    return parser


def _shape(text: str) -> tuple[int, ...]:
    try:
        shape = tuple(int(part) for part in text.replace("x", ",").split(","))
    except ValueError:
        shape = ()
    if not shape or min(shape) < 1:
        raise argparse.ArgumentTypeError(f"expected positive integers separated by commas (1,3,224,224), got {text!r}")
    return shape


def _common(parser: argparse.ArgumentParser, criterion: str | None = "taylor") -> None:
    parser.add_argument("--flops", type=_fraction, default=0.1,
                        help="target FLOPs as a fraction of the model's (default: 0.1, i.e. 10x fewer)")
    default = "taylor" if criterion else "taylor for a model file, l1 for a model name"
    parser.add_argument("--criterion", choices=_CRITERIA, default=criterion,
                        help=f"importance criterion (default: {default})")
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
    if not os.path.exists(args.model):
        print(prune_by_name(args.model, args.out, flops=args.flops, criterion=args.criterion or "l1",
                            input_shape=args.input_shape, num_classes=args.num_classes, step=args.step,
                            seed=args.seed, threads=args.threads, progress=not args.no_progress))
        print(f"\nsaved {args.out}")
        return 0
    from .demo import prune_file

    result = prune_file(args.model, args.out, flops=args.flops, criterion=args.criterion or "taylor", seed=args.seed,
                        prune_every=args.steps_between, prune_step=args.step,
                        finetune_epochs=args.finetune_epochs, threads=args.threads, progress=not args.no_progress)
    print(result.table)
    print(f"\nsaved {args.out}")
    return 0


def needs_data(criterion: str) -> bool:
    """Whether the named criterion reads activations or gradients (so needs training data).

    Example
    -------
    >>> needs_data("taylor"), needs_data("l1")
    (True, False)
    """
    from .importance import make_criterion

    made = make_criterion(criterion)
    return bool(made.needs_grad or made.needs_activations)


def model_by_name(name: str, num_classes: int = 1000) -> tuple[Any, dict[str, Any], tuple[int, ...]]:
    """``(model, architecture, input shape)`` of a torchvision or timm classification model name.

    ``timm:NAME`` or ``torchvision:NAME`` chooses the library; a plain name is
    looked up in torchvision first, then in timm (when installed).

    Example
    -------
    >>> model, arch, shape = model_by_name("resnet18", num_classes=10)
    >>> arch, shape
    ({'name': 'torchvision', 'model': 'resnet18', 'num_classes': 10}, (1, 3, 224, 224))
    """
    from . import io

    source, _, bare = name.rpartition(":")
    if source not in ("", "torchvision", "timm"):
        raise io.ModelFileError(f"unknown model library {source!r} in {name!r}; use torchvision:NAME or timm:NAME")
    if source in ("", "torchvision") and bare in _torchvision_names():
        import torchvision

        arch = {"name": "torchvision", "model": bare, "num_classes": num_classes}
        size = torchvision.models.get_model_weights(bare).DEFAULT.transforms().crop_size[0]
        return io.build_model(arch), arch, (1, 3, size, size)
    if source in ("", "timm") and _timm_has(bare):
        arch = {"name": "timm", "model": bare, "num_classes": num_classes}
        model = io.build_model(arch)
        return model, arch, (1, *model.pretrained_cfg.get("input_size", (3, 224, 224)))
    raise io.ModelFileError(
        f"no such model file or model name: {name!r}; give a file written by prunable.save, a torchvision "
        "classification model (resnet18 …: torchvision.models.list_models()) or a timm model (timm:resnet10t"
        f"{'' if _timm_has(None) else '; timm is not installed'})")


def _torchvision_names() -> list[str]:
    try:
        import torchvision
    except ImportError:
        return []
    return torchvision.models.list_models(module=torchvision.models)


def _timm_has(name: str | None) -> bool:
    """Whether timm is installed and (when ``name`` is given) knows ``name``."""
    try:
        import timm
    except ImportError:
        return False
    return name is None or timm.is_model(name)


@contextlib.contextmanager
def _torch_threads(threads: int | None) -> Iterator[None]:
    import torch

    old = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(old)


def prune_by_name(
    name: str, out: str | os.PathLike[str], *, flops: float, criterion: str = "l1",
    input_shape: Sequence[int] | None = None, num_classes: int = 1000, step: int | float = 0.05, seed: int = 0,
    threads: int | None = None, progress: bool = True,
) -> str:
    """Prune a freshly built torchvision/timm model by name with a data-free criterion; save it to ``out``.

    Returns the pruner's report (markdown). The file loads with ``prunable.load(out)``.

    Raises
    ------
    PruningValueError
        If the criterion needs data (the message lists the data-free ones).
    ModelFileError
        If the name is neither a torchvision nor a timm model.
    """
    import torch

    from . import io
    from .errors import PruningValueError
    from .importance import CRITERIA
    from .pruner import Pruner

    if needs_data(criterion):
        free = ", ".join(n for n in CRITERIA if not needs_data(n))
        raise PruningValueError(
            f"criterion {criterion!r} needs training data, which a model given by name does not have; "
            f"data-free criteria: {free} (or prune with your data through the Python API)")
    torch.manual_seed(seed)
    with _torch_threads(threads), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # groups left alone are listed in the report's skipped count
        model, arch, default_shape = model_by_name(name, num_classes)
        shape = tuple(input_shape or default_shape)
        pruner = Pruner(model.eval(), torch.zeros(shape), criterion=criterion)
        pruner.prune_to(flops=flops, channels_per_step=step, progress=progress)
    io.save(model, out, plans=pruner.history, architecture=arch, example_input_shape=shape,
            meta={"criterion": criterion, "target_flops": flops, "source": name})
    return pruner.report() + f"\n\n{len(pruner.skipped)} group(s) left alone: see prunable.Pruner(...).skipped"


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
    given = data["architecture"]
    arch = "not saved (load it into a fresh instance: prunable.load(path, model))"
    if given is not None:
        arch = given.get("name") + "(" + ", ".join(f"{k}={v}" for k, v in given.items() if k != "name") + ")"
    flops = "unknown" if data["flops"] is None else f"{data['flops'] / 1e6:.2f} M"
    params = "unknown" if data["params"] is None else f"{data['params']:,}"
    shape = "not saved" if data["input_shape"] is None else data["input_shape"]
    lines = [f"{path}: {data['format']}, {data['file_size'] / 1024:.1f} KiB", f"architecture: {arch}",
             f"input shape: {shape}", f"params: {params}", f"FLOPs: {flops}", "layers (weight shapes):"]
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
