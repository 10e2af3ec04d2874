"""Mixed precision: overflowed backwards are skipped like GradScaler skips the step; scores are fp32."""

import warnings

import pytest
import torch
from torch import nn

from prunable import EstimationError, MeanActivation, Pruner, TaylorActivation, TaylorBN, TaylorWeight


def net(dtype=torch.float32):
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 6, 3, padding=1), nn.BatchNorm2d(6), nn.ReLU(),
        nn.Conv2d(6, 5, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(5 * 5 * 5, 3),
    ).to(dtype)


torch.manual_seed(1)
BATCHES = [(torch.randn(4, 3, 5, 5), torch.randint(0, 3, (4,))) for _ in range(3)]
CRITERIA = [TaylorActivation, lambda: TaylorActivation(abs_after_batch_mean=True), TaylorWeight, TaylorBN]


def _scores(make_criterion, batches, bad=None):
    """Scores after ``batches``; batch ``bad`` gets its gradients scaled to inf (an overflow)."""
    model = net()
    pruner = Pruner(model, BATCHES[0][0], criterion=make_criterion())
    with pruner.estimate():
        for i in batches:
            x, y = BATCHES[i]
            loss = nn.functional.cross_entropy(model(x), y)
            (loss * float("inf") if i == bad else loss).backward()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        scores = pruner.scores()
    return pruner, scores, [str(w.message) for w in caught]


@pytest.mark.parametrize("make_criterion", CRITERIA)
def test_overflowed_backward_is_skipped(make_criterion):
    pruner, with_bad, messages = _scores(make_criterion, [0, 1, 2], bad=1)
    _, without, quiet = _scores(make_criterion, [0, 2])
    assert with_bad.keys() == without.keys()
    for gid in with_bad:
        torch.testing.assert_close(with_bad[gid], without[gid], rtol=1e-6, atol=0)
    assert pruner.criterion.skipped() and set(pruner.criterion.skipped().values()) == {1}
    assert len(messages) == 1 and "non-finite" in messages[0]  # reported once, not per layer
    assert not quiet
    assert pruner.plan(3) == _scores(make_criterion, [0, 2])[0].plan(3)
    pruner.step(3)


def test_partly_overflowed_backward_is_skipped_whole_for_parameter_criteria():
    """A non-finite gradient in one parameter (BN bias) drops that backward's terms of the
    conv weight and BN weight too: the layer's scores equal those without the batch."""
    results = []
    for poison in (True, False):
        model = net()
        pruner = Pruner(model, BATCHES[0][0], criterion=TaylorWeight())
        for i in (0, 1, 2):
            if i == 1 and not poison:
                continue
            # registered before estimate(): runs before the criterion's hook and feeds it
            handle = model[1].bias.register_hook(lambda g: g * float("inf")) if i == 1 else None
            with pruner.estimate():
                x, y = BATCHES[i]
                nn.functional.cross_entropy(model(x), y).backward()
            if handle:
                handle.remove()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            results.append(pruner.criterion.scores(pruner._points["1"]))
    torch.testing.assert_close(results[0], results[1], rtol=1e-6, atol=0)


def test_every_batch_overflowed_is_a_clear_error():
    model = net()
    pruner = Pruner(model, BATCHES[0][0])
    with pruner.estimate():
        x, y = BATCHES[0]
        (nn.functional.cross_entropy(model(x), y) * float("inf")).backward()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(EstimationError, match="non-finite"):
            pruner.step(1)


@pytest.mark.parametrize("make_criterion", [TaylorActivation, TaylorWeight, MeanActivation])
def test_half_model_scores_in_float32(make_criterion):
    """A pure bfloat16 model: the accumulators hold float32 sums of float32 products."""
    model = net(torch.bfloat16)
    pruner = Pruner(model, BATCHES[0][0].bfloat16(), criterion=make_criterion())
    captured = {}
    model[1].register_forward_hook(lambda m, i, o: o.retain_grad() or captured.setdefault("a", o))
    with pruner.estimate():
        x, y = BATCHES[0]
        nn.functional.cross_entropy(model(x.bfloat16()).float(), y).backward()
    acc = pruner.criterion.accumulators["1"]
    assert acc.total.dtype == torch.float32
    a = captured["a"].detach().float()
    if isinstance(pruner.criterion, TaylorWeight):
        conv, bn = model[0], model[1]
        expected = sum((p.detach().float() * p.grad.float()).reshape(6, -1).sum(1).pow(2)
                       for p in (conv.weight, conv.bias))
        expected = expected + sum((p.detach().float() * p.grad.float()).pow(2) for p in (bn.weight, bn.bias))
    elif isinstance(pruner.criterion, TaylorActivation):
        expected = (a * captured["a"].grad.float()).mean((2, 3)).abs().mean(0)
    else:
        expected = a.relu().mean((2, 3)).mean(0)
    torch.testing.assert_close(pruner.criterion.scores(pruner._points["1"]), expected, rtol=1e-6, atol=1e-12)
    assert all(s.dtype == torch.float32 for s in pruner.scores().values())


def test_grad_scaler_overflow_on_cpu():
    """fp16 autocast + GradScaler with a scale that overflows: the scaler skips the step,
    the accumulators skip the batch, and the next step prunes."""
    model = net()
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 40)
    pruner = Pruner(model, BATCHES[0][0], optimizer=opt)
    overflows = 0
    with pruner.estimate():
        for x, y in BATCHES * 10:
            with torch.autocast("cpu", dtype=torch.float16):
                loss = nn.functional.cross_entropy(model(x), y)
            scaler.scale(loss).backward()
            scaler.step(opt)
            before = scaler.get_scale()
            scaler.update()
            overflows += scaler.get_scale() < before
            opt.zero_grad()
    assert scaler.get_scale() < 2.0 ** 40  # the scaler saw overflows and skipped those steps
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        skipped = pruner.criterion.skipped()
        assert 0 < max(skipped.values()) <= overflows
        pruner.step(2)
    assert model(BATCHES[0][0]).shape == (4, 3)
