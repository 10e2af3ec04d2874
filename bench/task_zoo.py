"""Task models (video, segmentation, detection, optical flow): 30 % of each group, ours vs Torch-Pruning.

Random weights, eval mode, small inputs (detectors: two images, 128 px for the
two-stage and dense detectors; YOLO from ultralytics' own yaml files, 64 px).
The final predictors (class / box / mask / keypoint logits, the segmentation
classifier) are ignored by both libraries: their output channels are fixed by
the task. For each model and library, graph + pruning runs three times on
fresh copies (median time reported; each run gets :data:`LIMIT` seconds):

- **ours**: ``Pruner(model, inputs, criterion=WeightNorm(), ignored_layers=…)``,
  then 30 % of every prunable group (:func:`tests.helpers.fraction_plan`);
- **TP**: Torch-Pruning ``BasePruner`` + ``MagnitudeImportance(p=1)``,
  ``pruning_ratio=0.3``, the same ignored layers.

"ok" = the pruned model runs, its output has the same structure (the same
keys and the same trailing sizes; a detector's number of detections may
differ) and its FLOPs are strictly lower. Writes the "task models" section
of ``docs/zoo.md`` (between its markers; the rest of the file is kept).

ultralytics (YOLO) is AGPL-3.0: used here and in tests only, never by
prunable; its models are skipped when it is not installed (``pip install
-e .[yolo]``).

Run: ``python bench/task_zoo.py [--quick]`` (``--quick``: one model per task, no doc written).
"""

from __future__ import annotations

import copy
import statistics
import sys
from typing import Any, Callable

import torch
import torchvision
from torch import nn

import common
from common import REPO, fmt_seconds, markdown_table, short_error

sys.path.insert(0, str(REPO / "tests"))
from helpers import fraction_plan  # noqa: E402

FRACTION = 0.3
LIMIT = 60  # seconds per run (graph + prune) and library
__doc__ = __doc__.replace(":data:`LIMIT`", str(LIMIT))  # the page and --help say the real limit
REPEATS = 3
ZOO_DOC = REPO / "docs" / "zoo.md"
START, END = "<!-- task models: bench/task_zoo.py -->", "<!-- end of task models -->"


def _tv(name: str, **kwargs: Any) -> Callable[[], nn.Module]:
    return lambda: torchvision.models.get_model(name, **kwargs).eval()


def _yolo(cfg: str) -> Callable[[], nn.Module]:
    def build() -> nn.Module:
        from ultralytics.nn import tasks

        return (tasks.SegmentationModel if "seg" in cfg else tasks.DetectionModel)(cfg, verbose=False).eval()
    return build


def _images() -> tuple:
    return ([torch.rand(3, 128, 128), torch.rand(3, 112, 128)],)


_DET = {"weights": None, "weights_backbone": None}
_SMALL = {"min_size": 128, "max_size": 128}
_RCNN = ["rpn.head.cls_logits", "rpn.head.bbox_pred", "roi_heads.box_predictor.cls_score",
         "roi_heads.box_predictor.bbox_pred"]
_SSD = [f"head.{h}_head.module_list.{i}" for h in ("classification", "regression") for i in range(6)]
_YOLO_HEAD = [f"model.{n}.{b}.{i}.2" for n in (22, 23) for b in ("cv2", "cv3", "cv4") for i in range(3)]

