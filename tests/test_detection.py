"""Detectors and other task models (issue #17): cached tensors, data-dependent
post-processing, RoI pooling, torchvision detection, YOLO, video attention."""

import copy
import warnings

import pytest
import torch
import torchvision
from torch import nn
from torch.utils._pytree import tree_flatten
from torchvision.ops import MultiScaleRoIAlign

from prunable import DependencyGraph, Pruner, count_flops, count_params, module_flops
from prunable.copies import meta_clone
from prunable.surgery import Role, handler_for
from tests.helpers import fraction_plan, randomize_bn, zero_plan


def _meta_warnings(caught) -> list[str]:
    return [str(w.message) for w in caught if "meta device" in str(w.message)]


# -- tensors cached in plain attributes ------------------------------------------------
class CachingHead(nn.Module):
    """Caches its anchor grid as plain tensors (not buffers) on its first forward, like
    ultralytics' Detect head; later forwards reuse the cache."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.pred = nn.Conv2d(8, 6, 1)
        self.shape = None
        self.anchors = torch.empty(0)
        self.cache: dict = {"grid": None}
        self.levels: list = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.pred(torch.relu(self.stem(x))).flatten(2)
        if self.shape != y.shape:
            self.shape = y.shape
            self.anchors = torch.arange(y.shape[2], dtype=y.dtype, device=y.device).view(1, 1, -1)
            self.cache["grid"], self.levels = self.anchors * 2, [(self.anchors + 1, 3)]
        return y + self.anchors + self.cache["grid"] * self.levels[0][0]


def test_meta_clone_moves_tensors_held_in_plain_attributes_and_containers():
    model = CachingHead()
    model(torch.randn(1, 3, 4, 4))
    clone = meta_clone(model)
    assert clone.anchors.is_meta and clone.cache["grid"].is_meta and clone.levels[0][0].is_meta
    assert clone.levels[0][1] == 3 and clone.shape == model.shape
    assert not model.anchors.is_meta and model.anchors.shape == clone.anchors.shape
    shared = nn.Module()
    shared.a = shared.b = torch.ones(2)
    copied = meta_clone(shared)
    assert copied.a is copied.b and copied.a.is_meta


@pytest.mark.parametrize("warm", [False, True])
def test_module_caching_tensors_is_traced_on_meta_before_and_after_a_forward(warm):
    model, x = CachingHead().eval(), torch.randn(2, 3, 6, 6)
    if warm:
        with torch.no_grad():
            model(x)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        pruner = Pruner(model, x, criterion="l1")
    assert not _meta_warnings(caught)
    assert [g.id for g in pruner.groups] == ["stem"]
    reference = copy.deepcopy(model)
    zero_plan(reference, pruner.graph, {"stem": [1, 4, 6]})
    pruner.prune({"stem": [1, 4, 6]})
    with torch.no_grad():
        torch.testing.assert_close(model(x), reference(x), atol=1e-5, rtol=1e-4)


# -- data-dependent post-processing ---------------------------------------------------
class ToyDetector(nn.Module):
    """A backbone with a residual block, class and box heads, then post-processing that
    only runs on real values (score threshold → ``nonzero``, NMS) and that mixes integer
    level ids into the scores: none of it may couple or block the backbone's channels."""

    def __init__(self, threshold: float = 0.6) -> None:
        super().__init__()
        self.threshold = threshold
        self.stem = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU())
        self.block = nn.Sequential(nn.Conv2d(8, 12, 3, padding=1), nn.ReLU(), nn.Conv2d(12, 8, 3, padding=1))
        self.cls = nn.Conv2d(8, 3, 1)
        self.box = nn.Conv2d(8, 4, 1)

    def forward(self, images: list[torch.Tensor]) -> list[dict[str, torch.Tensor]]:
        f = self.stem(torch.stack(images))
        f = torch.relu(f + self.block(f))
        scores, deltas = self.cls(f).sigmoid().flatten(2), self.box(f).flatten(2)
        half = scores.shape[2] // 2
        ids = {"dtype": torch.long, "device": f.device}
        level = torch.cat([torch.zeros(half, **ids), torch.ones(scores.shape[2] - half, **ids)])
        out = []
        for s, d in zip(scores, deltas):
            best, label = s.max(0)
            best = best * (1 + (level == 0))  # level ids are integers, not channel labels
            keep = torch.nonzero(best > self.threshold).flatten()
            corner = torch.arange(len(best), dtype=d.dtype, device=d.device)[:, None].expand(-1, 2)
            boxes = torch.cat([corner, corner + 1 + d[2:].t().exp()], 1)[keep]
            kept = torchvision.ops.nms(boxes, best[keep], 0.5)
            out.append({"boxes": boxes[kept], "scores": best[keep][kept], "labels": label[keep][kept]})
        return out


