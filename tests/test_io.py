import os
import pickle

import pytest
import torch

import prunable
from prunable import Pruner, TaylorActivation, count_params, io

ARCH = {"name": "CharNet", "num_classes": 7, "config": [8, "M", 12, "M"], "input_size": 16, "hidden": 16}
SHAPE = (1, 1, 16, 16)


def _pruned_net():
    """A small CharNet, trained a little and pruned twice with the Taylor criterion."""
    net = io.build_model(ARCH)
    opt = torch.optim.SGD(net.parameters(), lr=0.05, momentum=0.9)
    x, y = torch.randn(16, 1, 16, 16), torch.randint(0, 7, (16,))
    pruner = Pruner(net, x[:2], criterion=TaylorActivation(), optimizer=opt)
    for n in (3, 4):
        with pruner.estimate():
            for _ in range(2):
                loss = torch.nn.functional.cross_entropy(net(x), y)
                opt.zero_grad()
                loss.backward()
                opt.step()
        pruner.step(n)
    return net, pruner


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    torch.manual_seed(0)
    net, pruner = _pruned_net()
    path = tmp_path_factory.mktemp("io") / "net.pt"
    io.save(net, path, plans=pruner.history, architecture=ARCH, example_input_shape=SHAPE, meta={"note": "test"})
    return net.eval(), pruner, path


def _evil_payload(marker):
    class Evil:
        def __reduce__(self):
            return os.mkdir, (str(marker),)

    return {"format": io.FORMAT, "architecture": Evil(), "plans": [], "input_shape": list(SHAPE), "state_dict": {}}


def test_round_trip_gives_equal_outputs(saved):
    net, _, path = saved
    loaded = io.load(path)
    x = torch.randn(5, 1, 16, 16)
    assert not loaded.training
    assert torch.equal(loaded(x), net(x))
    assert {k: v.shape for k, v in loaded.state_dict().items()} == {k: v.shape for k, v in net.state_dict().items()}
    assert count_params(loaded) < count_params(io.build_model(ARCH))


def test_load_accepts_a_fresh_model_or_a_builder(saved):
    net, _, path = saved
    x = torch.randn(3, 1, 16, 16)
    fresh = prunable.CharNet(7, config=[8, "M", 12, "M"], input_size=16, hidden=16)
    assert torch.equal(io.load(path, fresh)(x), net(x))
    calls = []
    loaded = io.load(path, build=lambda arch: calls.append(arch) or io.build_model(arch))
    assert calls == [ARCH] and torch.equal(loaded(x), net(x))


def test_file_is_plain_data(saved):
    _, pruner, path = saved
    payload = torch.load(path, weights_only=True)
    assert payload["format"] == io.FORMAT
    assert payload["architecture"] == ARCH
    assert payload["plans"] == [p.to_dict() for p in pruner.history]
    assert payload["input_shape"] == list(SHAPE)
    assert payload["meta"]["note"] == "test"


def test_info_describes_without_building(saved):
    net, _, path = saved
    data = io.info(path)
    assert data["plans"] == 2 and data["channels_removed"] == 7
    assert data["params"] == count_params(net)
    assert data["file_size"] == os.path.getsize(path)
    assert data["layers"]["features.0"] == list(net.features[0].weight.shape)
    assert sum(n for plan in data["history"] for n in plan.values()) == 7
    assert data["flops"] > 0 and data["architecture"] == ARCH


def test_save_to_a_file_object_and_an_unpruned_model():
    import io as stdio

    net = io.build_model(ARCH)
    buffer = stdio.BytesIO()
    io.save(net, buffer, architecture=ARCH, example_input_shape=SHAPE)
    buffer.seek(0)
    x = torch.randn(2, 1, 16, 16)
    assert torch.equal(io.load(buffer)(x), net.eval()(x))


