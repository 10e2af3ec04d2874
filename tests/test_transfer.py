"""Plans made on a meta-device model, applied to the real weights (prunable.transfer)."""

import copy
import json

import pytest
import torch
from torch import nn

from prunable import EstimationError, Pruner, PruningValueError, SurgeryError, apply_plan, export_plan
from prunable.transfer import tensor_shapes
from tests.helpers import randomize_bn, zero_plan


class Block(nn.Module):
    def __init__(self, c: int) -> None:
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(c, 2 * c, 3, padding=1, bias=False), nn.BatchNorm2d(2 * c)
        self.conv2, self.bn2 = nn.Conv2d(2 * c, c, 3, padding=1, bias=False), nn.BatchNorm2d(c)

    def forward(self, x):
        return torch.relu(x + self.bn2(self.conv2(torch.relu(self.bn1(self.conv1(x))))))


def tiny_cnn(width: int = 8) -> nn.Module:
    return nn.Sequential(nn.Conv2d(3, width, 3, padding=1), nn.BatchNorm2d(width), nn.ReLU(), Block(width),
                         Block(width), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(width, 5))


def tiny_llama(intermediate: int = 48) -> nn.Module:
    transformers = pytest.importorskip("transformers")
    config = transformers.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=intermediate,
                                      num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                      max_position_embeddings=32)
    return transformers.LlamaForCausalLM(config)


def on_meta(build, *args):
    with torch.device("meta"):
        return build(*args)


def real_copy(build, seed: int, *args) -> nn.Module:
    torch.manual_seed(seed)
    model = build(*args).eval()
    randomize_bn(model)
    return model


def half_plan(pruner: Pruner) -> dict:
    plan = pruner.plan(0.5, scope="layer").to_dict()
    assert plan, "nothing planned"
    return plan


def test_cnn_planned_on_meta_applies_to_real_weights():
    planned = on_meta(tiny_cnn)
    pruner = Pruner(planned, torch.empty(1, 3, 8, 8, device="meta"), criterion="random")
    plan = half_plan(pruner)
    record = json.loads(json.dumps(export_plan(pruner, plan)))
    assert tensor_shapes(planned) == record["shapes"]  # the meta model is not pruned by export

    real, x = real_copy(tiny_cnn, 0), torch.randn(4, 3, 8, 8)
    reference = copy.deepcopy(real)
    zero_plan(reference, pruner.graph, plan)
    apply_plan(real, record, x)
    assert real[0].out_channels == 8 - len(plan["0"])
    assert all(t.device.type == "cpu" for t in real.parameters())
    torch.testing.assert_close(real(x), reference(x), rtol=1e-5, atol=1e-5)


def test_llama_planned_on_meta_applies_to_real_weights():
    planned = on_meta(tiny_llama)
    ids = torch.randint(0, 64, (2, 12))
    pruner = Pruner(planned, ids.to("meta"), criterion="random")
    mlp = [g.id for g in pruner.groups if ".mlp." in g.id]
    assert len(mlp) == 2
    # the feed-forward channels: removing them is zeroing them (no norm reads them)
    plan = pruner.plan(0.5, scope="layer", groups=mlp).to_dict()
    record = export_plan(pruner, plan)

    real = real_copy(tiny_llama, 0)
    reference = copy.deepcopy(real)
    zero_plan(reference, pruner.graph, plan)
    apply_plan(real, record, ids)
    assert real.model.layers[0].mlp.up_proj.out_features == 24
    torch.testing.assert_close(real(ids).logits, reference(ids).logits, rtol=1e-5, atol=1e-5)


def test_a_whole_meta_plan_equals_the_same_plan_pruned_on_the_real_model():
    """Every group, the residual stream (read by RMSNorms: removing is not zeroing there) too."""
    planned = on_meta(tiny_llama)
    ids = torch.randint(0, 64, (2, 12))
    pruner = Pruner(planned, ids.to("meta"), criterion="random")
    plan = half_plan(pruner)
    assert "model.embed_tokens" in plan
    record = export_plan(pruner, plan)
    real = real_copy(tiny_llama, 0)
    direct = copy.deepcopy(real)
    apply_plan(real, record, ids)
    Pruner(direct, ids, criterion="l1").prune(plan)
    assert tensor_shapes(real) == tensor_shapes(direct) != record["shapes"]
    assert all(torch.equal(a, b) for a, b in zip(real.state_dict().values(), direct.state_dict().values()))
    assert torch.equal(real(ids).logits, direct(ids).logits)


def _state(model: nn.Module) -> dict:
    return {k: v.clone() for k, v in model.state_dict().items()}


def _unchanged(model: nn.Module, before: dict) -> None:
    after = model.state_dict()
    assert set(after) == set(before)
    assert all(torch.equal(after[k], v) for k, v in before.items())


