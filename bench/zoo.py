"""Table 5: every torchvision classification model, 30 % of each group's channels, ours vs Torch-Pruning.

Models and inputs come from ``tests/zoo_models.py`` (random weights, 10
classes, eval mode, small valid inputs, mostly 64×64). For each model:

- **ours**: ``Pruner(model, x, criterion=WeightNorm())``, then
  ``pruner.prune({g.id: scores[g.id].argsort()[:k]})`` with ``k`` = 30 % of
  each prunable group (at least one channel kept; for a group feeding
  attention heads, 30 % of each head's dimensions, the same in every head);
- **TP**: Torch-Pruning ``BasePruner`` + ``MagnitudeImportance(p=1)``,
  ``pruning_ratio=0.3``, the 10-way classifier ignored, attention heads
  declared for ``nn.MultiheadAttention``;

"ok" means the pruned model runs, its output shape is unchanged and finite,
and its FLOPs and params are strictly lower. Only what a user calls is timed
(ours: the constructor, the plan, ``prune``; TP: the constructor and
``step()``); the groups shown are counted outside the timed region, for both
libraries alike. Each library gets ``LIMIT`` seconds per model for building
its graph and pruning (a ``SIGALRM`` interrupts it: "timeout", counted apart
from failures). A library that prunes a model is timed on ``REPEATS`` fresh
deep copies, the libraries alternating (each run again under ``LIMIT``), so
every time shown, and the summed time over the models both libraries prune,
is a median (range) of ``REPEATS`` runs: the summed time of run *i* is the sum
of every model's run *i*, and ours/TP is the median (range) of those run-by-run
ratios; the spread of the per-model ratios is shown too.
Also writes ``docs/zoo.md``.

Run: ``python bench/zoo.py [--quick]`` (``--quick``: the representative subset
that ``make test`` uses).
"""

from __future__ import annotations

import copy
import gc
import math
import signal
import statistics
import sys
from contextlib import contextmanager
from typing import Any, Callable

import torch

import common
import layer_table
import task_zoo
import transformer_zoo
from common import REPEATS, REPO, Runs, fmt_ratio_runs, fmt_runs, markdown_table, short_error, timed

sys.path.insert(0, str(REPO / "tests"))
from helpers import fraction_plan  # noqa: E402
from zoo_models import REPRESENTATIVE, all_models, build  # noqa: E402

FRACTION = 0.3
LIMIT = 20  # seconds per model and library
CLASSES = 10
ZOO_DOC = REPO / "docs" / "zoo.md"


class Timeout(BaseException):
    """A library ran past ``LIMIT`` seconds on one model.

    A ``BaseException`` (like ``KeyboardInterrupt``) so that a library's own
    ``except Exception`` (prunable's trial prunes, for one) cannot swallow it.
    """


@contextmanager
def time_limit(seconds: int):
    def handler(signum, frame):
        raise Timeout(f"over {seconds} s")

    previous = signal.signal(signal.SIGALRM, handler)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


def _check(model: torch.nn.Module, x: torch.Tensor, shape: tuple, before: dict[str, int]) -> dict[str, Any]:
    """Status ("ok" or why not) and the pruned model's FLOPs and params."""
    from prunable import count_flops, count_params

    with torch.no_grad():
        out = model(x)
    after = {"flops": count_flops(model, x), "params": count_params(model)}
    if tuple(out.shape) != shape:
        status = f"failed: output shape {tuple(out.shape)} != {shape}"
    elif not bool(torch.isfinite(out).all()):
        status = "failed: non-finite output"
    elif after["flops"] >= before["flops"] or after["params"] >= before["params"]:
        status = "failed: FLOPs or params not lower"
    else:
        status = "ok"
    return {"status": status, **after}


class Ours:
    """prunable as a user calls it: ``Pruner(...)``, then a 30 % plan and ``prune``."""

    @staticmethod
    def build(model: torch.nn.Module, x: torch.Tensor) -> Any:
        from prunable import Pruner, WeightNorm

        return Pruner(model, x, criterion=WeightNorm())

    @staticmethod
    def groups(pruner: Any) -> str:
        return f"{len(pruner.groups)}/{len(pruner.graph.groups)}"

    @staticmethod
    def step(pruner: Any) -> None:
        plan = fraction_plan(pruner, FRACTION)
        if not plan:
            raise RuntimeError(f"no prunable group ({len(pruner.graph.groups)} groups)")
        pruner.prune(plan)


