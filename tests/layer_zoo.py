"""The layer zoo: one tiny model per layer type, with a hand-written way to make channels dead.

Shared by ``tests/test_layers.py`` (every registered handler must have a row) and
``bench/layer_table.py`` (the "layer types" table of docs/zoo.md). A row's
``kill(model, dead)`` zeroes, by plain tensor indexing and without asking
prunable, every weight and bias that produces or reads group channels ``dead``:
an L1 criterion must then remove exactly those, and the output must not change.

Add a row for every new handler (the test walks the registry); the "recurrent"
rows (LSTM/GRU/RNN) go in :data:`ROWS` the same way.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.nn.utils import parametrizations


@dataclass(frozen=True)
class LayerCase:
    """One row of the layer zoo.

    ``covers`` are the registry keys (classes or qualified names) the row exercises,
    ``layer`` names the layer type in the docs, ``pruned`` says what is cut.
    ``exact`` is False where removing even a dead channel changes the output
    (norms whose statistics run over the channels); ``zeroed`` is False where
    zeroing the readers of a channel is not the same as removing it (attention's
    q·k, statistics over channels, spectral norm's σ over the producer's rows).
    """

    name: str
    layer: str
    covers: tuple[Any, ...]
    build: Callable[[], nn.Module]
    inputs: Callable[[], Any]
    kill: Callable[[nn.Module, list[int]], None]
    group: str
    dead: tuple[int, ...]
    pruned: str
    exact: bool = True
    zeroed: bool = True


def _zero(*tensors_and_index: tuple[torch.Tensor, Any]) -> None:
    with torch.no_grad():
        for t, index in tensors_and_index:
            if t is not None:
                t[index] = 0


def _kill_conv_chain(model: nn.Module, dead: list[int]) -> None:
    """``model[0]`` a conv (or Linear) producing channels, an optional norm/PReLU at
    ``model[1]``, and the first layer with input channels after it reading them."""
    producer = model[0]
    _zero((producer.weight, dead), (producer.bias, dead))
    for layer in list(model)[1:]:
        if isinstance(layer, (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)):
            _zero((layer.weight, (slice(None), dead)))
            return
        for name in ("weight", "bias"):
            t = getattr(layer, name, None)
            if isinstance(t, torch.Tensor) and t.dim() == 1 and t.numel() > 1:
                _zero((t, dead))


def _x(*shape: int) -> Callable[[], torch.Tensor]:
    return lambda: torch.randn(*shape)


def _kill_transposed(model: nn.Module, dead: list[int]) -> None:
    """``model[0]`` conv → ``model[2]`` ConvTranspose (grouped: positions ``dead`` of every
    group) → ``model[4]`` conv reading them."""
    convt, reader = model[2], model[4]
    per_group = convt.out_channels // convt.groups
    outs = [g * per_group + p for g in range(convt.groups) for p in dead]
    _zero((convt.weight, (slice(None), dead)), (convt.bias, outs), (reader.weight, (slice(None), outs)))


def _kill_depthwise(model: nn.Module, dead: list[int]) -> None:
    """``model[0]`` conv → ``model[2]`` depthwise (multiplier ``m``) → ``model[4]`` conv."""
    first, dw, reader = model[0], model[2], model[4]
    m = dw.out_channels // dw.in_channels
    outs = [c * m + k for c in dead for k in range(m)]
    _zero((first.weight, dead), (first.bias, dead), (dw.weight, dead if dw.transposed else outs),
          (dw.bias, outs), (reader.weight, (slice(None), outs)))


def _kill_grouped(model: nn.Module, dead: list[int]) -> None:
    """``model[0]`` conv → ``model[2]`` grouped conv: positions ``dead`` of every input group
    are read by nobody; the producer's rows of those channels are zero."""
    first, grouped = model[0], model[2]
    per_group = grouped.in_channels // grouped.groups
    ins = [g * per_group + p for g in range(grouped.groups) for p in dead]
    _zero((first.weight, ins), (first.bias, ins), (grouped.weight, (slice(None), dead)))


