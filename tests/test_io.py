import os
import pickle

import pytest
import torch

import prunable
from prunable import Pruner, TaylorActivation, count_params, io

ARCH = {"name": "CharNet", "num_classes": 7, "config": [8, "M", 12, "M"], "input_size": 16, "hidden": 16}
SHAPE = (1, 1, 16, 16)


def _pruned_net():
    """A small CharNet, trained a little and pruned twice with the Taylor criterion."""
    net = io.build_model(ARCH)
    opt = torch.optim.SGD(net.parameters(), lr=0.05, momentum=0.9)
    x, y = torch.randn(16, 1, 16, 16), torch.randint(0, 7, (16,))
    pruner = Pruner(net, x[:2], criterion=TaylorActivation(), optimizer=opt)
    for n in (3, 4):
        with pruner.estimate():
            for _ in range(2):
                loss = torch.nn.functional.cross_entropy(net(x), y)
                opt.zero_grad()
                loss.backward()
                opt.step()
        pruner.step(n)
    return net, pruner


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    torch.manual_seed(0)
    net, pruner = _pruned_net()
    path = tmp_path_factory.mktemp("io") / "net.pt"
    io.save(net, path, plans=pruner.history, architecture=ARCH, example_input_shape=SHAPE, meta={"note": "test"})
    return net.eval(), pruner, path


def _evil_payload(marker):
    class Evil:
        def __reduce__(self):
            return os.mkdir, (str(marker),)

    return {"format": io.FORMAT, "architecture": Evil(), "plans": [], "input_shape": list(SHAPE), "state_dict": {}}


def test_round_trip_gives_equal_outputs(saved):
    net, _, path = saved
    loaded = io.load(path)
    x = torch.randn(5, 1, 16, 16)
    assert not loaded.training
    assert torch.equal(loaded(x), net(x))
    assert {k: v.shape for k, v in loaded.state_dict().items()} == {k: v.shape for k, v in net.state_dict().items()}
    assert count_params(loaded) < count_params(io.build_model(ARCH))


def test_load_accepts_a_fresh_model_or_a_builder(saved):
    net, _, path = saved
    x = torch.randn(3, 1, 16, 16)
    fresh = prunable.CharNet(7, config=[8, "M", 12, "M"], input_size=16, hidden=16)
    assert torch.equal(io.load(path, fresh)(x), net(x))
    calls = []
    loaded = io.load(path, build=lambda arch: calls.append(arch) or io.build_model(arch))
    assert calls == [ARCH] and torch.equal(loaded(x), net(x))


def test_file_is_plain_data(saved):
    _, pruner, path = saved
    payload = torch.load(path, weights_only=True)
    assert payload["format"] == io.FORMAT
    assert payload["architecture"] == ARCH
    assert payload["plans"] == [p.to_dict() for p in pruner.history]
    assert payload["input_shape"] == list(SHAPE)
    assert payload["meta"]["note"] == "test"


def test_info_describes_without_building(saved):
    net, _, path = saved
    data = io.info(path)
    assert data["plans"] == 2 and data["channels_removed"] == 7
    assert data["params"] == count_params(net)
    assert data["file_size"] == os.path.getsize(path)
    assert data["layers"]["features.0"] == list(net.features[0].weight.shape)
    assert sum(n for plan in data["history"] for n in plan.values()) == 7
    assert data["flops"] > 0 and data["architecture"] == ARCH


def test_save_to_a_file_object_and_an_unpruned_model():
    import io as stdio

    net = io.build_model(ARCH)
    buffer = stdio.BytesIO()
    io.save(net, buffer, architecture=ARCH, example_input_shape=SHAPE)
    buffer.seek(0)
    x = torch.randn(2, 1, 16, 16)
    assert torch.equal(io.load(buffer)(x), net.eval()(x))


