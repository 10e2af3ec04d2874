"""Recurrent layers (``nn.LSTM``, ``nn.GRU``, ``nn.RNN``): pruning hidden units.

A recurrent layer of ``L`` layers and ``D`` directions (``D = 2`` when
bidirectional) has ONE ``hidden_size`` ``H`` shared by every layer and direction,
so prunable removes hidden unit ``j`` everywhere at once: **unit ``j`` of every
layer and direction is one channel** (a coarser coupling than strictly needed,
the price of keeping a single ``hidden_size``). Removing unit ``j`` cuts

* row ``j`` of every gate block (``i, f, g, o`` for LSTM, ``r, z, n`` for GRU, one
  block for RNN): rows ``j, H+j, 2H+j, …`` of every ``weight_ih_l*``,
  ``weight_hh_l*``, ``bias_ih_l*`` and ``bias_hh_l*``;
* column ``j`` of every ``weight_hh_l*`` (the recurrence reads the unit back);
* columns ``j`` (and ``H+j`` for the reverse direction) of ``weight_ih_l{k}``,
  ``k ≥ 1`` (the next layer reads the previous layer's output);
* the inputs ``j`` (and ``H+j``) of whatever reads the output ``(…, D·H)`` — a
  Linear, a LayerNorm — and of whatever reads ``h_n``/``c_n`` ``(D·L, …, H)``.

The input features are pruned as the inputs of any layer: columns of
``weight_ih_l0`` (both directions) leave with the channels of the layer before.
Initial states ``h0``/``c0`` given to the forward follow the hidden units when the
model makes them (a learnt parameter is sliced); a model input is a fixed-size
tensor, so the hidden units are then not pruned, with that reason. LSTM
projections (``proj_size > 0``) and packed sequences are refused with a reason.

The cells (``nn.LSTMCell``, ``nn.GRUCell``, ``nn.RNNCell``, :class:`RecurrentCellHandler`)
lose hidden units the same way, one time step at a time: the state a model's loop feeds
back carries the units.

The tracer (:mod:`prunable.trace`) runs the layer as one operation
(:meth:`RecurrentHandler.trace_module`); activation criteria observe unit ``j``
on the sequence output, both directions together (``(…, D, H)``). On the meta
copies of tracing, trial prunes and FLOP counts the kernel is computed from the
shapes (:func:`prunable.meta.rnn_meta`, every weight checked; the real meta
kernel runs each time step, and the CPU kernel does not check weight shapes).

Example
-------
>>> import torch
>>> from torch import nn
>>> from prunable import Pruner
>>> class Tagger(nn.Module):
...     def __init__(self):
...         super().__init__()
...         self.embed = nn.Linear(5, 8)
...         self.rnn = nn.LSTM(8, 6, num_layers=2, bidirectional=True, batch_first=True)
...         self.head = nn.Linear(12, 3)
...     def forward(self, x):
...         return self.head(self.rnn(self.embed(x))[0])
>>> model = Tagger()
>>> pruner = Pruner(model, torch.randn(2, 7, 5), criterion="l1")
>>> group = next(g for g in pruner.groups if g.id == "rnn")
>>> pruner.prune({group.id: [0, 4]})
>>> model.rnn.hidden_size, tuple(model.rnn.weight_ih_l1.shape), model.head.in_features
(4, (16, 8), 8)
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from .errors import SurgeryError
from .handlers import ModuleHandler, Role, register_handler
from .reasons import SkipKind, SkipReason

__all__ = ["RecurrentHandler", "RecurrentCellHandler"]


class RecurrentHandler(ModuleHandler):
    """How to cut an ``nn.RNNBase`` layer: its input features (``Role.IN``: columns of
    ``weight_ih_l0``) and its hidden units (``Role.OUT``: gate rows of every layer and
    direction; the columns that read the units back are separate members of the group,
    made by :meth:`trace_module`). ``gates`` is the number of gate blocks."""

    gates = 1
    describes = ("hidden units: row j of every gate block of every layer and direction, the columns that "
                 "read unit j back (weight_hh, the next layer's weight_ih), the readers of the output and h_n")

    @staticmethod
    def suffixes(module: nn.Module) -> tuple[str, ...]:
        """Parameter-name suffixes of the directions (``""``, ``"_reverse"``)."""
        return ("", "_reverse") if module.bidirectional else ("",)

    def unsupported(self, module: nn.Module, x: Any = None) -> str | None:
        """Why this layer (called on input ``x``, when given) cannot be pruned, or None."""
        if getattr(module, "proj_size", 0) > 0:
            return f"proj_size={module.proj_size} (an LSTM projection) is not supported"
        if x is not None and not isinstance(x, torch.Tensor):
            return f"a {type(x).__name__} input (packed sequences) is not supported"
        return None

    def params(self, module: nn.Module, role: Role) -> dict[str, int]:
        if role is Role.IN:
            return {f"weight_ih_l0{sfx}": 1 for sfx in self.suffixes(module)}
        reason = self.unsupported(module)
        if reason is not None:
            raise SurgeryError(f"{type(module).__name__}: hidden units cannot be cut: {reason}")
        kinds = ("weight_ih", "weight_hh", "bias_ih", "bias_hh") if module.bias else ("weight_ih", "weight_hh")
        return {f"{kind}_l{layer}{sfx}": 0 for layer in range(module.num_layers)
                for sfx in self.suffixes(module) for kind in kinds}

    def local_keep(self, module: nn.Module, role: Role, name: str, keep: torch.Tensor) -> torch.Tensor:
        if role is Role.IN:
            return keep
        size = module.hidden_size  # still the old size: resizes come after every slice is computed
        return torch.cat([keep + g * size for g in range(self.gates)])

    def weights(self, module: nn.Module) -> list[str]:
        """Every ``weight_ih_l*`` and ``weight_hh_l*``: what weight criteria read, per unit."""
        return [n for n in self.params(module, Role.OUT) if n.startswith("weight")]

    def biases(self, module: nn.Module) -> list[str]:
        return [n for n in self.params(module, Role.OUT) if n.startswith("bias")]

    def channels(self, module: nn.Module, role: Role) -> int:
        """Input features (``Role.IN``) or hidden units (``Role.OUT``)."""
        return int(module.input_size if role is Role.IN else module.hidden_size)

    def out_view(self, module: nn.Module, name: str, tensor: torch.Tensor | None = None) -> torch.Tensor:
        """Row ``j``: the rows of unit ``j`` in every gate block of tensor ``name`` (or ``tensor``)."""
        t = getattr(module, name) if tensor is None else tensor
        return t.reshape(self.gates, -1, t[0].numel()).transpose(0, 1).flatten(1)

    def channel_view(self, module: nn.Module, tensor: torch.Tensor, dim: int) -> torch.Tensor:
        """The output ``(…, D·H)`` as ``(…, D, H)``: both directions of unit ``j`` observed together
        (``dim`` is -1, the last dim before and after)."""
        return tensor.unflatten(dim, (len(self.suffixes(module)), -1))

    def activation(self, module: nn.Module, output: Any) -> torch.Tensor | None:
        out = output[0] if isinstance(output, tuple) else output
        return out if isinstance(out, torch.Tensor) else None

    def resize(self, module: nn.Module, role: Role, n: int) -> None:
        if role is Role.IN:
            module.input_size = n
        else:
            module.hidden_size = n
        sizes = (module.weight_ih_l0.shape[1], module.weight_hh_l0.shape[1])
        if sizes == (module.input_size, module.hidden_size):  # both sides done: cuDNN's packed copy
            module.flatten_parameters()  # (a no-op off CUDA); the Parameters stay the same objects

    def trace_module(self, tracer: Any, module: nn.Module, args: tuple, kwargs: dict, output: Any) -> None:
        """Trace the layer as one operation: inputs → ``Role.IN``; hidden units → ``Role.OUT``,
        read back by every ``weight_hh`` and the next layers' ``weight_ih``; the output and
        ``h_n``/``c_n`` carry the units; an initial state must be able to follow them."""
        name = tracer.name_of(module)
        x = args[0] if args else kwargs.get("input")
        hx = args[1] if len(args) > 1 else kwargs.get("hx")
        out, final = output
        finals = list(final) if isinstance(final, (tuple, list)) else [final]
        hidden = tracer.produce(module, module.hidden_size)
        why = self.unsupported(module, x)
        reason = None if why is None else SkipReason(SkipKind.UNSUPPORTED_LAYER, f"{name}: {why}")
        labels = tracer.input_labels(x, x.dim() - 1, name) if reason is None else None
        if reason is None and labels is None:
            reason = SkipReason(SkipKind.MIXED, f"{name}: input features mixed with other dimensions")
        if reason is not None:
            return self._refuse(tracer, hidden, [x, out, *finals], reason)
        tracer.consume(module, labels)
        directions = len(self.suffixes(module))
        for layer in range(module.num_layers):
            for sfx in self.suffixes(module):
                tracer.consume(module, hidden, param=f"weight_hh_l{layer}{sfx}", axis=1)
                if layer:
                    tracer.consume(module, hidden.repeat(directions), param=f"weight_ih_l{layer}{sfx}", axis=1)
        self._follow_states(tracer, name, hx, hidden)
        tracer.label_output(out, hidden.repeat(directions), -1, producer=module)  # -1: see channel_view
        for h in finals:
            tracer.label_output(h, hidden, -1)

    @staticmethod
    def _follow_states(tracer: Any, name: str, hx: Any, hidden: torch.Tensor) -> None:
        """The initial states ``hx`` (last dim: the units) carry the hidden units: a parameter is
        sliced with them, another layer's output is coupled to them, a model input blocks them."""
        for h in hx if isinstance(hx, (tuple, list)) else [hx]:
            if isinstance(h, torch.Tensor):
                tracer.trace.union(tracer.shadow(h), hidden.expand(h.shape), SkipReason(
                    SkipKind.FIXED_INPUT, f"{name}: the initial state h0/c0 has a fixed size (a model input)"))

    @staticmethod
    def _refuse(tracer: Any, hidden: torch.Tensor, tensors: list, reason: SkipReason) -> None:
        """Block the hidden units and the input features with ``reason``; outputs are fixed-size."""
        tracer.trace.block(hidden, reason)
        x, *outputs = [t if isinstance(t, torch.Tensor) else t.data for t in tensors]  # a PackedSequence's data
        if isinstance(x, torch.Tensor):
            tracer.trace.block(tracer.shadow(x), reason)
        for t in outputs:
            tracer.mark_input(t)


