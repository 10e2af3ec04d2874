"""Self-attention: pruning head dimensions while keeping ``num_heads`` and ``head_dim`` consistent.

An attention layer of width ``E`` with ``H`` heads projects its input to
queries, keys and values (``3E`` rows of one weight, heads contiguous inside
each of q, k, v) and projects the heads' outputs back with an output Linear.
``nn.MultiheadAttention`` and torchvision's Swin attention compute the head
width from the input width (``head_dim = E // H``), so the inner width must
stay equal to the input width: prunable removes inner dimension ``i`` of q, k
and v together with input channel ``i``, and requires **every head to lose
the same number of dimensions**, so ``num_heads`` is unchanged and
``head_dim`` shrinks. The queries are rescaled by ``sqrt(head_dim' /
head_dim)`` so the softmax temperature ``1/sqrt(head_dim)`` of the remaining
dimensions is unchanged: the pruned layer computes exactly what the original
computes with those dimensions zeroed.

The tracer (:mod:`prunable.trace`) runs a module whose handler is an
:class:`AttentionHandler` as one operation (:meth:`AttentionHandler.trace_module`);
subclass it and register it with :func:`prunable.register_handler` for a
custom attention module with the same layout.

Example
-------
>>> import torch
>>> from torch import nn
>>> from prunable import Pruner
>>> class Tiny(nn.Module):
...     def __init__(self):
...         super().__init__()
...         self.embed = nn.Linear(4, 16)
...         self.attn = nn.MultiheadAttention(16, num_heads=4, batch_first=True)
...         self.head = nn.Linear(16, 3)
...     def forward(self, x):
...         h = self.embed(x)
...         return self.head(self.attn(h, h, h, need_weights=False)[0].mean(1))
>>> model = Tiny()
>>> pruner = Pruner(model, torch.randn(2, 5, 4), criterion="l1")
>>> group = next(g for g in pruner.groups if g.blocks is not None)
>>> group.blocks.tolist()[1]                       # group channels of head 1
[4, 5, 6, 7]
>>> pruner.prune({group.id: group.blocks[:, 0].tolist()})   # one dimension of every head
>>> model.attn.embed_dim, model.attn.num_heads, model.attn.head_dim
(12, 4, 3)
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from .reasons import SkipKind, SkipReason
from .surgery import ModuleHandler, Role, resolve, register_handler

__all__ = ["AttentionHandler"]


class AttentionHandler(ModuleHandler):
    """How to cut a self-attention module: its input channels (``Role.IN``) and its
    ``3E`` inner q/k/v rows (``Role.OUT``); the output projection is a separate
    Linear (:meth:`out_proj`) cut by its own handler.

    Subclasses name the q/k/v weight (``qkv_weight``, shape ``(3E, E)``, rows ``[q; k; v]``
    with heads contiguous; dotted names reach into submodules), the optional
    ``qkv_bias``, the output projection (:meth:`out_proj`), how to read and set the
    width (:meth:`width`, :meth:`set_width`: update every size attribute the forward
    reads, e.g. a stored ``head_dim``), and whether the forward computes the scale
    ``1/sqrt(head_dim)`` from the current width (:attr:`scaled`; set it False when
    the scale is a stored number or the attention is cosine).

    Example
    -------
    A timm-style module (``qkv`` and ``proj`` Linears, ``self.head_dim`` used in a reshape,
    ``F.scaled_dot_product_attention``)::

        @prunable.register_handler(MyAttention)
        class MyAttentionHandler(prunable.AttentionHandler):
            qkv_weight, qkv_bias = "qkv.weight", "qkv.bias"

            def out_proj(self, module):
                return module.proj

            def width(self, module):
                return module.qkv.out_features // 3

            def set_width(self, module, role, n):
                if role is prunable.Role.IN:
                    module.qkv.in_features = n
                else:
                    module.qkv.out_features, module.head_dim = 3 * n, n // module.num_heads
    """

    qkv_weight = "in_proj_weight"
    qkv_bias = "in_proj_bias"
    #: attention logits are scaled by 1/sqrt(head_dim) (False for cosine attention)
    scaled = True
    #: the output projection's width must equal the input width (its output is reshaped with it)
    tied_output = False

    def out_proj(self, module: nn.Module) -> nn.Linear:
        """The Linear applied to the concatenated heads."""
        return module.out_proj

    def num_heads(self, module: nn.Module) -> int:
        return int(module.num_heads)

    def streams(self, module: nn.Module, args: tuple, kwargs: dict) -> list[torch.Tensor]:
        """The inputs whose last dim is the layer's input width (query, key, value)."""
        return [args[0]]

    def output(self, output: Any) -> torch.Tensor:
        """The attention output tensor (last dim = channels) inside ``output``."""
        return output[0] if isinstance(output, (tuple, list)) else output

    def unsupported(self, module: nn.Module, args: tuple, kwargs: dict) -> str | None:
        """Why this call cannot be pruned, or None."""
        return None

    def params(self, module: nn.Module, role: Role) -> dict[str, int]:
        if role is Role.IN:
            return {self.qkv_weight: 1}
        names = {self.qkv_weight: 0}
        if _get(module, self.qkv_bias) is not None:
            names[self.qkv_bias] = 0
        return names

    def resize(self, module: nn.Module, role: Role, n: int) -> None:
        if role is Role.IN:
            self.set_width(module, Role.IN, n)
            return
        heads, old = self.num_heads(module), self.width(module)
        self.set_width(module, Role.OUT, n // 3)
        if self.scaled and old and n // 3 != old:
            # keep the softmax temperature of the remaining dimensions: q·k / sqrt(d) unchanged
            factor = math.sqrt((n // 3 // heads) / (old // heads))
            with torch.no_grad():
                for name in (self.qkv_weight, self.qkv_bias):
                    t = _get(module, name)
                    if t is not None:
                        t[: n // 3].mul_(factor)

    def trace_module(self, tracer: Any, module: nn.Module, args: tuple, kwargs: dict, output: Any) -> None:
        """Trace the layer as one operation: input channel i, inner q/k/v dim i and output-projection
        input i are one channel; the heads' partition of the inner dims is recorded for
        equal-per-head pruning."""
        name = tracer.name_of(module)
        streams, out = self.streams(module, args, kwargs), self.output(output)
        labels = [tracer.input_labels(x, x.dim() - 1, name) for x in streams]
        reason = self._refusal(module, args, kwargs, labels)
        if reason is not None:
            why = SkipReason(SkipKind.UNSUPPORTED_OP, f"{name}: attention with {reason}")
            for x in streams:
                tracer.trace.block(tracer.shadow(x), why)
            return tracer.mark_input(out)
        for other in labels[1:]:
            tracer.trace.union(labels[0], other)
        width, heads, proj = self.width(module), self.num_heads(module), self.out_proj(module)
        tracer.consume(module, labels[0])
        inner = tracer.produce(module, 3 * width)
        for part in inner.view(3, width):
            tracer.trace.union(part, labels[0])
        tracer.consume(proj, inner[:width])
        slots = tracer.produce(proj, out.shape[-1])
        if self.tied_output:
            tracer.trace.union(slots, labels[0])
        tracer.trace.blocks.append((inner[:width].view(heads, width // heads), f"the {heads} heads of {name}"))
        tracer.label_output(out, slots, out.dim() - 1, producer=proj, at=module)

    def _refusal(self, module: nn.Module, args: tuple, kwargs: dict, labels: list) -> str | None:
        """Why this call cannot be traced as a prunable attention layer, or None."""
        reason = self.unsupported(module, args, kwargs)
        if reason is None and (not labels or any(lab is None for lab in labels)):
            reason = "inputs whose channels are mixed with other dimensions"
        width, heads = self.width(module), self.num_heads(module)
        if reason is None and (any(len(lab) != width for lab in labels) or width % heads):
            reason = f"inner width {width} differs from the input width or is not a multiple of {heads} heads"
        return reason

    def width(self, module: nn.Module) -> int:
        """The inner width ``E`` (before a resize)."""
        return int(module.embed_dim)

    def set_width(self, module: nn.Module, role: Role, n: int) -> None:
        """Update the module's size attributes after a cut."""
        if role is Role.OUT:
            module.embed_dim = module.kdim = module.vdim = n
            module.head_dim = n // self.num_heads(module)


def _get(module: nn.Module, dotted: str) -> Any:
    """The tensor a possibly dotted name (``"qkv.bias"``) names, or None."""
    return getattr(*resolve(module, dotted), None)


@register_handler(nn.MultiheadAttention)
class MultiheadAttentionHandler(AttentionHandler):
    """``nn.MultiheadAttention`` with one packed in-projection (``kdim == vdim == embed_dim``)."""

    def streams(self, module: nn.Module, args: tuple, kwargs: dict) -> list[torch.Tensor]:
        names = ("query", "key", "value")
        found = [args[i] if len(args) > i else kwargs.get(n) for i, n in enumerate(names)]
        return [t for t in found if isinstance(t, torch.Tensor)]

    def unsupported(self, module: nn.Module, args: tuple, kwargs: dict) -> str | None:
        if not module._qkv_same_embed_dim:
            return "separate key/value widths (kdim/vdim)"
        if module.bias_k is not None or module.bias_v is not None:
            return "add_bias_kv=True"
        return None


class _SwinHandler(AttentionHandler):
    """torchvision's ``ShiftedWindowAttention``: ``qkv`` and ``proj`` Linears, input ``(B, H, W, C)``."""

    qkv_weight, qkv_bias = "qkv.weight", "qkv.bias"
    tied_output = True

    def out_proj(self, module: nn.Module) -> nn.Linear:
        return module.proj

    def width(self, module: nn.Module) -> int:
        return int(module.qkv.out_features) // 3

    def set_width(self, module: nn.Module, role: Role, n: int) -> None:
        if role is Role.IN:
            module.qkv.in_features = n
        else:
            module.qkv.out_features = 3 * n


class _SwinV2Handler(_SwinHandler):
    """Swin V2 uses cosine attention with a learnt per-head logit scale: no 1/sqrt(d)."""

    scaled = False


register_handler("torchvision.models.swin_transformer.ShiftedWindowAttention")(_SwinHandler)
register_handler("torchvision.models.swin_transformer.ShiftedWindowAttentionV2")(_SwinV2Handler)


@register_handler("torchvision.models.video.swin_transformer.ShiftedWindowAttention3d")
class _Swin3dHandler(_SwinHandler):
    """torchvision's video ``ShiftedWindowAttention3d``: the same layout, input ``(B, T, H, W, C)``."""