#: (task, name, builder, inputs, ignored layer names)
MODELS: list[tuple[str, str, Callable[[], nn.Module], Callable[[], tuple], list[str]]] = [
    ("video", "r3d_18", _tv("r3d_18", num_classes=10), lambda: (torch.randn(1, 3, 4, 64, 64),), ["fc"]),
    ("video", "r2plus1d_18", _tv("r2plus1d_18", num_classes=10), lambda: (torch.randn(1, 3, 4, 64, 64),), ["fc"]),
    ("video", "swin3d_t", _tv("swin3d_t", num_classes=10), lambda: (torch.randn(1, 3, 4, 64, 64),), ["head"]),
    ("segmentation", "fcn_resnet50", _tv("fcn_resnet50", num_classes=5, weights_backbone=None),
     lambda: (torch.randn(1, 3, 64, 64),), ["classifier.4"]),
    ("segmentation", "deeplabv3_mobilenet_v3_large",
     _tv("deeplabv3_mobilenet_v3_large", num_classes=5, weights_backbone=None),
     lambda: (torch.randn(1, 3, 64, 64),), ["classifier.4"]),
    ("segmentation", "lraspp_mobilenet_v3_large",
     _tv("lraspp_mobilenet_v3_large", num_classes=5, weights_backbone=None),
     lambda: (torch.randn(1, 3, 64, 64),), ["classifier.low_classifier", "classifier.high_classifier"]),
    ("detection", "fasterrcnn_mobilenet_v3_large_fpn", _tv("fasterrcnn_mobilenet_v3_large_fpn", **_DET, **_SMALL),
     _images, _RCNN),
    ("detection", "retinanet_resnet50_fpn", _tv("retinanet_resnet50_fpn", num_classes=5, **_DET, **_SMALL), _images,
     ["head.classification_head.cls_logits", "head.regression_head.bbox_reg"]),
    ("detection", "fcos_resnet50_fpn", _tv("fcos_resnet50_fpn", num_classes=5, **_DET, **_SMALL), _images,
     ["head.classification_head.cls_logits", "head.regression_head.bbox_reg", "head.regression_head.bbox_ctrness"]),
    ("detection", "ssdlite320_mobilenet_v3_large", _tv("ssdlite320_mobilenet_v3_large", num_classes=5, **_DET),
     _images, [f"{n}.1" for n in _SSD]),
    ("detection", "ssd300_vgg16", _tv("ssd300_vgg16", num_classes=5, **_DET), _images, _SSD),
    ("detection", "maskrcnn_resnet50_fpn", _tv("maskrcnn_resnet50_fpn", num_classes=5, **_DET, **_SMALL), _images,
     [*_RCNN, "roi_heads.mask_predictor.mask_fcn_logits"]),
    ("detection", "keypointrcnn_resnet50_fpn", _tv("keypointrcnn_resnet50_fpn", num_classes=2, **_DET, **_SMALL),
     _images, [*_RCNN, "roi_heads.keypoint_predictor.kps_score_lowres"]),
    ("detection", "yolov8n", _yolo("yolov8n.yaml"), lambda: (torch.rand(1, 3, 64, 64),), _YOLO_HEAD),
    ("detection", "yolo11n", _yolo("yolo11n.yaml"), lambda: (torch.rand(1, 3, 64, 64),), _YOLO_HEAD),
    ("segmentation", "yolov8n-seg", _yolo("yolov8n-seg.yaml"), lambda: (torch.rand(1, 3, 64, 64),),
     [*_YOLO_HEAD, "model.22.cv4.0.2", "model.22.cv4.1.2", "model.22.cv4.2.2", "model.22.proto.cv3"]),
    ("optical flow", "raft_small", _tv("raft_small"),
     lambda: (torch.rand(1, 3, 128, 128), torch.rand(1, 3, 128, 128), 2), []),  # 2 flow updates
]
QUICK = {"r3d_18", "fcn_resnet50", "fasterrcnn_mobilenet_v3_large_fpn", "raft_small"}


def _structure(out: Any) -> Any:
    """The output's structure: container keys and types, tensors' trailing sizes."""
    if isinstance(out, torch.Tensor):
        return ("tensor", tuple(out.shape[1:]))
    if isinstance(out, dict):
        return {k: _structure(v) for k, v in out.items()}
    if isinstance(out, (list, tuple)):
        return [_structure(v) for v in out]
    return type(out).__name__


def _present(names: list[str], model: nn.Module) -> list[str]:
    known = dict(model.named_modules())
    return [n for n in names if n in known]


def run_ours(model: nn.Module, inputs: tuple, ignored: list[str]) -> dict[str, Any]:
    from prunable import Pruner, WeightNorm

    pruner = Pruner(model, inputs, criterion=WeightNorm(), ignored_layers=_present(ignored, model))
    info = {"groups": f"{len(pruner.groups)}/{len(pruner.graph.groups)}"}
    plan = fraction_plan(pruner, FRACTION)
    if not plan:
        raise RuntimeError(f"no prunable group ({info['groups']} groups)")
    pruner.prune(plan)
    return info


def run_theirs(model: nn.Module, inputs: tuple, ignored: list[str]) -> dict[str, Any]:
    import torch_pruning as tp

    modules = dict(model.named_modules())
    pruner = tp.pruner.BasePruner(model, inputs, importance=tp.importance.MagnitudeImportance(p=1),
                                  pruning_ratio=FRACTION, ignored_layers=[modules[n] for n in _present(ignored, model)])
    pruner.step()
    return {}


