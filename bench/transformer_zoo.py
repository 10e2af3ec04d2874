"""timm and Hugging Face models: 30 % of each group, ours vs Torch-Pruning.

Random weights (``timm.create_model(name, pretrained=False)``; Hugging Face
models built from a small config, nothing downloaded), 10 classes, eval mode,
small inputs where the model accepts them. The classifier (the Linear or conv
with the 10 logits; a language model's ``lm_head``) is ignored by both
libraries. For each model and library, graph + pruning runs on fresh deep
copies, the two libraries alternating, up to three times while a library's
runs of that model total under ``LIMIT`` seconds (median wall time shown). A
run is interrupted ("timeout") after ``LIMIT`` seconds of CPU time (all threads
together, so that other jobs on the machine cannot cause a timeout) or four
times as many seconds of wall time. Models run in the order shown (Hugging Face
first); those not started within ``BUDGET`` seconds are listed as not run:

- **ours**: ``Pruner(model, inputs, criterion=WeightNorm(), ignored_layers=…)``,
  then 30 % of every prunable group (``tests/helpers.py``'s ``fraction_plan``; a
  group feeding attention heads loses 30 % of each head's dims);
- **TP**: Torch-Pruning ``BasePruner`` + ``MagnitudeImportance(p=1)``,
  ``pruning_ratio=0.3``, the same ignored layers, run the way its examples
  show: timm attention declared through ``num_heads`` (its ``qkv``, or ``q``,
  ``k``, ``v``), head dims pruned, ``head_dim`` (and ``attn_dim``) set from the
  pruned ``qkv`` afterwards; Hugging Face models get their dict of inputs (TP
  calls ``model(**inputs)``) and lose 30 % of whole heads
  (``prune_num_heads=True``, ``prune_head_dims=False``) plus 30 % of the other
  channels, then the attention attributes and the config are set from the
  pruned layers.

"ok" = the pruned model runs, its output has the same structure (keys and
trailing sizes) and is finite, and its FLOPs are strictly lower; a causal
language model must also ``generate`` 3 tokens with its cache. "not pruned"
lists prunable's groups left alone with their reasons (the ignored classifier
aside; "model output" is the logits' group). Writes the "timm models" and
"Hugging Face models" sections of ``docs/zoo.md`` (between their markers; the
rest of the file is kept).

Run: ``python bench/transformer_zoo.py [--quick]`` (``--quick``: one tiny timm and one tiny Hugging Face
model, no budget, no doc written).
"""

from __future__ import annotations

import copy
import dataclasses
import datetime
import gc
import os
import signal
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

import common
from common import REPO, fmt_runs, markdown_table, short_error, timed

sys.path.insert(0, str(REPO / "tests"))
from helpers import fraction_plan  # noqa: E402
from prunable.inputs import call_model, input_tensors  # noqa: E402

LIMIT = 30  # CPU seconds (all threads) per run (graph + prune) and library
WALL_FACTOR = 4  # and a run is stopped after LIMIT * WALL_FACTOR seconds of wall time whatever its CPU time
BUDGET = 540  # wall seconds: models not started by then are listed as not run
NOT_RUN = f"not run (the run's {BUDGET} s were spent)"
FRACTION, REPEATS, CLASSES = 0.3, 3, 10
ZOO_DOC = REPO / "docs" / "zoo.md"
TIMM = ("<!-- timm models: bench/transformer_zoo.py -->", "<!-- end of timm models -->")
HF = ("<!-- Hugging Face models: bench/transformer_zoo.py -->", "<!-- end of Hugging Face models -->")
LAYER_TYPES = "<!-- layer types:"  # bench/layer_table.py's section, always last in docs/zoo.md


@dataclasses.dataclass(frozen=True)
class Spec:
    """One model of the table: how to build it and its inputs, what kind of model it is, how it is shown."""

    family: str
    name: str
    build: Callable[[], nn.Module]
    inputs: Callable[[], Any]
    kind: str  # "timm", "hf" or "hf-causal" (also checked with generate)
    label: str  # the configuration shown in the table


def _timm(family: str, name: str, size: int = 64, **kwargs: Any) -> Spec:
    def build() -> nn.Module:
        import timm

        return timm.create_model(name, pretrained=False, num_classes=CLASSES, **kwargs).eval()

    shown = name + "".join(f", {k}={v}" for k, v in kwargs.items())
    return Spec(family, name, build, lambda: torch.randn(1, 3, size, size), "timm", shown)


