"""Export and deployment of pruned models (issue 7).

Pruned ResNet-18 and MobileNetV2 (≈30 % of every group, L1 criterion) must go
through ``torch.jit.script``, ``torch.export.export``, ``torch.compile`` (CPU)
and ONNX (checked with onnxruntime) and compute what the eager model computes.
A pruned ViT keeps consistent attention heads and exports. Pruning works in
float16 and bfloat16 (CPU; CUDA when present).
"""

from __future__ import annotations

import copy
import io
import shutil
import warnings

import pytest
import torch
import torchvision
from torch import nn

from prunable import Pruner, count_params
from helpers import fraction_plan, randomize_bn, zero_plan

ATOL = RTOL = 1e-4


def prune_fraction(model: nn.Module, x: torch.Tensor, fraction: float = 0.3) -> tuple[Pruner, dict]:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pruner = Pruner(model, x, criterion="l1")
    plan = fraction_plan(pruner, fraction)
    assert plan, "nothing to prune"
    pruner.prune(plan)
    return pruner, plan


_CACHE: dict[str, tuple[nn.Module, torch.Tensor, torch.Tensor]] = {}


def pruned(name: str) -> tuple[nn.Module, torch.Tensor, torch.Tensor]:
    """A pruned torchvision model (eval), its input and its eager output; built once per session.

    Callers must not modify the model (every exporter below leaves it as it is).
    """
    if name not in _CACHE:
        torch.manual_seed(0)
        model = torchvision.models.get_model(name, num_classes=10).eval()
        randomize_bn(model)
        x = torch.randn(1, 3, 64, 64)
        params = count_params(model)
        prune_fraction(model, x)
        assert count_params(model) < 0.8 * params
        with torch.no_grad():
            expected = model(x)
        _CACHE[name] = (model, x, expected)
    return _CACHE[name]


CNNS = ["resnet18", "mobilenet_v2"]


# -- TorchScript, torch.export, torch.compile, ONNX --------------------------------------------------
@pytest.mark.parametrize("name", CNNS)
def test_pruned_cnn_torchscript(name):
    model, x, expected = pruned(name)
    scripted = torch.jit.script(model)
    with torch.no_grad():
        torch.testing.assert_close(scripted(x), expected, atol=ATOL, rtol=RTOL)
    buffer = io.BytesIO()  # and it survives a save/load round trip
    torch.jit.save(scripted, buffer)
    buffer.seek(0)
    with torch.no_grad():
        torch.testing.assert_close(torch.jit.load(buffer)(x), expected, atol=ATOL, rtol=RTOL)


@pytest.mark.parametrize("name", CNNS)
def test_pruned_cnn_torch_export(name):
    model, x, expected = pruned(name)
    program = torch.export.export(model, (x,))
    with torch.no_grad():
        torch.testing.assert_close(program.module()(x), expected, atol=ATOL, rtol=RTOL)


def _compile_or_skip(model: nn.Module, x: torch.Tensor, backend: str) -> torch.Tensor:
    if backend == "inductor" and shutil.which("gcc") is None and shutil.which("cc") is None:
        pytest.skip("torch.compile's inductor backend needs a C compiler; none on PATH")
    torch._dynamo.reset()
    compiled = torch.compile(model, backend=backend)
    try:
        with torch.no_grad():
            return compiled(x)
    except Exception as exc:  # noqa: BLE001 - an environment without a working toolchain
        text = f"{type(exc).__name__}: {exc}"
        toolchain = ("InvalidCxxCompiler", "CppCompileError", "compiler", "Python.h")
        if backend == "inductor" and any(s in text for s in toolchain):  # aot_eager needs no toolchain
            pytest.skip(f"torch.compile cannot build kernels here: {text.splitlines()[0][:200]}")
        raise
    finally:
        torch._dynamo.reset()


