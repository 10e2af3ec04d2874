import contextlib
import io as _io
import shutil
from pathlib import Path

import pytest
import torch

from prunable import Criterion, PruningValueError, io
from prunable.demo import CRITERIA, QUICK, DemoSettings, format_table, make_criterion, run_demo
from prunable.demo_report import README_END, README_START, format_readme, read_readme

README = Path(__file__).resolve().parents[1] / "README.md"

#: A run of a few seconds: 16×16 images, 4 training images per class, one epoch.
TINY = DemoSettings(size=16, config=(8, "M", 16, "M"), hidden=32, train_per_class=4, eval_per_class=2,
                    batch_size=32, epochs=1, prune_every=1, prune_step=4, finetune_epochs=1,
                    latency_repeats=3)


def _tiny(root, name, **kwargs):
    return run_demo(root / name, flops=0.5, seed=3, settings=TINY, data_root=root / "cache", progress=False,
                    threads=1, **kwargs)


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """A tiny run that also rewrites a copy of the README; its standard output is kept."""
    root = tmp_path_factory.mktemp("demo")
    shutil.copy(README, root / "README.md")
    printed = _io.StringIO()
    with contextlib.redirect_stdout(printed):
        result = _tiny(root, "out", readme=root / "README.md")
    (root / "stdout.txt").write_text(printed.getvalue(), encoding="utf-8")
    return root, result


def test_demo_prints_seed_and_threads(tiny_run):
    root, _ = tiny_run
    assert "seed 3, 1 torch thread(s)" in (root / "stdout.txt").read_text(encoding="utf-8")


def test_demo_rewrites_only_the_readme_block(tiny_run):
    root, result = tiny_run
    block, record = read_readme(root / "README.md")
    assert block == format_readme(result.record) and record == result.record
    assert record["mode"] == "custom" and record["seed"] == 3 and record["threads"] == 1
    assert result.table in block
    rows = [[r[k] for k in ("stage", "params", "flops")] for r in record["rows"]]
    assert rows == [[r[k] for k in ("stage", "params", "flops")] for r in result.rows]
    before, after = README.read_text(encoding="utf-8"), (root / "README.md").read_text(encoding="utf-8")
    outside = lambda text: (text[:text.index(README_START)], text[text.index(README_END):])  # noqa: E731
    assert outside(after) == outside(before)


def test_demo_refuses_a_readme_without_the_block_before_work(tmp_path):
    (tmp_path / "README.md").write_text("# no block here\n", encoding="utf-8")
    with pytest.raises(PruningValueError, match="demo:start"):
        run_demo(tmp_path / "out", settings=TINY, readme=tmp_path / "README.md")
    assert not (tmp_path / "out").exists()


def test_demo_writes_table_plot_and_models(tiny_run):
    root, result = tiny_run
    out = root / "out"
    for name in ("results.md", "results.json", "pruning.png", "baseline.pt", "pruned.pt"):
        assert (out / name).is_file(), name
    assert (out / "pruning.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    text = (out / "results.md").read_text(encoding="utf-8")
    assert result.table in text and "| trained baseline |" in text and "| after fine-tuning |" in text
    assert [r["stage"] for r in result.rows] == ["trained baseline", "after pruning", "after fine-tuning"]


def test_demo_reduces_flops_to_the_target(tiny_run):
    _, result = tiny_run
    base, pruned, tuned = result.rows
    assert pruned["flops"] < base["flops"] and pruned["flops"] <= 0.5 * base["flops"]
    assert pruned["params"] < base["params"] and tuned["flops"] == pruned["flops"]
    assert pruned["size_bytes"] < base["size_bytes"]
    flops = [s["flops"] for s in result.steps]
    assert flops[0] == 1.0 and flops == sorted(flops, reverse=True) and flops[-1] <= 0.5
    for row in result.rows:
        assert 0 <= row["test_accuracy"] <= 1 and row["latency_b1_ms"] > 0 and row["latency_b32_ms"] > 0


def test_demo_model_file_loads_with_the_reported_numbers(tiny_run):
    root, result = tiny_run
    model = io.load(root / "out" / "pruned.pt")
    assert sum(p.numel() for p in model.parameters()) == result.rows[-1]["params"]
    assert io.info(root / "out" / "pruned.pt")["flops"] == result.rows[-1]["flops"]
    assert model(torch.zeros(2, 1, 16, 16)).shape == (2, 92)


def test_demo_is_reproducible(tiny_run):
    root, result = tiny_run
    again = _tiny(root, "again")
    keys = ("test_accuracy", "params", "flops")
    assert [[r[k] for k in keys] for r in again.rows] == [[r[k] for k in keys] for r in result.rows]
    assert io.read(root / "again" / "pruned.pt")["plans"] == io.read(root / "out" / "pruned.pt")["plans"]


@pytest.mark.parametrize("kwargs, match", [
    ({"flops": 1.0}, "flops"), ({"flops": 0}, "flops"), ({"criterion": "psychic"}, "psychic.*taylor"),
    ({"seed": -1}, "seed"),
])
def test_demo_rejects_bad_arguments_before_work(tmp_path, kwargs, match):
    with pytest.raises(PruningValueError, match=match):
        run_demo(tmp_path / "out", settings=TINY, **kwargs)
    assert not (tmp_path / "out").exists()


def test_every_criterion_name_builds_a_criterion():
    assert set(CRITERIA) == {"taylor", "taylor-bn", "taylor-weight", "l1", "l2", "bn-scale", "mean-activation",
                             "apoz", "random"}
    for name in CRITERIA:
        assert isinstance(make_criterion(name, seed=1), Criterion)


def test_format_table_has_a_row_per_stage():
    row = {"stage": "s", "test_accuracy": 0.991, "params": 1234, "flops": 5e6, "latency_b1_ms": 0.5,
           "latency_b32_ms": 4.0, "size_bytes": 10240}
    lines = format_table([row, {**row, "stage": "t"}]).splitlines()
    assert len(lines) == 4 and "99.10 %" in lines[2] and "1,234" in lines[2] and "10.0 KiB" in lines[2]


@pytest.mark.slow
def test_quick_demo(tmp_path):
    """The --quick preset: under 2 minutes on an idle 2-core machine (the bound here allows for a busy one)."""
    result = run_demo(tmp_path / "out", quick=True, data_root=tmp_path / "cache", progress=False)
    assert result.wall_time < 300
    assert result.rows[-1]["flops"] <= 0.1 * result.rows[0]["flops"]
    assert result.rows[0]["test_accuracy"] > 0.9 and result.rows[-1]["test_accuracy"] > 0.5
    assert io.load(tmp_path / "out" / "pruned.pt")(torch.zeros(2, 1, QUICK.size, QUICK.size)).shape == (2, 92)
