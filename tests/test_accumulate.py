"""The accumulation machinery's fast paths compute what the plain formulas compute."""

import math
import warnings

import pytest
import torch
from torch import nn

from prunable import TaylorActivation, accumulate
from prunable.accumulate import ScoreAccumulator, Scratch, taylor_per_example
from prunable.importance import MeasurePoint, estimating


def _pair(shape, dtype, layout):
    gen = torch.Generator().manual_seed(0)
    a, g = (torch.randn(shape, generator=gen).to(dtype) for _ in range(2))
    if layout == "channels_last":
        a = a.to(memory_format=torch.channels_last)
    elif layout == "transposed":  # an attention output: (T, N, C) memory seen as (N, T, C)
        a = a.transpose(0, 1).contiguous().transpose(0, 1)
    return a, g


@pytest.mark.parametrize("shape, dim, dtype, layout", [
    ((7, 5, 3, 3), 1, torch.float32, "contiguous"), ((7, 5, 3, 3), 1, torch.float32, "channels_last"),
    ((7, 9, 6), -1, torch.float32, "contiguous"), ((7, 9, 6), -1, torch.float32, "transposed"),
    ((7, 4, 6), 1, torch.bfloat16, "contiguous"), ((7, 5, 3, 3), 1, torch.bfloat16, "contiguous"),
    ((7, 5, 5, 5), 1, torch.float32, "contiguous"), ((7, 4, 17), 1, torch.bfloat16, "contiguous"),
])
def test_blocks_in_a_scratch_are_bitwise_the_fresh_blocks(monkeypatch, shape, dim, dtype, layout):
    """At every block size a reused scratch gives the bits of fresh blocks; with contiguous inputs
    every block size gives the bits of the float32 product summed in one block (bfloat16 widened
    before multiplying, never rounded to bfloat16 first), up to the order of the sum where a
    matrix-vector product sums a few positions per channel."""
    a, g = _pair(shape, dtype, layout)
    reduced = tuple(d for d in range(1, a.dim()) if d != dim % a.dim())
    want = torch.sum(a.float() * g.float(), reduced).div_(math.prod(a.shape[d] for d in reduced))
    scratch = Scratch()
    pairs = [(taylor_per_example(a, g, dim), taylor_per_example(a, g, dim, scratch=scratch))]
    monkeypatch.setattr(accumulate, "CHUNK_ELEMENTS", math.prod(shape[1:]))
    for threads in (1, 2, 3):  # blocks of one, two and three examples, the last one short
        monkeypatch.setattr(torch, "get_num_threads", lambda threads=threads: threads)
        pairs.append((taylor_per_example(a, g, dim), taylor_per_example(a, g, dim, scratch=scratch)))
    for fresh, reused in pairs:
        assert torch.equal(reused, fresh)
        if layout == "contiguous":
            if math.prod(a.shape[2:]) > accumulate.ROW_SUM_POSITIONS or dim % a.dim() != 1:
                assert torch.equal(fresh, want)
            else:  # summed as rows: another order of the same float32 terms (rounding bf16 first: ~1e-2)
                torch.testing.assert_close(fresh, want, rtol=1e-6, atol=1e-7)
        else:  # a strided product is summed in its own layout in one block, in blocks in theirs
            torch.testing.assert_close(fresh, want)


def test_scratch_is_reused_and_never_shared():
    cpu = torch.device("cpu")
    scratch = Scratch()
    first = scratch.take(10, cpu)
    scratch.give(first)
    assert scratch.take(6, cpu) is first  # big enough: reused
    assert scratch.take(6, cpu) is not first  # in use: the second caller gets its own
    scratch.give(first)
    assert scratch.take(11, cpu).numel() == 11  # too small: a bigger one
    a, g = _pair((6, 4, 5, 5), torch.float32, "contiguous")
    taylor_per_example(a, g, scratch=scratch)
    kept = scratch.take(1, cpu)
    scratch.give(kept)
    taylor_per_example(a, g, scratch=scratch)
    assert scratch.take(1, cpu) is kept  # the blocks of the next call were formed in it


@pytest.mark.parametrize("size", [5, 2])  # 25 positions summed by torch.sum, 4 as rows (with a vector of ones)
def test_criterion_frees_its_scratch_with_its_hooks(monkeypatch, size):
    monkeypatch.setattr(accumulate, "CHUNK_ELEMENTS", 4 * size * size)  # blocks: the work buffer is used
    conv = nn.Conv2d(3, 4, 3, padding=1)
    criterion = TaylorActivation()
    with estimating(criterion, [MeasurePoint("conv", conv, 1, conv)]):
        conv(torch.randn(6, 3, size, size)).square().sum().backward()
        assert criterion.steps._work is not None and criterion.steps._plans
        assert bool(criterion.scratch._ones) == (size == 2)
    assert criterion.steps._work is None and not criterion.steps._plans
    assert not criterion.scratch._free and not criterion.scratch._ones
    assert criterion.accumulators["conv"].count == 6


