"""Accumulation of per-example channel scores over minibatches.

The per-batch machinery behind the data-driven criteria of
:mod:`prunable.importance` and the seed's layers (:mod:`prunable.nn`):
:func:`taylor_per_example` turns an activation and its gradient into signed
per-example, per-channel values, and a :class:`ScoreAccumulator` keeps their
running mean in float32, leaving out batches whose scores are not finite;
a :class:`KeptActivation` keeps a measured activation from the forward pass
for the backward hook, as the layer produced it.

Example
-------
>>> import torch
>>> a = torch.randn(4, 3, 5, 5); g = torch.randn(4, 3, 5, 5)
>>> acc = ScoreAccumulator()
>>> acc.add(taylor_per_example(a, g))
>>> acc.value().shape
torch.Size([3])
"""

from __future__ import annotations

import functools
import math
import threading
import warnings
from collections.abc import Callable

import torch

__all__ = ["CLAMPS", "InPlaceClamps", "KeptActivation", "ScoreAccumulator", "Scratch", "StepScores",
           "taylor_per_example", "taylor_sums"]


#: elements of ``activation * grad`` formed at a time per torch thread: a share small enough to stay
#: in a core's cache (one block per thread count: smaller blocks cost a parallel region each)
CHUNK_ELEMENTS = 1 << 18
#: at most this many positions per channel (a 4×4 map) are summed as rows by a matrix-vector
#: product: over a few elements per row that is 2-3× faster on the CPU than ``torch.sum``; from
#: an 8×8 map on, ``torch.sum`` is as fast or faster (bench: a ResNet-18's 2×2-8×8 maps)
ROW_SUM_POSITIONS = 16


def taylor_per_example(activation: torch.Tensor, grad: torch.Tensor, channel_dim: int = 1, *,
                       scratch: "Scratch | None" = None) -> torch.Tensor:
    """Signed per-example, per-channel spatial mean of ``activation * grad``.

    The product is formed a few examples at a time into one small buffer that
    stays in the cache, and summed there without moving the channel dim (no
    copy of a ``(N, T, C)`` token tensor), so the full-size product is never
    allocated; the sums are divided by the number of positions at the end.

    Parameters
    ----------
    activation, grad
        Tensors of equal shape; dim 0 indexes examples and ``channel_dim`` the
        channels. Every other dimension is averaged (spatial positions, tokens).
    channel_dim
        The channel dimension.
    scratch
        Where the CPU blocks are formed, reused from call to call (a fresh
        block of a megabyte costs page faults on every call); default: a new one.

    Returns
    -------
    torch.Tensor
        Shape ``(N, C)`` in float32. Take ``abs()`` before averaging over N for
        the paper's Eq. 8.

    Example
    -------
    >>> a = torch.ones(2, 3, 4); g = torch.full((2, 3, 4), 0.5)
    >>> taylor_per_example(a, g, channel_dim=-1)
    tensor([[0.5000, 0.5000, 0.5000, 0.5000],
            [0.5000, 0.5000, 0.5000, 0.5000]])
    """
    n, c = activation.shape[0], activation.shape[channel_dim]
    out = torch.empty(n, c, dtype=torch.float32, device=activation.device)
    positions = taylor_sums(activation, grad, channel_dim, out=out, scratch=scratch)
    return out.div_(positions) if positions != 1 else out


def taylor_sums(activation: torch.Tensor, grad: torch.Tensor, channel_dim: int = 1, *, out: torch.Tensor,
                scratch: "Scratch | None" = None) -> int:
    """:func:`taylor_per_example` before its division: the per-example, per-channel sums of
    ``activation * grad``, written into ``out`` (float32, ``(N, C)``, any strides).

    Returns the number of positions summed per channel (the divisor of the mean).

    Example
    -------
    >>> out = torch.empty(2, 4)
    >>> taylor_sums(torch.ones(2, 3, 4), torch.full((2, 3, 4), 0.5), -1, out=out)
    3
    >>> out[0]
    tensor([1.5000, 1.5000, 1.5000, 1.5000])
    """
    a = activation.detach() if activation.requires_grad else activation
    g = grad.detach() if grad.requires_grad else grad
    if a.dim() <= 2:  # (N, C): nothing to average
        torch.mul(a.float(), g.float(), out=out)
        return 1
    reduced, positions, step, _ = _blocks(a.shape, channel_dim)
    if not _in_blocks(a, g, step):
        torch.sum(a.float() * g.float(), reduced, out=out)
        return positions
    scratch = scratch or Scratch()
    flat = scratch.take(_work_elements(a.shape, channel_dim), a.device)
    _sums_plan(a, g, channel_dim, out, flat, scratch)(a, g)
    scratch.give(flat)
    return positions


