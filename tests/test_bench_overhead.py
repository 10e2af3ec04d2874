"""bench/overhead.py: round-by-round paired ratios with a bootstrap interval, shuffled rounds, pinned threads."""

from __future__ import annotations

import statistics

import pytest
import torch


@pytest.fixture()
def overhead(bench_script):
    return bench_script("overhead")


def test_the_ratio_pairs_steps_of_the_same_round(overhead):
    # the load changes 16-fold between rounds; ours is 1.5× plain within every round
    plain = [1.0, 2.0, 4.0, 8.0, 16.0]
    ours = [1.5 * p for p in plain]
    assert overhead.paired_ratio(ours, plain) == (1.5, 1.5, 1.5)
    assert overhead.paired_ratio(ours, plain[1:] + plain[:1])[0] == 0.75  # paired with the wrong rounds


def test_the_interval_is_a_bootstrap_interval_of_the_median(overhead):
    ratios = [1.0, 1.01, 1.02, 1.03, 1.04, 1.05, 1.06, 1.07, 1.08, 1.2, 0.8]
    mid, low, high = overhead.paired_ratio(ratios, [1.0] * len(ratios))
    assert mid == statistics.median(ratios)
    assert min(ratios) <= low < mid < high <= max(ratios)
    assert (low, high) != (min(ratios), max(ratios))  # narrower than the range: outliers barely move it
    assert overhead.paired_ratio(ratios, [1.0] * len(ratios)) == (mid, low, high)  # seeded
    assert overhead.fmt_paired(ratios, [1.0] * len(ratios)) == f"{mid:.2f}× ({low:.2f}–{high:.2f})"
    assert overhead.fmt_paired([], []) == "—"


def test_rounds_are_shuffled_and_timed_on_one_thread_then_two(overhead, monkeypatch):
    calls: list[tuple[str, int]] = []

    class FakeSetup:
        def __init__(self, config, model):
            self.config, self.finish = config, lambda: None
            self.context = overhead.contextlib.ExitStack()

        def step(self):
            calls.append((self.config, torch.get_num_threads()))

    monkeypatch.setattr(overhead, "Setup", FakeSetup)
    assert overhead.THREAD_COUNTS == (1, 2)
    threads = torch.get_num_threads()
    torch.set_num_threads(3)
    try:
        out = overhead.time_configs(warmup=1, rounds=6)
        assert torch.get_num_threads() == 3  # restored
    finally:
        torch.set_num_threads(threads)
    n = len(overhead.TIMED)
    timed = calls[2 * n:]  # after one warm-up step of each on each thread count
    groups = [timed[i:i + n] for i in range(0, len(timed), n)]
    assert [{t for _, t in g} for g in groups] == [{1}, {2}] * 6
    assert all(sorted(c for c, _ in g) == sorted(overhead.TIMED) for g in groups)
    assert len({tuple(c for c, _ in g) for g in groups}) > 1  # the order changes
    for c in overhead.TIMED:
        assert all(len(out[c]["steps"][t].cpu) == len(out[c]["steps"][t].wall) == 6 for t in (1, 2))


def test_the_goal_is_met_only_when_the_whole_interval_lies_below_it(overhead):
    below = [1.01, 1.02, 1.015, 1.012, 1.018]
    assert overhead.verdict(below, [1.0] * 5).endswith("goal is met")
    touching = below + [1.04, 1.05, 1.045]  # the median still below 1.03, the interval not
    mid, low, high = overhead.paired_ratio(touching, [1.0] * 8)
    assert mid < overhead.GOAL <= high
    assert "not shown to be met" in overhead.verdict(touching, [1.0] * 8)
    assert f"{high:.3f}" in overhead.verdict(touching, [1.0] * 8)