def _kill_shuffle(model: nn.Module, dead: list[int]) -> None:
    """Conv (c·r² outputs) → PixelShuffle(r) → conv: group channel c is conv rows c·r² … c·r²+r²−1."""
    conv, shuffle, reader = model[0], model[1], model[2]
    r2 = shuffle.upscale_factor ** 2
    rows = [c * r2 + k for c in dead for k in range(r2)]
    _zero((conv.weight, rows), (conv.bias, rows), (reader.weight, (slice(None), dead)))


def _kill_unshuffle(model: nn.Module, dead: list[int]) -> None:
    """Conv → PixelUnshuffle(r) → conv: conv channel c is read as inputs c·r² … c·r² + r² − 1."""
    conv, unshuffle, reader = model[0], model[1], model[2]
    r2 = unshuffle.downscale_factor ** 2
    _zero((conv.weight, dead), (conv.bias, dead),
          (reader.weight, (slice(None), [c * r2 + k for c in dead for k in range(r2)])))


class Embedded(nn.Module):
    """Embedding (or EmbeddingBag) → Linear."""

    def __init__(self, bag: bool = False) -> None:
        super().__init__()
        self.embed = nn.EmbeddingBag(20, 8) if bag else nn.Embedding(20, 8, padding_idx=0)
        self.fc = nn.Linear(8, 3)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.fc(self.embed(tokens))


def _kill_embedding(model: nn.Module, dead: list[int]) -> None:
    _zero((model.embed.weight, (slice(None), dead)), (model.fc.weight, (slice(None), dead)))


class Attended(nn.Module):
    """Linear → MultiheadAttention (2 heads) → mean over tokens → Linear."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Linear(4, 8)
        self.attn = nn.MultiheadAttention(8, num_heads=2, batch_first=True)
        self.head = nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.embed(x)
        return self.head(self.attn(h, h, h, need_weights=False)[0].mean(1))


def _kill_attention(model: nn.Module, dead: list[int]) -> None:
    e = model.attn.embed_dim
    rows = [d + k * e for d in dead for k in range(3)]
    _zero((model.embed.weight, dead), (model.embed.bias, dead), (model.attn.in_proj_weight, (slice(None), dead)),
          (model.attn.in_proj_weight, rows), (model.attn.in_proj_bias, rows),
          (model.attn.out_proj.weight, (slice(None), dead)))


class Windowed(nn.Module):
    """Linear → torchvision's shifted-window attention (V1, V2, or the video one) → mean → Linear."""

    def __init__(self, v2: bool = False, video: bool = False) -> None:
        super().__init__()
        from torchvision.models import swin_transformer as swin
        from torchvision.models.video import swin_transformer as swin3d

        self.embed = nn.Linear(4, 8)
        if video:
            self.attn = swin3d.ShiftedWindowAttention3d(8, [2, 2, 2], [1, 1, 1], num_heads=2)
        else:
            kind = swin.ShiftedWindowAttentionV2 if v2 else swin.ShiftedWindowAttention
            self.attn = kind(8, [2, 2], [1, 1], num_heads=2)
        self.head = nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.attn(self.embed(x)).flatten(1, -2).mean(1))


def _kill_window(model: nn.Module, dead: list[int]) -> None:
    e, attn = model.embed.out_features, model.attn
    rows = [d + k * e for d in dead for k in range(3)]
    _zero((model.embed.weight, dead), (model.embed.bias, dead), (attn.qkv.weight, (slice(None), dead)),
          (attn.qkv.weight, rows), (attn.qkv.bias, rows), (attn.proj.weight, (slice(None), dead)),
          (attn.proj.weight, dead), (attn.proj.bias, dead), (model.head.weight, (slice(None), dead)))