def test_data_dependent_forward_is_traced_and_trial_pruned_on_a_real_copy():
    torch.manual_seed(0)
    model = ToyDetector().eval()
    randomize_bn(model)
    images = [torch.rand(3, 8, 8), torch.rand(3, 8, 8)]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        pruner = Pruner(model, images, criterion="l1", ignored_layers=[model.cls, model.box])
        flops = count_flops(model, images)
        for _ in range(2):  # the trial and the trace after each prune run on real copies too
            plan = fraction_plan(pruner, 0.25)
            reference = copy.deepcopy(model)
            zero_plan(reference, pruner.graph, plan)
            pruner.prune(plan)
            with torch.no_grad():
                got, want = model(images), reference(images)
            assert [sorted(o) for o in got] == [["boxes", "labels", "scores"]] * 2
            for g, w in zip(got, want):
                assert g["boxes"].shape[1:] == (4,) and len(g["boxes"]) > 0
                torch.testing.assert_close(g, w, atol=1e-5, rtol=1e-4)
    (message,) = _meta_warnings(caught)  # said once
    assert "nonzero" in message and "real copies" in message
    members = sorted(sorted({m.target.name for m in g.members}) for g in pruner.groups)
    assert members == [["block.0", "block.2"], ["block.0", "block.2", "box", "cls", "stem.0", "stem.1"]]
    assert sorted(pruner.skipped) == ["box", "cls"]
    assert (model.stem[0].out_channels, model.block[0].out_channels) == (5, 7)
    assert 0 < count_flops(model, images) < flops


def test_detector_without_any_detection_is_pruned_all_the_same():
    model, images = ToyDetector(threshold=2.0).eval(), [torch.rand(3, 8, 8)]
    with pytest.warns(UserWarning, match="cannot run on the meta device"):
        pruner = Pruner(model, images, criterion="l1")
    assert len(pruner.groups) == 2
    pruner.prune(fraction_plan(pruner, 0.5))
    with torch.no_grad():
        (out,) = model(images)
    assert out["boxes"].shape == (0, 4) and model.stem[0].out_channels == 4


# -- RoI pooling ------------------------------------------------------------------
class RoINet(nn.Module):
    """Two feature levels pooled by ``MultiScaleRoIAlign`` (zero-filled result written
    level by level), then a Linear on the flattened regions."""

    def __init__(self) -> None:
        super().__init__()
        self.p0 = nn.Conv2d(3, 6, 3, stride=4, padding=1)
        self.p1 = nn.Conv2d(3, 6, 3, stride=8, padding=1)
        self.pool = MultiScaleRoIAlign(["0", "1"], output_size=2, sampling_ratio=2)
        self.fc = nn.Linear(6 * 4, 5)

    def forward(self, x: torch.Tensor, boxes: list[torch.Tensor]) -> torch.Tensor:
        features = {"0": self.p0(x), "1": self.p1(x)}
        regions = self.pool(features, boxes, [tuple(x.shape[2:])] * len(x))
        return self.fc(regions.flatten(1))


def test_roi_pooling_keeps_the_channels_of_every_level():
    torch.manual_seed(0)
    model, x = RoINet().eval(), torch.randn(2, 3, 64, 64)
    boxes = [torch.tensor([[0.0, 0.0, 20.0, 30.0], [0.0, 0.0, 120.0, 120.0]]), torch.tensor([[4.0, 4.0, 40.0, 40.0]])]
    graph = DependencyGraph(model, (x, boxes))
    (group,) = [g for g in graph.groups if g.id == "p0"]
    assert group.skip_reason is None and sorted({m.target.name for m in group.members}) == ["fc", "p0", "p1"]
    pruner = Pruner(model, (x, boxes), criterion="l1")
    reference = copy.deepcopy(model)
    zero_plan(reference, pruner.graph, {"p0": [0, 3]})
    pruner.prune({"p0": [0, 3]})
    assert (model.p0.out_channels, model.p1.out_channels, model.fc.in_features) == (4, 4, 16)
    with torch.no_grad():
        torch.testing.assert_close(model(x, boxes), reference(x, boxes), atol=1e-5, rtol=1e-4)