#: in the order they run (the families the issue names first: the run stops at ``BUDGET``)
TIMM_MODELS = [
    _timm("ViT", "vit_tiny_patch16_224", img_size=64),
    _timm("ResNet", "resnet50"),
    _timm("EfficientNet", "efficientnet_b0"),
    _timm("Swin", "swin_tiny_patch4_window7_224", size=128, img_size=128, window_size=4),
    _timm("hybrid ResNet + ViT", "vit_tiny_r_s16_p8_224", img_size=64),
    _timm("RegNet", "regnety_008"),
    _timm("ConvNeXt", "convnext_atto"),
    _timm("CaiT (layer scale, class attention)", "cait_xxs24_224", img_size=64),
    _timm("PoolFormer", "poolformer_s12"),
    _timm("MLP-Mixer", "mixer_s16_224", img_size=64),
    _timm("MobileNetV3", "mobilenetv3_large_100"),
    _timm("ResNeXt", "resnext26ts"),
    _timm("DeiT III (layer scale)", "deit3_small_patch16_224", img_size=64),
    _timm("BEiT (layer scale, relative position)", "beit_base_patch16_224", img_size=64),
    _timm("EVA-02 (rotary, SwiGLU)", "eva02_tiny_patch14_224", size=56, img_size=56),
    _timm("MobileViT", "mobilevit_xxs"),
    _timm("LeViT", "levit_128s", img_size=64),
    _timm("PVT v2", "pvt_v2_b0"),
    _timm("CoaT", "coat_lite_tiny", img_size=64),
    _timm("ConvNeXt V2 (GRN)", "convnextv2_atto"),
    _timm("GhostNet", "ghostnet_100"),
]
TIMM_QUICK = [_timm("ViT", "vit_tiny_patch16_224", size=32, img_size=32, patch_size=8, depth=2)]


def _hf(family: str, model: str, shown: str, inputs: Callable[[], Any], kind: str = "hf", **config: Any) -> Spec:
    """A Hugging Face ``model`` class built from ``<Family>Config(**config)`` (random weights, offline)."""
    def build() -> nn.Module:
        import transformers

        config_class = getattr(transformers, model.split("For")[0] + "Config")
        return getattr(transformers, model)(config_class(**config)).eval()

    return Spec(family, model, build, inputs, kind, f"{model} ({shown})")


def _tokens(vocab: int, length: int = 32) -> Callable[[], dict[str, torch.Tensor]]:
    ids = torch.randint(0, vocab, (2, length), generator=torch.Generator().manual_seed(0))
    return lambda: {"input_ids": ids, "attention_mask": torch.ones_like(ids)}


HF_MODELS = [
    _hf("BERT", "BertForSequenceClassification", "hidden 256, 4 layers, 4 heads, FFN 1024", _tokens(1000),
        vocab_size=1000, hidden_size=256, num_hidden_layers=4, num_attention_heads=4, intermediate_size=1024,
        max_position_embeddings=128, num_labels=CLASSES),
    _hf("ViT", "ViTForImageClassification", "64², patch 8, hidden 192, 4 layers, 3 heads, FFN 768",
        lambda: {"pixel_values": torch.randn(1, 3, 64, 64)}, image_size=64, patch_size=8, hidden_size=192,
        num_hidden_layers=4, num_attention_heads=3, intermediate_size=768, num_labels=CLASSES),
    _hf("Llama (GQA, rotary, RMSNorm, SwiGLU)", "LlamaForCausalLM",
        "hidden 256, 4 layers, 8 query / 2 key-value heads, FFN 688", _tokens(1000), "hf-causal", vocab_size=1000,
        hidden_size=256, num_hidden_layers=4, num_attention_heads=8, num_key_value_heads=2, intermediate_size=688,
        max_position_embeddings=128),
]
HF_QUICK = [_hf("BERT", "BertForSequenceClassification", "hidden 32, 1 layer, 4 heads, FFN 64", _tokens(100, 8),
                vocab_size=100, hidden_size=32, num_hidden_layers=1, num_attention_heads=4, intermediate_size=64,
                max_position_embeddings=32, num_labels=CLASSES)]