def _normed(norm: Callable[[nn.Module], nn.Module], conv: type = nn.Conv2d) -> Callable[[], nn.Module]:
    return lambda: nn.Sequential(conv(3, 8, 3), norm(8), nn.ReLU(), conv(8, 4, 1))


def _weight_normed() -> nn.Module:
    return nn.Sequential(parametrizations.weight_norm(nn.Conv2d(3, 8, 3)), nn.ReLU(),
                         parametrizations.weight_norm(nn.Conv2d(8, 4, 1)))


def _kill_weight_norm(model: nn.Module, dead: list[int]) -> None:
    """g (original0) of the producer's dead rows, and the reader's v (original1) columns."""
    first, reader = model[0].parametrizations.weight, model[2].parametrizations.weight
    _zero((first.original0, dead), (model[0].bias, dead), (reader.original1, (slice(None), dead)))


def _spectral_normed() -> nn.Module:
    return nn.Sequential(parametrizations.spectral_norm(nn.Conv2d(3, 8, 3)), nn.ReLU(),
                         parametrizations.spectral_norm(nn.Conv2d(8, 4, 1)))


def _kill_spectral_norm(model: nn.Module, dead: list[int]) -> None:
    first, reader = model[0].parametrizations.weight, model[2].parametrizations.weight
    _zero((first.original, dead), (model[0].bias, dead), (reader.original, (slice(None), dead)))


class Split(nn.Module):
    """A conv whose output is split along height (literal sizes) and chunked along width."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3)
        self.top, self.bottom = nn.Conv2d(8, 4, 1), nn.Conv2d(8, 4, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv(x)
        top, bottom = torch.split(h, [4, 3], dim=2)
        left, right = self.top(top).chunk(2, dim=3)
        return torch.cat([left, right, self.bottom(bottom)[..., :2]], dim=2)


def _kill_split(model: nn.Module, dead: list[int]) -> None:
    _zero((model.conv.weight, dead), (model.conv.bias, dead), (model.top.weight, (slice(None), dead)),
          (model.bottom.weight, (slice(None), dead)))


class Recurrent(nn.Module):
    """Linear → LSTM / GRU / RNN → Linear on every step (both directions when bidirectional)."""

    def __init__(self, kind: type, batch_first: bool = True, **options: Any) -> None:
        super().__init__()
        self.embed = nn.Linear(4, 8)
        self.rnn = kind(8, 6, batch_first=batch_first, **options)
        self.head = nn.Linear(6 * (2 if self.rnn.bidirectional else 1), 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.rnn(self.embed(x))[0])


def _kill_recurrent(model: nn.Module, dead: list[int]) -> None:
    """Hidden units ``dead``: rows j, H+j, 2H+j … of every gate block of every layer and
    direction, the columns reading them back (weight_hh, the next layer's weight_ih at j
    and H+j), and the head's inputs j (and H+j)."""
    rnn, size = model.rnn, model.rnn.hidden_size
    gates = getattr(rnn, "weight_ih_l0", getattr(rnn, "weight_ih", None)).shape[0] // size
    rows = [g * size + j for g in range(gates) for j in dead]
    both = dead + [size + j for j in dead]
    for name, t in rnn.named_parameters():
        _zero((t, rows))
        if name.startswith("weight_hh"):
            _zero((t, (slice(None), dead)))
        elif name.startswith("weight_ih_l") and not name.startswith("weight_ih_l0"):
            _zero((t, (slice(None), both if t.shape[1] == 2 * size else dead)))
    _zero((model.head.weight, (slice(None), both if model.head.in_features == 2 * size else dead)))