def _blocks(shape: torch.Size, channel_dim: int) -> tuple[tuple[int, ...], int, int, int]:
    """:func:`_blocking` of ``shape`` with this thread count's budget (:data:`CHUNK_ELEMENTS` per torch thread)."""
    return _blocking(shape, channel_dim, CHUNK_ELEMENTS * torch.get_num_threads())


def _in_blocks(a: torch.Tensor, g: torch.Tensor, step: int) -> bool:
    """Whether the product is formed in blocks of a CPU buffer (``step`` examples each): not on a
    GPU (which reads it in one kernel), nor for one block of a strided input (the product then
    keeps the layout it takes)."""
    return a.device.type == "cpu" and (step < a.shape[0] or (a.is_contiguous() and g.is_contiguous()))


def _work_elements(shape: torch.Size, channel_dim: int) -> int:
    """Elements of the work buffer :func:`_sums_plan` needs for inputs of ``shape``."""
    _, positions, step, size = _blocks(shape, channel_dim)
    step = min(step, shape[0])
    return step * size + (step * shape[1] if _by_rows(positions, channel_dim, len(shape)) else 0)


def _by_rows(positions: int, channel_dim: int, dims: int) -> bool:
    """Whether the positions are summed as rows by a matrix-vector product: at most
    :data:`ROW_SUM_POSITIONS` per channel, in the trailing dims."""
    return positions <= ROW_SUM_POSITIONS and channel_dim % dims == 1


def _sums_plan(a: torch.Tensor, g: torch.Tensor, channel_dim: int, out: torch.Tensor, flat: torch.Tensor,
               scratch: Scratch) -> Callable[[torch.Tensor, torch.Tensor], None]:
    """The CPU block path of :func:`taylor_sums` for inputs laid out as ``a`` and ``g`` (shape,
    dtypes): a function of ``(activation, grad)`` that writes their sums into ``out``, forming the
    blocks in ``flat`` (:func:`_work_elements` long). Its views are made here once, so a point
    scored every step runs only the product and the reduction of each block (on the CPU each
    operation, however small, costs microseconds, tens of them in a training step's cold caches).
    """
    reduced, positions, step, size = _blocks(a.shape, channel_dim)
    n, c = a.shape[0], a.shape[1]
    step = min(step, n)
    by_rows = _by_rows(positions, channel_dim, a.dim())
    product = torch.mul if a.dtype == g.dtype == torch.float32 else _widened_product
    ones = scratch.ones(positions, a.device) if by_rows else None
    blocks = []  # (where the block's product is formed, the reduction of it into its rows of out)
    for i in range(0, n, step):
        k = min(n, i + step) - i
        target = out if k == n else out[i:i + k]
        block = flat[: k * size].view((k,) + a.shape[1:])
        if not by_rows:
            blocks.append((block, functools.partial(torch.sum, block, reduced, out=target)))
            continue
        rows = target.view(-1) if target.is_contiguous() else flat[step * size: step * size + k * c]
        mv = functools.partial(torch.mv, flat[: k * size].view(-1, positions), ones, out=rows)
        blocks.append((block, mv if rows.data_ptr() == target.data_ptr() else _then_copy(mv, target, rows.view(k, c))))
    if len(blocks) == 1:  # one block: no slices (each is an operation)
        ((block, reduce),) = blocks

        def run(a: torch.Tensor, g: torch.Tensor) -> None:
            product(a, g, out=block)
            reduce()
    else:
        def run(a: torch.Tensor, g: torch.Tensor) -> None:
            for a_part, g_part, (block, reduce) in zip(a.split(step), g.split(step), blocks):  # one call each
                product(a_part, g_part, out=block)
                reduce()
    return run


