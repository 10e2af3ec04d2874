"""Channel importance: the Taylor criterion and the other criteria.

The first-order Taylor estimate of Molchanov et al. (2017, Eq. 8) for feature
map ``k`` is, for each example, the absolute value of the spatial mean of
``a * dL/da`` over that map, averaged over examples. Scores are accumulated over
minibatches (:mod:`prunable.accumulate`) and, when compared across layers,
L2-normalised per layer.

Example
-------
>>> import torch
>>> l2_normalize(torch.tensor([3.0, 4.0]))
tensor([0.6000, 0.8000])
>>> type(make_criterion("taylor")).__name__
'TaylorActivation'
"""

from __future__ import annotations

import contextlib
import enum
import sys
import warnings
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch import nn

from .accumulate import InPlaceClamps, KeptActivation, ScoreAccumulator, Scratch, StepScores, taylor_per_example
from .errors import EstimationError
from .handlers import ModuleHandler, Role, handler_for
from .surgery import originals

__all__ = [
    "taylor_per_example", "ScoreAccumulator", "l2_normalize", "Aggregation", "MeasurePoint", "Criterion",
    "TaylorActivation", "TaylorBN", "TaylorWeight", "WeightNorm", "BNScale", "MeanActivation", "APoZ", "Random",
    "CRITERIA", "estimating", "make_criterion",
]


def l2_normalize(scores: torch.Tensor, eps: float = 1e-12, norm: torch.Tensor | None = None) -> torch.Tensor:
    """``scores / ||scores||_2``; an all-zero vector stays zero (no NaN). ``norm``: that norm,
    when the caller has it already."""
    norm = torch.linalg.vector_norm(scores.float()) if norm is None else norm
    return scores.float() / norm if norm > eps else torch.zeros_like(scores, dtype=torch.float32)


class Aggregation(enum.Enum):
    """How the scores of coupled channels (a residual group) are combined."""

    SUM = "sum"
    MEAN = "mean"
    MAX = "max"


class MeasurePoint:
    """Where a producer's channels are observed.

    ``module`` is the producing layer, or the norm right after it when there
    is one (for conv→BN→ReLU the BN output ``y`` gives
    ``relu(y)·dL/drelu(y) == y·dL/dy``, the paper's measurement); ``dim`` is
    the channel dimension of its output; ``producer`` is the layer whose
    output channels these are.
    """

    def __init__(self, name: str, module: nn.Module, dim: int, producer: nn.Module) -> None:
        self.name, self.module, self.dim, self.producer = name, module, dim, producer

    @property
    def norm(self) -> nn.Module | None:
        """The normalisation layer measured, if any."""
        return self.module if self.module is not self.producer else None

    def out_view(self, tensor: torch.Tensor | None = None, name: str = "weight") -> torch.Tensor:
        """The producer's tensor ``name`` (or ``tensor`` shaped like it, e.g. ``w·dL/dw``) as
        ``(output channels, -1)``, laid out by the producer's handler (never guessed)."""
        handler = handler_for(self.producer)
        if handler is None:
            raise EstimationError(f"{self.name}: no handler for {type(self.producer).__name__}")
        return handler.out_view(self.producer, name, tensor)

    def activation(self, output: Any) -> torch.Tensor | None:
        """The tensor of ``module``'s forward output holding the channels (along ``dim``),
        as the module's handler says (an RNN's ``(output, h_n)``: its sequence output)."""
        return (handler_for(self.module) or ModuleHandler()).activation(self.module, output)

    def view(self, tensor: torch.Tensor) -> torch.Tensor:
        """An activation (or its gradient) with one entry per producer channel along ``dim``."""
        return (handler_for(self.module) or ModuleHandler()).channel_view(self.module, tensor, self.dim)

    def producing(self, biases: bool = False) -> list[str]:
        """Names of the producer's weights (and biases) that criteria read, as its handler says
        (every gate weight of every layer and direction of an RNN)."""
        handler = handler_for(self.producer)
        if handler is None:
            raise EstimationError(f"{self.name}: no handler for {type(self.producer).__name__}")
        return handler.weights(self.producer) + (handler.biases(self.producer) if biases else [])

    def out_channels(self) -> int:
        """Number of output channels of the producer."""
        handler = handler_for(self.producer)
        n = handler.channels(self.producer, Role.OUT) if handler is not None else None
        if n is None:
            raise EstimationError(f"{self.name}: the handler of {type(self.producer).__name__} gives no channel count")
        return n


