import importlib
import sys
from pathlib import Path

import pytest
import torch

BENCH = Path(__file__).resolve().parents[1] / "bench"


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def state_copy(model: torch.nn.Module) -> dict:
    """A deep copy of a state dict, for asserting that a model is unchanged."""
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def assert_state_equal(model: torch.nn.Module, before: dict) -> None:
    after = model.state_dict()
    assert after.keys() == before.keys()
    for k, v in before.items():
        assert after[k].shape == v.shape, k
        assert torch.equal(after[k], v), k


@pytest.fixture()
def bench_script(monkeypatch):
    """Import a script of ``bench/`` as a module (``bench_script("zoo")``), fresh; forgotten after the test."""
    names = []

    def load(name: str):
        monkeypatch.syspath_prepend(str(BENCH))
        sys.modules.pop(name, None)
        names.append(name)
        return importlib.import_module(name)

    yield load
    for name in names:
        sys.modules.pop(name, None)