def test_another_width_is_refused_naming_module_and_shapes():
    pruner = Pruner(on_meta(tiny_cnn), torch.empty(1, 3, 8, 8, device="meta"), criterion="random")
    record = export_plan(pruner, {"0": [1, 2]})
    wider = real_copy(tiny_cnn, 0, 12)
    before = _state(wider)
    with pytest.raises(PruningValueError, match=r"module '0': weight has shape \[12, 3, 3, 3\] in the model but "
                                                r"\[8, 3, 3, 3\] in the plan's model"):
        apply_plan(wider, record, torch.randn(1, 3, 8, 8))
    _unchanged(wider, before)


def test_another_architecture_is_refused():
    pruner = Pruner(on_meta(tiny_cnn), torch.empty(1, 3, 8, 8, device="meta"), criterion="random")
    record = export_plan(pruner, {"0": [1]})
    other = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 5, 3))
    before = _state(other)
    with pytest.raises(PruningValueError, match="module '1': the model has no tensor 'weight'"):
        apply_plan(other, record, torch.randn(1, 3, 8, 8))
    _unchanged(other, before)
    extra = tiny_cnn()
    extra.add_module("head", nn.Linear(5, 2))
    with pytest.raises(PruningValueError, match=r"tensors the plan's model lacks, e.g. 'head\.(bias|weight)'"):
        apply_plan(extra, record, torch.randn(1, 3, 8, 8))


@pytest.mark.parametrize("plan,match", [
    ({"nope": [0]}, "unknown group 'nope'"),
    ({"0": [8]}, r"group 0: channel index 8 out of range \[0, 8\)"),
    ({"format": "prunable-plan/0", "plan": {}, "shapes": {}}, "format 'prunable-plan/0'"),
])
def test_bad_plans_leave_the_model_unchanged(plan, match):
    real = real_copy(tiny_cnn, 0)
    before = _state(real)
    with pytest.raises(PruningValueError, match=match):
        apply_plan(real, plan, torch.randn(1, 3, 8, 8))
    _unchanged(real, before)


class Sliced(nn.Module):
    """Reads only `a`'s first 16 channels: cutting one of those breaks the forward pass
    (the slice then reads another channel)."""

    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Conv2d(3, 32, 1), nn.Conv2d(16, 8, 1)

    def forward(self, x):
        return self.b(self.a(x)[:, :16])


def test_a_plan_that_breaks_the_forward_pass_is_refused():
    pruner = Pruner(on_meta(Sliced), torch.empty(1, 3, 4, 4, device="meta"), criterion="random")
    assert "a" in {g.id for g in pruner.groups}  # one channel may go
    with pytest.raises(SurgeryError, match="breaks the forward pass"):
        export_plan(pruner, {"a": [0]})
    real = Sliced()
    before = _state(real)
    with pytest.raises(SurgeryError, match="breaks the forward pass"):
        apply_plan(real, {"a": [0]}, torch.randn(1, 3, 4, 4))
    _unchanged(real, before)
    assert real.a.out_channels == 32


@pytest.mark.parametrize("criterion", ["l1", "bn-scale"])
def test_criteria_reading_values_say_why_on_meta(criterion):
    pruner = Pruner(on_meta(tiny_cnn), torch.empty(1, 3, 8, 8, device="meta"), criterion=criterion)
    with pytest.raises(EstimationError, match="meta device.*criterion='random'"):
        pruner.plan(0.5)


class Fragile(nn.Module):
    """Its forward hard-codes a channel count: cutting `a` fails its trial run; `b` is prunable."""

    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Conv2d(3, 8, 1), nn.Conv2d(3, 6, 1)
        self.c, self.d = nn.Conv2d(8, 2, 1), nn.Conv2d(6, 2, 1)

    def forward(self, x):
        y = self.a(x)
        return self.c(y.reshape(y.shape[0], 8, y.shape[2], y.shape[3])) + self.d(self.b(x))


def test_a_group_failing_its_trial_is_not_bisected_again_at_each_step(monkeypatch):
    """Scale: with one failing group per layer, re-bisecting them at every rebuild costs
    O(layers²) trial runs per step; once found, a failing group stays skipped."""
    import prunable.validation as validation

    with pytest.warns(UserWarning, match="trial prune failed"):
        pruner = Pruner(Fragile(), torch.randn(1, 3, 4, 4), criterion="l1")
    assert pruner.skipped["a"].kind.value == "trial prune failed"
    calls = []
    real_trial = validation.trial
    monkeypatch.setattr(validation, "trial", lambda *a, **k: calls.append(1) or real_trial(*a, **k))
    pruner.step(2)
    assert pruner.model.b.out_channels == 4 and pruner.model.a.out_channels == 8
    assert pruner.skipped["a"].kind.value == "trial prune failed"
    assert len(calls) <= 1, f"{len(calls)} trial runs in one step"