# -- torchvision detection ----------------------------------------------------------
#: final predictors (their outputs are anchors × classes / boxes): ignored, as a user would
_PREDICTORS = {
    "fasterrcnn_mobilenet_v3_large_fpn": ["rpn.head.cls_logits", "rpn.head.bbox_pred",
                                          "roi_heads.box_predictor.cls_score", "roi_heads.box_predictor.bbox_pred"],
    "retinanet_resnet50_fpn": ["head.classification_head.cls_logits", "head.regression_head.bbox_reg"],
    "fcos_resnet50_fpn": ["head.classification_head.cls_logits", "head.regression_head.bbox_reg",
                          "head.regression_head.bbox_ctrness"],
    "ssdlite320_mobilenet_v3_large": [f"head.{h}_head.module_list.{i}.1" for h in ("classification", "regression")
                                      for i in range(6)],
    "ssd300_vgg16": [f"head.{h}_head.module_list.{i}" for h in ("classification", "regression") for i in range(6)],
    "maskrcnn_resnet50_fpn": ["rpn.head.cls_logits", "rpn.head.bbox_pred", "roi_heads.box_predictor.cls_score",
                              "roi_heads.box_predictor.bbox_pred", "roi_heads.mask_predictor.mask_fcn_logits"],
    "keypointrcnn_resnet50_fpn": ["rpn.head.cls_logits", "rpn.head.bbox_pred", "roi_heads.box_predictor.cls_score",
                                  "roi_heads.box_predictor.bbox_pred", "roi_heads.keypoint_predictor.kps_score_lowres"],
}
_FAST = {"fasterrcnn_mobilenet_v3_large_fpn"}


def _detector(name: str) -> nn.Module:
    kwargs = {"weights": None, "weights_backbone": None}
    if name.startswith("ssd"):
        kwargs.update(num_classes=5, score_thresh=0.0)
    elif name.startswith(("retinanet", "fcos")):
        kwargs.update(num_classes=5, min_size=128, max_size=128, score_thresh=0.0)
    else:
        kwargs.update(min_size=128, max_size=128, box_score_thresh=0.0)
        kwargs["num_classes"] = 2 if name.startswith("keypoint") else 5
    return torchvision.models.get_model(name, **kwargs).eval()


def _zero_producers(model: nn.Module, graph: DependencyGraph, removals: dict) -> None:
    """Zero, in ``model`` (a copy), the output rows of the removed channels too, so that they are
    zero before any operation that mixes channels (SSD's L2Norm normalises over them)."""
    modules = dict(model.named_modules())
    with torch.no_grad():
        for gid, idx in removals.items():
            group = next(g for g in graph.groups if g.id == gid)
            removed = group.classes[torch.as_tensor(idx)]
            for m in group.producers:
                module = modules[m.target.name]
                for name, axis in handler_for(module).params(module, Role.OUT).items():
                    t = getattr(module, name)
                    if t.shape[axis] == len(m.classes):
                        t.index_fill_(axis, torch.nonzero(torch.isin(m.classes, removed)).flatten(), 0.0)


def _tapped(model: nn.Module, images: list[torch.Tensor], names: list[str]) -> tuple[list, dict[str, object]]:
    """The model's detections and the outputs of the named submodules during that forward."""
    seen: dict[str, object] = {}
    modules = dict(model.named_modules())
    hooks = [modules[n].register_forward_hook(lambda m, a, out, n=n: seen.setdefault(n, out)) for n in names]
    try:
        with torch.no_grad():
            return model(images), seen
    finally:
        for h in hooks:
            h.remove()


@pytest.mark.parametrize("name", [pytest.param(n, marks=() if n in _FAST else pytest.mark.slow) for n in _PREDICTORS])
def test_torchvision_detector_is_pruned_end_to_end(name):
    torch.manual_seed(0)
    model = _detector(name)
    randomize_bn(model)
    images = [torch.rand(3, 128, 128), torch.rand(3, 112, 128)]
    with torch.no_grad():
        before = model(images)
    with pytest.warns(UserWarning, match="cannot run on the meta device"):
        pruner = Pruner(model, images, criterion="l1", ignored_layers=_PREDICTORS[name])
    assert set(pruner.skipped) <= set(_PREDICTORS[name]), pruner.skipped
    covered = {".".join(m.target.name.split(".")[:2]) for g in pruner.groups for m in g.producers}
    parts = {"fasterrcnn": {"backbone.body", "backbone.fpn", "rpn.head", "roi_heads.box_head"},
             "maskrcnn": {"backbone.body", "backbone.fpn", "rpn.head", "roi_heads.box_head", "roi_heads.mask_head"},
             "keypointrcnn": {"backbone.body", "backbone.fpn", "rpn.head", "roi_heads.keypoint_head"},
             "retinanet": {"backbone.body", "backbone.fpn", "head.classification_head", "head.regression_head"},
             "fcos": {"backbone.body", "backbone.fpn", "head.classification_head", "head.regression_head"},
             "ssdlite320": {"backbone.features", "backbone.extra", "head.classification_head"},
             "ssd300": {"backbone.features", "backbone.extra"}}[name.split("_")[0]]
    assert parts <= covered, sorted(covered)
    plan = fraction_plan(pruner, 0.3)
    reference = copy.deepcopy(model)
    zero_plan(reference, pruner.graph, plan)
    _zero_producers(reference, pruner.graph, plan)
    flops, params = module_flops(model, images)["backbone"], count_params(model)  # the heads' FLOPs follow
    pruner.prune(plan)                                                    # the number of detections
    assert module_flops(model, images)["backbone"] < 0.8 * flops and count_params(model) < 0.8 * params
    # pruned equals zeroed on the raw head outputs (post-processing may order near-tied random
    # boxes differently); not for FCOS, whose heads' GroupNorm statistics change once channels are zeroed
    taps = [] if any(isinstance(m, nn.GroupNorm) for m in model.modules()) else [
        "rpn.head" if hasattr(model, "rpn") else "head"]
    (after, got), (_, want) = _tapped(model, images, taps), _tapped(reference, images, taps)
    for b, a in zip(before, after):
        assert sorted(a) == sorted(b) and a["boxes"].dim() == 2 and a["boxes"].shape[1] == 4 and len(a["boxes"])
        assert all(a[k].shape[1:] == b[k].shape[1:] for k in b)
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-3)