def attempt(runner, build: Callable[[], nn.Module], inputs: tuple, ignored: list[str],
            before: dict[str, Any]) -> dict[str, Any]:
    """Median time of ``REPEATS`` runs on fresh models; status and FLOPs of the last one."""
    from prunable import count_flops
    from zoo import Timeout, time_limit

    times, result = [], {}
    try:
        for _ in range(REPEATS):
            common.seed_all(0)
            model = build()
            with common.quiet(), time_limit(LIMIT):
                seconds, result = common.timed(lambda: runner(model, inputs, ignored))
            times.append(seconds)
        with torch.no_grad(), common.quiet():
            out = model(*inputs)
            flops = count_flops(model, inputs)
        if _structure(out) != before["structure"]:
            result["status"] = "failed: output structure changed"
        elif flops >= before["flops"]:
            result["status"] = "failed: FLOPs not lower"
        else:
            result["status"] = "ok"
        result.update(flops=flops, seconds=statistics.median(times))
    except Timeout:
        result.update(status=f"timeout (> {LIMIT} s)")
    except Exception as exc:  # noqa: BLE001 - reported in the table
        result.update(status=f"failed: {short_error(exc)}")
    return result


def run_model(task: str, name: str, build, make_inputs, ignored) -> dict[str, Any] | None:
    from prunable import count_flops

    common.seed_all(0)
    try:
        model, inputs = build(), make_inputs()
    except ImportError:  # ultralytics not installed
        return None
    with torch.no_grad(), common.quiet():  # the unpruned model must run: an error here is the script's
        before = {"structure": _structure(model(*inputs)), "flops": count_flops(model, inputs)}
    shapes = [tuple(t.shape) for t in torch.utils._pytree.tree_flatten(inputs)[0] if isinstance(t, torch.Tensor)]
    return {"task": task, "name": name, "input": " + ".join("×".join(map(str, s)) for s in shapes),
            "before": before, "ours": attempt(run_ours, build, inputs, ignored, before),
            "theirs": attempt(run_theirs, build, inputs, ignored, before)}


def _gflops(n: int | None) -> str:
    return "—" if n is None else f"{n / 1e9:,.2f} G"


def table(results: list[dict[str, Any]]) -> str:
    rows = []
    for r in results:
        o, t, b = r["ours"], r["theirs"], r["before"]["flops"]
        rows.append([r["task"], f"`{r['name']}`", r["input"], o.get("groups", "—"),
                     f"{_gflops(b)} → {_gflops(o.get('flops'))}", o["status"], fmt_seconds(o.get("seconds")),
                     f"{_gflops(t.get('flops'))}", t["status"], fmt_seconds(t.get("seconds"))])
    return markdown_table(["task", "model", "input", "groups (prunable/total)", "FLOPs before → after (ours)",
                           "prunable", f"time (median of {REPEATS})", "FLOPs after (TP)", "Torch-Pruning",
                           f"TP time (median of {REPEATS})"], rows)


def section(results: list[dict[str, Any]]) -> str:
    ok = lambda who: sum(r[who]["status"] == "ok" for r in results)  # noqa: E731
    return (f"{START}\n## Task models\n\nGenerated by `python bench/task_zoo.py`; do not edit by hand.\n\n"
            f"{' '.join(line.strip() for line in __doc__.split('- **ours**')[0].splitlines()[2:])}\n\n"
            f"prunable: **{ok('ours')}/{len(results)} ok**; Torch-Pruning: **{ok('theirs')}/{len(results)} ok**.\n\n"
            f"{table(results)}\n{END}")


def with_section(text: str, block: str) -> str:
    """``text`` (docs/zoo.md) with its task-models block replaced, or inserted before the
    next generated section (a ``<!--`` marker line), or appended."""
    if START in text and END in text:
        head, rest = text.split(START, 1)
        return head + block + rest.split(END, 1)[1]
    at = text.find("\n<!--")
    if at >= 0:
        return f"{text[:at].rstrip()}\n\n{block}\n{text[at:]}"
    return f"{text.rstrip()}\n\n{block}\n"


def kept_block(text: str) -> str | None:
    """The task-models block of ``text``, for a script that rewrites docs/zoo.md around it."""
    if START in text and END in text:
        return START + text.split(START, 1)[1].split(END, 1)[0] + END
    return None


def main(quick: bool = False) -> str:
    common.setup(0)
    results = []
    for task, name, build, make_inputs, ignored in MODELS:
        if quick and name not in QUICK:
            continue
        result = run_model(task, name, build, make_inputs, ignored)
        if result is not None:
            results.append(result)
            print(f"task_zoo: {name}: ours {result['ours']['status']}, TP {result['theirs']['status']}",
                  file=sys.stderr, flush=True)
    if not quick:
        old = ZOO_DOC.read_text() if ZOO_DOC.exists() else ""
        ZOO_DOC.write_text(with_section(old, section(results)))
    return table(results)


if __name__ == "__main__":
    common.run_script(main, __doc__)