class _EagerStance:
    """Runs ``torch.compile``d code eagerly until :meth:`remove` (a hook handle's interface)."""

    def __init__(self) -> None:
        set_stance = getattr(getattr(torch, "compiler", None), "set_stance", None)  # torch >= 2.6
        self._stance = set_stance("force_eager") if set_stance is not None else None

    def remove(self) -> None:
        if self._stance is not None and not sys.is_finalizing():  # at exit nothing is left to restore
            self._stance.__exit__(None, None, None)
        self._stance = None


class Criterion:
    """Base class of channel importance criteria.

    A criterion declares what it needs (``needs_activations``, ``needs_grad``)
    and scores each :class:`MeasurePoint`; it never branches on module types.
    Data-driven criteria accumulate inside ``Pruner.estimate()``.
    """

    needs_activations = False
    needs_grad = False
    #: layer-wise L2 normalisation before ranking across layers
    normalize = True

    def __init__(self) -> None:
        self.accumulators: dict[str, ScoreAccumulator] = {}
        self._warned_skips = False
        #: where activation criteria form their products, reused by every point; freed with the hooks
        self.scratch = Scratch()
        #: the holds an in-place clamp module may mark (gradient criteria: no copy of outputs it changes)
        self.clamps = InPlaceClamps()

    def attach(self, points: list[MeasurePoint]) -> list[Any]:
        """Install hooks on ``points``; returns removable handles.

        While hooks are attached, ``torch.compile``d code runs eagerly
        (``torch.compiler.set_stance("force_eager")``, restored by removing the
        handles): a graph compiled before the hooks were added would not call
        them, and one compiled while they are attached would keep calling them
        after. A compiled model compiles again after the block, for its new shapes.
        """
        handles: list[Any] = []
        for point in points:
            acc = self.accumulators.setdefault(point.name, ScoreAccumulator())
            handles += self._hooks(point, acc)
        if handles:
            handles += [_EagerStance(), self.scratch, self.clamps]
        return handles

    def watch(self, modules: list[nn.Module]) -> list[Any]:
        """Forward hooks on in-place clamp modules (:data:`~prunable.accumulate.CLAMPS`, e.g. from
        :meth:`InPlaceClamps.modules`) after :meth:`attach`: an output they alone change in place
        is read as is at the backward, not copied in the forward (the products are the same).
        Returns removable handles; none for criteria that read no gradients."""
        if not (self.needs_activations and self.needs_grad):
            return []
        return [m.register_forward_hook(self.clamps.hook) for m in modules]

    def _hooks(self, point: MeasurePoint, acc: ScoreAccumulator) -> list[Any]:
        if not self.needs_activations:
            return []

        keep = KeptActivation(point.name, self.clamps if self.needs_grad else None)
        # bound once: a hook runs on every step, where each Python call costs (its caches are cold)
        handler, dim, per_example = handler_for(point.module) or ModuleHandler(), point.dim, self.per_example
        activation, view, accumulate, name = handler.activation, handler.channel_view, self.accumulate, point.name
        hold, use, release, needs_grad, grad_enabled = keep.hold, keep.use, keep.release, self.needs_grad, \
            torch.is_grad_enabled
        identity = type(handler).channel_view is ModuleHandler.channel_view  # the tensor as it is: no call

        def forward_hook(module: nn.Module, inputs: Any, output: torch.Tensor) -> None:
            output = activation(module, output)
            if output is None:
                return
            if needs_grad:
                if grad_enabled() and output.requires_grad:
                    held = hold(output.detach() if identity else view(module, output.detach(), dim), output)

                    def backward_hook(g: torch.Tensor) -> None:
                        a = use(held)
                        if a is not None:
                            accumulate(name, acc, a, g if identity else view(module, g, dim), dim)
                            release(held)

                    output.register_hook(backward_hook)
            else:
                acc.add(per_example(view(module, output.detach(), dim), None, dim))

        return [point.module.register_forward_hook(forward_hook)]

    def per_example(self, a: torch.Tensor, g: torch.Tensor | None, dim: int) -> torch.Tensor:
        """Per-example, per-channel values ``(N, C)`` for activation criteria."""
        raise NotImplementedError

    def accumulate(self, name: str, acc: ScoreAccumulator, a: torch.Tensor, g: torch.Tensor, dim: int) -> None:
        """Score one batch of point ``name`` (activation ``a``, its gradient ``g``) into ``acc``."""
        acc.add(self.per_example(a, g, dim))

    def scores(self, point: MeasurePoint) -> torch.Tensor:
        """Importance of each output channel of ``point.producer``."""
        acc = self.accumulators.get(point.name)
        if acc is not None:
            self._report_skips(point.name, acc)
        if acc is None or acc.count == 0:
            raise self._missing(point.name, acc)
        return acc.value()

    def _missing(self, name: str, acc: ScoreAccumulator | None) -> EstimationError:
        if acc is not None and acc.skipped:
            return EstimationError(
                f"{type(self).__name__} has no estimates for {name}: all {acc.skipped} batch(es) seen had "
                "non-finite scores (overflowed mixed-precision backwards?)")
        passes = "forward and backward passes" if self.needs_activations else "backward passes"
        return EstimationError(f"{type(self).__name__} has no estimates for {name}: run {passes} "
                               "inside `with pruner.estimate():` first")

    def skipped(self) -> dict[str, int]:
        """Batches left out per measure point because their scores were not finite."""
        return {name: acc.skipped for name, acc in self.accumulators.items() if acc.skipped}

    def _report_skips(self, name: str, acc: ScoreAccumulator) -> None:
        """Warn, once per criterion, that non-finite batches were left out."""
        if self._warned_skips or not acc.skipped:
            return
        self._warned_skips = True
        warnings.warn(
            f"prunable: {type(self).__name__} left out {acc.skipped} batch(es) with non-finite scores at "
            f"{name!r} (an overflowed mixed-precision backward, skipped as GradScaler skips "
            "the step); see Criterion.skipped() for every layer", stacklevel=4)

    def reset(self) -> None:
        """Forget accumulated statistics."""
        self.accumulators.clear()