# -- YOLO (ultralytics: AGPL-3.0, tests only, never imported by prunable) -----------------
@pytest.mark.slow
@pytest.mark.parametrize("warm", [False, True], ids=["fresh", "after-forward"])
@pytest.mark.parametrize("cfg", ["yolov8n.yaml", "yolo11n.yaml", "yolov8n-seg.yaml", "yolo11n-seg.yaml"])
def test_yolo_built_from_its_yaml_is_pruned_before_and_after_a_forward(cfg, warm, monkeypatch, tmp_path):
    monkeypatch.setenv("YOLO_CONFIG_DIR", str(tmp_path))
    monkeypatch.setenv("YOLO_OFFLINE", "1")
    tasks = pytest.importorskip("ultralytics.nn.tasks")
    torch.manual_seed(0)
    model = (tasks.SegmentationModel if "seg" in cfg else tasks.DetectionModel)(cfg, verbose=False).eval()
    x = torch.rand(1, 3, 64, 64)
    with torch.no_grad():
        before = model(x)
    if not warm:
        model = (tasks.SegmentationModel if "seg" in cfg else tasks.DetectionModel)(cfg, verbose=False).eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pruner = Pruner(model, x, criterion="l1")
    assert not [r for r in pruner.skipped.values() if "trial prune failed" in str(r)], pruner.skipped
    assert len(pruner.groups) > 40
    plan = fraction_plan(pruner, 0.3)
    reference = copy.deepcopy(model)
    zero_plan(reference, pruner.graph, plan)
    flops = count_flops(model, x)
    pruner.prune(plan)
    assert count_flops(model, x) < 0.7 * flops
    with torch.no_grad():
        (after, want), first = (model(x), reference(x)), lambda out: tree_flatten(out)[0][0]
    assert first(after).shape == first(before).shape
    torch.testing.assert_close(first(after), first(want), atol=1e-4, rtol=1e-3)


# -- video attention ---------------------------------------------------------------
def test_swin3d_attention_head_dims_are_pruned_like_zeroing_them():
    from torchvision.models.video.swin_transformer import ShiftedWindowAttention3d

    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.embed = nn.Linear(5, 16)
            self.attn = ShiftedWindowAttention3d(16, [2, 2, 2], [1, 1, 1], 4)
            self.head = nn.Linear(16, 3)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.head(self.attn(self.embed(x)).flatten(1, -2).mean(1))

    torch.manual_seed(0)
    model, x = Net().eval(), torch.randn(2, 4, 4, 4, 5)
    pruner = Pruner(model, x, criterion="l1")
    (group,) = [g for g in pruner.groups if g.blocks is not None]
    assert tuple(group.blocks.shape) == (4, 4) and not pruner.skipped.keys() - {"head"}
    idx = group.blocks[:, [1, 3]].flatten().tolist()
    reference = copy.deepcopy(model)
    zero_plan(reference, pruner.graph, {group.id: idx})
    with torch.no_grad():  # the attention's q/k/v rows and input columns, so zeroing equals removing them
        removed = group.classes[torch.as_tensor(idx)]
        for m in group.members:
            if m.target.name == "attn":
                hit = torch.isin(m.classes, removed)
                if m.producer:
                    reference.attn.qkv.weight[hit] = 0
                    reference.attn.qkv.bias[hit] = 0
                else:
                    reference.attn.qkv.weight[:, hit] = 0
    pruner.prune({group.id: idx})
    assert model.attn.qkv.weight.shape == (24, 8) and model.attn.num_heads == 4
    with torch.no_grad():
        torch.testing.assert_close(model(x), reference(x), atol=1e-5, rtol=1e-4)