@pytest.mark.slow
@pytest.mark.parametrize("name", CNNS)
def test_pruned_cnn_torch_compile_aot_eager(name):
    """Dynamo capture + AOT autograd of the pruned model (no C compiler needed)."""
    model, x, expected = pruned(name)
    torch.testing.assert_close(_compile_or_skip(model, x, "aot_eager"), expected, atol=ATOL, rtol=RTOL)


@pytest.mark.slow
@pytest.mark.parametrize("name", CNNS)
def test_pruned_cnn_torch_compile_inductor(name):
    """The default backend: generated C++ kernels for the pruned shapes."""
    model, x, expected = pruned(name)
    torch.testing.assert_close(_compile_or_skip(model, x, "inductor"), expected, atol=ATOL, rtol=RTOL)


def _onnx_run(model: nn.Module, x: torch.Tensor, dynamo: bool, tmp_path) -> torch.Tensor:
    import onnx  # the `export` extra (part of `dev`): a missing exporter fails here instead of skipping
    import onnxruntime as ort
    path = tmp_path / "model.onnx"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(model, (x,), str(path), dynamo=dynamo, input_names=["x"], output_names=["y"],
                          opset_version=18, external_data=False)
    onnx.checker.check_model(str(path))
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    (out,) = session.run(None, {session.get_inputs()[0].name: x.numpy()})
    return torch.from_numpy(out)


@pytest.mark.parametrize("name", CNNS)
def test_pruned_cnn_onnx_torchscript_exporter(name, tmp_path):
    model, x, expected = pruned(name)
    torch.testing.assert_close(_onnx_run(model, x, False, tmp_path), expected, atol=ATOL, rtol=RTOL)


@pytest.mark.parametrize("name", [CNNS[0], *(pytest.param(n, marks=pytest.mark.slow) for n in CNNS[1:])])
def test_pruned_cnn_onnx_dynamo_exporter(name, tmp_path):
    """torch.onnx.export's default (dynamo) exporter; needs onnxscript from the `export` extra."""
    import onnxscript  # noqa: F401 - fail, do not skip, when the extra is missing
    model, x, expected = pruned(name)
    torch.testing.assert_close(_onnx_run(model, x, True, tmp_path), expected, atol=ATOL, rtol=RTOL)


