"""Attention written with operations (prunable/sdpa.py): F.scaled_dot_product_attention and q @ kᵀ, softmax, @ v."""

import copy
import math
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from prunable import Pruner, count_flops
from prunable.reasons import SkipKind

from helpers import fraction_plan, zero_producers


class Block(nn.Module):
    """A timm-style attention block: fused qkv Linear, a reshape to (3, heads, head_dim),
    SDPA (or the hand-written matmul/softmax variant), output projection, residual."""

    def __init__(self, dim: int = 24, heads: int = 3, manual: bool = False, scale: bool = False) -> None:
        super().__init__()
        self.num_heads, self.head_dim, self.manual = heads, dim // heads, manual
        self.scale = self.head_dim ** -0.5
        self.pass_scale = scale
        self.qkv, self.proj = nn.Linear(dim, 3 * dim), nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, N, _ = x.shape
        q, k, v = self.qkv(x).reshape(B, N, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4).unbind(0)
        if self.manual:
            attn = (q * self.scale) @ k.transpose(-2, -1)
            out = attn.softmax(dim=-1) @ v
        elif self.pass_scale:
            out = F.scaled_dot_product_attention(q, k, v, scale=self.scale)
        else:
            out = F.scaled_dot_product_attention(q, k, v)
        return x + self.proj(out.transpose(1, 2).reshape(B, N, -1))


class Net(nn.Module):
    def __init__(self, **kw) -> None:
        super().__init__()
        self.embed, self.block, self.head = nn.Linear(5, 24), Block(**kw), nn.Linear(24, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.block(self.embed(x)).mean(1))


VARIANTS = {"sdpa": {}, "sdpa-scale": {"scale": True}, "manual": {"manual": True}}


def _inner(pruner: Pruner):
    return next(g for g in pruner.groups if g.id.endswith("qkv"))


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_head_dims_are_one_group_with_size_attribute(variant):
    torch.manual_seed(0)
    model = Net(**VARIANTS[variant]).eval()
    pruner = Pruner(model, torch.randn(2, 6, 5), criterion="l1")
    assert not _attention_skips(pruner)
    inner = _inner(pruner)
    labels = {m.target.label() for m in inner.members}
    assert inner.channels == 24 and {"block.qkv.out", "block.proj.in", "block.head_dim"} <= labels
    assert "block.qkv.in" not in labels  # the stream is another group
    assert inner.blocks.shape == (3, 8) and "heads" in inner.blocks_of  # each head keeps its own dims


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_dead_head_dims_are_removed_losslessly_by_l1(variant):
    """q, k, v rows of head dim d in every head and the proj columns zero: L1 ranks them last
    and removing them changes nothing (the softmax temperature is kept)."""
    torch.manual_seed(0)
    model = Net(**VARIANTS[variant]).eval()
    x = torch.randn(2, 6, 5)
    dead = [1, 6]
    with torch.no_grad():
        for d in dead:
            rows = [p * 24 + h * 8 + d for p in range(3) for h in range(3)]
            model.block.qkv.weight[rows] = 0
            model.block.qkv.bias[rows] = 0
            model.block.proj.weight[:, [h * 8 + d for h in range(3)]] = 0
        reference = model(x)
    pruner = Pruner(model, x, criterion="l1")
    inner = _inner(pruner)
    lowest = pruner.scores()[inner.id].argsort()[: 3 * len(dead)].tolist()
    assert sorted(lowest) == sorted(inner.blocks[:, dead].flatten().tolist())
    pruner.prune({inner.id: lowest})
    assert model.block.head_dim == 6 and model.block.num_heads == 3
    assert model.block.qkv.weight.shape == (54, 24) and model.block.proj.weight.shape == (24, 18)
    with torch.no_grad():
        torch.testing.assert_close(model(x), reference, atol=1e-5, rtol=0)


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_pruned_equals_zeroed_on_random_plans(variant):
    torch.manual_seed(1)
    x = torch.randn(2, 6, 5)
    for trial in range(3):
        model = Net(**VARIANTS[variant]).eval()
        pruner = Pruner(model, x, criterion="l1")
        inner = _inner(pruner)
        per_head = 1 + trial * 2  # every head loses as many dims, each its own
        removals = {inner.id: torch.cat([row[torch.randperm(8)[:per_head]] for row in inner.blocks]).tolist()}
        stream = next(g for g in pruner.groups if g is not inner)
        removals[stream.id] = torch.randperm(stream.channels)[:5].tolist()
        reference = copy.deepcopy(model)
        zero_producers(reference, pruner, removals)
        pruner.prune(removals)
        with torch.no_grad():
            torch.testing.assert_close(model(x), reference(x), atol=1e-5, rtol=1e-4)


