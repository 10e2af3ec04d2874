import math

import pytest
import torch
from torch import nn

from prunable import (
    APoZ, Aggregation, BNScale, EstimationError, MeanActivation, Pruner, Random, TaylorActivation,
    TaylorBN, TaylorWeight, WeightNorm,
)
from prunable import accumulate
from prunable.accumulate import ScoreAccumulator, taylor_per_example
from prunable.importance import l2_normalize

from helpers import hand_per_example


def net():
    return nn.Sequential(
        nn.Conv2d(3, 6, 3, padding=1), nn.BatchNorm2d(6), nn.ReLU(),
        nn.Conv2d(6, 4, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 5 * 5, 3),
    )


# seeded here: drawn from the global generator, the data (and any tie between scores) depended on test order
_DATA = torch.Generator().manual_seed(0)
X = torch.randn(8, 3, 5, 5, generator=_DATA)
Y = torch.randint(0, 3, (8,), generator=_DATA)


def _run(pruner, model, batches=2):
    with pruner.estimate():
        for i in range(batches):
            nn.functional.cross_entropy(model(X[i::batches]), Y[i::batches]).backward()


def test_accumulator_two_batches_equal_combined():
    a, g = torch.randn(6, 3, 4, 4), torch.randn(6, 3, 4, 4)
    split, whole = ScoreAccumulator(), ScoreAccumulator()
    split.add(taylor_per_example(a[:2], g[:2]))
    split.add(taylor_per_example(a[2:], g[2:]))
    whole.add(taylor_per_example(a, g))
    torch.testing.assert_close(split.value(), whole.value())
    seed = ScoreAccumulator(abs_after_batch_mean=True)
    seed.add(taylor_per_example(a, g))
    torch.testing.assert_close(seed.value(), (a * g).mean((2, 3)).mean(0).abs())


@pytest.mark.parametrize("shape, dim, dtype, channels_last", [
    ((7, 5, 3, 3), 1, torch.float32, False), ((7, 5, 3, 3), 1, torch.float32, True),
    ((7, 9, 6), -1, torch.float32, False), ((7, 4, 6), 1, torch.bfloat16, False),
])
def test_taylor_per_example_in_blocks_equals_the_mean_of_the_product(monkeypatch, shape, dim, dtype, channels_last):
    gen = torch.Generator().manual_seed(0)
    a, g = (torch.randn(shape, generator=gen).to(dtype) for _ in range(2))
    if channels_last:
        a = a.to(memory_format=torch.channels_last)
    want = (a.float() * g.float()).movedim(dim, 1).flatten(2).mean(2)
    torch.testing.assert_close(taylor_per_example(a, g, dim), want)  # one block
    # blocks of two examples (one thread) and of three (three threads: a block per thread count), the last short
    monkeypatch.setattr(accumulate, "CHUNK_ELEMENTS", math.prod(shape[1:]))
    for threads in (2, 3):
        monkeypatch.setattr(torch, "get_num_threads", lambda threads=threads: threads)
        torch.testing.assert_close(taylor_per_example(a, g, dim), want)


def test_l2_normalize_guards_zero():
    assert torch.equal(l2_normalize(torch.zeros(3)), torch.zeros(3))
    torch.testing.assert_close(l2_normalize(torch.tensor([3.0, 4.0])), torch.tensor([0.6, 0.8]))
    torch.testing.assert_close(l2_normalize(torch.tensor([1e-3, 0.0])), torch.tensor([1.0, 0.0]))


@pytest.mark.parametrize("criterion", [
    TaylorActivation(), TaylorActivation(abs_after_batch_mean=True), TaylorBN(), TaylorWeight(),
    WeightNorm(1), WeightNorm(2), BNScale(), MeanActivation(), APoZ(), Random(seed=3),
])
def test_every_criterion_scores_and_prunes(criterion):
    model = net()
    pruner = Pruner(model, X, criterion=criterion)
    _run(pruner, model)
    scores = pruner.scores()
    assert set(scores) == {"0", "3"}
    assert all(torch.isfinite(s).all() and s.shape == (g.channels,) for g, s in zip(pruner.groups, scores.values()))
    pruner.step(2)
    assert model(X).shape == (8, 3)
    assert not any(m._forward_hooks for m in model.modules())