def _then_copy(reduce: Callable[[], torch.Tensor], target: torch.Tensor, rows: torch.Tensor) -> Callable[[], None]:
    """``reduce()`` into the contiguous ``rows``, then copied into the strided ``target``."""
    def run() -> None:
        reduce()
        target.copy_(rows)
    return run


@functools.lru_cache(maxsize=256)
def _blocking(shape: torch.Size, channel_dim: int, budget: int) -> tuple[tuple[int, ...], int, int, int]:
    """For :func:`taylor_per_example` (the same for every batch of a shape): the averaged dims, their
    number of positions, the examples per block (``budget`` elements, at least one example) and
    the elements per example."""
    dim = channel_dim % len(shape)
    reduced = tuple(d for d in range(1, len(shape)) if d != dim)
    positions, size = math.prod(shape[d] for d in reduced), math.prod(shape[1:])
    return reduced, positions, max(1, budget // max(size, 1)), size


def _sums_into(channel_dim: int, out: torch.Tensor, scratch: Scratch, a: torch.Tensor, g: torch.Tensor) -> None:
    """:func:`taylor_sums` of ``a`` and ``g`` into ``out`` (a plan for the layouts it does not cover)."""
    taylor_sums(a, g, channel_dim, out=out, scratch=scratch)


def _widened_product(a: torch.Tensor, g: torch.Tensor, *, out: torch.Tensor) -> None:
    """``out = float(a) * float(g)`` without a float32 copy of either (a product in the
    inputs' lower precision would round before the cast)."""
    out.copy_(a).mul_(g)  # in place: computed in out's float32, ``g`` widened exactly


class Scratch:
    """A float32 buffer that :func:`taylor_per_example` reuses for its blocks.

    :meth:`take` hands the buffer out (a fresh one if it is in use, too small
    or on another device) and :meth:`give` returns it, so two threads never
    share it. :meth:`remove` frees it (a hook handle's interface: a criterion
    frees its scratch with its hooks).

    Example
    -------
    >>> scratch = Scratch()
    >>> buf = scratch.take(8, torch.device("cpu"))
    >>> scratch.give(buf)
    >>> scratch.take(4, torch.device("cpu")) is buf
    True
    """

    def __init__(self) -> None:
        self._free: list[torch.Tensor] = []  # pop and append are atomic: threads never share a buffer
        self._ones: dict[tuple[int, torch.device], torch.Tensor] = {}

    def ones(self, numel: int, device: torch.device) -> torch.Tensor:
        """A float32 vector of ``numel`` ones on ``device`` (made once, never written)."""
        key = (numel, device)
        ones = self._ones.get(key)
        if ones is None:
            ones = self._ones[key] = torch.ones(numel, dtype=torch.float32, device=device)
        return ones

    def take(self, numel: int, device: torch.device) -> torch.Tensor:
        """A float32 buffer of at least ``numel`` elements on ``device``, now the caller's."""
        try:
            buf = self._free.pop()
        except IndexError:
            buf = None
        if buf is None or buf.numel() < numel or buf.device != device:
            buf = torch.empty(numel, dtype=torch.float32, device=device)
        return buf

    def give(self, buf: torch.Tensor) -> None:
        """Return ``buf`` for the next :meth:`take`."""
        if not self._free:
            self._free.append(buf)

    def remove(self) -> None:
        """Free the buffer."""
        self._free.clear()
        self._ones.clear()


class ScoreAccumulator:
    """Running mean over examples of per-channel scores, in float32.

    ``add`` takes per-example signed values ``(N, C)``. With
    ``abs_after_batch_mean=False`` (the paper) it accumulates ``|x|`` per
    example; with ``True`` (the 2018 seed code) it accumulates ``|mean_N x|``
    weighted by N. ``value()`` is the mean over all examples seen, so two
    batches accumulate exactly like their concatenation.

    A batch whose contribution is not finite (``inf``/``NaN`` gradients from an
    overflowed mixed-precision backward, which ``GradScaler`` skips too) is left
    out and counted in :attr:`skipped`. On a GPU the check runs on the device:
    adding a batch never waits for the GPU; only reading :attr:`count`,
    :attr:`skipped` or :meth:`value` does. Scores are summed in float32 whatever
    the model's dtype, so half-precision models neither overflow nor lose small
    scores.

    Loss scaling: gradients of a loss scaled by ``S`` are ``S`` times larger, so
    every Taylor score of a layer is ``S`` (activation criteria) or ``S²``
    (parameter criteria) times larger. A scale that is constant while estimating
    cancels in the per-layer L2 normalisation (``θ / ||θ||₂``) used to rank
    across layers. A scale that changes in the window (``GradScaler`` grows it
    every ``growth_interval`` steps, halves it on overflow) weights the batches
    by their scale; estimate over a window of steady scale for exact averages.

    Example
    -------
    >>> acc = ScoreAccumulator()
    >>> acc.add(torch.tensor([[1.0, -2.0]]))
    >>> acc.add(torch.tensor([[float("inf"), 0.0]]))  # skipped, like an overflowed step
    >>> acc.value(), acc.count, acc.skipped
    (tensor([1., 2.]), 1, 1)
    """

    def __init__(self, abs_after_batch_mean: bool = False) -> None:
        self.abs_after_batch_mean = abs_after_batch_mean
        #: called before a read: a :class:`StepScores` holding batches of this accumulator adds them
        self.sync: Callable[[], None] | None = None
        self.reset()

    def add(self, per_example: torch.Tensor) -> None:
        """Accumulate a batch of signed per-example scores of shape ``(N, C)``."""
        n = per_example.shape[0]
        if per_example.requires_grad or per_example.dtype != torch.float32:
            per_example = per_example.detach().float()
        if self.abs_after_batch_mean:
            batch = per_example.mean(0).abs_().mul_(n)
        else:
            batch = torch.sum(per_example.abs(), 0)
        self._add(batch, n)

    def add_total(self, total: torch.Tensor, count: int) -> None:
        """Accumulate an already summed score of ``count`` examples (non-Taylor criteria).

        In place, with no new running tensors per batch once the first batch is
        in. On a GPU the finiteness check stays on the device (no host
        synchronisation); on the CPU, where nothing waits, it is decided on the
        host in fewer operations: a finite sum of the entries proves them all
        finite, and only a sum that is not finite looks at every entry.
        """
        self._add(total.detach().float(), count)

    def _add(self, total: torch.Tensor, count: int) -> None:
        """:meth:`add_total` of a float32 tensor outside autograd."""
        if self.total is None:
            self.total = torch.zeros_like(total)
        self._offered += count
        if total.device.type == "cpu":
            if math.isfinite(float(total.sum())) or bool(torch.isfinite(total).all()):
                self.total.add_(total)
            else:
                self._bad_host += count
                self._bad_batches_host += 1
            return
        bad = torch.isfinite(total).all().logical_not_()
        if self._bad is None:
            self._bad = torch.zeros((), dtype=torch.long, device=total.device)
            self._bad_batches = torch.zeros((), dtype=torch.long, device=total.device)
        self.total.add_(total.masked_fill(bad, 0))
        self._bad.add_(bad, alpha=count)
        self._bad_batches.add_(bad)

    @property
    def count(self) -> int:
        """Examples accumulated (those of skipped batches not included)."""
        if self.sync is not None:
            self.sync()
        return self._offered - self._bad_host - (int(self._bad) if self._bad is not None else 0)

    @property
    def skipped(self) -> int:
        """Batches left out because their scores were not finite."""
        if self.sync is not None:
            self.sync()
        return self._bad_batches_host + (int(self._bad_batches) if self._bad_batches is not None else 0)

    def value(self, size: int | None = None, device: torch.device | None = None) -> torch.Tensor:
        """Mean score per channel; zeros of length ``size`` when nothing was seen."""
        count = self.count
        if self.total is None or count == 0:
            return torch.zeros(size or 0, device=device)
        return self.total / count

    def reset(self) -> None:
        """Forget everything accumulated."""
        self.total: torch.Tensor | None = None
        self._offered = 0
        self._bad_host = self._bad_batches_host = 0  # skipped examples and batches, counted on the host (CPU)
        self._bad: torch.Tensor | None = None  # the same, counted on the device (GPU)
        self._bad_batches: torch.Tensor | None = None

    def keep(self, keep: torch.Tensor) -> None:
        """Drop the entries of removed channels, keeping indices ``keep``."""
        if self.total is not None:
            self.total = self.total.index_select(0, keep.to(self.total.device))


class StepScores:
    """The per-example sums of every measure point of a step in one buffer, scored at once (CPU).

    Each small operation costs microseconds on the CPU whatever its size, so a
    point's backward hook only writes its sums (:func:`taylor_sums`) into its
    own columns of an ``(N, ΣC)`` float32 buffer, and one :meth:`flush` per
    step divides them by the positions, takes ``abs``, sums over N, checks
    finiteness (one host read) and adds into one running total, of which every
    point's :class:`ScoreAccumulator` total is a view. The result is
    :meth:`ScoreAccumulator.add` of each point's :func:`taylor_per_example` up
    to float rounding; a batch that is not finite is left out per point, as there.

    A point writing its columns again (the next step, or a retained graph run
    backward again), :meth:`remove` (the end of estimation) and any read of an
    accumulator flush. Points not reached in a step, batch sizes, input sizes
    and channel counts that change between steps are all handled; a point
    whose first dim differs from the others' in a step (an RNN's ``(T, N, H)``)
    is added on its own, as :meth:`ScoreAccumulator.add` does.

    Example
    -------
    >>> acc, steps = ScoreAccumulator(), StepScores()
    >>> steps.add("conv", acc, torch.ones(2, 3, 4), torch.ones(2, 3, 4))
    >>> acc.count, acc.value()  # a read flushes
    (2, tensor([1., 1., 1.]))
    """

    def __init__(self, abs_after_batch_mean: bool = False) -> None:
        self.abs_after_batch_mean = abs_after_batch_mean
        #: name -> (accumulator, first column, channels, the accumulator's total as bound, its columns of the buffer)
        self._columns: dict[str, tuple[ScoreAccumulator, int, int, torch.Tensor, torch.Tensor]] = {}
        self._positions: dict[str, int] = {}
        self._written: dict[str, int] = {}  # points written since the last flush
        self._buf: torch.Tensor | None = None  # (N, ΣC)
        self._scale = self._total = torch.zeros(0, dtype=torch.float32)  # positions and running total per column
        self._lock = threading.RLock()
        #: name -> (the layout of its batches, accumulator, its total, the function writing its sums, N): made once
        #: per layout; every plan is dropped when the columns are laid out anew
        self._plans: dict[str, tuple] = {}
        self._work: torch.Tensor | None = None  # the plans' block buffer, shared (points are scored one at a time)

    def add(self, name: str, acc: ScoreAccumulator, activation: torch.Tensor, grad: torch.Tensor,
            channel_dim: int = 1, *, scratch: Scratch | None = None) -> None:
        """Write one batch of point ``name`` (scored into ``acc`` at the next flush)."""
        layout = (activation.shape, activation.stride(), grad.stride(), activation.dtype, grad.dtype, channel_dim,
                  activation.requires_grad or grad.requires_grad)
        with self._lock:
            plan = self._plans.get(name)
            if plan is None or plan[0] != layout or plan[1] is not acc or plan[2] is not acc.total:
                plan = self._prepare(name, acc, activation, grad, channel_dim, layout, scratch)
                if plan is None:
                    return
            elif name in self._written:
                self.flush()
            plan[3](activation, grad)
            self._written[name] = plan[4]

    def _prepare(self, name: str, acc: ScoreAccumulator, activation: torch.Tensor, grad: torch.Tensor,
                 channel_dim: int, layout: tuple, scratch: Scratch | None) -> tuple | None:
        """:meth:`add`'s set-up for a point whose plan is missing or stale: its columns (laid out anew if
        needed), its positions, and its plan ``(layout, acc, acc.total, write the sums, N)``; None when the
        batch was scored on its own (another first dim than the others' in this step)."""
        n, c = activation.shape[0], activation.shape[channel_dim]
        column = self._columns.get(name)
        if self._buf is not None and self._buf.shape[0] != n and self._written and name not in self._written:
            acc.add(taylor_per_example(activation, grad, channel_dim, scratch=scratch))  # another N in this step
            return None
        if (column is None or column[0] is not acc or column[2] != c or column[3] is not acc.total
                or self._buf is None or self._buf.shape[0] != n):
            self._layout(name, acc, n, c)
            column = self._columns[name]
        elif name in self._written:
            self.flush()
        write, positions = self._plan(activation, grad, channel_dim, column[4], scratch)
        if self._positions.get(name) != positions:
            self._positions[name] = positions
            self._scale[column[1]:column[1] + c] = positions
        plan = self._plans[name] = (layout, acc, acc.total, write, n)
        return plan

    def _plan(self, a: torch.Tensor, g: torch.Tensor, channel_dim: int, out: torch.Tensor, scratch: Scratch | None
              ) -> tuple[Callable[[torch.Tensor, torch.Tensor], None], int]:
        """The function writing the sums of inputs laid out as ``a`` and ``g`` into ``out``, and its positions:
        :func:`taylor_sums`' CPU block path with its views made once, or :func:`taylor_sums` itself."""
        scratch = scratch or Scratch()
        _, positions, step, _ = _blocks(a.shape, channel_dim)
        if a.dim() <= 2 or a.requires_grad or g.requires_grad or not _in_blocks(a, g, step):
            return functools.partial(_sums_into, channel_dim, out, scratch), positions
        need = _work_elements(a.shape, channel_dim)
        if self._work is None or self._work.numel() < need:
            self._work = torch.empty(need, dtype=torch.float32)
            self._plans = {}  # their views are of the old buffer
        return _sums_plan(a, g, channel_dim, out, self._work, scratch), positions

    def _layout(self, name: str, acc: ScoreAccumulator, n: int, c: int) -> None:
        """Lay the columns out anew (a new point, batch size or channel count), keeping the totals."""
        self.flush()
        accs = {k: (v[0], v[2]) for k, v in self._columns.items()} | {name: (acc, c)}
        width = sum(c for _, c in accs.values())
        self._buf, self._plans = torch.empty(n, width, dtype=torch.float32), {}  # the plans wrote to the old columns
        self._scale, self._total = torch.ones(width, dtype=torch.float32), torch.zeros(width, dtype=torch.float32)
        self._columns, start = {}, 0
        for key, (a, c) in accs.items():
            view = self._total[start:start + c]
            if a.total is not None:
                view.copy_(a.total)
            a.total, a.sync = view, self.flush
            self._scale[start:start + c] = self._positions.get(key, 1)
            self._columns[key], start = (a, start, c, view, self._buf[:, start:start + c]), start + c

    def flush(self) -> None:
        """Score the batches written since the last flush into their accumulators."""
        with self._lock:
            if not self._written:
                return
            written, self._written, buf = self._written, {}, self._buf
            n = buf.shape[0]
            buf.div_(self._scale)
            batch = buf.mean(0).abs_().mul_(n) if self.abs_after_batch_mean else torch.sum(buf.abs_(), 0)
            columns = [self._columns[name] for name in written]
            if (len(columns) == len(self._columns) and all(acc.total is view for acc, _, _, view, _ in columns)
                    and math.isfinite(float(batch.sum()))):
                self._total.add_(batch)
                for acc, *_ in columns:
                    acc._offered += n
                return
            for acc, start, c, *_ in columns:  # some points not reached, or a sum not finite: point by point
                acc._add(batch[start:start + c], n)

    def __getstate__(self) -> dict:
        """Flushed, without the layout (a copy's accumulators keep their totals, laid out again by
        the next :meth:`add`; a pickle does not keep them views of one tensor) and the lock."""
        self.flush()
        return {**self.__dict__, "_columns": {}, "_buf": None, "_lock": None, "_plans": {}, "_work": None}

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state, _lock=threading.RLock())

    def retain(self, names: list[str]) -> None:
        """Flush, and lay out only points ``names`` from now on (those hooked: the others would never be written)."""
        with self._lock:
            self.flush()
            self._columns = {k: v for k, v in self._columns.items() if k in names}
            self._buf, self._plans = None, {}

    def remove(self) -> None:
        """Flush and free the buffers (a hook handle's interface)."""
        self.flush()
        self._buf, self._plans, self._work = None, {}, None


