import json
import os
import subprocess
import sys

import pytest
import torch

import prunable
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


# -- prune a model given by name -------------------------------------------------------------------------------------

def test_prune_a_torchvision_model_by_name(capsys, tmp_path):
    pytest.importorskip("torchvision")
    out = tmp_path / "r18.pt"
    argv = ["prune", "resnet18", "--flops", "0.5", "--criterion", "l2", "--out", str(out), "--input-shape", "1,3,32,32",
            "--num-classes", "10", "--no-progress", "--threads", "1"]
    assert main(argv) == 0
    assert f"saved {out}" in capsys.readouterr().out
    data = io.info(out)
    assert data["architecture"] == {"name": "torchvision", "model": "resnet18", "num_classes": 10}
    assert data["input_shape"] == [1, 3, 32, 32] and data["plans"] >= 1 and data["meta"]["criterion"] == "l2"
    model = io.load(out)  # rebuilt from the architecture, shrunk, weights loaded
    unpruned = io.build_model(data["architecture"]).eval()
    x = torch.zeros(1, 3, 32, 32)
    assert prunable.count_flops(model, x) <= 0.5 * prunable.count_flops(unpruned, x)
    assert main(["info", str(out)]) == 0
    assert "architecture: torchvision(model=resnet18, num_classes=10)" in capsys.readouterr().out


def test_prune_a_timm_model_by_name(capsys, tmp_path):
    pytest.importorskip("timm")
    out = tmp_path / "t.pt"
    assert main(["prune", "timm:resnet10t", "--flops", "0.8", "--out", str(out), "--input-shape", "2,3,32,32",
                 "--num-classes", "5", "--no-progress", "--threads", "1"]) == 0
    data = io.info(out)
    assert data["architecture"]["name"] == "timm" and data["meta"]["criterion"] == "l1"  # l1: the default by name
    assert io.load(out)(torch.zeros(2, 3, 32, 32)).shape == (2, 5)


@pytest.mark.parametrize("criterion", ["taylor", "apoz", "mean-activation", "taylor-bn"])
def test_criteria_that_need_data_are_refused_by_name(capsys, tmp_path, criterion):
    assert main(["prune", "resnet18", "--criterion", criterion, "--out", str(tmp_path / "o.pt")]) == 2
    _one_line_error(capsys, criterion, "needs training data", "data-free criteria: l1, l2, bn-scale, random")
    assert not (tmp_path / "o.pt").exists()


@pytest.mark.parametrize("argv, needles", [
    (["prune", "no_such_net", "--out", "o.pt"], ["no such model file or model name", "no_such_net"]),
    (["prune", "keras:resnet18", "--out", "o.pt"], ["unknown model library", "keras"]),
    (["prune", "resnet18", "--out", "o.pt", "--input-shape", "1,3,x"], ["--input-shape", "1,3,x"]),
])
def test_bad_model_names_exit_2(capsys, argv, needles):
    assert main(argv) == 2
    _one_line_error(capsys, *needles)


@pytest.mark.parametrize("content", [b"", b"my notes\n", b"hello notes\n", b"(lp0\n", "random.pt"])
@pytest.mark.parametrize("command", ["info", "prune"])
def test_files_that_are_not_model_files_exit_2(capsys, tmp_path, content, command):
    path = tmp_path / "notes.txt"
    if content == "random.pt":
        torch.save({"x": torch.randn(3)}, path)
    else:
        path.write_bytes(content)
    argv = [command, str(path)] + (["--out", str(tmp_path / "o.pt")] if command == "prune" else [])
    assert main(argv) == 2
    _one_line_error(capsys, "notes.txt", "not a prunable model file")


def test_info_of_a_file_saved_without_architecture(capsys, tmp_path):
    prunable.save(torch.nn.Linear(3, 2), tmp_path / "lin.pt")
    assert main(["info", str(tmp_path / "lin.pt")]) == 0
    out = capsys.readouterr().out
    assert "architecture: not saved" in out and "input shape: not saved" in out