def test_cpu_accumulator_skips_exactly_the_non_finite_batches():
    """A batch whose entries are finite counts even when their sum overflows float32 (the host
    check reads the sum first); one with an inf or a NaN is left out."""
    acc = ScoreAccumulator()
    acc.add(torch.tensor([[1.0, -2.0]]))
    acc.add(torch.tensor([[3e38, 3e38], [-3e37, 0.0]]))  # sum of |x| overflows; every entry finite
    acc.add(torch.tensor([[float("inf"), 0.0]]))
    acc.add(torch.tensor([[float("nan"), 1.0]]))
    acc.add_total(torch.tensor([1.0, float("-inf")]), 4)
    assert (acc.count, acc.skipped) == (3, 3)
    torch.testing.assert_close(acc.value(), torch.tensor([1.0 + 3e38 + 3e37, 2.0 + 3e38]) / 3)
    acc.reset()
    assert (acc.count, acc.skipped) == (0, 0)


@pytest.mark.parametrize("abs_after_batch_mean", [False, True])
def test_add_keeps_the_running_total_outside_autograd(abs_after_batch_mean):
    x = torch.randn(3, 4, requires_grad=True)
    acc = ScoreAccumulator(abs_after_batch_mean)
    acc.add(x * 2)
    assert not acc.total.requires_grad
    torch.testing.assert_close(acc.value(), (2 * x.detach()).abs().mean(0) if not abs_after_batch_mean
                               else (2 * x.detach()).mean(0).abs())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("chunk", [None, 2 * 5 * 5 * 5])
def test_mean_activation_and_apoz_read_no_full_size_ones(monkeypatch, dtype, chunk):
    """Their per-example values are bitwise those of the full-size formulas, in one block and in blocks."""
    from prunable import APoZ, MeanActivation

    if chunk is not None:
        monkeypatch.setattr(accumulate, "CHUNK_ELEMENTS", chunk)
    a, _ = _pair((7, 5, 5, 5), dtype, "contiguous")  # 25 positions: torch.sum (few are summed as rows)
    mean, apoz = MeanActivation(), APoZ()
    assert torch.equal(mean.per_example(a, None, 1), taylor_per_example(a.relu(), torch.ones_like(a), 1))
    want = taylor_per_example((a > 0).float(), torch.ones_like(a, dtype=torch.float32), 1)
    assert torch.equal(apoz.per_example(a, None, 1), want)
    assert 0 < float(want.min()) and float(want.max()) < 1  # the fractions are not all 0 or 1


class _ReLUSubclass(nn.ReLU):
    """Not a clamp for the proof (exact types only): it may compute something else."""


class ClampedBN(nn.Module):
    """conv → BN, then ``tail`` changes the BN output ``y`` in place (or not) before the backward."""

    def __init__(self, tail: str) -> None:
        super().__init__()
        self.conv, self.bn, self.head = nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.Linear(4, 3)
        self.act = {"relu": nn.ReLU(inplace=True), "relu6": nn.ReLU6(inplace=True),
                    "hardtanh": nn.Hardtanh(-0.5, 0.5, inplace=True), "leaky": nn.LeakyReLU(0.1, inplace=True),
                    "subclass": _ReLUSubclass(inplace=True), "slice": nn.ReLU(inplace=True),
                    "add_first": nn.ReLU(inplace=True), "functional": nn.Identity(),
                    "read_first": nn.ReLU(inplace=True), "no_grad": nn.ReLU(inplace=True)}[tail]
        self.tail = tail

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.bn(self.conv(x))
        if self.tail == "slice":  # the clamp changes a part of y only
            self.act(y[:, :2])
            out = y
        elif self.tail == "functional":  # in place, but no module to prove it
            out = torch.relu_(y)
        elif self.tail == "read_first":  # another reader before the clamp: its gradient reaches y unclamped
            z = 0.5 * y
            out = self.act(y) + z
        elif self.tail == "no_grad":  # clamped outside autograd: its gradient is not masked
            with torch.no_grad():
                self.act(y)
            out = y * 1.0
        else:
            if self.tail == "add_first":  # another change before the clamp (torchvision's residual sum)
                y += 1.0
            out = self.act(y)
        return self.head(out.mean((2, 3)))


def _clamp_run(tails: list[str], inplace: bool = True):
    """TaylorActivation at the BN of a :class:`ClampedBN` through ``estimating`` with its clamp modules
    watched, one batch per entry of ``tails``; with a separate hook's copies of ``y`` and ``dL/dy``, the
    point's kept-activation state, the clamp hooks left after the block and the batches that warned."""
    from prunable.accumulate import InPlaceClamps
    from prunable.importance import MeasurePoint

    torch.manual_seed(0)
    model = ClampedBN(tails[0])
    model.act.inplace = inplace
    criterion = TaylorActivation()
    point = MeasurePoint("conv", model.bn, 1, model.conv)
    seen, warned = [], []

    def copy_hook(module, inputs, y):
        seen.append([y.detach().clone(), None])
        y.register_hook(lambda g, i=len(seen) - 1: seen[i].__setitem__(1, g.clone()))

    hand = model.bn.register_forward_hook(copy_hook)
    with estimating(criterion, [point], InPlaceClamps.modules(model)):
        for batch, tail in enumerate(tails):
            model.tail = tail
            x, target = torch.randn(6, 3, 5, 5), torch.randint(0, 3, (6,))
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                nn.functional.cross_entropy(model(x), target).backward()
            warned += [batch for w in caught if "changed in place" in str(w.message)]
        (keep,) = criterion.clamps._storage or [None]
    hand.remove()
    hooks_left = sum(len(m._forward_hooks) for m in model.modules())
    return criterion, point, seen, keep, hooks_left, warned