def ignored_layers(model: nn.Module, spec: Spec) -> list[nn.Module]:
    """The classifier: the layer with the 10 logits, or a language model's output embedding."""
    return [model.get_output_embeddings()] if spec.kind == "hf-causal" else common.tp_ignored_layers(model, CLASSES)


class Ours:
    """prunable: ``Pruner(...)``, then 30 % of every group and ``prune``."""

    @staticmethod
    def build(model: nn.Module, inputs: Any, spec: Spec) -> Any:
        from prunable import Pruner, WeightNorm

        return Pruner(model, inputs, criterion=WeightNorm(), ignored_layers=ignored_layers(model, spec))

    @staticmethod
    def describe(pruner: Any) -> dict[str, str]:
        from prunable.reasons import SkipKind

        by_kind: dict[SkipKind, list[str]] = {}  # per kind: its count and its first message ("…": others differ)
        for reason in sorted(r for r in pruner.skipped.values() if r.kind is not SkipKind.IGNORED):
            by_kind.setdefault(reason.kind, []).append(str(reason))
        why = "; ".join(f"{len(v)}: {v[0][:100]}{' …' if len(set(v)) > 1 else ''}"
                        for v in sorted(by_kind.values(), key=len, reverse=True))
        return {"groups": f"{len(pruner.groups)}/{len(pruner.graph.groups)}", "skipped": why or "—"}

    @staticmethod
    def step(pruner: Any) -> None:
        plan = fraction_plan(pruner, FRACTION)
        if not plan:
            raise RuntimeError(f"no prunable group ({len(pruner.graph.groups)} groups)")
        pruner.prune(plan)


def _linear(module: nn.Module, name: str) -> nn.Linear | None:
    return layer if isinstance(layer := getattr(module, name, None), nn.Linear) else None


def tp_heads(model: nn.Module, spec: Spec) -> dict[nn.Module, int]:
    """TP's ``num_heads`` map, as its examples build it: the fused ``qkv`` (or ``q``/``k``/``v``)
    Linears of a timm attention; the query/key/value projections of a Hugging Face attention."""
    heads: dict[nn.Module, int] = {}
    config = getattr(model, "config", None)
    for m in model.modules():
        if spec.kind == "timm":
            n = getattr(m, "num_heads", None)
            layers = [_linear(m, "qkv")] if _linear(m, "qkv") else [_linear(m, a) for a in "qkv"]
            heads.update({layer: n for layer in layers if layer is not None and isinstance(n, int)})
            continue
        q_heads = config.num_attention_heads
        kv_heads = getattr(config, "num_key_value_heads", None) or q_heads
        for names in (("query", "key", "value"), ("q_proj", "k_proj", "v_proj")):
            if all(_linear(m, a) for a in names):
                heads.update({getattr(m, names[0]): q_heads, getattr(m, names[1]): kv_heads,
                              getattr(m, names[2]): kv_heads})
    return heads


class Theirs:
    """Torch-Pruning: ``BasePruner(...)``, ``step()``, then the attribute updates its examples make."""

    @staticmethod
    def build(model: nn.Module, inputs: Any, spec: Spec) -> Any:
        import torch_pruning as tp

        heads = tp_heads(model, spec)
        options = {} if spec.kind == "timm" else {"prune_num_heads": True, "prune_head_dims": False,
                                                  "head_pruning_ratio": FRACTION}
        pruner = tp.pruner.BasePruner(model, inputs, importance=tp.importance.MagnitudeImportance(p=1),
                                      pruning_ratio=FRACTION, ignored_layers=ignored_layers(model, spec),
                                      num_heads=heads, **options)
        return pruner, model, spec, heads

    @staticmethod
    def describe(state: Any) -> dict[str, str]:
        groups = state[0].DG.get_all_groups(ignored_layers=state[0].ignored_layers,
                                            root_module_types=state[0].root_module_types)
        return {"groups": str(sum(1 for _ in groups))}

    @staticmethod
    def step(state: Any) -> None:
        pruner, model, spec, heads = state
        pruner.step()
        (_tp_timm_sizes if spec.kind == "timm" else _tp_hf_sizes)(model, pruner, heads)