@pytest.mark.parametrize("protocol", [None, 2, 4])
def test_malicious_pickle_is_refused_not_run(tmp_path, protocol):
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pt"
    if protocol is None:
        torch.save(_evil_payload(marker), path)
    else:  # a bare pickle; protocol 4 is refused before its GLOBAL is even reached
        path.write_bytes(pickle.dumps(_evil_payload(marker), protocol=protocol))
    expected = io.ModelFileError if protocol == 4 else io.UnsafeFileError
    for reader in (io.load, io.info, io.read):
        with pytest.raises(expected, match="nothing was run") as caught:
            reader(path)
        assert isinstance(caught.value, prunable.PrunableError)
        assert isinstance(caught.value.__cause__, pickle.UnpicklingError)
        assert protocol == 4 or "posix.mkdir" in str(caught.value) or "os.mkdir" in str(caught.value)
    assert not marker.exists()


def test_the_malicious_file_really_is_malicious(tmp_path):
    """Control for the test above: an unsafe load does run the payload."""
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pt"
    torch.save(_evil_payload(marker), path)
    torch.load(path, weights_only=False)
    assert marker.exists()


def _write(path, **changes):
    payload = {"format": io.FORMAT, "architecture": ARCH, "plans": [], "input_shape": list(SHAPE),
               "state_dict": io.build_model(ARCH).state_dict(), **changes}
    torch.save(payload, path)
    return path


def test_unknown_format_is_named(tmp_path):
    with pytest.raises(io.ModelFileError, match="'other/9'"):
        io.load(_write(tmp_path / "m.pt", format="other/9"))


def test_unknown_architecture_is_named(tmp_path):
    path = _write(tmp_path / "m.pt", architecture={"name": "NoSuchNet"})
    with pytest.raises(io.ModelFileError, match="'NoSuchNet'.*CharNet"):
        io.load(path)


def test_bad_architecture_arguments(tmp_path):
    with pytest.raises(io.ModelFileError, match="bad arguments"):
        io.load(_write(tmp_path / "m.pt", architecture={**ARCH, "depth": 3}))


def test_plan_that_does_not_fit_is_reported(tmp_path):
    path = _write(tmp_path / "m.pt", plans=[{"features.99": [0]}])
    with pytest.raises(io.ModelFileError, match="plan 1 of 1"):
        io.load(path)


def test_weights_that_do_not_fit_are_reported(tmp_path):
    state = io.build_model({**ARCH, "hidden": 8}).state_dict()
    with pytest.raises(io.ModelFileError, match="do not fit"):
        io.load(_write(tmp_path / "m.pt", state_dict=state))


def test_missing_and_garbage_files(tmp_path):
    with pytest.raises(io.ModelFileError, match="no such model file"):
        io.load(tmp_path / "absent.pt")
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"not a model at all")
    with pytest.raises(io.ModelFileError, match="not a prunable model file") as caught:
        io.load(garbage)
    assert not isinstance(caught.value, io.UnsafeFileError)
    other = tmp_path / "other.pt"
    torch.save({"weights": torch.zeros(2)}, other)
    with pytest.raises(io.ModelFileError, match="no 'format' key"):
        io.info(other)


def test_torchvision_architecture():
    pytest.importorskip("torchvision")
    net = io.build_model({"name": "torchvision", "model": "resnet18", "num_classes": 10})
    assert net.fc.out_features == 10
    with pytest.raises(io.ModelFileError, match="no_such_model"):
        io.build_model({"name": "torchvision", "model": "no_such_model", "num_classes": 10})


@pytest.mark.slow
def test_torchvision_round_trip(tmp_path):
    pytest.importorskip("torchvision")
    arch = {"name": "torchvision", "model": "resnet18", "num_classes": 10}
    net = io.build_model(arch)
    x = torch.randn(2, 3, 32, 32)
    pruner = Pruner(net, x, criterion=prunable.WeightNorm())
    pruner.step(40)
    pruner.step(40)
    io.save(net, tmp_path / "r.pt", plans=pruner.history, architecture=arch, example_input_shape=(1, 3, 32, 32))
    assert torch.equal(io.load(tmp_path / "r.pt")(x), net.eval()(x))
    assert io.info(tmp_path / "r.pt")["channels_removed"] == 80