class KeptActivation:
    """A measure point's activation, kept from the forward pass for the backward hook.

    The model may change a layer's output in place after the layer (torchvision's
    ResNet: ``out = self.bn2(out); out += identity; out = self.relu(out)`` with an
    in-place ReLU) before the backward pass: the tensor the hook kept then holds
    ``relu(y + identity)``, not ``y``, while the gradient is still ``dL/dy``.
    Whether a point's output is changed so is learnt from its first backward: until
    then the activation is copied and its version counter checked; afterwards it is
    copied only where the model changes it. A batch whose uncopied activation was
    changed anyway (the forward pass took another path) is left out with a warning,
    never mixed into the scores.

    One change needs no copy: an in-place clamp module (:data:`CLAMPS`: ReLU, ReLU6,
    Hardtanh) applied to the whole output as its first reader, and nothing else. Every
    gradient then reaches ``y`` through the clamp, which passes none wherever it
    changed a value, so ``clamp(y)·dL/dy == y·dL/dy`` exactly. (A reader before the
    clamp, ``z = 2 * y``, would send ``y`` gradient where the clamp zeroed it.)
    :class:`InPlaceClamps` proves it batch by batch: the clamp module's forward hook
    marks the hold when the output it returns is this one (same storage, shape and
    strides) one version later, and its autograd node is the very next one recorded
    after the layer's (no operation read ``y`` with gradients in between); the backward
    then finds that version still.

    A copy whose batch has been scored is reused for the next batch of the same
    shape, so a copied point allocates no new memory per step (fresh copies cost
    page faults on every CPU step). If a retained graph is run backward again
    after a later forward pass reused its copy, that batch is left out with a
    warning. The copy is freed with the hooks, when estimation stops.

    Example
    -------
    >>> y = torch.ones(2, 3)
    >>> keep = KeptActivation("bn")
    >>> held = keep.hold(y)
    >>> _ = y.add_(1.0)  # the model changes the output in place after the hook
    >>> float(keep.use(held).sum())
    6.0
    >>> keep.copies
    True
    """

    def __init__(self, name: str, clamps: "InPlaceClamps | None" = None) -> None:
        self.name = name
        self.copies: bool | None = None  # unknown until the first backward
        #: the output is changed after the layer by an in-place clamp only (learnt): kept without a copy
        self.clamped = False
        self._clamps = clamps
        self._spare: _Held | None = None  # a copy whose batch was scored, free for the next hold
        self._last: _Held | None = None  # the latest hold a clamp may mark (while one may)

    def hold(self, a: torch.Tensor, source: torch.Tensor | None = None) -> "_Held":
        """What the backward hook needs: the activation (a copy unless known unchanged), its alias, its version.

        ``source``: the tensor ``a`` was detached from (its autograd node dates the layer for
        :meth:`clamp`); without it no clamp is proved."""
        if self.copies is False:
            held = _Held(a, a)
        else:
            alias = None if self.copies else a  # the output itself is kept only to learn whether it changes
            spare, self._spare = self._spare, None
            if spare is not None and (spare.kept.shape, spare.kept.stride(), spare.kept.dtype, spare.kept.device) == (
                    a.shape, a.stride(), a.dtype, a.device):
                held = _Held(spare.kept.copy_(a), alias, spare.owner)  # an older hold of it can no longer read it
            else:
                held = _Held(a.clone(), alias)
        if self._clamps is not None and (self.copies is None or self.clamped) and source is not None:
            held.node = _node_number(source)
            if held.node is not None:
                self._last = held
                self._clamps.note(self, a)
        return held

    def clamp(self, output: torch.Tensor) -> None:
        """An in-place clamp module returned ``output``: mark the latest hold if that is its activation,
        changed once, by the clamp alone."""
        held = self._last
        if (held is not None and held.alias is not None and output._version == held.version + 1
                and output.data_ptr() == held.alias.data_ptr() and output.shape == held.alias.shape
                and output.stride() == held.alias.stride() and _node_number(output) == held.node + 1):
            held.clamped = True

    def use(self, held: "_Held") -> torch.Tensor | None:
        """The activation as the layer produced it (or clamped in place: the same products), or None if it was lost."""
        if self._last is held:
            self._last = None
        if held.owner[0] is not held.token:
            warnings.warn(f"prunable: {self.name}'s kept activation was reused by a later forward pass before "
                          "this backward (a retained graph run backward again?); the batch is left out",
                          stacklevel=2)
            return None
        changed = held.alias is not None and held.alias._version != held.version
        clamped = changed and held.clamped and held.alias._version == held.version + 1
        if self.copies is None:
            self.copies = changed and not clamped
            self.clamped = clamped  # from now on the clamped output itself is read
        elif changed and not self.copies and not clamped:
            self.copies, self.clamped = True, False
            warnings.warn(f"prunable: {self.name}'s output was changed in place after the layer in this batch "
                          "only; the batch is left out of its estimate, and its output is copied from now on",
                          stacklevel=2)
            return None
        return held.kept

    def release(self, held: "_Held") -> None:
        """The batch of ``held`` is scored: its copy may be reused by the next :meth:`hold`."""
        if held.kept is not held.alias and self.copies:
            held.alias = None  # the spare must not keep the layer's output alive
            self._spare = held