class Stepped(nn.Module):
    """Linear → an LSTMCell / GRUCell / RNNCell looped over the time steps → Linear on every step."""

    def __init__(self, kind: type) -> None:
        super().__init__()
        self.embed = nn.Linear(4, 8)
        self.rnn = kind(8, 6)
        self.head = nn.Linear(6, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x.new_zeros(x.shape[0], self.rnn.hidden_size)
        state = (h, h) if isinstance(self.rnn, nn.LSTMCell) else h
        outs = []
        for t in range(x.shape[1]):
            state = self.rnn(self.embed(x[:, t]), state)
            outs.append(self.head(state[0] if isinstance(state, tuple) else state))
        return torch.stack(outs, 1)


_RNN = ("hidden units: row j of every gate block in every layer and direction, the weight_hh columns "
        "and next layer's weight_ih columns (j, H+j) reading them, the readers of the output")

_S = nn.Sequential
_RNN_CELL = "hidden units: row j of every gate block, column j of weight_hh, the readers of the new state"
_CONV = "output channels: weight rows, bias; readers' input columns"
_NORM = "the producer's channels: affine weight/bias and running statistics (when present)"

#: the zoo: one row per layer type (and per trace rule that moves channels in blocks)
ROWS: list[LayerCase] = [
    LayerCase("conv2d_bn2d", "Conv2d + BatchNorm2d", (nn.modules.conv._ConvNd, nn.modules.batchnorm._NormBase),
              _normed(nn.BatchNorm2d), _x(2, 3, 8, 8), _kill_conv_chain, "0", (1, 5), _CONV),
    LayerCase("syncbatchnorm", "SyncBatchNorm (traced as a local BatchNorm)", (nn.SyncBatchNorm,),
              _normed(nn.SyncBatchNorm), _x(2, 3, 8, 8), _kill_conv_chain, "0", (0, 3), _NORM),
    LayerCase("conv1d_bn1d", "Conv1d + BatchNorm1d", (), _normed(nn.BatchNorm1d, nn.Conv1d), _x(2, 3, 10),
              _kill_conv_chain, "0", (0, 6), _CONV),
    LayerCase("conv3d_bn3d", "Conv3d + BatchNorm3d", (), _normed(nn.BatchNorm3d, nn.Conv3d), _x(2, 3, 5, 5, 5),
              _kill_conv_chain, "0", (2, 3), _CONV),
    LayerCase("conv2d_grouped", "Conv2d, groups=2", (), lambda: _S(nn.Conv2d(3, 8, 3), nn.ReLU(),
              nn.Conv2d(8, 6, 1, groups=2),
              nn.ReLU(), nn.Conv2d(6, 4, 1)), _x(2, 3, 8, 8), _kill_grouped, "0", (1,),
              "the same position of every group (input groups stay equal)"),
    LayerCase("conv2d_depthwise", "Conv2d, depthwise (multiplier 2)", (), lambda: _S(nn.Conv2d(3, 8, 3), nn.ReLU(),
              nn.Conv2d(8, 16, 3, groups=8), nn.ReLU(), nn.Conv2d(16, 4, 1)), _x(2, 3, 8, 8), _kill_depthwise, "0",
              (2, 7), "input channel c with its output channels c·m … c·m + m − 1"),
    LayerCase("convtranspose1d", "ConvTranspose1d", (), lambda: _S(nn.Conv1d(3, 6, 3), nn.ReLU(),
              nn.ConvTranspose1d(6, 8, 3, stride=2, output_padding=1), nn.ReLU(), nn.Conv1d(8, 4, 1)), _x(2, 3, 9),
              _kill_transposed, "2", (0, 5), "output channels: weight axis 1, bias; readers' input columns"),
    LayerCase("convtranspose2d", "ConvTranspose2d (stride, output_padding, dilation)", (), lambda: _S(
              nn.Conv2d(3, 6, 3), nn.ReLU(), nn.ConvTranspose2d(6, 8, 3, stride=2, output_padding=1, dilation=2),
              nn.ReLU(), nn.Conv2d(8, 4, 1)), _x(2, 3, 7, 7), _kill_transposed, "2", (3, 4),
              "output channels: weight axis 1, bias; readers' input columns"),
    LayerCase("convtranspose3d", "ConvTranspose3d", (), lambda: _S(nn.Conv3d(3, 6, 2), nn.ReLU(),
              nn.ConvTranspose3d(6, 8, 2, stride=2), nn.ReLU(), nn.Conv3d(8, 4, 1)), _x(2, 3, 4, 4, 4),
              _kill_transposed, "2", (1, 2), "output channels: weight axis 1, bias; readers' input columns"),
    LayerCase("convtranspose2d_grouped", "ConvTranspose2d, groups=2", (), lambda: _S(nn.Conv2d(3, 6, 3), nn.ReLU(),
              nn.ConvTranspose2d(6, 8, 3, groups=2, dilation=2), nn.ReLU(), nn.Conv2d(8, 4, 1)), _x(2, 3, 7, 7),
              _kill_transposed, "2", (1,), "the same position of every output group"),
    LayerCase("convtranspose2d_depthwise", "ConvTranspose2d, depthwise", (), lambda: _S(nn.Conv2d(3, 6, 3), nn.ReLU(),
              nn.ConvTranspose2d(6, 12, 3, groups=6), nn.ReLU(), nn.Conv2d(12, 4, 1)), _x(2, 3, 7, 7),
              _kill_depthwise, "0", (0, 4), "input channel c with its output channels c·m … c·m + m − 1"),
    LayerCase("instancenorm2d_affine", "InstanceNorm2d (affine, running stats)", (),
              _normed(lambda c: nn.InstanceNorm2d(c, affine=True, track_running_stats=True)), _x(2, 3, 8, 8),
              _kill_conv_chain, "0", (1, 2), _NORM),
    LayerCase("instancenorm1d", "InstanceNorm1d (no affine)", (), _normed(nn.InstanceNorm1d, nn.Conv1d),
              _x(2, 3, 10), _kill_conv_chain, "0", (3,), _NORM),
    LayerCase("instancenorm1d_tracked", "InstanceNorm1d (no affine, running stats)", (),
              _normed(lambda c: nn.InstanceNorm1d(c, track_running_stats=True), nn.Conv1d), _x(2, 3, 10),
              _kill_conv_chain, "0", (0, 5), _NORM),
    LayerCase("instancenorm3d_affine", "InstanceNorm3d (affine)", (),
              _normed(lambda c: nn.InstanceNorm3d(c, affine=True), nn.Conv3d), _x(2, 3, 5, 5, 5),
              _kill_conv_chain, "0", (0, 7), _NORM),
    LayerCase("groupnorm", "GroupNorm (2 groups)", (nn.GroupNorm,), _normed(lambda c: nn.GroupNorm(2, c)),
              _x(2, 3, 8, 8), _kill_conv_chain, "0", (1, 6), "the same number of channels from every group",
              exact=False, zeroed=False),
    LayerCase("layernorm", "LayerNorm", (nn.LayerNorm,), lambda: _S(nn.Linear(4, 8), nn.LayerNorm(8), nn.ReLU(),
              nn.Linear(8, 3)), _x(2, 4), _kill_conv_chain, "0", (2, 5), "the normalised (last) dimension",
              exact=False, zeroed=False),
    LayerCase("rmsnorm", "RMSNorm", (nn.RMSNorm,), lambda: _S(nn.Linear(4, 8), nn.RMSNorm(8), nn.ReLU(),
              nn.Linear(8, 3)), _x(2, 4), _kill_conv_chain, "0", (2, 5), "the normalised (last) dimension",
              exact=False, zeroed=False),
    LayerCase("prelu", "PReLU (per channel)", (nn.PReLU,),
              lambda: _S(nn.Conv2d(3, 8, 3), nn.PReLU(8), nn.Conv2d(8, 4, 1)),
              _x(2, 3, 8, 8), _kill_conv_chain, "0", (4, 6), "one slope per channel"),
    LayerCase("linear", "Linear", (nn.Linear,), lambda: _S(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3)), _x(2, 4),
              _kill_conv_chain, "0", (0, 3), "output features: weight rows, bias; readers' input columns"),
    LayerCase("embedding", "Embedding (padding_idx=0)", (nn.Embedding,), Embedded,
              lambda: torch.randint(0, 20, (2, 5)), _kill_embedding, "embed", (1, 6),
              "the embedding dimension (weight columns); vocabulary and padding_idx untouched"),
    LayerCase("embeddingbag", "EmbeddingBag", (nn.EmbeddingBag,), lambda: Embedded(bag=True),
              lambda: torch.randint(0, 20, (2, 5)), _kill_embedding, "embed", (2,),
              "the embedding dimension (weight columns)"),
    LayerCase("weight_norm", "parametrizations.weight_norm", ("torch.nn.utils.parametrizations._WeightNorm",),
              _weight_normed, _x(2, 3, 8, 8), _kill_weight_norm, "0", (1, 4),
              "original0 (g) and original1 (v) like the weight; the parametrization stays"),
    LayerCase("spectral_norm", "parametrizations.spectral_norm", ("torch.nn.utils.parametrizations._SpectralNorm",),
              _spectral_normed, _x(2, 3, 8, 8), _kill_spectral_norm, "0", (2, 7),
              "the original weight and the power-iteration vectors _u / _v; the parametrization stays",
              zeroed=False),
    LayerCase("multihead_attention", "MultiheadAttention", (nn.MultiheadAttention,), Attended, _x(2, 5, 4),
              _kill_attention, "attn", (1, 5), "input channels with q/k/v dims, the same number per head",
              zeroed=False),
    LayerCase("swin_attention", "torchvision ShiftedWindowAttention",
              ("torchvision.models.swin_transformer.ShiftedWindowAttention",), Windowed, _x(2, 4, 4, 4),
              _kill_window, "attn", (2, 6), "input channels with q/k/v dims and the tied output projection",
              zeroed=False),
    LayerCase("swin_attention_v2", "torchvision ShiftedWindowAttentionV2",
              ("torchvision.models.swin_transformer.ShiftedWindowAttentionV2",), lambda: Windowed(v2=True),
              _x(2, 4, 4, 4), _kill_window, "attn", (0, 7),
              "input channels with q/k/v dims and the tied output projection", zeroed=False),
    LayerCase("swin3d_attention", "torchvision ShiftedWindowAttention3d (video)",
              ("torchvision.models.video.swin_transformer.ShiftedWindowAttention3d",), lambda: Windowed(video=True),
              _x(2, 2, 4, 4, 4), _kill_window, "attn", (1, 5),
              "input channels with q/k/v dims and the tied output projection", zeroed=False),
    LayerCase("pixel_shuffle", "PixelShuffle(2) after a conv", (), lambda: _S(nn.Conv2d(3, 16, 3), nn.PixelShuffle(2),
              nn.Conv2d(4, 4, 1)), _x(2, 3, 6, 6), _kill_shuffle, "0", (1,),
              "blocks of r² conv channels (one shuffled channel each)"),
    LayerCase("pixel_unshuffle", "PixelUnshuffle(2) after a conv", (), lambda: _S(nn.Conv2d(3, 4, 3),
              nn.PixelUnshuffle(2), nn.Conv2d(16, 4, 1)), _x(2, 3, 6, 6), _kill_unshuffle, "0", (2,),
              "conv channel c with the r² unshuffled channels it becomes"),
    LayerCase("lstm", "LSTM (2 layers, bidirectional)", (nn.LSTM,),
              lambda: Recurrent(nn.LSTM, num_layers=2, bidirectional=True), _x(2, 5, 4), _kill_recurrent, "rnn",
              (1, 4), _RNN),
    LayerCase("gru", "GRU (sequence first)", (nn.GRU,), lambda: Recurrent(nn.GRU, batch_first=False),
              _x(5, 2, 4), _kill_recurrent, "rnn", (0, 3), _RNN),
    LayerCase("rnn", "RNN (2 layers, ReLU)", (nn.RNN,),
              lambda: Recurrent(nn.RNN, num_layers=2, nonlinearity="relu"), _x(2, 5, 4), _kill_recurrent, "rnn",
              (2,), _RNN),
    LayerCase("lstm_cell", "LSTMCell looped over time", (nn.LSTMCell,), lambda: Stepped(nn.LSTMCell), _x(2, 4, 4),
              _kill_recurrent, "rnn", (0, 5), _RNN_CELL),
    LayerCase("gru_cell", "GRUCell looped over time", (nn.GRUCell,), lambda: Stepped(nn.GRUCell), _x(2, 4, 4),
              _kill_recurrent, "rnn", (2, 3), _RNN_CELL),
    LayerCase("rnn_cell", "RNNCell looped over time", (nn.RNNCell,), lambda: Stepped(nn.RNNCell), _x(2, 4, 4),
              _kill_recurrent, "rnn", (4,), _RNN_CELL),
    LayerCase("split_chunk", "split / chunk along non-channel dims", (), Split, _x(2, 3, 9, 6), _kill_split,
              "conv", (0, 5), "the channels of every part together"),
]