# -- save(model, path) / load(path, fresh) for any model ------------------------------------------------------------

def _round_trip(pruned, build, x, tmp_path):
    """Save ``pruned``, load it into ``build()`` (fresh, other random weights); compare everything."""
    path = tmp_path / "model.pt"
    prunable.save(pruned, path)
    torch.manual_seed(123)
    fresh = build()
    before = {k: tuple(v.shape) for k, v in fresh.state_dict().items()}
    loaded = prunable.load(path, fresh)
    assert loaded is fresh and not loaded.training
    pruned.eval()
    assert {k: tuple(v.shape) for k, v in loaded.state_dict().items()} != before  # it really was shrunk
    assert {k: v.shape for k, v in loaded.state_dict().items()} == {k: v.shape for k, v in pruned.state_dict().items()}
    assert io.size_attributes(loaded) == io.size_attributes(pruned)
    with torch.no_grad():
        assert torch.equal(_first(loaded(*x)), _first(pruned(*x)))
    return loaded


def _first(output):
    """The first tensor of a model's output (Hugging Face models return dataclasses)."""
    if isinstance(output, torch.Tensor):
        return output
    return output[0] if isinstance(output, (tuple, list)) else output.last_hidden_state


def _pruned(build, x, ratio=0.3):
    torch.manual_seed(0)
    model = build()
    Pruner(model, x, criterion="l1").step(ratio, scope="layer")
    return model


class UserNet(torch.nn.Module):
    """A user's model: a bare parameter (layer scale), a grouped conv, an int size attribute."""

    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 12, 3, padding=1)
        self.gamma = torch.nn.Parameter(torch.rand(1, 12, 1, 1))
        self.conv2 = torch.nn.Conv2d(12, 6, 3, groups=3)
        self.norm = torch.nn.LayerNorm(6)
        self.head = torch.nn.Linear(6, 4)

    def forward(self, x):
        h = self.conv2(torch.relu(self.conv(x)) * self.gamma)
        return self.head(self.norm(h.mean((2, 3))))


def test_any_user_model_round_trips_bit_identical(tmp_path):
    x = torch.randn(2, 3, 8, 8)
    pruned = _pruned(UserNet, x, 0.5)
    loaded = _round_trip(pruned, UserNet, (x,), tmp_path)
    assert loaded.gamma.shape == pruned.gamma.shape == (1, 6, 1, 1)
    assert loaded.conv2.groups == 3 and loaded.conv2.in_channels == 6 and loaded.norm.normalized_shape == (3,)


def test_torchvision_resnet18_round_trips(tmp_path):
    torchvision = pytest.importorskip("torchvision")
    x = torch.randn(2, 3, 32, 32)
    build = lambda: torchvision.models.resnet18(num_classes=10)  # noqa: E731
    _round_trip(_pruned(build, x), build, (x,), tmp_path)


def test_torchvision_vit_round_trips_with_hidden_dim_and_heads(tmp_path):
    pytest.importorskip("torchvision")
    from torchvision.models.vision_transformer import VisionTransformer

    def build():
        return VisionTransformer(image_size=32, patch_size=8, num_layers=2, num_heads=2, hidden_dim=16,
                                 mlp_dim=32, num_classes=5)

    x = torch.randn(2, 3, 32, 32)
    pruned = _pruned(build, x)
    assert pruned.hidden_dim < 16
    loaded = _round_trip(pruned, build, (x,), tmp_path)
    attention = loaded.encoder.layers[0].self_attention
    assert (loaded.hidden_dim, attention.head_dim) == (pruned.hidden_dim, pruned.encoder.layers[0].self_attention.head_dim)


