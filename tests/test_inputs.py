"""Example inputs as keyword arguments: a dict, or an ``(args, kwargs)`` pair (issue #12 item 4)."""

import copy

import pytest
import torch
from torch import nn

from prunable import DependencyGraph, Pruner, PruningValueError, count_flops
from prunable.flops import measure_latency, module_flops
from prunable.inputs import call_model, input_tensors, inputs_to, split_inputs
from tests.helpers import zero_plan


class KeywordNet(nn.Module):
    """Two image streams, one of them keyword-only, and an optional keyword scale."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Conv2d(3, 8, 3, padding=1)
        self.b = nn.Conv2d(2, 8, 3, padding=1)
        self.mid = nn.Conv2d(8, 12, 3, padding=1)
        self.head = nn.Linear(12, 4)

    def forward(self, image: torch.Tensor, *, depth: torch.Tensor, scale: float = 1.0) -> torch.Tensor:
        h = torch.relu(self.a(image) + self.b(depth)) * scale
        return self.head(torch.relu(self.mid(h)).mean((2, 3)))


def _inputs():
    return torch.randn(2, 3, 8, 8), torch.randn(2, 2, 8, 8)


@pytest.mark.parametrize("given, args, kwargs", [
    (torch.ones(1), 1, []),
    ((torch.ones(1), torch.ones(2)), 2, []),
    ([torch.ones(1), torch.ones(2)], 1, []),  # a list of images is one positional argument
    ({"x": torch.ones(1), "y": None}, 0, ["x", "y"]),
    (((torch.ones(1),), {"y": torch.ones(1)}), 1, ["y"]),
    ((({"a": 1},), {}), 1, []),  # a dict passed positionally
    ((torch.ones(1), {"y": 1}), 2, []),  # a 2-tuple whose first item is not a tuple stays positional
])
def test_convention(given, args, kwargs):
    a, k = split_inputs(given)
    assert len(a) == args and list(k) == kwargs


def test_helpers_keep_structure_and_move_every_tensor():
    image, depth = _inputs()
    given = ((image,), {"depth": depth, "scale": 2.0})
    moved = inputs_to(given, "meta")
    assert moved[0][0].is_meta and moved[1]["depth"].is_meta and moved[1]["scale"] == 2.0
    assert [t.shape for t in input_tensors(given)] == [image.shape, depth.shape]
    model = KeywordNet().eval()
    with torch.no_grad():
        torch.testing.assert_close(call_model(model, given), model(image, depth=depth, scale=2.0))


@pytest.mark.parametrize("form", ["dict", "pair"])
def test_keyword_inputs_trace_count_and_prune_like_positional_ones(form):
    image, depth = _inputs()
    model = KeywordNet().eval()
    given = {"image": image, "depth": depth} if form == "dict" else ((image,), {"depth": depth})
    graph = DependencyGraph(model, given)
    members = sorted((sorted({(m.target.name, m.producer) for m in g.members}), g.skip_reason is None)
                     for g in graph.groups)
    assert members == [([("a", True), ("b", True), ("mid", False)], True), ([("head", False), ("mid", True)], True),
                       ([("head", True)], False)]
    flops = count_flops(model, given)
    assert flops == count_flops(model, given) > 0 and module_flops(model, given)["mid"] > 0
    assert measure_latency(model, given, warmup=0, repeats=1) > 0

    pruner = Pruner(model, given, criterion="l1")
    plan = {g.id: [0, 2] for g in pruner.groups}
    reference = copy.deepcopy(model)
    zero_plan(reference, pruner.graph, plan)
    pruner.prune(plan)
    assert (model.a.out_channels, model.mid.out_channels) == (6, 10)
    assert count_flops(model, given) < flops
    with torch.no_grad():
        torch.testing.assert_close(model(image, depth=depth), reference(image, depth=depth), atol=1e-5, rtol=1e-4)


def test_keyword_inputs_on_the_wrong_device_are_refused():
    image, depth = _inputs()
    with pytest.raises(PruningValueError, match="example input on meta"):
        Pruner(KeywordNet(), {"image": image, "depth": depth.to("meta")})


def test_tiny_bert_traces_with_keyword_inputs_and_prunes_its_feed_forward_layers():
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    config = transformers.BertConfig(vocab_size=50, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                     intermediate_size=64, max_position_embeddings=16)
    model = transformers.BertModel(config).eval()
    inputs = {"input_ids": torch.randint(0, 50, (2, 8)), "attention_mask": torch.ones(2, 8, dtype=torch.long)}
    with pytest.warns(UserWarning):
        pruner = Pruner(model, inputs, criterion="l1")
    ids = {g.id for g in pruner.groups}
    assert {"encoder.layer.0.intermediate.dense", "encoder.layer.1.intermediate.dense"} <= ids
    plan = {gid: list(range(0, 64, 3)) for gid in ids if gid.endswith("intermediate.dense")}
    reference = copy.deepcopy(model)
    zero_plan(reference, pruner.graph, plan)
    pruner.prune(plan)
    assert model.encoder.layer[0].intermediate.dense.out_features == 64 - 22
    with torch.no_grad():
        torch.testing.assert_close(model(**inputs).last_hidden_state, reference(**inputs).last_hidden_state,
                                   atol=1e-5, rtol=1e-4)