#: the first line of the generated section of docs/zoo.md (everything after it is generated)
DOC_MARKER = "<!-- layer types: generated by `python bench/layer_table.py` from tests/layer_zoo.py; do not edit -->"


def _how_tested(row: LayerCase) -> str:
    dead = f"{len(row.dead)} dead channel(s) are exactly the L1 plan"
    dead += (", output unchanged (≤ 1e-5)" if row.exact
             else "; output shape kept (statistics over the channels change)")
    return dead + ("; random plan = zeroed copy" if row.zeroed else "")


def _key_name(key: Any) -> str:
    return key if isinstance(key, str) else f"{key.__module__}.{key.__qualname__}"


def markdown() -> str:
    """The "layer types" section of docs/zoo.md: the zoo's rows and the handler registry."""
    from prunable.surgery import registered_types

    lines = [DOC_MARKER, "", "## Layer types", "",
             "One tiny model per layer type in `tests/layer_zoo.py`, run by `tests/test_layers.py` "
             "(`make test`). Channels made dead by hand (every weight and bias producing or reading "
             "them zeroed) must be exactly what an L1 criterion removes; \"zeroed copy\": a random plan "
             "computes what the model with those channels' readers zeroed computes.", "",
             "| layer | what is pruned | how it is tested |", "|---|---|---|"]
    lines += [f"| {row.layer} | {row.pruned} | {_how_tested(row)} |" for row in ROWS]
    lines += ["", "Handlers registered by prunable (`prunable.surgery.registered_types()`), each covered by a row:",
              "",
              "| module type | handler | what is pruned |", "|---|---|---|"]
    ours = sorted(((_key_name(k), h) for k, h in registered_types().items()
                   if type(h).__module__.startswith("prunable.")), key=lambda item: item[0])
    lines += [f"| `{name}` | `{type(h).__name__}` | {_described(h)} |" for name, h in ours]
    lines += ["", "Refused or skipped, always with a named reason (`pruner.skipped[group].kind`):", "",
              "- legacy `nn.utils.weight_norm` / `nn.utils.spectral_norm` hooks: `Pruner` raises "
              "`PruningValueError` naming the layer (use `torch.nn.utils.parametrizations`);",
              "- a weight under a parametrization without a `ParametrizationHandler`: `SkipKind.UNSUPPORTED_LAYER`;",
              "- `split` along the channels with literal sizes, uneven `chunk` along the channels: "
              "`SkipKind.UNSUPPORTED_OP`;",
              "- a reshape size equal to both an attribute and a channel count read through `.shape`: "
              "`SkipKind.SIZE_ATTRIBUTE` (the attribute is never rewritten by guess)."]
    return "\n".join(lines) + "\n"


def _described(handler: Any) -> str:
    text = handler.describes or (type(handler).__doc__ or "").strip().splitlines()[0]
    return text.replace("``", "`")
