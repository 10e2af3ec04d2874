"""The accumulation machinery's fast paths compute what the plain formulas compute."""

import math

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
])
def test_blocks_in_a_scratch_are_bitwise_the_fresh_blocks(monkeypatch, shape, dim, dtype, layout):
    """At every block size a reused scratch gives the bits of fresh blocks; with contiguous inputs
    every block size gives the bits of the float32 product summed in one block (bfloat16 widened
    before multiplying, never rounded to bfloat16 first)."""
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
            assert torch.equal(fresh, want)
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


def test_criterion_frees_its_scratch_with_its_hooks(monkeypatch):
    monkeypatch.setattr(accumulate, "CHUNK_ELEMENTS", 4 * 5 * 5)  # blocks: the scratch is used
    conv = nn.Conv2d(3, 4, 3, padding=1)
    criterion = TaylorActivation()
    with estimating(criterion, [MeasurePoint("conv", conv, 1, conv)]):
        conv(torch.randn(6, 3, 5, 5)).square().sum().backward()
        assert criterion.scratch._free
    assert not criterion.scratch._free
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
@pytest.mark.parametrize("chunk", [None, 2 * 5 * 3 * 3])
def test_mean_activation_and_apoz_read_no_full_size_ones(monkeypatch, dtype, chunk):
    """Their per-example values are bitwise those of the full-size formulas, in one block and in blocks."""
    from prunable import APoZ, MeanActivation

    if chunk is not None:
        monkeypatch.setattr(accumulate, "CHUNK_ELEMENTS", chunk)
    a, _ = _pair((7, 5, 3, 3), dtype, "contiguous")
    mean, apoz = MeanActivation(), APoZ()
    assert torch.equal(mean.per_example(a, None, 1), taylor_per_example(a.relu(), torch.ones_like(a), 1))
    want = taylor_per_example((a > 0).float(), torch.ones_like(a, dtype=torch.float32), 1)
    assert torch.equal(apoz.per_example(a, None, 1), want)
    assert 0 < float(want.min()) and float(want.max()) < 1  # the fractions are not all 0 or 1