class TaylorActivation(Criterion):
    """Molchanov et al. 2017, Eq. 8: per example ``|mean_spatial(a·dL/da)|``, averaged.

    ``a`` is the output of the BatchNorm after the producing layer when there
    is one (exact for a following ReLU), else the producer's output.
    ``abs_after_batch_mean=True`` gives the 2018 seed's variant.
    """

    needs_activations = True
    needs_grad = True

    def __init__(self, abs_after_batch_mean: bool = False) -> None:
        super().__init__()
        self.abs_after_batch_mean = abs_after_batch_mean
        #: the CPU batches of a step, scored at once at its end (flushed with the hooks, and on every read)
        self.steps = StepScores(abs_after_batch_mean)

    def attach(self, points: list[MeasurePoint]) -> list[Any]:
        for point in points:
            self.accumulators.setdefault(point.name, ScoreAccumulator(self.abs_after_batch_mean))
        self.steps.retain([point.name for point in points])
        handles = super().attach(points)
        return handles + [self.steps] if handles else handles

    def per_example(self, a: torch.Tensor, g: torch.Tensor | None, dim: int) -> torch.Tensor:
        return taylor_per_example(a, g, dim, scratch=self.scratch)

    def accumulate(self, name: str, acc: ScoreAccumulator, a: torch.Tensor, g: torch.Tensor, dim: int) -> None:
        if not a.is_cpu:  # a GPU runs the per-point operations without waiting for the host
            return super().accumulate(name, acc, a, g, dim)
        self.steps.add(name, acc, a, g, dim, scratch=self.scratch)


class MeanActivation(Criterion):
    """Mean of ``relu(a)`` per channel (Molchanov et al. 2017's baseline)."""

    needs_activations = True

    def per_example(self, a: torch.Tensor, g: torch.Tensor | None, dim: int) -> torch.Tensor:
        return taylor_per_example(a.relu(), _ones(a, a.dtype), dim, scratch=self.scratch)


class APoZ(Criterion):
    """``1 − APoZ``: the fraction of positive ``a`` per channel (Hu et al. 2016)."""

    needs_activations = True

    def per_example(self, a: torch.Tensor, g: torch.Tensor | None, dim: int) -> torch.Tensor:
        return taylor_per_example(a > 0, _ones(a, torch.float32), dim, scratch=self.scratch)