@pytest.mark.parametrize("name, kwargs", [
    ("resnet10t", {}),
    ("vit_tiny_patch16_224", {"img_size": 32, "patch_size": 8, "depth": 2}),
])
def test_timm_models_round_trip(tmp_path, name, kwargs):
    timm = pytest.importorskip("timm")
    x = torch.randn(2, 3, 32, 32)
    build = lambda: timm.create_model(name, pretrained=False, num_classes=10, **kwargs)  # noqa: E731
    pruned = _pruned(build, x)
    if name.startswith("vit"):  # timm's attention (scaled_dot_product_attention) is pruned too
        assert pruned.blocks[0].attn.head_dim < 64
    _round_trip(pruned, build, (x,), tmp_path)


def test_hugging_face_bert_round_trips(tmp_path):
    transformers = pytest.importorskip("transformers")
    config = transformers.BertConfig(vocab_size=50, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                     intermediate_size=64, max_position_embeddings=32)
    build = lambda: transformers.BertModel(config).eval()  # noqa: E731
    ids = torch.randint(0, 50, (2, 8))
    pruned = _pruned(build, ids)  # its attention (scaled_dot_product_attention) is pruned too
    assert pruned.encoder.layer[0].intermediate.dense.out_features < 64
    assert pruned.encoder.layer[0].attention.self.attention_head_size < 8
    _round_trip(pruned, build, (ids,), tmp_path)


def test_a_model_that_does_not_fit_is_refused_and_left_unchanged(tmp_path):
    from conftest import assert_state_equal, state_copy

    x = torch.randn(2, 3, 8, 8)
    pruned = _pruned(UserNet, x, 0.5)
    prunable.save(pruned, tmp_path / "m.pt")
    smaller = _pruned(UserNet, x, 0.75)  # pruned further than the file: cannot grow back
    before, sizes = state_copy(smaller), io.size_attributes(smaller)
    with pytest.raises(io.ModelFileError, match=r"the top module: gamma has shape \[1, 6, 1, 1\] in .* but "
                                                r"\[1, 3, 1, 1\] in the model"):
        prunable.load(tmp_path / "m.pt", smaller)
    assert_state_equal(smaller, before)
    assert io.size_attributes(smaller) == sizes
    other = UserNet()
    other.norm = torch.nn.BatchNorm1d(6)
    with pytest.raises(io.ModelFileError, match="module 'norm' is a torch.nn.modules.normalization.LayerNorm"):
        prunable.load(tmp_path / "m.pt", other)
    with pytest.raises(io.ModelFileError, match="without an architecture: pass a fresh instance"):
        prunable.load(tmp_path / "m.pt")


@pytest.mark.filterwarnings("ignore:for .* copying from a non-meta parameter")  # meta stands in for a GPU
def test_load_into_a_model_on_another_device_keeps_it_there(tmp_path):
    x = torch.randn(2, 3, 8, 8)
    prunable.save(_pruned(UserNet, x, 0.5), tmp_path / "m.pt")
    with torch.device("meta"):
        fresh = UserNet()
    loaded = prunable.load(tmp_path / "m.pt", fresh)
    assert {p.device.type for p in loaded.parameters()} == {"meta"} and loaded.conv.out_channels == 6


def test_first_format_replay_builds_its_example_on_the_models_device(tmp_path, monkeypatch):
    """#18: a model on a GPU must be traced with an input on that GPU (meta stands in for it here)."""
    seen = []

    class RecordingPruner:
        def __init__(self, model, example_inputs, **kwargs):
            seen.append((example_inputs.device, next(model.parameters()).device))
            raise prunable.PrunableError("stop here")

    monkeypatch.setattr(io, "Pruner", RecordingPruner)
    path = _write(tmp_path / "m.pt", format="prunable/1", plans=[{"features.0": [0]}])
    with torch.device("meta"):
        fresh = io.build_model(ARCH)
    with pytest.raises(io.ModelFileError, match="cannot trace"):
        io.load(path, fresh)
    assert seen == [(torch.device("meta"), torch.device("meta"))]


@pytest.mark.parametrize("content", [b"", b"some notes\n", b"PK\x03\x04 truncated zip"])
def test_files_that_are_not_model_files(tmp_path, content):
    path = tmp_path / "notes.txt"
    path.write_bytes(content)
    for reader in (io.load, io.info, io.read):
        with pytest.raises(io.ModelFileError, match="notes.txt"):
            reader(path)
    torch.save(torch.randn(3), tmp_path / "tensor.pt")
    with pytest.raises(io.ModelFileError, match="not a prunable model file"):
        io.info(tmp_path / "tensor.pt")