def _tp_timm_sizes(model: nn.Module, pruner: Any, heads: dict[nn.Module, int]) -> None:
    """TP's timm example: ``head_dim`` from the pruned ``qkv`` (and ``attn_dim``, which newer timm reads)."""
    for m in model.modules():
        layer = _linear(m, "qkv") or _linear(m, "q")
        if layer is None or layer not in heads or not hasattr(m, "head_dim"):
            continue
        m.head_dim = layer.out_features // ((3 if layer is getattr(m, "qkv", None) else 1) * m.num_heads)
        if hasattr(m, "attn_dim"):
            m.attn_dim = m.head_dim * m.num_heads


def _tp_hf_sizes(model: nn.Module, pruner: Any, heads: dict[nn.Module, int]) -> None:
    """TP's Hugging Face examples: head counts of each attention, then the config, from the pruned layers."""
    config = model.config
    for m in model.modules():
        q, k = (_linear(m, "query"), _linear(m, "key")) if _linear(m, "query") else (_linear(m, "q_proj"),
                                                                                     _linear(m, "k_proj"))
        if q is not None and q in heads:
            q_heads, kv_heads = pruner.num_heads[q], pruner.num_heads[k]
            for name, value in (("num_attention_heads", q_heads), ("all_head_size", q.out_features),
                                ("num_key_value_groups", q_heads // kv_heads)):
                if hasattr(m, name):
                    setattr(m, name, value)
            config.num_attention_heads, config.num_key_value_heads = q_heads, kv_heads
        if _linear(m, "gate_proj"):
            config.intermediate_size = m.gate_proj.out_features
    if model.get_output_embeddings() is not None:
        config.hidden_size = model.get_output_embeddings().in_features


def structure(out: Any) -> Any:
    """The output's structure: container keys, tensors' trailing sizes, other objects' type names."""
    if isinstance(out, torch.Tensor):
        return ("tensor", tuple(out.shape[1:]))
    if isinstance(out, dict):
        return {k: structure(v) for k, v in out.items()}
    if isinstance(out, (list, tuple)):
        return [structure(v) for v in out]
    return type(out).__name__


def _finite(out: Any) -> bool:
    return all(bool(torch.isfinite(t).all()) for t in input_tensors(out) if t.is_floating_point())


def _generates(model: nn.Module, inputs: dict[str, torch.Tensor]) -> str | None:
    """Why ``model.generate`` (3 new tokens, greedy, with its cache) fails, or None."""
    ids = inputs["input_ids"][:, :8]
    try:
        with torch.no_grad(), common.quiet():
            out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=3, do_sample=False)
    except Exception as exc:  # noqa: BLE001 - reported in the table
        return f"generate: {short_error(exc)}"
    return None if tuple(out.shape) == (ids.shape[0], ids.shape[1] + 3) else f"generate: shape {tuple(out.shape)}"


def check(model: nn.Module, inputs: Any, spec: Spec, before: dict[str, Any]) -> dict[str, Any]:
    """Status ("ok" or why not) and FLOPs of a pruned model."""
    from prunable import count_flops

    with torch.no_grad(), common.quiet():
        out = call_model(model, inputs)
        flops = count_flops(model, inputs)
    if structure(out) != before["structure"]:
        status = "failed: output structure changed"
    elif not _finite(out):
        status = "failed: non-finite output"
    elif flops >= before["flops"]:
        status = "failed: FLOPs not lower"
    else:
        failure = _generates(model, inputs) if spec.kind == "hf-causal" else None
        status = f"failed: {failure}" if failure else "ok"
    return {"status": status, "flops": flops}


@contextmanager
def cpu_limit(seconds: float) -> Iterator[None]:
    """``zoo.Timeout`` after ``seconds`` of CPU time (this process, all threads) or ``WALL_FACTOR``× that of wall."""
    from zoo import Timeout

    def interrupt(signum: int, frame: Any) -> None:
        raise Timeout(f"over {LIMIT} s of CPU time")

    previous = {sig: signal.signal(sig, interrupt) for sig in (signal.SIGPROF, signal.SIGALRM)}
    signal.setitimer(signal.ITIMER_PROF, seconds)
    signal.setitimer(signal.ITIMER_REAL, WALL_FACTOR * seconds)
    try:
        yield
    finally:
        for timer, (sig, handler) in zip((signal.ITIMER_PROF, signal.ITIMER_REAL), previous.items()):
            signal.setitimer(timer, 0), signal.signal(sig, handler)


def run_once(lib: type, spec: Spec, model: nn.Module, inputs: Any, describe: bool) -> tuple[float, dict[str, Any]]:
    """Wall time of ``lib``'s build and step (together under ``LIMIT`` CPU seconds); groups described untimed."""
    from zoo import Timeout

    cpu = time.process_time()
    with common.quiet(), cpu_limit(LIMIT):
        build, state = timed(lambda: lib.build(model, inputs, spec))
    used = time.process_time() - cpu
    info = lib.describe(state) if describe else {}
    cpu = time.process_time()
    with common.quiet(), cpu_limit(max(0.1, LIMIT - used)):
        step, _ = timed(lambda: lib.step(state))
    if used + time.process_time() - cpu > LIMIT:
        raise Timeout(f"over {LIMIT} s of CPU time")
    return build + step, info


def attempt(lib: type, spec: Spec, src: nn.Module, inputs: Any, before: dict[str, Any],
            spent: list[float]) -> dict[str, Any]:
    """One more run of ``lib`` on a deep copy of ``src``; ``spent`` collects its times (the first run is checked)."""
    from zoo import attempt_with

    return attempt_with(src, spent, lambda model, first: run_once(lib, spec, model, inputs, describe=first),
                        lambda model: check(model, inputs, spec, before), f"timeout (> {LIMIT} CPU s)")


def run_model(spec: Spec) -> dict[str, Any]:
    """Both libraries on ``spec``'s model, alternating, up to ``REPEATS`` timed runs each."""
    from prunable import count_flops

    common.seed_all(0)
    src, inputs = spec.build(), spec.inputs()
    with torch.no_grad(), common.quiet():  # the unpruned model must run: an error here is the script's
        before = {"structure": structure(call_model(src, inputs)), "flops": count_flops(src, inputs)}
    libs = {"ours": Ours, "theirs": Theirs}
    times: dict[str, list[float]] = {who: [] for who in libs}
    results = {who: attempt(lib, spec, src, inputs, before, times[who]) for who, lib in libs.items()}
    for _ in range(REPEATS - 1):
        for who, lib in libs.items():
            if results[who]["status"] == "ok" and sum(times[who]) < LIMIT:
                attempt(lib, spec, src, inputs, before, times[who])
    for who, result in results.items():
        result["runs"] = common.Runs(tuple(times[who])) if result["status"] == "ok" else None
    items = inputs.items() if isinstance(inputs, dict) else [("", inputs)]
    shapes = ", ".join(f"{key} {'×'.join(map(str, t.shape))}".strip() for key, t in items)
    del src
    gc.collect()
    return {"spec": spec, "input": shapes, "before": before, **results}


def not_run(spec: Spec, why: str) -> dict[str, Any]:
    """The row of a model left out (the run had spent its ``BUDGET``, or the unpruned model fails)."""
    status = {"status": why}
    return {"spec": spec, "input": "—", "before": {"flops": None}, "ours": status, "theirs": dict(status)}


def table(results: list[dict[str, Any]]) -> str:
    _flops = lambda n: "—" if n is None else f"{n / 1e6:,.1f} M"  # noqa: E731
    rows = []
    for r in results:
        o, t, spec = r["ours"], r["theirs"], r["spec"]
        rows.append([spec.family, f"`{spec.label}`", r["input"], o.get("groups", "—"), o.get("skipped", "—"),
                     f"{_flops(r['before']['flops'])} → {_flops(o.get('flops'))}", o["status"],
                     fmt_runs(o.get("runs")), t.get("groups", "—"), _flops(t.get("flops")), t["status"],
                     fmt_runs(t.get("runs"))])
    return markdown_table(["family", "model", "input", "groups (prunable/total)", "not pruned (why)",
                           "FLOPs before → after (ours)", "prunable", "time (median, range)", "TP groups",
                           "FLOPs after (TP)", "Torch-Pruning", "TP time (median, range)"], rows)


def summary(results: list[dict[str, Any]]) -> str:
    def count(who: str) -> str:
        statuses = [r[who]["status"] for r in results]
        n = lambda prefix: sum(s.startswith(prefix) for s in statuses)  # noqa: E731
        return f"**{n('ok')}/{len(results) - n('not run')} ok**, {n('timeout')} timeout, {n('failed')} failed"
    late = sum(r["ours"]["status"] == NOT_RUN for r in results)
    return f"prunable {count('ours')}; Torch-Pruning {count('theirs')}.{f' {late} more {NOT_RUN}.' if late else ''}"


def _method() -> str:
    """The docstring's description (title and ``Run:`` line left out), as markdown."""
    body = (__doc__ or "").split("\n", 1)[1].split("Writes the")[0]
    return body.strip().replace("``LIMIT``", str(LIMIT)).replace("``BUDGET``", str(BUDGET)).replace("``", "`")


def run_info(load_start: tuple[float, ...], seconds: float) -> str:
    """Where and when the figures were measured: date, CPU, versions, the machine's load."""
    import importlib.metadata as md

    versions = ", ".join(f"{name} {md.version(name)}" for name in ("torch", "timm", "transformers", "torch-pruning"))
    load = lambda values: ", ".join(f"{v:.1f}" for v in values)  # noqa: E731
    return (f"Measured {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC in one run of "
            f"{seconds:.0f} s on {common.cpu_model()} ({os.cpu_count()} cores, {common.THREADS} torch threads; "
            f"{versions}). Load average (1, 5, 15 min) at the start {load(load_start)}, at the end "
            f"{load(os.getloadavg())}: a load above the core count means other jobs shared the CPUs and the "
            "times are inflated; statuses, groups and FLOPs do not depend on the load.")


def section(markers: tuple[str, str], title: str, results: list[dict[str, Any]], method: str, info: str) -> str:
    return (f"{markers[0]}\n## {title}\n\nGenerated by `python bench/transformer_zoo.py`; do not edit by hand.\n\n"
            f"{method}\n\n{info}\n\n{summary(results)}\n\n{table(results)}\n{markers[1]}")


def with_block(text: str, markers: tuple[str, str], block: str) -> str:
    """``text`` (docs/zoo.md) with the block between ``markers`` replaced, or inserted before
    the layer-types section (always last), or appended."""
    start, end = markers
    if start in text and end in text:
        head, rest = text.split(start, 1)
        return head + block + rest.split(end, 1)[1]
    at = text.find(LAYER_TYPES)
    if at >= 0:
        return f"{text[:at].rstrip()}\n\n{block}\n\n{text[at:]}"
    return f"{text.rstrip()}\n\n{block}\n" if text.strip() else f"{block}\n"


def kept_blocks(text: str) -> list[str]:
    """This script's blocks of ``text``, for a script that rewrites docs/zoo.md around them."""
    return [start + text.split(start, 1)[1].split(end, 1)[0] + end
            for start, end in (TIMM, HF) if start in text and end in text]


def main(quick: bool = False, doc: Path | None = None) -> str:
    """Run the timm and the Hugging Face models; write their sections into ``doc``
    (default: docs/zoo.md for a full run, nothing for ``quick``); returns both."""
    common.setup(0)
    load_start, start = os.getloadavg(), datetime.datetime.now().timestamp()
    results: dict[str, list[dict[str, Any]]] = {"hf": [], "timm": []}
    for key, spec in [("hf", s) for s in (HF_QUICK if quick else HF_MODELS)] + \
            [("timm", s) for s in (TIMM_QUICK if quick else TIMM_MODELS)]:
        late = not quick and datetime.datetime.now().timestamp() - start > BUDGET
        try:
            results[key].append(not_run(spec, NOT_RUN) if late else run_model(spec))
        except Exception as exc:  # noqa: BLE001 - the unpruned model's forward pass or FLOPs count failed
            results[key].append(not_run(spec, f"not run: the unpruned model fails: {short_error(exc)}"))
        print(f"transformer_zoo: {spec.name}: ours {results[key][-1]['ours']['status']}, "
              f"TP {results[key][-1]['theirs']['status']}", file=sys.stderr, flush=True)
    info = run_info(load_start, datetime.datetime.now().timestamp() - start)
    blocks = [section(TIMM, "timm models", results["timm"], _method(), info),
              section(HF, "Hugging Face models", results["hf"], "Measured as the timm models above, in the same run.",
                      info)]
    doc = doc if doc is not None or quick else ZOO_DOC
    if doc is not None:
        text = doc.read_text() if doc.exists() else ""
        for markers, block in zip((TIMM, HF), blocks):
            text = with_block(text, markers, block)
        doc.write_text(text)
    return "\n\n".join(blocks)


if __name__ == "__main__":
    common.run_script(main, __doc__)
