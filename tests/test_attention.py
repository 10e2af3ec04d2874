"""Attention layers: head dimensions pruned with num_heads / head_dim kept consistent."""

import copy

import pytest
import torch
from torch import nn

from prunable import Pruner, PruningValueError, Scope, count_flops
from prunable.attention import AttentionHandler
from prunable.surgery import Role, handler_for

torchvision = pytest.importorskip("torchvision")
from torchvision.models.swin_transformer import ShiftedWindowAttention, ShiftedWindowAttentionV2  # noqa: E402


class TokenNet(nn.Module):
    """Linear embedding → self-attention → mean over tokens → Linear (no LayerNorm, so
    pruning is exactly the same as zeroing)."""

    def __init__(self, attention: nn.Module, width: int, tokens_last: bool = True) -> None:
        super().__init__()
        self.embed = nn.Linear(5, width)
        self.attn = attention
        self.head = nn.Linear(width, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.embed(x)
        if isinstance(self.attn, nn.MultiheadAttention):
            h = self.attn(h, h, h, need_weights=False)[0]
        else:
            h = self.attn(h)
        return self.head(h.flatten(1, -2).mean(1))


def _mha(batch_first: bool) -> nn.Module:
    class Net(TokenNet):
        def forward(self, x):
            h = self.embed(x if batch_first else x.transpose(0, 1))
            h = self.attn(h, h, h, need_weights=False)[0]
            return self.head(h.mean(1 if batch_first else 0))
    return Net(nn.MultiheadAttention(16, 4, batch_first=batch_first), 16)


def _models():
    torch.manual_seed(0)
    return {
        "mha-batch-first": (_mha(True), torch.randn(3, 6, 5)),
        "mha-seq-first": (_mha(False), torch.randn(3, 6, 5)),
        "swin": (TokenNet(ShiftedWindowAttention(16, [2, 2], [1, 1], 4), 16), torch.randn(2, 4, 4, 5)),
        "swin-v2": (TokenNet(ShiftedWindowAttentionV2(16, [2, 2], [1, 1], 4), 16), torch.randn(2, 4, 4, 5)),
    }


def _zero_removed(model: nn.Module, pruner: Pruner, gid: str, idx: list[int]) -> None:
    """In ``model`` (a copy), zero every producer row of the removed channels."""
    group = next(g for g in pruner.groups if g.id == gid)
    removed = group.classes[torch.as_tensor(idx)]
    modules = dict(model.named_modules())
    with torch.no_grad():
        for m in group.producers:
            mask = torch.isin(m.classes, removed)
            module = modules[m.target.name]
            handler = handler_for(module)
            names = handler.params(module, Role.OUT)
            for name in names:
                owner, _, attr = name.rpartition(".")
                t = getattr(module.get_submodule(owner) if owner else module, attr)
                t[mask] = 0


@pytest.mark.parametrize("name", ["mha-batch-first", "mha-seq-first", "swin", "swin-v2"])
def test_pruning_head_dims_equals_zeroing_them(name):
    model, x = _models()[name]
    model.eval()
    pruner = Pruner(model, x, criterion="l1")
    group = next(g for g in pruner.groups if g.blocks is not None)
    assert tuple(group.blocks.shape) == (4, 4)
    idx = group.blocks[:, [0, 2]].flatten().tolist()  # two dims of every head
    reference = copy.deepcopy(model)
    _zero_removed(reference, pruner, group.id, idx)
    before = count_flops(model, x)
    pruner.prune({group.id: idx})
    handler = handler_for(model.attn)
    assert isinstance(handler, AttentionHandler)
    assert handler.width(model.attn) == 8 and handler.num_heads(model.attn) == 4
    if isinstance(model.attn, nn.MultiheadAttention):
        assert (model.attn.embed_dim, model.attn.head_dim, model.attn.in_proj_weight.shape) == (8, 2, (24, 8))
    else:
        assert model.attn.qkv.weight.shape == (24, 8) and model.attn.proj.weight.shape == (8, 8)
    assert count_flops(model, x) < before
    with torch.no_grad():
        torch.testing.assert_close(model(x), reference(x), atol=1e-5, rtol=1e-4)


def test_unbalanced_plan_is_refused_and_model_unchanged():
    model, x = _models()["mha-batch-first"]
    pruner = Pruner(model, x, criterion="l1")
    group = next(g for g in pruner.groups if g.blocks is not None)
    state = copy.deepcopy(model.state_dict())
    with pytest.raises(PruningValueError, match="same number"):
        pruner.prune({group.id: group.blocks[0, :2].tolist()})  # two dims of head 0 only
    with pytest.raises(PruningValueError, match="keep at least one"):
        pruner.prune({group.id: group.blocks[:, :].flatten().tolist()[: 16 - 1]})
    assert model.attn.embed_dim == 16
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in state.items())


@pytest.mark.parametrize("scope", [Scope.GLOBAL, Scope.LAYER])
def test_selection_takes_the_same_number_from_every_head(scope):
    model, x = _models()["swin"]
    pruner = Pruner(model, x, criterion="l1")
    group = next(g for g in pruner.groups if g.blocks is not None)
    for _ in range(2):
        plan = pruner.plan(0.4, scope)
        counts = torch.isin(group.blocks, torch.tensor(plan.removals.get(group.id, ()))).sum(1)
        assert len(set(counts.tolist())) == 1 and counts[0] > 0
        pruner.prune(plan)
        group = next(g for g in pruner.graph.groups if g.blocks is not None)
    assert model(x).shape == (2, 3)
    assert group.blocks.shape == (4, 1)  # 16 → 8 → 4: one dimension left per head
    assert "last one" in pruner.skipped[group.id]