def test_classes_are_matched_by_name_not_by_the_file_that_defined_them(tmp_path):
    """A model defined in a script (``__main__.Net``) loads where the class is imported (``mypkg.Net``)."""
    x = torch.randn(2, 3, 8, 8)
    pruned = _pruned(UserNet, x, 0.5)
    prunable.save(pruned, tmp_path / "m.pt")
    payload = torch.load(tmp_path / "m.pt", weights_only=True)
    payload["modules"] = {k: "__main__." + v.rpartition(".")[2] for k, v in payload["modules"].items()}
    torch.save(payload, tmp_path / "script.pt")
    assert torch.equal(prunable.load(tmp_path / "script.pt", UserNet())(x), pruned.eval()(x))


def test_buffers_outside_the_state_dict_are_restored(tmp_path):
    """Non-persistent buffers (caches a forward filled, rotary tables …) come back as saved."""

    class Cached(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = torch.nn.Linear(3, 3)
            self.register_buffer("table", torch.zeros(4), persistent=False)

        def forward(self, x):
            return self.lin(x) + self.table[: x.shape[-1]].sum()

    model = Cached()
    model.table = torch.arange(7.0)  # grown after construction
    prunable.save(model, tmp_path / "c.pt")
    loaded = prunable.load(tmp_path / "c.pt", Cached())
    assert torch.equal(loaded.table, torch.arange(7.0)) and "table" not in loaded.state_dict()
    x = torch.randn(2, 3)
    assert torch.equal(loaded(x), model.eval()(x))


def test_hugging_face_llama_pruned_by_hand_round_trips(tmp_path):
    """A tiny Llama (rotary tables as non-persistent buffers), its MLPs cut with prunable.surgery by hand."""
    transformers = pytest.importorskip("transformers")
    from prunable.surgery import Cut, Role, apply_cuts, keep_indices

    config = transformers.LlamaConfig(vocab_size=50, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                      num_key_value_heads=2, intermediate_size=64, max_position_embeddings=32)
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(config).eval()
    for i, layer in enumerate(model.model.layers):
        keep = keep_indices(64, range(i, 64, 3))  # a different third of the hidden units in each layer
        mlp = layer.mlp
        apply_cuts([Cut(mlp.gate_proj, Role.OUT, keep), Cut(mlp.up_proj, Role.OUT, keep),
                    Cut(mlp.down_proj, Role.IN, keep)])
    ids = torch.randint(0, 50, (2, 8))
    prunable.save(model, tmp_path / "llama.pt")
    fresh = transformers.LlamaForCausalLM(config)
    loaded = prunable.load(tmp_path / "llama.pt", fresh)
    assert [layer.mlp.down_proj.in_features for layer in loaded.model.layers] == [42, 43]
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, model(ids).logits)


@pytest.mark.parametrize("wrap", [torch.nn.DataParallel, torch.compile], ids=["DataParallel", "compile"])
def test_wrapped_models_save_and_load_as_the_module_they_wrap(tmp_path, wrap):
    x = torch.randn(2, 3, 8, 8)
    pruned = _pruned(UserNet, x, 0.5)
    io.save(wrap(pruned), tmp_path / "wrapped.pt")
    assert set(io.read(tmp_path / "wrapped.pt")["state_dict"]) == set(pruned.state_dict())  # no wrapper prefix
    fresh = wrap(UserNet())
    loaded = io.load(tmp_path / "wrapped.pt", fresh)
    assert loaded is fresh
    inner = fresh.module if isinstance(fresh, torch.nn.DataParallel) else fresh._orig_mod
    assert inner.gamma.shape == pruned.gamma.shape == (1, 6, 1, 1)
    assert torch.equal(inner(x), pruned.eval()(x))