@pytest.mark.parametrize("name", CNNS)
def test_pruned_cnn_shapes_are_consistent(name):
    """Every conv/BN/Linear attribute agrees with its tensors (what exporters read)."""
    model, _, _ = pruned(name)
    for mname, m in model.named_modules():
        if isinstance(m, nn.Conv2d):
            assert m.weight.shape == (m.out_channels, m.in_channels // m.groups, *m.kernel_size), mname
            assert m.in_channels % m.groups == 0 and m.out_channels % m.groups == 0, mname
        elif isinstance(m, nn.BatchNorm2d):
            assert m.weight.shape == m.running_mean.shape == m.running_var.shape == (m.num_features,), mname
        elif isinstance(m, nn.Linear):
            assert m.weight.shape == (m.out_features, m.in_features), mname


# -- attention -----------------------------------------------------------------------------------
def assert_attention_consistent(model: nn.Module) -> None:
    attention = [m for m in model.modules() if isinstance(m, nn.MultiheadAttention)]
    assert attention
    for m in attention:
        assert m.embed_dim % m.num_heads == 0
        assert m.head_dim * m.num_heads == m.embed_dim
        assert m.in_proj_weight.shape == (3 * m.embed_dim, m.embed_dim)
        assert m.out_proj.in_features == m.out_proj.out_features == m.embed_dim


class TinyTransformer(nn.Module):
    """Patch embedding → two ``nn.TransformerEncoderLayer`` → mean over tokens → Linear."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Conv2d(3, 32, 4, 4)
        layer = nn.TransformerEncoderLayer(32, 4, 64, dropout=0.0, batch_first=True)
        self.encoder = nn.TransformerEncoder(layer, 2, enable_nested_tensor=False)
        self.head = nn.Linear(32, 10)

    def forward(self, x):
        tokens = self.embed(x).flatten(2).transpose(1, 2)
        return self.head(self.encoder(tokens).mean(1))


def test_pruned_transformer_keeps_heads_consistent_and_exports():
    torch.manual_seed(0)
    model, x = TinyTransformer().eval(), torch.randn(2, 3, 16, 16)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pruner = Pruner(model, x, criterion="l1")
    plan = fraction_plan(pruner)
    hidden = {f"encoder.layers.{i}.linear1" for i in range(2)}
    assert hidden <= set(plan), f"the feed-forward hidden dims should be prunable: {pruner.skipped}"
    stream = next(g for g in pruner.groups if g.blocks is not None)  # LayerNorm'd: not a zeroing
    assert stream.id in plan and len(stream.blocks) == 4
    hidden_plan = {gid: idx for gid, idx in plan.items() if gid in hidden}
    zeroed = copy.deepcopy(model)
    zero_plan(zeroed, pruner.graph, hidden_plan)
    pruner.prune(hidden_plan)
    assert all(model.encoder.layers[i].linear1.out_features < 64 for i in range(2))
    with torch.no_grad():
        torch.testing.assert_close(model(x), zeroed(x), atol=ATOL, rtol=RTOL)
    stream = next(g for g in pruner.groups if g.blocks is not None)
    pruner.prune({stream.id: stream.blocks[:, :2].flatten().tolist()})  # two dims of every head
    assert_attention_consistent(model)
    assert [m.head_dim for m in model.modules() if isinstance(m, nn.MultiheadAttention)] == [6, 6]
    with torch.no_grad():
        expected = model(x)
    program = torch.export.export(model, (x,))
    with torch.no_grad():
        torch.testing.assert_close(program.module()(x), expected, atol=ATOL, rtol=RTOL)


class TokenMLP(nn.Module):
    """ViT in miniature: a class token concatenated along the token dim, then a residual MLP."""

    def __init__(self) -> None:
        super().__init__()
        self.cls = nn.Parameter(torch.randn(1, 1, 8))
        self.proj = nn.Linear(4, 8)
        self.fc1, self.fc2 = nn.Linear(8, 16), nn.Linear(16, 8)
        self.head = nn.Linear(8, 2)

    def forward(self, x):  # x: (batch, tokens, 4)
        t = torch.cat([self.cls.expand(x.shape[0], -1, -1), self.proj(x)], 1)
        t = t + self.fc2(torch.relu(self.fc1(t)))
        return self.head(t[:, 0])


def test_class_token_does_not_hide_mlp_hidden_group():
    """fc1.out ⇄ fc2.in is prunable without the class token; the token must not make it vanish."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pruner = Pruner(TokenMLP().eval(), torch.randn(2, 5, 4), criterion="l1")
    assert "fc1" in {g.id for g in pruner.groups}, [str(g) for g in pruner.graph.groups]


_VIT: dict[str, tuple] = {}


def pruned_vit() -> tuple[nn.Module, torch.Tensor, dict, int]:
    """torchvision ViT-B/16 at 64×64, with whatever prunable prunes pruned (≈30 % of each group)."""
    if not _VIT:
        torch.manual_seed(0)
        model = torchvision.models.vit_b_16(image_size=64, num_classes=10).eval()
        x = torch.randn(1, 3, 64, 64)
        params = count_params(model)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            pruner = Pruner(model, x, criterion="l1")
        plan = fraction_plan(pruner)
        if plan:
            pruner.prune(plan)
        _VIT["vit"] = (model, x, plan, params)
    return _VIT["vit"]


@pytest.mark.slow
def test_pruned_vit_keeps_heads_consistent_and_exports():
    model, x, _, _ = pruned_vit()
    assert_attention_consistent(model)
    with torch.no_grad():
        expected = model(x)
    assert expected.shape == (1, 10)
    program = torch.export.export(model, (x,))
    with torch.no_grad():
        torch.testing.assert_close(program.module()(x), expected, atol=ATOL, rtol=RTOL)


@pytest.mark.slow
def test_vit_mlp_hidden_dims_are_pruned():
    model, _, plan, params = pruned_vit()
    mlp = [m for n, m in model.named_modules() if n.endswith("mlp.0") and isinstance(m, nn.Linear)]
    assert len(mlp) == 12
    assert all(m.out_features < 3072 for m in mlp), f"MLP hidden dims not pruned; plan: {sorted(plan)[:4]}"
    assert count_params(model) < params


# -- dtype and device ------------------------------------------------------------------------------
class SmallNet(nn.Module):
    """Conv/BN/residual/depthwise/concat/flatten→Linear: every cut kind, small enough for fp16 on CPU."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1, bias=False), nn.BatchNorm2d(16), nn.ReLU())
        self.body = nn.Sequential(nn.Conv2d(16, 12, 3, padding=1), nn.BatchNorm2d(12), nn.ReLU(),
                                  nn.Conv2d(12, 16, 3, padding=1), nn.BatchNorm2d(16))
        self.dw = nn.Sequential(nn.Conv2d(16, 16, 3, padding=1, groups=16), nn.BatchNorm2d(16), nn.ReLU())
        self.side = nn.Conv2d(16, 8, 1)
        self.head = nn.Sequential(nn.Flatten(), nn.Linear(24 * 4 * 4, 20), nn.ReLU(), nn.Linear(20, 5))

    def forward(self, x):
        x = self.stem(x)
        x = torch.relu(x + self.body(x))
        x = torch.cat([self.dw(x), self.side(x)], 1)
        return self.head(nn.functional.max_pool2d(x, 2))


def _check_dtype(dtype: torch.dtype, device: str) -> None:
    torch.manual_seed(0)
    model = SmallNet().eval()
    randomize_bn(model)
    model = model.to(device=device, dtype=dtype)
    x = torch.randn(2, 3, 8, 8, device=device, dtype=dtype)
    with torch.no_grad():
        shape = model(x).shape
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pruner = Pruner(model, x, criterion="l1")
    plan = fraction_plan(pruner, 0.4)
    zeroed = copy.deepcopy(model)
    zero_plan(zeroed, pruner.graph, plan)
    params = count_params(model)
    pruner.prune(plan)
    assert count_params(model) < params
    for name, t in list(model.named_parameters()) + list(model.named_buffers()):
        if t.is_floating_point():
            assert t.dtype == dtype and t.device.type == device, name
    with torch.no_grad():
        out = model(x)
        expected = zeroed(x)
    assert out.dtype == dtype and out.shape == shape and out.device.type == device
    assert torch.isfinite(out).all()
    tol = 2e-2 if dtype is torch.float16 else 1e-1 if dtype is torch.bfloat16 else 1e-4
    torch.testing.assert_close(out.float(), expected.float(), atol=tol, rtol=tol)
    pruner.step(2)  # the ranking (scores in float32) works on low-precision weights too
    with torch.no_grad():
        assert model(x).dtype == dtype


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
def test_pruning_keeps_dtype_cpu(dtype):
    _check_dtype(dtype, "cpu")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA is not available")
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
def test_pruning_keeps_dtype_cuda(dtype):
    _check_dtype(dtype, "cuda")


@pytest.mark.slow
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_pruned_torchvision_model_low_precision_cpu(dtype):
    torch.manual_seed(0)
    model = torchvision.models.mobilenet_v2(num_classes=10).eval().to(dtype)
    x = torch.randn(1, 3, 32, 32, dtype=dtype)
    prune_fraction(model, x)
    with torch.no_grad():
        out = model(x)
    assert out.dtype == dtype and out.shape == (1, 10) and torch.isfinite(out).all()