def test_default_scale_rescales_the_queries_only():
    torch.manual_seed(0)
    model = Net().eval()
    before = model.block.qkv.weight.detach().clone()
    pruner = Pruner(model, torch.randn(2, 6, 5), criterion="l1")
    inner = _inner(pruner)
    pruner.prune({inner.id: inner.blocks[:, :2].flatten().tolist()})  # head_dim 8 → 6
    keep = [p * 24 + h * 8 + d for p in range(3) for h in range(3) for d in range(2, 8)]
    expected = before[keep].clone()
    expected[:18] *= (6 / 8) ** 0.5
    torch.testing.assert_close(model.block.qkv.weight, expected)


class GroupedQuery(nn.Module):
    """Two q heads share each k/v head (SDPA's enable_gqa)."""

    def __init__(self) -> None:
        super().__init__()
        self.q, self.kv, self.proj = nn.Linear(16, 16, bias=False), nn.Linear(16, 16), nn.Linear(16, 16)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, N, _ = x.shape
        q = self.q(x).reshape(B, N, 4, -1).transpose(1, 2)
        k, v = self.kv(x).reshape(B, N, 2, 2, -1).permute(2, 0, 3, 1, 4)
        out = F.scaled_dot_product_attention(q, k, v, enable_gqa=True)
        return self.proj(out.transpose(1, 2).reshape(B, N, -1))


@pytest.mark.filterwarnings("ignore:.*group proj is not pruned")
def test_grouped_query_attention_keeps_shared_heads_consistent():
    """q heads 2h and 2h + 1 read k/v head h: their dims are k/v head h's; each k/v head loses as many."""
    torch.manual_seed(0)
    model = GroupedQuery().eval()
    x = torch.randn(2, 6, 16)
    pruner = Pruner(model, x, criterion="l1")
    assert not _attention_skips(pruner)
    inner = next(g for g in pruner.groups if g.id == "kv")
    assert {"q.out", "kv.out", "proj.in"} <= {m.target.label() for m in inner.members}
    assert inner.channels == 8 and inner.blocks.shape == (2, 4)
    removals = {inner.id: torch.cat([row[torch.randperm(4)[:1]] for row in inner.blocks]).tolist()}
    reference = copy.deepcopy(model)
    zero_producers(reference, pruner, removals)
    pruner.prune(removals)
    assert model.q.out_features == 12 and model.kv.out_features == 12 and model.proj.in_features == 12
    with torch.no_grad():
        torch.testing.assert_close(model(x), reference(x), atol=1e-5, rtol=1e-4)


class ActivatedQuery(Block):
    """The queries pass a GELU before SDPA's default scale: rescaling the Linear would not
    rescale them, so the temperature cannot be kept."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, N, _ = x.shape
        q, k, v = self.qkv(x).reshape(B, N, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4).unbind(0)
        out = F.scaled_dot_product_attention(F.gelu(q), k, v)
        return self.proj(out.transpose(1, 2).reshape(B, N, -1))


class ReusedQuery(Block):
    """The queries also feed a Linear: rescaling them for SDPA's default scale would change it."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, N, _ = x.shape
        q, k, v = self.qkv(x).reshape(B, N, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4).unbind(0)
        out = F.scaled_dot_product_attention(q, k, v) + q
        return self.proj(out.transpose(1, 2).reshape(B, N, -1))


@pytest.mark.parametrize("model, why", [(ActivatedQuery(), "temperature"),
                                        (ReusedQuery(), "also read by a layer or an operation")])
