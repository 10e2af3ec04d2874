"""Bad input is refused with a clear message and leaves model and optimizer bit-identical."""

import os
import tempfile

import pytest
import torch
from torch import nn

from helpers import Opaque
import prunable
from prunable import ModelFileError, EstimationError, PrunableError, Pruner, PruningValueError, TaylorActivation, WeightNorm


def make():
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
        nn.Conv2d(8, 8, 3, padding=1), Opaque(8), nn.ReLU(),
        nn.Conv2d(8, 6, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(6 * 4 * 4, 3),
    )
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    x = torch.randn(4, 3, 4, 4)
    nn.functional.cross_entropy(model(x), torch.tensor([0, 1, 2, 0])).backward()
    opt.step()
    return model, opt, x


def snapshot(model, opt):
    state = {k: v.clone() for k, v in model.state_dict().items()}
    optim = {id(p): {k: v.clone() for k, v in s.items() if torch.is_tensor(v)} for p, s in opt.state.items()}
    return state, optim


def quiet_pruner(model, x, **kw):
    with pytest.warns(UserWarning):
        return Pruner(model, x, **kw)


def _inject_nan(model):
    with torch.no_grad():
        model[6].weight[0, 0, 0, 0] = float("nan")


def _nan_weights(model, opt, x):
    quiet_pruner(model, x, criterion=WeightNorm()).step(1)


def _corrupted_file(model, opt, x):
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "model.pt")
        prunable.save(model, path, architecture={"name": "unknown-to-test"}, example_input_shape=list(x.shape))
        with open(path, "r+b") as f:
            f.truncate(os.path.getsize(path) // 2)
        prunable.load(path)


def _in_inference_mode(model, opt, x):
    pruner = quiet_pruner(model, x, criterion=WeightNorm())
    with torch.inference_mode():
        pruner.step(1)


def _estimate_under_no_grad(model, opt, x):
    pruner = quiet_pruner(model, x)
    with torch.no_grad(), pruner.estimate():
        model(x)


CASES = {
    "ratio above 1": (lambda m, o, x: quiet_pruner(m, x, criterion="l1").prune_to(flops=1.5), PruningValueError, "1.5"),
    "ratio zero": (lambda m, o, x: quiet_pruner(m, x, criterion="l1").step(0.0), PruningValueError, "0.0"),
    "negative n": (lambda m, o, x: quiet_pruner(m, x, criterion="l1").step(-3), PruningValueError, "-3"),
    "n too large": (lambda m, o, x: quiet_pruner(m, x, criterion="l1").step(10_000), PruningValueError, "10000"),
    "unknown criterion": (lambda m, o, x: Pruner(m, x, criterion="tayler"), PruningValueError, "tayler"),
    "no gradients collected": (lambda m, o, x: quiet_pruner(m, x).step(1), EstimationError, "estimate"),
    "estimation under no_grad": (_estimate_under_no_grad, EstimationError, "no_grad"),
    "wrong input shape": (lambda m, o, x: Pruner(m, torch.randn(4, 5, 4, 4)), PruningValueError, r"\(4, 5, 4, 4\)"),
    "wrong input dtype": (lambda m, o, x: Pruner(m, x.double()), PruningValueError, "Double|double"),
    "wrong input device": (lambda m, o, x: Pruner(m, x.to("meta")), PruningValueError, "meta"),
    "inference mode": (_in_inference_mode, PruningValueError, "inference_mode"),
    "nan weights": (_nan_weights, EstimationError, "group 6"),
    "ignored layer not in model": (lambda m, o, x: Pruner(m, x, ignored_layers=["fc9"]), PruningValueError, "fc9"),
    "ignored module not in model": (lambda m, o, x: Pruner(m, x, ignored_layers=[nn.Linear(2, 2)]), PruningValueError, "Linear"),
    "plan for another architecture": (lambda m, o, x: quiet_pruner(m, x).prune({"layer1.0.conv1": [0]}), PruningValueError, "layer1.0.conv1"),
    "index out of range": (lambda m, o, x: quiet_pruner(m, x).prune({"6": [6]}), PruningValueError, "index 6"),
    "corrupted saved file": (_corrupted_file, ModelFileError, "model.pt"),
    "custom module without handler": (lambda m, o, x: quiet_pruner(m, x).prune({"3": [1]}), PruningValueError, "no handler"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_bad_input_is_refused_and_nothing_changes(case):
    action, error, message = CASES[case]
    model, opt, x = make()
    if case == "nan weights":
        _inject_nan(model)
    before_state, before_opt = snapshot(model, opt)
    with pytest.raises(error, match=message) as info:
        action(model, opt, x)
    assert isinstance(info.value, PrunableError)
    after_state, after_opt = snapshot(model, opt)
    assert after_state.keys() == before_state.keys()
    for k in before_state:
        assert torch.equal(after_state[k].nan_to_num(), before_state[k].nan_to_num()), k
        assert torch.equal(after_state[k].isnan(), before_state[k].isnan()), k
    for pid, state in before_opt.items():
        for k, v in state.items():
            assert torch.equal(after_opt[pid][k], v)


def _rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


@pytest.mark.skipif(not os.path.exists("/proc/self/statm"), reason="needs /proc")
def test_memory_flat_over_200_estimation_batches():
    model, opt, x = make()
    model[4] = nn.Identity()
    pruner = Pruner(model, x, criterion=TaylorActivation())
    y = torch.tensor([0, 1, 2, 0])

    def batch():
        loss = nn.functional.cross_entropy(model(x), y)
        loss.backward()
        opt.step()
        opt.zero_grad()

    with pruner.estimate():
        for _ in range(20):
            batch()
        start = _rss_mb()
        for _ in range(200):
            batch()
        growth = _rss_mb() - start
    assert growth < 50, f"RSS grew by {growth:.1f} MB over 200 batches"
    assert pruner.criterion.accumulators["1"].count == 220 * 4
    assert not any(m._forward_hooks for m in model.modules())