def _node_number(t: torch.Tensor) -> int | None:
    """The sequence number of ``t``'s autograd node (nodes are numbered as the forward pass records
    them, per thread), or None (no node, or a torch without the number)."""
    node = t.grad_fn
    number = getattr(node, "_sequence_nr", None) if node is not None else None
    return number() if number is not None else None


#: modules whose in-place form leaves ``a·dL/da`` of its input exact (its gradient is zero wherever it
#: changed a value); exact types: a subclass may compute something else
CLAMPS = (torch.nn.ReLU, torch.nn.ReLU6, torch.nn.Hardtanh)


class InPlaceClamps:
    """Finds the kept activation an in-place clamp module (:data:`CLAMPS`) changes, by storage.

    :meth:`hook` is the clamp modules' forward hook; :meth:`note` records each hold
    that a clamp may mark (one per measure point: the latest). :meth:`remove` forgets
    them (a hook handle's interface).

    Example
    -------
    >>> clamps, relu, bn = InPlaceClamps(), torch.nn.ReLU(inplace=True), torch.nn.BatchNorm1d(2)
    >>> handle = relu.register_forward_hook(clamps.hook)
    >>> keep = KeptActivation("bn", clamps)
    >>> y = bn(torch.tensor([[-1.0, 2.0], [3.0, -4.0]], requires_grad=True))
    >>> held = keep.hold(y.detach(), y)
    >>> _ = relu(y)  # the first reader of y, in place
    >>> keep.use(held) is held.kept, keep.clamped  # learnt: no copy from now on
    (True, True)
    """

    def __init__(self) -> None:
        self._by_storage: dict[int, KeptActivation] = {}
        self._storage: dict[KeptActivation, int] = {}

    @staticmethod
    def modules(model: torch.nn.Module) -> list[torch.nn.Module]:
        """The modules of ``model`` of a :data:`CLAMPS` type (whether in place is read when they run)."""
        return [m for m in model.modules() if type(m) in CLAMPS]

    def note(self, keep: KeptActivation, a: torch.Tensor) -> None:
        """``keep`` holds ``a`` now (its previous hold can no longer be marked)."""
        ptr = a.data_ptr()
        old = self._storage.get(keep)
        if old is not None and self._by_storage.get(old) is keep:
            del self._by_storage[old]
        self._by_storage[ptr], self._storage[keep] = keep, ptr

    def hook(self, module: torch.nn.Module, inputs: tuple, output: torch.Tensor) -> None:
        """Forward hook of a clamp module: mark the hold whose activation it changed in place."""
        if getattr(module, "inplace", False) and isinstance(output, torch.Tensor):
            keep = self._by_storage.get(output.data_ptr())
            if keep is not None:
                keep.clamp(output)

    def remove(self) -> None:
        """Forget every hold."""
        self._by_storage.clear()
        self._storage.clear()


class _Held:
    """A kept activation, the output it was read from (None when not needed) and its version then.

    ``owner`` is shared by every hold of the same copy; it holds the ``token``
    of the hold whose activation the copy holds now."""

    __slots__ = ("kept", "alias", "version", "owner", "token", "clamped", "node")

    def __init__(self, kept: torch.Tensor, alias: torch.Tensor | None, owner: list | None = None) -> None:
        self.kept, self.alias, self.clamped, self.node = kept, alias, False, None
        self.version = alias._version if alias is not None else None
        self.token = object()
        self.owner = owner if owner is not None else [None]
        self.owner[0] = self.token