class Theirs:
    """Torch-Pruning as a user calls it: ``BasePruner(...)``, then ``step()``."""

    @staticmethod
    def build(model: torch.nn.Module, x: torch.Tensor) -> Any:
        import torch_pruning as tp

        return common.tp_pruner(model, x, tp.importance.MagnitudeImportance(p=1), FRACTION, CLASSES)

    @staticmethod
    def groups(pruner: Any) -> str:
        return str(sum(1 for _ in pruner.DG.get_all_groups(ignored_layers=pruner.ignored_layers,
                                                            root_module_types=pruner.root_module_types)))

    @staticmethod
    def step(pruner: Any) -> None:
        pruner.step()


def run_once(lib: type, model: torch.nn.Module, x: torch.Tensor, count: bool) -> tuple[float, dict[str, Any]]:
    """Timed build and step of ``lib`` (each under what is left of ``LIMIT``); groups counted untimed."""
    with common.quiet(), time_limit(LIMIT):
        build, pruner = timed(lambda: lib.build(model, x))
    info = {"groups": lib.groups(pruner)} if count else {}
    with common.quiet(), time_limit(max(1, math.ceil(LIMIT - build))):
        step, _ = timed(lambda: lib.step(pruner))
    if build + step > LIMIT:
        raise Timeout(f"over {LIMIT} s")
    return build + step, info


def attempt(lib: type, src: torch.nn.Module, x: torch.Tensor, shape: tuple, before: dict[str, int],
            spent: list[float]) -> dict[str, Any]:
    """One more run of ``lib`` on a deep copy of ``src``; ``spent`` collects its times (first run checked)."""
    return attempt_with(src, spent, lambda model, first: run_once(lib, model, x, count=first),
                        lambda model: _check(model, x, shape, before), f"timeout (> {LIMIT} s)")


def attempt_with(src: torch.nn.Module, spent: list[float],
                 run: Callable[[torch.nn.Module, bool], tuple[float, dict[str, Any]]],
                 check: Callable[[torch.nn.Module], dict[str, Any]], timeout_status: str) -> dict[str, Any]:
    """``run(copy, first)`` on a deep copy of ``src``, its time appended to ``spent``; the first run is
    also ``check``-ed. A :class:`Timeout` or any error becomes the result's ``status``."""
    result: dict[str, Any] = {}
    model = copy.deepcopy(src)
    try:
        seconds, result = run(model, not spent)
        spent.append(seconds)
        if len(spent) == 1:
            result.update(check(model))
    except Timeout:
        result.update(status=timeout_status)
    except Exception as exc:  # noqa: BLE001 - reported in the table
        result.update(status=f"failed: {short_error(exc)}")
    del model
    gc.collect()
    return result


def run_model(name: str) -> dict[str, Any]:
    """Both libraries on ``name``, ``REPEATS`` runs each, alternating (a library that fails or times out once
    is not run again)."""
    from prunable import count_flops, count_params

    common.seed_all(0)
    src, x = build(name)
    with torch.no_grad():
        shape = tuple(src(x).shape)
    before = {"flops": count_flops(src, x), "params": count_params(src)}
    libs = {"ours": Ours, "theirs": Theirs}
    times: dict[str, list[float]] = {"ours": [], "theirs": []}
    results = {who: attempt(lib, src, x, shape, before, times[who]) for who, lib in libs.items()}
    for _ in range(REPEATS - 1):
        for who, lib in libs.items():
            if results[who]["status"] == "ok":
                later = attempt(lib, src, x, shape, before, times[who])
                if "status" in later:  # a later run failed or timed out: the model's status says so
                    results[who] = {**results[who], "status": later["status"]}
    del src
    gc.collect()
    for who, result in results.items():
        result["runs"] = Runs(tuple(times[who])) if result["status"] == "ok" else None
    return {"name": name, "input": tuple(x.shape[-2:]), "before": before, **results}


def _millions(n: int | None) -> str:
    return "—" if n is None else f"{n / 1e6:,.2f} M"


