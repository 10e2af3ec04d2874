"""bench/zoo.py and bench/latency_target.py: every timed figure is REPEATS runs (the zoo's summed line run by run)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

BENCH = Path(__file__).resolve().parents[1] / "bench"


@pytest.fixture()
def zoo(bench_script):
    return bench_script("zoo")


def _fake_lib(calls: list[str], name: str, seconds: list[float], fail_on: int | None = None):
    """A library whose n-th build + step takes ``seconds[n]`` (reported, not slept), failing on run ``fail_on``."""

    class Lib:
        @staticmethod
        def build(model, x):
            calls.append(name)
            if fail_on is not None and calls.count(name) == fail_on:
                raise RuntimeError(f"{name} broke on run {fail_on}")
            return model

        @staticmethod
        def groups(pruner):
            return "1/1"

        @staticmethod
        def step(pruner):
            with torch.no_grad():
                pruner[0].weight[:1] = 0.0

    return Lib


def _patch(zoo, monkeypatch, ours, theirs, seconds):
    """``build`` gives a tiny Linear model; ``run_once`` reports the scripted seconds instead of a wall time."""
    torch.manual_seed(0)
    monkeypatch.setattr(zoo, "build", lambda name: (torch.nn.Sequential(torch.nn.Linear(4, 3)), torch.randn(2, 4)))
    monkeypatch.setattr(zoo, "Ours", ours)
    monkeypatch.setattr(zoo, "Theirs", theirs)
    done = {"ours": 0, "theirs": 0}
    real = zoo.run_once

    def run_once(lib, model, x, count):
        _, info = real(lib, model, x, count)
        who = "ours" if lib is ours else "theirs"
        done[who] += 1
        return seconds[who][done[who] - 1], info

    monkeypatch.setattr(zoo, "run_once", run_once)
    # the scripted model loses no FLOPs, so accept the first-run check as ok
    monkeypatch.setattr(zoo, "_check", lambda model, x, shape, before: {"status": "ok", "flops": 1, "params": 1})


def test_every_model_gets_repeats_runs_per_library_alternating(zoo, monkeypatch):
    calls: list[str] = []
    seconds = {"ours": [1.0, 2.0, 3.0], "theirs": [4.0, 5.0, 6.0]}
    _patch(zoo, monkeypatch, _fake_lib(calls, "ours", seconds["ours"]),
           _fake_lib(calls, "theirs", seconds["theirs"]), seconds)
    result = zoo.run_model("any")
    assert calls == ["ours", "theirs"] * zoo.REPEATS
    assert result["ours"]["runs"].times == (1.0, 2.0, 3.0)
    assert result["theirs"]["runs"].times == (4.0, 5.0, 6.0)


def test_a_later_failure_is_the_models_status(zoo, monkeypatch):
    calls: list[str] = []
    seconds = {"ours": [1.0, 2.0, 3.0], "theirs": [4.0, 5.0, 6.0]}
    _patch(zoo, monkeypatch, _fake_lib(calls, "ours", seconds["ours"]),
           _fake_lib(calls, "theirs", seconds["theirs"], fail_on=2), seconds)
    result = zoo.run_model("any")
    assert result["theirs"]["status"].startswith("failed: RuntimeError: theirs broke on run 2")
    assert result["theirs"]["runs"] is None
    assert calls.count("theirs") == 2 and calls.count("ours") == zoo.REPEATS


def test_summed_time_adds_the_models_run_by_run(zoo):
    from common import Runs

    both = [{"ours": {"runs": Runs((1.0, 9.0, 2.0))}, "theirs": {"runs": Runs((2.0, 2.0, 2.0))}},
            {"ours": {"runs": Runs((3.0, 1.0, 4.0))}, "theirs": {"runs": Runs((4.0, 6.0, 4.0))}}]
    line = zoo._timing(both)
    # run-by-run sums: ours 4, 10, 6 s (median 6, range 4–10); TP 6, 8, 6 s; ratios 0.67, 1.25, 1.00
    assert "median (range) of 3 runs" in line
    assert "ours 6.00 s (4.00–10.00)" in line
    assert "Torch-Pruning 6.00 s (6.00–8.00)" in line
    assert "ours/TP 1.00× (0.67–1.25)" in line


def test_latency_target_prunes_repeats_times_alternating_and_keeps_the_first_models(monkeypatch):
    monkeypatch.syspath_prepend(str(BENCH))
    sys.modules.pop("latency_target", None)
    import latency_target

    calls: list[str] = []

    def fake_prune(model, x, key, step):
        calls.append(key)
        n = calls.count(key)
        return f"{key} model {n}", {"seconds": float(n), "table": 10.0 * n if key == "latency" else 0.0}

    monkeypatch.setattr(latency_target, "_prune", fake_prune)
    out = latency_target._prunes(None, None, 0.1)
    assert calls == ["latency", "flops"] * latency_target.common.REPEATS
    assert out["latency"][0] == "latency model 1" and out["flops"][0] == "flops model 1"
    assert out["latency"][1]["table"].times == (10.0, 20.0, 30.0)
    assert out["flops"][1]["seconds"].times == (1.0, 2.0, 3.0)
    sys.modules.pop("latency_target", None)