@pytest.mark.parametrize("protocol", [None, 2, 4])
def test_malicious_pickle_is_refused_not_run(tmp_path, protocol):
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pt"
    if protocol is None:
        torch.save(_evil_payload(marker), path)
    else:  # a bare pickle; protocol 4 is refused before its GLOBAL is even reached
        path.write_bytes(pickle.dumps(_evil_payload(marker), protocol=protocol))
    expected = io.ModelFileError if protocol == 4 else io.UnsafeFileError
    for reader in (io.load, io.info, io.read):
        with pytest.raises(expected, match="nothing was run") as caught:
            reader(path)
        assert isinstance(caught.value, prunable.PrunableError)
        assert isinstance(caught.value.__cause__, pickle.UnpicklingError)
        assert protocol == 4 or "posix.mkdir" in str(caught.value) or "os.mkdir" in str(caught.value)
    assert not marker.exists()


def test_the_malicious_file_really_is_malicious(tmp_path):
    """Control for the test above: an unsafe load does run the payload."""
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pt"
    torch.save(_evil_payload(marker), path)
    torch.load(path, weights_only=False)
    assert marker.exists()


def _write(path, **changes):
    payload = {"format": io.FORMAT, "architecture": ARCH, "plans": [], "input_shape": list(SHAPE),
               "state_dict": io.build_model(ARCH).state_dict(), **changes}
    torch.save(payload, path)
    return path


def test_unknown_format_is_named(tmp_path):
    with pytest.raises(io.ModelFileError, match="'other/9'"):
        io.load(_write(tmp_path / "m.pt", format="other/9"))


def test_unknown_architecture_is_named(tmp_path):
    path = _write(tmp_path / "m.pt", architecture={"name": "NoSuchNet"})
    with pytest.raises(io.ModelFileError, match="'NoSuchNet'.*CharNet"):
        io.load(path)


def test_bad_architecture_arguments(tmp_path):
    with pytest.raises(io.ModelFileError, match="bad arguments"):
        io.load(_write(tmp_path / "m.pt", architecture={**ARCH, "depth": 3}))


def test_plan_that_does_not_fit_is_reported(tmp_path):
    path = _write(tmp_path / "m.pt", plans=[{"features.99": [0]}])
    with pytest.raises(io.ModelFileError, match="plan 1 of 1"):
        io.load(path)


def test_weights_that_do_not_fit_are_reported(tmp_path):
    state = io.build_model({**ARCH, "hidden": 8}).state_dict()
    with pytest.raises(io.ModelFileError, match="do not fit"):
        io.load(_write(tmp_path / "m.pt", state_dict=state))


def test_missing_and_garbage_files(tmp_path):
    with pytest.raises(io.ModelFileError, match="no such model file"):
        io.load(tmp_path / "absent.pt")
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"not a model at all")
    with pytest.raises(io.ModelFileError, match="not a prunable model file") as caught:
        io.load(garbage)
    assert not isinstance(caught.value, io.UnsafeFileError)
    other = tmp_path / "other.pt"
    torch.save({"weights": torch.zeros(2)}, other)
    with pytest.raises(io.ModelFileError, match="no 'format' key"):
        io.info(other)


def test_torchvision_architecture():
    pytest.importorskip("torchvision")
    net = io.build_model({"name": "torchvision", "model": "resnet18", "num_classes": 10})
    assert net.fc.out_features == 10
    with pytest.raises(io.ModelFileError, match="no_such_model"):
        io.build_model({"name": "torchvision", "model": "no_such_model", "num_classes": 10})


@pytest.mark.slow
def test_torchvision_round_trip(tmp_path):
    pytest.importorskip("torchvision")
    arch = {"name": "torchvision", "model": "resnet18", "num_classes": 10}
    net = io.build_model(arch)
    x = torch.randn(2, 3, 32, 32)
    pruner = Pruner(net, x, criterion=prunable.WeightNorm())
    pruner.step(40)
    pruner.step(40)
    io.save(net, tmp_path / "r.pt", plans=pruner.history, architecture=arch, example_input_shape=(1, 3, 32, 32))
    assert torch.equal(io.load(tmp_path / "r.pt")(x), net.eval()(x))
    assert io.info(tmp_path / "r.pt")["channels_removed"] == 80
