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

__all__ = ["KeptActivation", "ScoreAccumulator", "Scratch", "StepScores", "taylor_per_example", "taylor_sums"]


#: elements of ``activation * grad`` formed at a time per torch thread: a share small enough to stay
#: in a core's cache (one block per thread count: smaller blocks cost a parallel region each)
CHUNK_ELEMENTS = 1 << 18


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
    reduced, positions, step, size = _blocking(a.shape, channel_dim, CHUNK_ELEMENTS * torch.get_num_threads())
    n = a.shape[0]
    if a.device.type != "cpu" or (step >= n and not (a.is_contiguous() and g.is_contiguous())):
        # one block (a GPU reads it in one kernel); a strided one keeps the layout the product takes
        torch.sum(a.float() * g.float(), reduced, out=out)
        return positions
    step = min(step, n)
    flat = (scratch or Scratch()).take(step * size, a.device)
    block = flat[: step * size].view((step,) + a.shape[1:])
    if step == n:  # one block: no slices (each is an operation)
        _product(a, g, block)
        torch.sum(block, reduced, out=out)
    else:
        for i in range(0, n, step):
            j = min(n, i + step)
            _product(a[i:j], g[i:j], block[: j - i])
            torch.sum(block[: j - i], reduced, out=out[i:j])
    if scratch is not None:
        scratch.give(flat)
    return positions


@functools.lru_cache(maxsize=256)
def _blocking(shape: torch.Size, channel_dim: int, budget: int) -> tuple[tuple[int, ...], int, int, int]:
    """For :func:`taylor_per_example` (the same for every batch of a shape): the averaged dims, their
    number of positions, the examples per block (``budget`` elements, at least one example) and
    the elements per example."""
    dim = channel_dim % len(shape)
    reduced = tuple(d for d in range(1, len(shape)) if d != dim)
    positions, size = math.prod(shape[d] for d in reduced), math.prod(shape[1:])
    return reduced, positions, max(1, budget // max(size, 1)), size


def _product(a: torch.Tensor, g: torch.Tensor, out: torch.Tensor) -> None:
    """``out = float(a) * float(g)`` without a float32 copy of either (a product in the
    inputs' lower precision would round before the cast)."""
    if a.dtype == g.dtype == torch.float32:
        torch.mul(a, g, out=out)
    else:
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

    def add(self, name: str, acc: ScoreAccumulator, activation: torch.Tensor, grad: torch.Tensor,
            channel_dim: int = 1, *, scratch: Scratch | None = None) -> None:
        """Write one batch of point ``name`` (scored into ``acc`` at the next flush)."""
        n, c = activation.shape[0], activation.shape[channel_dim]
        with self._lock:
            column = self._columns.get(name)
            if self._buf is not None and self._buf.shape[0] != n and self._written and name not in self._written:
                acc.add(taylor_per_example(activation, grad, channel_dim, scratch=scratch))  # another N in this step
                return
            if (column is None or column[0] is not acc or column[2] != c or column[3] is not acc.total
                    or self._buf is None or self._buf.shape[0] != n):
                self._layout(name, acc, n, c)
                column = self._columns[name]
            elif name in self._written:
                self.flush()
            positions = taylor_sums(activation, grad, channel_dim, out=column[4], scratch=scratch)
            if self._positions.get(name) != positions:
                self._positions[name] = positions
                self._scale[column[1]:column[1] + c] = positions
            self._written[name] = n

    def _layout(self, name: str, acc: ScoreAccumulator, n: int, c: int) -> None:
        """Lay the columns out anew (a new point, batch size or channel count), keeping the totals."""
        self.flush()
        accs = {k: (v[0], v[2]) for k, v in self._columns.items()} | {name: (acc, c)}
        width = sum(c for _, c in accs.values())
        self._buf = torch.empty(n, width, dtype=torch.float32)
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
        return {**self.__dict__, "_columns": {}, "_buf": None, "_lock": None}

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state, _lock=threading.RLock())

    def retain(self, names: list[str]) -> None:
        """Flush, and lay out only points ``names`` from now on (those hooked: the others would never be written)."""
        with self._lock:
            self.flush()
            self._columns = {k: v for k, v in self._columns.items() if k in names}
            self._buf = None

    def remove(self) -> None:
        """Flush and free the buffer (a hook handle's interface)."""
        self.flush()
        self._buf = None


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

    def __init__(self, name: str) -> None:
        self.name = name
        self.copies: bool | None = None  # unknown until the first backward
        self._spare: _Held | None = None  # a copy whose batch was scored, free for the next hold

    def hold(self, a: torch.Tensor) -> "_Held":
        """What the backward hook needs: the activation (a copy unless known unchanged), its alias, its version."""
        if self.copies is False:
            return _Held(a, a)
        alias = None if self.copies else a  # the output itself is kept only to learn whether it changes
        spare, self._spare = self._spare, None
        if spare is not None and (spare.kept.shape, spare.kept.stride(), spare.kept.dtype, spare.kept.device) == (
                a.shape, a.stride(), a.dtype, a.device):
            return _Held(spare.kept.copy_(a), alias, spare.owner)  # an older hold of it can no longer read it
        return _Held(a.clone(), alias)

    def use(self, held: "_Held") -> torch.Tensor | None:
        """The activation as the layer produced it, or None if it was lost."""
        if held.owner[0] is not held.token:
            warnings.warn(f"prunable: {self.name}'s kept activation was reused by a later forward pass before "
                          "this backward (a retained graph run backward again?); the batch is left out",
                          stacklevel=2)
            return None
        changed = held.alias is not None and held.alias._version != held.version
        if self.copies is None:
            self.copies = changed
        elif changed and not self.copies:
            self.copies = True
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


class _Held:
    """A kept activation, the output it was read from (None when not needed) and its version then.

    ``owner`` is shared by every hold of the same copy; it holds the ``token``
    of the hold whose activation the copy holds now."""

    __slots__ = ("kept", "alias", "version", "owner", "token")

    def __init__(self, kept: torch.Tensor, alias: torch.Tensor | None, owner: list | None = None) -> None:
        self.kept, self.alias = kept, alias
        self.version = alias._version if alias is not None else None
        self.token = object()
        self.owner = owner if owner is not None else [None]
        self.owner[0] = self.token
