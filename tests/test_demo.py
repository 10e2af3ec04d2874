import pytest
import torch

from prunable import Criterion, PruningValueError, io
from prunable.demo import CRITERIA, QUICK, DemoSettings, format_table, make_criterion, run_demo

#: A run of a few seconds: 16×16 images, 4 training images per class, one epoch.
TINY = DemoSettings(size=16, config=(8, "M", 16, "M"), hidden=32, train_per_class=4, eval_per_class=2,
                    batch_size=32, epochs=1, prune_every=1, prune_step=4, finetune_epochs=1,
                    latency_repeats=3)


def _tiny(root, name):
    return run_demo(root / name, flops=0.5, seed=3, settings=TINY, data_root=root / "cache", progress=False, threads=1)


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("demo")
    result = _tiny(root, "out")
    return root, result


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