def test_weight_norm_and_bn_scale_values():
    model = net()
    pruner = Pruner(model, X, criterion=WeightNorm(2))
    point = pruner._points["1"]
    torch.testing.assert_close(pruner.criterion.scores(point), model[0].weight.detach().flatten(1).norm(dim=1))
    with torch.no_grad():
        model[1].weight.copy_(torch.tensor([1.0, -5.0, 0.1, 2.0, 3.0, 4.0]))
    assert Pruner(model, X, criterion=BNScale()).plan(1).removals == {"0": (2,)}


def test_random_is_seeded():
    a = Pruner(net(), X, criterion=Random(seed=1)).plan(3)
    b = Pruner(net(), X, criterion=Random(seed=1)).plan(3)
    assert a == b


def test_step_without_backward_is_a_clear_error():
    model = net()
    pruner = Pruner(model, X)
    with pruner.estimate():
        model(X)  # forward only
    with pytest.raises(EstimationError, match="backward"):
        pruner.step(1)


def test_nan_scores_name_the_group():
    model = net()
    pruner = Pruner(model, X, criterion=TaylorActivation())
    _run(pruner, model)
    pruner.criterion.accumulators["4" if "4" in pruner.criterion.accumulators else "3"].total[0] = float("nan")
    with pytest.raises(EstimationError, match="group 3"):
        pruner.scores()


def test_hooks_removed_on_exception():
    model = net()
    pruner = Pruner(model, X)
    with pytest.raises(RuntimeError, match="boom"):
        with pruner.estimate():
            raise RuntimeError("boom")
    assert not any(m._forward_hooks for m in model.modules())


