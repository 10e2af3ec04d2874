import json
import os
import subprocess
import sys

import pytest
import torch

from prunable import Pruner, WeightNorm, io
from prunable.cli import main

ARCH = {"name": "CharNet", "num_classes": 92, "config": [8, "M", 8, "M"], "input_size": 16, "hidden": 16}


@pytest.fixture(scope="module")
def model_file(tmp_path_factory):
    torch.manual_seed(0)
    net = io.build_model(ARCH)
    pruner = Pruner(net, torch.randn(2, 1, 16, 16), criterion=WeightNorm())
    pruner.step(2)
    path = tmp_path_factory.mktemp("cli") / "model.pt"
    io.save(net, path, plans=pruner.history, architecture=ARCH, example_input_shape=(1, 1, 16, 16))
    return path


def _one_line_error(capsys, *needles):
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("prunable: error: ")
    assert "Traceback" not in err
    for needle in needles:
        assert needle in lines[0]
    return lines[0]


@pytest.mark.parametrize("argv, needles", [
    (["demo", "--flops", "1.5"], ["--flops", "1.5"]),
    (["demo", "--flops", "0"], ["--flops", "'0'"]),
    (["demo", "--flops", "lots"], ["--flops", "lots"]),
    (["demo", "--criterion", "psychic"], ["psychic", "taylor"]),
    (["demo", "--seed", "-1"], ["--seed"]),
    (["demo", "--frobnicate"], ["--frobnicate"]),
    ([], ["required", "demo"]),
    (["explode"], ["explode"]),
    (["prune", "model.pt"], ["--out"]),
    (["info"], ["file"]),
    (["prune", "m.pt", "--out", "o.pt", "--step", "1.5"], ["--step", "1.5"]),
])
def test_bad_arguments_exit_2_with_one_line(capsys, argv, needles):
    assert main(argv) == 2
    _one_line_error(capsys, *needles)


def test_missing_file_exits_2(capsys, tmp_path):
    assert main(["info", str(tmp_path / "absent.pt")]) == 2
    _one_line_error(capsys, "no such model file", "absent.pt")
    assert main(["prune", str(tmp_path / "absent.pt"), "--out", str(tmp_path / "o.pt")]) == 2
    _one_line_error(capsys, "no such model file")


def test_unsafe_file_exits_2(capsys, tmp_path):
    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            return os.mkdir, (str(marker),)

    path = tmp_path / "evil.pt"
    torch.save({"format": io.FORMAT, "architecture": Evil()}, path)
    assert main(["info", str(path)]) == 2
    _one_line_error(capsys, "refused")
    assert not marker.exists()


def test_info_prints_layers_and_history(capsys, model_file):
    assert main(["info", str(model_file)]) == 0
    out = capsys.readouterr().out
    assert "CharNet" in out and "1 plans, 2 channels removed" in out
    assert "features.0" in out and "params:" in out


def test_info_json(capsys, model_file):
    assert main(["info", str(model_file), "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["channels_removed"] == 2 and data["architecture"] == ARCH


def test_help_exits_0(capsys):
    assert main(["--help"]) == 0
    assert "demo" in capsys.readouterr().out


def test_prune_rejects_a_model_that_does_not_fit_the_data(capsys, tmp_path):
    arch = {**ARCH, "num_classes": 5}
    path = tmp_path / "five.pt"
    io.save(io.build_model(arch), path, architecture=arch, example_input_shape=(1, 1, 16, 16))
    assert main(["prune", str(path), "--out", str(tmp_path / "o.pt"), "--flops", "0.5"]) == 2
    _one_line_error(capsys, "classes", "5")


def test_python_dash_m_prunable(tmp_path):
    run = subprocess.run([sys.executable, "-m", "prunable", "info", str(tmp_path / "absent.pt")],
                         capture_output=True, text=True, timeout=120)
    assert run.returncode == 2
    assert run.stderr.strip().startswith("prunable: error: no such model file")
    assert "Traceback" not in run.stderr


def test_prune_command_prunes_a_saved_model(capsys, tmp_path, model_file, monkeypatch):
    monkeypatch.setenv("PRUNABLE_CACHE", str(tmp_path / "cache"))
    out = tmp_path / "pruned.pt"
    argv = ["prune", str(model_file), "--out", str(out), "--flops", "0.7", "--steps-between", "1", "--criterion", "l1",
            "--step", "2", "--finetune-epochs", "0", "--no-progress", "--threads", "1"]
    assert main(argv) == 0
    assert "after pruning" in capsys.readouterr().out
    data = io.info(out)
    assert data["plans"] > 1 and data["flops"] <= 0.7 * io.info(model_file)["flops"]
    assert io.load(out)(torch.zeros(2, 1, 16, 16)).shape == (2, 92)