class RecurrentCellHandler(RecurrentHandler):
    """How to cut ``nn.LSTMCell``/``nn.GRUCell``/``nn.RNNCell``: one time step. Hidden unit ``j``
    is row ``j`` of every gate block of ``weight_ih``, ``weight_hh`` and the biases, and column
    ``j`` of ``weight_hh``; the new state ``h`` (and ``c``) carries the units, so a model's loop
    feeding it back keeps every step consistent. A state the forward makes with a literal size
    (``torch.zeros(n, 6)``) fails the trial prune: the units are then skipped with that reason."""

    def unsupported(self, module: nn.Module, x: Any = None) -> str | None:
        return None

    def params(self, module: nn.Module, role: Role) -> dict[str, int]:
        if role is Role.IN:
            return {"weight_ih": 1}
        return dict.fromkeys(("weight_ih", "weight_hh", "bias_ih", "bias_hh") if module.bias else
                             ("weight_ih", "weight_hh"), 0)

    def channel_view(self, module: nn.Module, tensor: torch.Tensor, dim: int) -> torch.Tensor:
        return tensor

    def resize(self, module: nn.Module, role: Role, n: int) -> None:
        setattr(module, "input_size" if role is Role.IN else "hidden_size", n)

    def trace_module(self, tracer: Any, module: nn.Module, args: tuple, kwargs: dict, output: Any) -> None:
        """Trace one step: inputs → ``Role.IN``; units → ``Role.OUT``, read back by ``weight_hh``;
        the state given must be able to follow the units; the new ``h`` (and ``c``) carries them."""
        name = tracer.name_of(module)
        x = args[0] if args else kwargs.get("input")
        outs = list(output) if isinstance(output, (tuple, list)) else [output]
        hidden = tracer.produce(module, module.hidden_size)
        labels = tracer.input_labels(x, x.dim() - 1, name)
        if labels is None:
            reason = SkipReason(SkipKind.MIXED, f"{name}: input features mixed with other dimensions")
            return self._refuse(tracer, hidden, [x, *outs], reason)
        tracer.consume(module, labels)
        tracer.consume(module, hidden, param="weight_hh", axis=1)
        self._follow_states(tracer, name, args[1] if len(args) > 1 else kwargs.get("hx"), hidden)
        tracer.label_output(outs[0], hidden, -1, producer=module)
        for h in outs[1:]:
            tracer.label_output(h, hidden, -1)


@register_handler(nn.RNNCell)
class RNNCellHandler(RecurrentCellHandler):
    """``nn.RNNCell`` (tanh or ReLU): one block."""

    gates = 1


@register_handler(nn.GRUCell)
class GRUCellHandler(RecurrentCellHandler):
    """``nn.GRUCell``: gate blocks ``r, z, n``."""

    gates = 3


@register_handler(nn.LSTMCell)
class LSTMCellHandler(RecurrentCellHandler):
    """``nn.LSTMCell``: gate blocks ``i, f, g, o``."""

    gates = 4


@register_handler(nn.RNN)
class RNNHandler(RecurrentHandler):
    """``nn.RNN`` (tanh or ReLU): one block."""

    gates = 1


@register_handler(nn.GRU)
class GRUHandler(RecurrentHandler):
    """``nn.GRU``: gate blocks ``r, z, n``."""

    gates = 3


@register_handler(nn.LSTM)
class LSTMHandler(RecurrentHandler):
    """``nn.LSTM``: gate blocks ``i, f, g, o``."""

    gates = 4