def _taylor(pairs) -> torch.Tensor:
    return torch.cat([(a * g).sum((2, 3)).div(25).abs() for a, g in pairs]).mean(0)


@pytest.mark.parametrize("tail", ["relu", "relu6", "hardtanh"])
def test_an_output_clamped_in_place_by_a_clamp_module_is_read_uncopied_and_exact(tail):
    """After the first batch (copied, to learn), the clamped output itself is read: the clamp's gradient
    is zero wherever it changed a value, so the scores are the unclamped formula's, to the bit of a
    model whose clamp is not in place."""
    criterion, point, seen, keep, hooks_left, warned = _clamp_run([tail] * 3)
    assert keep is not None and keep.clamped and keep.copies is False
    assert keep._spare is None  # no copy buffer kept
    assert any((a < 0).any() for a, _ in seen)  # the clamp did change values
    scores = criterion.scores(point)
    torch.testing.assert_close(scores, _taylor(seen), rtol=1e-5, atol=1e-8)
    assert hooks_left == 0 and warned == []
    criterion, point = _clamp_run([tail] * 3, inplace=False)[:2]
    assert torch.equal(criterion.scores(point), scores)


@pytest.mark.parametrize("tail", ["leaky", "subclass", "slice", "add_first", "functional", "read_first", "no_grad"])
def test_any_other_change_in_place_is_copied(tail):
    """LeakyReLU changes values its gradient passes; a subclass may compute anything; a clamp of a
    part, another change before the clamp, an in-place call without a module, another reader before
    the clamp (its gradient reaches y where the clamp zeroed it), a clamp outside autograd: no proof,
    so the output is copied and the scores are still exact."""
    criterion, point, seen, keep, hooks_left, warned = _clamp_run([tail] * 3)
    assert keep is None or not keep.clamped
    torch.testing.assert_close(criterion.scores(point), _taylor(seen), rtol=1e-5, atol=1e-8)
    assert hooks_left == 0 and warned == []


def test_a_batch_changed_otherwise_after_the_clamp_was_learnt_is_left_out_with_a_warning():
    """A point learnt to be clamped only, whose output a later batch changes another way (here:
    ``+= 1``, then the clamp) is never scored from that output: the batch is left out, with a warning,
    and the point copies from then on."""
    criterion, point, seen, keep, _, warned = _clamp_run(["relu", "relu", "add_first", "add_first", "relu"])
    assert warned == [2]
    torch.testing.assert_close(criterion.scores(point), _taylor([seen[i] for i in (0, 1, 3, 4)]),
                               rtol=1e-5, atol=1e-8)
    assert criterion.accumulators["conv"].count == 24
    assert keep is not None and not keep.clamped and keep.copies


def test_the_pruner_watches_the_clamps_of_its_model_and_scores_as_without_in_place():
    """``Pruner.estimate`` on a torchvision ResNet-18 (in-place ReLUs after every BN and residual sum)
    scores every group to the bit as the same model with no in-place ReLU, and leaves no hook behind."""
    import torchvision

    from prunable import Pruner

    def run(inplace: bool) -> tuple[dict[str, torch.Tensor], int]:
        torch.manual_seed(0)
        model = torchvision.models.resnet18(num_classes=5)
        for m in model.modules():
            if isinstance(m, nn.ReLU):
                m.inplace = inplace
        gen = torch.Generator().manual_seed(1)
        x, y = torch.randn(4, 3, 32, 32, generator=gen), torch.randint(0, 5, (4,), generator=gen)
        pruner = Pruner(model, x[:1], criterion=TaylorActivation())
        with pruner.estimate():
            for _ in range(2):
                model.zero_grad()
                nn.functional.cross_entropy(model(x), y).backward()
            clamped = sum(keep.clamped for keep in pruner.criterion.clamps._storage)
        assert sum(len(m._forward_hooks) for m in model.modules()) == 0
        return pruner.scores(), clamped

    (in_place, clamped), (out_of_place, none) = run(True), run(False)
    assert (clamped, none) == (9, 0)  # every bn1 (8 blocks and the stem) read uncopied; bn2 has `+= identity`
    assert in_place.keys() == out_of_place.keys() and len(in_place) > 5
    for gid in in_place:
        assert torch.equal(in_place[gid], out_of_place[gid]), gid