def test_taylor_estimate_measures_attention_outputs():
    model, x = _models()["mha-batch-first"]
    pruner = Pruner(model, x)  # TaylorActivation
    target = torch.randint(0, 3, (3,))
    with pruner.estimate():
        for _ in range(2):
            nn.functional.cross_entropy(model(x), target).backward()
    scores = pruner.scores()
    group = next(g for g in pruner.groups if g.blocks is not None)
    assert torch.isfinite(scores[group.id]).all() and scores[group.id].abs().sum() > 0
    assert [m for m in pruner.groups if "attn.out_proj" in m.id]  # the attention output's own group
    pruner.step(8)
    assert model(x).shape == (3, 3)


def test_vision_transformer_stream_and_hidden_dim_attribute():
    model = torchvision.models.VisionTransformer(
        image_size=32, patch_size=8, num_layers=2, num_heads=4, hidden_dim=48, mlp_dim=64, num_classes=5).eval()
    x = torch.randn(2, 3, 32, 32)
    pruner = Pruner(model, x, criterion="l1")
    assert set(pruner.skipped) == {"heads.head"}  # only the classifier's outputs are kept
    stream = next(g for g in pruner.groups if g.blocks is not None)
    assert "hidden_dim" in str(stream) and "class_token" in str(stream)
    pruner.prune({stream.id: stream.blocks[:, -3:].flatten().tolist()})
    attn = model.encoder.layers[0].self_attention
    assert (model.hidden_dim, attn.embed_dim, attn.num_heads, attn.head_dim) == (36, 36, 4, 9)
    assert model(x).shape == (2, 5)


def test_literal_size_attribute_of_a_custom_model_follows_the_channels():
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.width = 12
            self.conv = nn.Conv2d(3, self.width, 3)
            self.fc = nn.Linear(self.width, 2)

        def forward(self, x):
            h = self.conv(x).reshape(x.shape[0], self.width, -1).mean(-1)
            return self.fc(h)

    model, x = Net(), torch.randn(2, 3, 8, 8)
    pruner = Pruner(model, x, criterion="l1")
    pruner.step(5)
    assert model.width == 7 == model.conv.out_channels
    assert model(x).shape == (2, 2)


def test_unsupported_attention_is_skipped_with_a_reason():
    class Cross(nn.Module):
        def __init__(self):
            super().__init__()
            self.q, self.kv = nn.Linear(5, 16), nn.Linear(5, 8)
            self.attn = nn.MultiheadAttention(16, 4, kdim=8, vdim=8, batch_first=True)

        def forward(self, x):
            return self.attn(self.q(x), self.kv(x), self.kv(x))[0].mean()

    with pytest.warns(UserWarning, match="kdim"):
        pruner = Pruner(Cross(), torch.randn(2, 3, 5), criterion="l1")
    assert any("kdim" in reason for reason in pruner.skipped.values())


class TimmStyleAttention(nn.Module):
    """A custom attention module: packed qkv Linear, F.scaled_dot_product_attention, proj."""

    def __init__(self, dim: int, num_heads: int) -> None:
        super().__init__()
        self.num_heads, self.head_dim = num_heads, dim // num_heads
        self.qkv, self.proj = nn.Linear(dim, 3 * dim), nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, c = x.shape
        q, k, v = self.qkv(x).reshape(b, n, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4).unbind(0)
        out = nn.functional.scaled_dot_product_attention(q, k, v)
        return self.proj(out.transpose(1, 2).reshape(b, n, c))


def test_custom_attention_module_becomes_prunable_with_a_registered_handler():
    torch.manual_seed(0)
    model, x = TokenNet(TimmStyleAttention(16, 4), 16).eval(), torch.randn(2, 6, 5)
    with pytest.warns(UserWarning):  # sdpa is opaque: the inner dims are skipped, with a reason
        unaware = Pruner(copy.deepcopy(model), x, criterion="l1")
    assert all(g.blocks is None for g in unaware.groups)

    from prunable import register_handler

    @register_handler(TimmStyleAttention)
    class Handler(AttentionHandler):
        qkv_weight, qkv_bias = "qkv.weight", "qkv.bias"

        def out_proj(self, module):
            return module.proj

        def width(self, module):
            return module.qkv.out_features // 3

        def set_width(self, module, role, n):
            if role is Role.IN:
                module.qkv.in_features = n
            else:
                module.qkv.out_features, module.head_dim = 3 * n, n // module.num_heads

    try:
        pruner = Pruner(model, x, criterion="l1")
        group = next(g for g in pruner.groups if g.blocks is not None)
        idx = group.blocks[:, 1].tolist()
        reference = copy.deepcopy(model)
        _zero_removed(reference, pruner, group.id, idx)
        pruner.prune({group.id: idx})
        assert (model.attn.head_dim, model.attn.qkv.weight.shape) == (3, (36, 12))
        with torch.no_grad():
            torch.testing.assert_close(model(x), reference(x), atol=1e-5, rtol=1e-4)
    finally:
        from prunable.surgery import unregister_handler
        unregister_handler(TimmStyleAttention)