def _ones(a: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Ones shaped like ``a`` without allocating them (one element, expanded)."""
    return torch.ones((), dtype=dtype, device=a.device).expand_as(a)


class WeightNorm(Criterion):
    """``||W_k||_p`` of each output filter of the producer (L1 by default): every weight
    entry producing channel ``k`` (all gates of all layers and directions of an RNN)."""

    def __init__(self, p: float = 1.0) -> None:
        super().__init__()
        self.p = p

    def scores(self, point: MeasurePoint) -> torch.Tensor:
        views = [point.out_view(name=n).detach().float() for n in point.producing()]
        w = views[0] if len(views) == 1 else torch.cat(views, 1)  # one weight: no copy
        if self.p == 1:
            return l1_rows(w)
        return torch.linalg.vector_norm(w, ord=self.p, dim=1)


#: elements of one block of :func:`l1_rows` per torch thread (2 MiB of float32)
L1_BLOCK = 2**19


def l1_rows(w: torch.Tensor) -> torch.Tensor:
    """``||row||_1`` of every row of the 2-D ``w``: the sum of ``|w|`` a few rows at a time.

    The same sum as ``w.abs().sum(1)``, without a full-size ``|w|`` when ``w`` is large:
    on CPU a fresh temporary of a large weight costs page faults every time (a 37 MB
    weight: 23 ms in one piece, 3-4 ms in blocks); blocks of :data:`L1_BLOCK`
    elements per thread keep the number of parallel regions small (each wakes the
    other threads).

    Example
    -------
    >>> l1_rows(torch.tensor([[1.0, -2.0], [-3.0, 0.5]]))
    tensor([3.0000, 3.5000])
    """
    rows = max(1, L1_BLOCK * torch.get_num_threads() // max(w.shape[1], 1))
    if w.device.type != "cpu" or rows >= w.shape[0]:
        return w.abs().sum(1)
    out = w.new_empty(w.shape[0])
    for start in range(0, w.shape[0], rows):
        torch.sum(w[start:start + rows].abs(), 1, out=out[start:start + rows])
    return out


class BNScale(Criterion):
    """``|γ|`` of the BatchNorm after the producer (Liu et al. 2017); L1 weight norm without one."""

    def scores(self, point: MeasurePoint) -> torch.Tensor:
        norm = point.norm
        if norm is not None and getattr(norm, "weight", None) is not None:
            return norm.weight.detach().float().abs()
        return WeightNorm(1.0).scores(point)


class Random(Criterion):
    """Uniform random scores from a seeded generator (a baseline)."""

    normalize = False

    def __init__(self, seed: int = 0) -> None:
        super().__init__()
        self.generator = torch.Generator().manual_seed(seed)

    def scores(self, point: MeasurePoint) -> torch.Tensor:
        n = point.out_channels()
        return torch.rand(n, generator=self.generator)


class _ParamTaylor(Criterion):
    """``(Σ w·dL/dw)²`` per channel over chosen parameters, accumulated per backward.

    The terms of one backward are summed over the parameters before they are
    accumulated, so a backward with a non-finite gradient in any of them is
    left out whole (see :class:`ScoreAccumulator`).
    """

    needs_grad = True

    def __init__(self) -> None:
        super().__init__()
        self._pending: dict[str, dict[int, torch.Tensor]] = {}

    def params(self, point: MeasurePoint) -> list[tuple[torch.Tensor, str | None]]:
        """``(tensor, name)`` pairs: a producer tensor with its name, or a norm's per-channel one with None."""
        raise NotImplementedError

    def _hooks(self, point: MeasurePoint, acc: ScoreAccumulator) -> list[Any]:
        params = self.params(point)
        pending: dict[int, torch.Tensor] = self._pending.setdefault(point.name, {})
        handles = []
        for i, (param, name) in enumerate(params):
            def on_grad(g: torch.Tensor, i=i, p=param, name=name) -> None:
                if i in pending:  # a new backward began before the last one reached every parameter
                    self._commit(point.name, acc)
                wg = p.detach().float() * g.detach().float()
                per_channel = point.out_view(wg, name) if name else wg.view(len(p), -1)
                pending[i] = per_channel.sum(1).pow(2)
                if len(pending) == len(params):
                    self._commit(point.name, acc)
            handles.append(param.register_hook(on_grad))
        return handles

    def _commit(self, name: str, acc: ScoreAccumulator) -> None:
        """Add one backward's terms of every parameter of ``name`` at once, so a backward whose
        gradients are partly non-finite is skipped whole."""
        pending = self._pending.get(name)
        if pending:
            acc.add_total(sum(pending.values()), 1)
            pending.clear()

    def scores(self, point: MeasurePoint) -> torch.Tensor:
        acc = self.accumulators.get(point.name)
        if acc is not None:
            self._commit(point.name, acc)
            self._report_skips(point.name, acc)
        if acc is None or acc.count == 0:
            raise self._missing(point.name, acc)
        return acc.value()

    def reset(self) -> None:
        super().reset()
        self._pending.clear()


class TaylorWeight(_ParamTaylor):
    """Molchanov et al. 2019: ``(Σ_k w·g)²`` over the filter's weights, bias and BN γ, β."""

    def params(self, point: MeasurePoint) -> list[tuple[torch.Tensor, str | None]]:
        # a parametrized weight (weight_norm …) is computed anew each forward: hook its originals
        weights, n = point.producing(), point.out_channels()
        out: list[tuple[torch.Tensor, str | None]] = [
            (t, name) for name in weights for t in originals(point.producer, name)
            if point.out_view(t.detach(), name).shape[0] == n]
        out += [(getattr(point.producer, name), name) for name in point.producing(biases=True)[len(weights):]]
        norm = point.norm
        for name in ("weight", "bias"):
            if norm is not None and getattr(norm, name, None) is not None:
                out.append((getattr(norm, name), None))
        return out


class TaylorBN(_ParamTaylor):
    """Molchanov et al. 2019 on BN only: ``(γ·dL/dγ + β·dL/dβ)²``; the filter without a BN."""

    def params(self, point: MeasurePoint) -> list[tuple[torch.Tensor, str | None]]:
        norm = point.norm
        if norm is None or getattr(norm, "weight", None) is None:
            return TaylorWeight.params(self, point)
        return [(t, None) for t in (norm.weight, norm.bias) if t is not None]


@contextlib.contextmanager
def estimating(criterion: Criterion, points: list[MeasurePoint], clamps: list[nn.Module] | None = None
               ) -> Iterator[None]:
    """``criterion``'s hooks on ``points`` while the block runs; removed on exit, also when it raises.

    ``clamps``: the model's in-place clamp modules to watch (:meth:`Criterion.watch`; the Pruner
    passes :meth:`InPlaceClamps.modules` of its model); none by default.

    Raises :class:`EstimationError` up front if the criterion needs gradients and they are disabled.

    Example
    -------
    >>> conv = nn.Conv2d(1, 2, 1)
    >>> criterion = MeanActivation()
    >>> with estimating(criterion, [MeasurePoint("conv", conv, 1, conv)]):
    ...     _ = conv(torch.ones(1, 1, 2, 2))
    >>> criterion.accumulators["conv"].count
    1
    """
    if criterion.needs_grad and not torch.is_grad_enabled():
        raise EstimationError(f"{type(criterion).__name__} needs gradients but they are "
                              "disabled (torch.no_grad / inference_mode) around estimate()")
    handles = criterion.attach(points)
    if handles and clamps:
        handles += criterion.watch(clamps)
    try:
        yield
    finally:
        for h in handles:
            h.remove()


#: The one registry of criteria by name (the CLI's ``--criterion``, the demo, ``Pruner(criterion=...)``).
CRITERIA: dict[str, Callable[[], Criterion]] = {
    "taylor": TaylorActivation,
    "taylor-bn": TaylorBN,
    "taylor-weight": TaylorWeight,
    "l1": lambda: WeightNorm(1.0),
    "l2": lambda: WeightNorm(2.0),
    "bn-scale": BNScale,
    "mean-activation": MeanActivation,
    "apoz": APoZ,
    "random": Random,
}


def make_criterion(criterion: "Criterion | str | None", seed: int | None = None) -> Criterion:
    """A criterion from an instance, a name in :data:`CRITERIA`, or None (Taylor).

    ``seed`` seeds the ``"random"`` criterion (ignored by the others).

    Example
    -------
    >>> type(make_criterion("l1")).__name__
    'WeightNorm'
    >>> type(make_criterion("random", seed=3)).__name__
    'Random'
    """
    if criterion is None:
        return TaylorActivation()
    if isinstance(criterion, Criterion):
        return criterion
    if isinstance(criterion, str) and criterion in CRITERIA:
        factory = CRITERIA[criterion]
        return factory(seed) if factory is Random and seed is not None else factory()
    from .errors import PruningValueError

    raise PruningValueError(f"unknown criterion {criterion!r}; choose one of {', '.join(CRITERIA)} or a Criterion")