def test_unsupported_attention_is_skipped_with_a_reason(model, why):
    x = torch.randn(2, 6, 24)
    with pytest.warns(UserWarning):
        pruner = Pruner(model, x, criterion="l1")
    reasons = [r for r in pruner.skipped.values() if why in r]
    assert reasons and all(r.kind is SkipKind.UNSUPPORTED_OP for r in reasons)
    for plan in (pruner.plan(0.3),):
        pruner.prune(plan)
    assert model(x).shape == (2, 6, 24)


def _attention_skips(pruner: Pruner) -> list:
    return [r for r in pruner.skipped.values() if r.kind in (SkipKind.UNSUPPORTED_OP, SkipKind.MIXED,
                                                               SkipKind.SIZE_ATTRIBUTE, SkipKind.BLOCKS)]


def test_timm_vit_is_pruned_like_a_cnn():
    """A tiny timm ViT: no group skipped because of attention; 30 % of every group removes
    about as many FLOPs as 30 % of every group of a CNN; inner head dims: pruned equals zeroed."""
    timm = pytest.importorskip("timm")
    torch.manual_seed(0)
    vit = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32, patch_size=8, depth=2,
                            num_classes=10).eval()
    x = torch.randn(2, 3, 32, 32)
    pruner = Pruner(vit, x, criterion="l1")
    assert not _attention_skips(pruner)
    inner = [g for g in pruner.groups if g.id.endswith("attn.qkv")]
    assert len(inner) == 2 and all(g.channels == 192 and g.blocks.shape == (3, 64) for g in inner)
    reference = copy.deepcopy(vit)
    removals = {g.id: torch.cat([row[torch.randperm(64)[:20]] for row in g.blocks]).tolist() for g in inner}
    zero_producers(reference, pruner, removals)
    pruner.prune(removals)
    assert vit.blocks[0].attn.head_dim == 44 and vit.blocks[0].attn.attn_dim == 132
    with torch.no_grad():
        torch.testing.assert_close(vit(x), reference(x), atol=1e-5, rtol=1e-4)

    vit = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32, patch_size=8, depth=2,
                            num_classes=10).eval()
    cnn = timm.create_model("resnet18", pretrained=False, num_classes=10).eval()
    ratios = {}
    for name, model in (("vit", vit), ("cnn", cnn)):
        pruner = Pruner(model, x, criterion="l1", ignored_layers=[model.get_classifier()])
        before = count_flops(model, x)
        pruner.prune(fraction_plan(pruner, 0.3))
        ratios[name] = before / count_flops(model, x)
        assert model(x).shape == (2, 10)
    assert ratios["vit"] > 1.7 and ratios["vit"] > 0.8 * ratios["cnn"], ratios