class Residual(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(3, 4, 1)
        self.b = nn.Conv2d(3, 4, 1)
        self.head = nn.Conv2d(4, 2, 1)

    def forward(self, x):
        return self.head(self.a(x) + self.b(x))


@pytest.mark.parametrize("how", list(Aggregation))
def test_group_aggregation(how):
    model = Residual()
    with torch.no_grad():
        model.a.weight.copy_(torch.tensor([1.0, 2.0, 3.0, 4.0]).view(4, 1, 1, 1).expand(4, 3, 1, 1))
        model.b.weight.copy_(torch.tensor([4.0, 3.0, 2.0, 1.0]).view(4, 1, 1, 1).expand(4, 3, 1, 1))
    pruner = Pruner(model, X, criterion=WeightNorm(), aggregation=how)
    a = torch.tensor([1.0, 2.0, 3.0, 4.0]) / math.sqrt(30)  # L1 norms of a's filters (×3), L2-normalised
    b = a.flip(0)
    expected = {Aggregation.SUM: a + b, Aggregation.MEAN: (a + b) / 2, Aggregation.MAX: torch.maximum(a, b)}[how]
    torch.testing.assert_close(pruner.scores()["a"], expected)


def test_flops_regularization_subtracts_lambda_times_mflops():
    model = nn.Sequential(nn.Conv2d(3, 4, 1), nn.ReLU(), nn.Conv2d(4, 4, 5, padding=2), nn.ReLU(), nn.Conv2d(4, 2, 1))
    plain = Pruner(model, X, criterion=WeightNorm()).scores()
    reg = Pruner(model, X, criterion=WeightNorm(), flops_regularization=1e-3).scores()
    n, hw = X.shape[0], 25
    conv0_out = 2 * n * hw * 3  # FLOPs per output channel of the 1x1 conv
    conv2_io = 2 * n * hw * 4 * 25  # per input (or output) channel of the 5x5 conv
    conv4_in = 2 * n * hw * 2
    torch.testing.assert_close(plain["0"] - reg["0"], torch.full((4,), 1e-3 * (conv0_out + conv2_io) / 1e6 / n))
    torch.testing.assert_close(plain["2"] - reg["2"], torch.full((4,), 1e-3 * (conv2_io + conv4_in) / 1e6 / n))
    on = Pruner(model, X, criterion=WeightNorm(), flops_regularization=True)
    assert on.flops_regularization == 1e-3


@pytest.mark.parametrize("criterion", [TaylorBN, TaylorWeight])
def test_parameter_criteria_keep_estimating_after_each_prune(criterion):
    """Regression: gradient hooks on pruned parameters used to stay silent after the first prune."""
    torch.manual_seed(0)
    model = net()
    pruner = Pruner(model, X, criterion=criterion())
    for _ in range(3):
        _run(pruner, model)
        scores = pruner.scores()
        assert all(s.abs().sum() > 0 for s in scores.values())
        pruner.step(1)


# -- every criterion against a hand formula, with mixed-sign a·g ---------------------------------------
BATCHES = [(X[0::2], Y[0::2]), (X[1::2], Y[1::2])]


def _capture(model):
    """Forward hooks keeping the BN output ('0') and the second conv's output ('3') with their grads."""
    seen = {"0": [], "3": []}

    def hook(key):
        def keep(module, inputs, output):
            output.retain_grad()
            seen[key].append(output)
        return keep

    model[1].register_forward_hook(hook("0"))
    model[3].register_forward_hook(hook("3"))
    return seen


def _hand_run(criterion):
    """Two cross-entropy batches (random targets) inside estimate(); what a hand formula needs.

    Returns the pruner, the model, the activations/gradients seen per group and, per backward,
    ``{param name: (value, gradient)}`` of every parameter.
    """
    torch.manual_seed(0)
    model = net()
    with torch.no_grad():  # γ of both signs, β away from zero: every term of every formula matters
        gamma = torch.tensor([1.0, -0.5, 0.7, -1.2, 0.3, 2.0])
        model[1].weight.copy_(gamma)
        # y = γ·x̂ + β is positive where x̂ > -β/γ (γ > 0) or x̂ < -β/γ (γ < 0): thresholds chosen so the
        # six channels' positive fractions lie about 0.12 apart (≈ 3 std of a fraction over 200 values),
        # and APoZ's scores (multiples of 1/200) cannot tie
        threshold = torch.tensor([-0.9, 0.5, -0.15, -0.55, 0.2, 0.85])  # fractions ≈ .82 .69 .56 .29 .42 .20
        model[1].bias.copy_(-threshold * gamma)
    pruner = Pruner(model, X, criterion=criterion)
    seen, grads = _capture(model), []
    with pruner.estimate():
        for x, y in BATCHES:
            model.zero_grad()
            nn.functional.cross_entropy(model(x), y).backward()
            grads.append({n: (p.detach().clone(), p.grad.clone()) for n, p in model.named_parameters()})
    pairs = {k: [(o.detach(), o.grad) for o in v] for k, v in seen.items()}
    return pruner, model, pairs, grads


def _normalized(values):
    """Hand L2 normalisation: ``v / sqrt(sum v²)``."""
    return values / math.sqrt(sum(float(v) ** 2 for v in values))


def _assert_mixed_signs(pairs):
    """The test only bites if some per-example products are negative (else abs is a no-op)."""
    for key, batches in pairs.items():
        products = torch.cat([hand_per_example(a, g) for a, g in batches])
        assert (products < 0).any() and (products > 0).any(), f"{key}: a·g of one sign only"


def _taylor_2017(batches):
    return torch.cat([hand_per_example(a, g).abs() for a, g in batches]).mean(0)


def _taylor_seed(batches):
    total = sum(hand_per_example(a, g).mean(0).abs() * len(a) for a, g in batches)
    return total / sum(len(a) for a, _ in batches)


def _param_taylor(grads, names):
    """Molchanov 2019 per backward: ``(Σ w·g)²`` per output channel of each named tensor, summed
    over the tensors, then averaged over backward passes."""
    total = 0
    for step in grads:
        for name in names:
            w, g = step[name]
            total = total + (w * g).reshape(len(w), -1).sum(1) ** 2
    return total / len(grads)


def _mean_relu(batches):
    """Mean over examples and positions of ``relu(a)``; the BN output has negative values too."""
    assert all((a < 0).any() for a, _ in batches)
    return torch.cat([a.clamp(min=0).mean((2, 3)) for a, _ in batches]).mean(0)


def _positive_fraction(batches):
    return torch.cat([(a > 0).float().mean((2, 3)) for a, _ in batches]).mean(0)


def _l1_rows(conv):
    return conv.weight.detach().abs().sum((1, 2, 3))


def _l2_rows(conv):
    return conv.weight.detach().pow(2).sum((1, 2, 3)).sqrt()


HAND = {
    "taylor": (TaylorActivation, lambda m, p, g: {k: _taylor_2017(p[k]) for k in p}),
    "taylor-seed": (lambda: TaylorActivation(abs_after_batch_mean=True),
                    lambda m, p, g: {k: _taylor_seed(p[k]) for k in p}),
    "taylor-weight": (TaylorWeight, lambda m, p, g: {
        "0": _param_taylor(g, ["0.weight", "0.bias"]) + _param_taylor(g, ["1.weight", "1.bias"]),
        "3": _param_taylor(g, ["3.weight", "3.bias"])}),
    "taylor-bn": (TaylorBN, lambda m, p, g: {
        "0": _param_taylor(g, ["1.weight", "1.bias"]), "3": _param_taylor(g, ["3.weight", "3.bias"])}),
    "l1": (lambda: WeightNorm(1), lambda m, p, g: {"0": _l1_rows(m[0]), "3": _l1_rows(m[3])}),
    "l2": (lambda: WeightNorm(2), lambda m, p, g: {"0": _l2_rows(m[0]), "3": _l2_rows(m[3])}),
    "bn-scale": (BNScale, lambda m, p, g: {"0": torch.tensor([1.0, 0.5, 0.7, 1.2, 0.3, 2.0]), "3": _l1_rows(m[3])}),
    "mean-activation": (MeanActivation, lambda m, p, g: {k: _mean_relu(p[k]) for k in p}),
    "apoz": (APoZ, lambda m, p, g: {k: _positive_fraction(p[k]) for k in p}),
}


@pytest.mark.parametrize("name", sorted(HAND))
def test_criterion_matches_hand_formula(name):
    """Pruner.scores() = the criterion's formula written out by hand, L2-normalised per layer."""
    make, formula = HAND[name]
    pruner, model, pairs, grads = _hand_run(make())
    _assert_mixed_signs(pairs)
    expected = formula(model, pairs, grads)
    scores = pruner.scores()
    assert set(scores) == {"0", "3"}
    for gid, values in expected.items():
        assert len(set(values.tolist())) == len(values), f"{name}/{gid}: ties would hide a permutation"
        torch.testing.assert_close(scores[gid], _normalized(values), rtol=1e-4, atol=1e-6, msg=f"{name} {gid}")


def test_random_criterion_draws_from_its_seeded_generator_in_group_order():
    scores = Pruner(net(), X, criterion=Random(seed=3)).scores()
    generator = torch.Generator().manual_seed(3)
    expected = {"0": torch.rand(6, generator=generator), "3": torch.rand(4, generator=generator)}
    for gid, values in expected.items():
        torch.testing.assert_close(scores[gid], values)  # Random is not normalised


class InPlaceResidual(nn.Module):
    """torchvision's residual tail: the BN output is changed in place (``+= identity``, ``relu_``)
    after the layer, before the backward pass reads it; ``branch`` takes the in-place path or not."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 4, 3, padding=1)
        self.conv = nn.Conv2d(4, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)
        self.head = nn.Linear(4, 3)
        self.in_place = True

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s = self.stem(x)
        out = self.bn(self.conv(s))
        if self.in_place:
            out += s
            out = torch.relu_(out)
        else:
            out = torch.relu(out + s)
        return self.head(out.mean((2, 3)))


def _in_place_run(paths: list[bool]):
    """TaylorActivation at the BN of :class:`InPlaceResidual` over one batch per entry of ``paths``,
    and the BN outputs and their gradients ``dL/dy`` seen by a separate hook that copies ``y``."""
    from prunable.importance import MeasurePoint

    torch.manual_seed(0)
    model = InPlaceResidual()
    criterion = TaylorActivation()
    point = MeasurePoint("conv", model.bn, 1, model.conv)
    handles = criterion.attach([point])
    seen = []

    def copy_hook(module, inputs, y):
        seen.append([y.detach().clone(), None])
        y.register_hook(lambda g, i=len(seen) - 1: seen[i].__setitem__(1, g.clone()))

    hand = model.bn.register_forward_hook(copy_hook)
    for in_place in paths:
        model.in_place = in_place
        x, target = torch.randn(6, 3, 5, 5), torch.randint(0, 3, (6,))
        nn.functional.cross_entropy(model(x), target).backward()
    hand.remove()
    for handle in handles:
        handle.remove()
    return criterion.scores(point), seen


def test_taylor_reads_the_activation_as_the_layer_produced_it_when_the_model_changes_it_in_place():
    scores, seen = _in_place_run([True, True, False, True])
    assert not torch.equal(seen[0][0], torch.relu(seen[0][0]))  # y has negative values the ReLU changes
    torch.testing.assert_close(scores, _taylor_2017([tuple(s) for s in seen]), rtol=1e-5, atol=1e-8)


def test_a_batch_changed_in_place_on_an_uncopied_path_is_left_out_with_a_warning():
    with pytest.warns(UserWarning, match="changed in place after the layer in this batch only"):
        scores, seen = _in_place_run([False, True, True])
    # batch 2 is left out; batch 3 is copied (the point copies from then on)
    torch.testing.assert_close(scores, _taylor_2017([tuple(seen[0]), tuple(seen[2])]), rtol=1e-5, atol=1e-8)


def test_a_scored_copy_is_reused_for_the_next_batch_and_never_read_by_an_older_one():
    from prunable.accumulate import KeptActivation

    keep = KeptActivation("bn")
    y1 = torch.arange(6.0).view(2, 3)
    first = keep.hold(y1)
    y1.zero_()  # changed in place after the layer: the copy still holds the output
    assert keep.use(first).sum() == 15
    keep.release(first)
    second = keep.hold(torch.ones(2, 3))
    assert second.kept.data_ptr() == first.kept.data_ptr()  # the same buffer, no new memory
    assert keep.use(second).sum() == 6
    with pytest.warns(UserWarning, match="reused by a later forward pass"):
        assert keep.use(first) is None  # a retained graph run backward again: its copy was overwritten
    third = keep.hold(torch.ones(3, 3))  # another shape: a new copy
    assert third.kept.data_ptr() != second.kept.data_ptr() and keep.use(third).sum() == 9


def test_taylor_over_a_retained_graph_run_backward_twice_counts_the_batch_twice():
    from prunable.importance import MeasurePoint

    torch.manual_seed(0)
    model = InPlaceResidual()
    point = MeasurePoint("conv", model.bn, 1, model.conv)
    criterion = TaylorActivation()
    handles = criterion.attach([point])
    x, target = torch.randn(6, 3, 5, 5), torch.randint(0, 3, (6,))
    loss = nn.functional.cross_entropy(model(x), target)
    loss.backward(retain_graph=True)
    once = criterion.scores(point).clone()
    loss.backward()
    for handle in handles:
        handle.remove()
    assert criterion.accumulators["conv"].count == 12
    torch.testing.assert_close(criterion.scores(point), once)


@pytest.mark.parametrize("shape", [(7, 5), (9, 3, 2, 2), (1, 40), (12, 1)])
def test_l1_norm_in_blocks_of_rows_equals_the_sum_of_abs(monkeypatch, shape):
    from prunable import importance
    from prunable.importance import MeasurePoint

    monkeypatch.setattr(importance, "L1_BLOCK", 8)  # a few rows per block, the last one short
    w = torch.randn(shape, generator=torch.Generator().manual_seed(0)).reshape(shape[0], -1)
    assert torch.allclose(importance.l1_rows(w), w.abs().sum(1), rtol=1e-6, atol=0)
    conv = nn.Conv2d(3, 9, 2)
    monkeypatch.setattr(importance, "L1_BLOCK", 13)
    point = MeasurePoint("c", conv, 1, conv)
    assert torch.allclose(WeightNorm(1).scores(point), _l1_rows(conv), rtol=1e-6, atol=0)


def test_an_estimate_left_open_at_interpreter_exit_ends_quietly(tmp_path):
    """A script that exits inside ``with pruner.estimate():`` (the block never left) must not print
    an "Exception ignored" traceback when Python shuts down and the estimate is finalised."""
    import subprocess
    import sys

    script = tmp_path / "left_open.py"
    script.write_text(
        "import torch\n"
        "from prunable import Pruner\n"
        "model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4), torch.nn.ReLU(),\n"
        "                            torch.nn.Conv2d(4, 2, 3))\n"
        "pruner = Pruner(model, torch.randn(1, 3, 8, 8))\n"
        "block = pruner.estimate()\n"
        "block.__enter__()\n"
        "model(torch.randn(2, 3, 8, 8)).sum().backward()\n"
        "print('done')\n")
    run = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=120)
    assert run.returncode == 0 and run.stdout.strip() == "done", run.stderr
    assert "Exception ignored" not in run.stderr and "Traceback" not in run.stderr, run.stderr