def write_doc(results: list[dict[str, Any]], summary: str) -> None:
    rows = []
    for r in results:
        o, t, b = r["ours"], r["theirs"], r["before"]
        rows.append([f"`{r['name']}`", f"{r['input'][0]}×{r['input'][1]}", o.get("groups", "—"),
                     f"{_millions(b['params'])} → {_millions(o.get('params'))}",
                     f"{_millions(b['flops'])} → {_millions(o.get('flops'))}", o["status"], t["status"]])
    table = markdown_table(["model", "input", "groups (prunable/total)", "params before → after",
                            "FLOPs before → after", "prunable", "Torch-Pruning"], rows)
    ZOO_DOC.parent.mkdir(exist_ok=True)
    old = ZOO_DOC.read_text() if ZOO_DOC.exists() else ""  # the sections of bench/task_zoo.py, transformer_zoo.py
    kept = "\n\n".join(b for b in (task_zoo.kept_block(old), *transformer_zoo.kept_blocks(old)) if b)
    ZOO_DOC.write_text(
        "# torchvision model zoo\n\n"
        "Generated by `python bench/zoo.py` (also run by `make bench`); do not edit by hand.\n\n"
        "Every classification model of `torchvision.models.list_models(module=torchvision.models)`, random "
        f"weights, 10 classes, the input of `tests/zoo_models.py`. prunable removes {FRACTION:.0%} of the "
        "channels of every prunable group (lowest L1 norm, `WeightNorm()`); \"groups\" counts the groups "
        "`Pruner` may prune over all groups its graph found (the rest are the model output or skipped with a "
        "reason, see `pruner.skipped`). Params and FLOPs are prunable's result. Torch-Pruning "
        f"(`BasePruner`, `pruning_ratio={FRACTION}`) is run on an identical copy for comparison. \"ok\" = the "
        "pruned model runs, output shape unchanged and finite, FLOPs and params strictly lower; \"timeout\" = "
        f"graph + pruning took over {LIMIT} s.\n\n"
        f"{summary}\n\n{table}\n" + (f"\n{kept}\n" if kept else ""))
    layer_table.main()  # the layer types section (bench/layer_table.py) follows the torchvision table


def main(quick: bool = False) -> str:
    common.setup(0)
    names = [n for n in all_models() if n in REPRESENTATIVE] if quick else all_models()
    results = []
    for name in names:
        results.append(run_model(name))
        print(f"zoo: {name}: ours {results[-1]['ours']['status']}, TP {results[-1]['theirs']['status']}",
              file=sys.stderr, flush=True)
    count = lambda who, prefix: sum(r[who]["status"].startswith(prefix) for r in results)  # noqa: E731
    summary = "; ".join(
        f"{label}: **{count(who, 'ok')}/{len(results)} ok**, {count(who, 'timeout')} timeout, "
        f"{count(who, 'failed')} failed" for who, label in (("ours", "prunable"), ("theirs", "Torch-Pruning")))
    summary += f" ({'representative subset' if quick else 'every model'}; {LIMIT} s limit per model and library)."
    if not quick:
        write_doc(results, summary)
    both = [r for r in results if r["ours"]["status"] == r["theirs"]["status"] == "ok"]
    timing = _timing(both)
    shown = results if quick else [r for r in results if not r["ours"]["status"] == r["theirs"]["status"] == "ok"]
    rows = [[f"`{r['name']}`", r["ours"].get("groups", "—"), r["ours"]["status"], fmt_runs(r["ours"].get("runs")),
             r["theirs"]["status"], fmt_runs(r["theirs"].get("runs"))] for r in shown]
    table = markdown_table(["model", "ours groups", "ours", "ours time", "TP", "TP time"], rows)
    scope = "" if quick else ("Models where the two libraries differ or either fails (every model, with groups, "
                              "params and FLOPs, is in [docs/zoo.md](zoo.md)):\n\n")
    return f"{summary} {timing}\n\n{scope}{table}"


def _timing(both: list[dict[str, Any]]) -> str:
    """Summed time over the models both libraries prune, run by run, and the spread of per-model ratios."""
    if not both:
        return "No model is pruned by both libraries."
    runs = min(len(r[w]["runs"].times) for r in both for w in ("ours", "theirs"))
    ours, theirs = (Runs(tuple(sum(r[w]["runs"].times[i] for r in both) for i in range(runs)))
                    for w in ("ours", "theirs"))
    ratios = sorted(r["ours"]["runs"].median / r["theirs"]["runs"].median for r in both)
    quartiles = statistics.quantiles(ratios, n=4, method="inclusive") if len(ratios) > 1 else [ratios[0]] * 3
    return (f"Graph + prune time summed over the {len(both)} models both libraries prune, median (range) of "
            f"{runs} runs: ours {fmt_runs(ours)}, Torch-Pruning {fmt_runs(theirs)} "
            f"(ours/TP {fmt_ratio_runs(ours, theirs)}); per model (medians), ours/TP is {quartiles[1]:.2f}× at the "
            f"median (middle half {quartiles[0]:.2f}–{quartiles[2]:.2f}×, range {ratios[0]:.2f}–{ratios[-1]:.2f}×).")


if __name__ == "__main__":
    common.run_script(main, __doc__)