class SeparateProjections(nn.Module):
    """q, k, v from three Linears, each reshaped to (heads, head_dim); ``attribute``: the reshapes
    share ``self.head_dim`` (one number for both groups), else they pass -1."""

    def __init__(self, attribute: bool, merge: str = "heads-major") -> None:
        super().__init__()
        self.num_heads, self.head_dim, self.attribute, self.merge = 3, 8, attribute, merge
        self.q, self.k, self.v, self.proj = (nn.Linear(24, 24) for _ in range(4))

    def _split(self, t: torch.Tensor) -> torch.Tensor:
        B, N, _ = t.shape
        return t.reshape(B, N, self.num_heads, self.head_dim if self.attribute else -1).transpose(1, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, N, _ = x.shape
        out = F.scaled_dot_product_attention(self._split(self.q(x)), self._split(self.k(x)), self._split(self.v(x)))
        if self.merge == "heads-major":
            out = out.transpose(1, 2).flatten(2)
        elif self.merge == "interleaved":  # (B, N, head_dim, heads): dim d of every head side by side
            out = out.permute(0, 2, 3, 1).reshape(B, N, -1)
        else:  # mean over the heads
            out = out.mean(1).repeat(1, 1, self.num_heads)
        return x + self.proj(out)


@pytest.mark.parametrize("attribute, merge, heads_free", [
    (False, "heads-major", True), (True, "heads-major", False), (False, "interleaved", False),
    (False, "mean", False)])
@pytest.mark.filterwarnings("ignore:.*group proj is not pruned")
def test_heads_are_free_only_where_positions_never_matter(attribute, merge, heads_free):
    """Each head keeps its own dims unless a shared size attribute (q, k and v then stay equal), a
    merge out of head order or a reduction over the heads (of v) needs the same dims in every head;
    pruned equals zeroed either way."""
    torch.manual_seed(0)
    model = SeparateProjections(attribute, merge).eval()
    x = torch.randn(2, 6, 24)
    pruner = Pruner(model, x, criterion="l1")  # the stream is the model input here: not pruned
    assert not _attention_skips(pruner)
    by_id = {g.id: g for g in pruner.groups}
    qk, v = by_id["k"], by_id.get("v", by_id["k"])
    assert {m.target.label() for m in qk.members} >= {"q.out", "k.out"}
    assert (v is qk) == attribute and (qk.blocks is not None) == (not attribute)
    assert (v.channels, v.blocks is not None) == ((24, True) if heads_free else (8, False))
    removals = {}
    for g in {qk.id: qk, v.id: v}.values():
        rows = g.blocks if g.blocks is not None else torch.arange(g.channels)[None]
        removals[g.id] = torch.cat([row[torch.randperm(len(row))[: len(row) // 3]] for row in rows]).tolist()
    reference = copy.deepcopy(model)
    zero_producers(reference, pruner, removals)
    pruner.prune(removals)
    with torch.no_grad():
        torch.testing.assert_close(model(x), reference(x), atol=1e-5, rtol=1e-4)
    assert model.head_dim == (6 if attribute else 8)


def test_timm_hybrid_cnn_transformer():
    """ResNet stem + ViT blocks (timm R+ViT-Ti): every group prunable, the pruned model runs
    with fewer FLOPs and its attention keeps three heads of fewer dims."""
    timm = pytest.importorskip("timm")
    torch.manual_seed(0)
    model = timm.create_model("vit_tiny_r_s16_p8_224", pretrained=False, img_size=64, depth=2,
                              num_classes=10).eval()
    x = torch.randn(2, 3, 64, 64)
    pruner = Pruner(model, x, criterion="l1", ignored_layers=[model.get_classifier()])
    assert not _attention_skips(pruner)
    assert any(g.blocks is not None and g.blocks.shape == (3, 64) for g in pruner.groups)
    before = count_flops(model, x)
    pruner.prune(fraction_plan(pruner, 0.3))
    assert count_flops(model, x) < before / 1.15
    attn = model.blocks[0].attn
    assert (attn.num_heads, attn.head_dim, attn.attn_dim) == (3, 45, 135) and model(x).shape == (2, 10)


class ComputedScale(Block):
    """Hand-written attention whose scale is computed in forward from ``self.head_dim`` (a size
    attribute pruning rewrites) or from the queries' shape: pruning would change the temperature."""

    def __init__(self, source: str) -> None:
        super().__init__(manual=True)
        self.source = source
        if source != "stored":
            del self.scale  # a stored float equal to the scale would make it a constant

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, N, _ = x.shape
        q, k, v = self.qkv(x).reshape(B, N, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4).unbind(0)
        if self.source == "attribute":
            attn = q @ k.transpose(-2, -1) / math.sqrt(self.head_dim)
        elif self.source == "shape":
            attn = (q @ k.transpose(-2, -1)) * q.shape[-1] ** -0.5
        else:  # stored in __init__: a constant
            attn = q @ k.transpose(-2, -1) * self.scale
        out = attn.softmax(dim=-1) @ v
        return x + self.proj(out.transpose(1, 2).reshape(B, N, -1))


@pytest.mark.parametrize("source", ["attribute", "shape", "stored"])
def test_scale_computed_in_forward_keeps_the_head_dims_with_a_reason(source):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 24), ComputedScale(source), nn.Linear(24, 4)).eval()
    x = torch.randn(2, 6, 5)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pruner = Pruner(model, x, criterion="l1")
    reason = pruner.skipped.get("1.qkv")
    if source == "stored":
        assert reason is None
    else:
        assert reason.kind is SkipKind.SIZE_ATTRIBUTE and "computed in forward" in reason
        assert "from head_dim" in reason or source == "shape"  # q.shape[-1] equals head_dim: either text
    before = model(x)
    pruner.prune(fraction_plan(pruner, 0.25))
    assert (model[1].head_dim == 8) == (source != "stored") and model(x).shape == before.shape
