import copy

import pytest
import torch

from prunable import CharNet, EstimationError, vgg


def _train_step(net, x, y, opt=None):
    loss = torch.nn.functional.cross_entropy(net(x), y)
    loss.backward()
    if opt:
        opt.step()
        opt.zero_grad()


@pytest.mark.parametrize("make", [
    lambda: CharNet(7, config=[8, "M", 12, "M", 16, "M"], input_size=24, hidden=32),
    lambda: vgg([8, "M", 16, "M"], 7, input_size=16, hidden=24, in_channels=1),
    lambda: vgg([8, "M", 16, "M"], 7, batch_norm=False, input_size=16, hidden=24, in_channels=1),
])
def test_repeated_prune_keeps_forward_working(make):
    net = make()
    size = 24 if isinstance(net, CharNet) else 16
    x, y = torch.randn(8, 1, size, size), torch.randint(0, 7, (8,))
    opt = torch.optim.SGD(net.parameters(), lr=0.01, momentum=0.9)
    before = sum(p.numel() for p in net.parameters())
    net.pruning(True)
    for _ in range(20):
        _train_step(net, x, y, opt)
        net.prune(optimizer=opt)
        net.reset_estimates()
    net.pruning(False)
    assert net(x).shape == (8, 7)
    assert sum(p.numel() for p in net.parameters()) < before
    convs = [m for m in net.prunable_layers()]
    widths = [m.weight.shape[0] for m in convs]
    assert sum(widths) == sum([8, 12, 16, 32] if isinstance(net, CharNet) else [8, 16, 24]) - 20


def test_prune_removes_globally_least_important_and_matches_zeroed_copy():
    net = CharNet(5, config=[6, "M", 8, "M"], input_size=12, hidden=10)
    x, y = torch.randn(6, 1, 12, 12), torch.randint(0, 5, (6,))
    outputs = {}

    def keep(module, inputs, output):
        output.retain_grad()
        outputs[module.pruning_name] = output

    for m in net.prunable_layers():
        m.register_forward_hook(keep)
    with net.pruning(True):
        _train_step(net, x, y)
    scores = {n: _hand_normalized_taylor(o.detach(), o.grad) for n, o in outputs.items()}
    assert len(scores) == 3
    name, index = min(((n, int(s.argmin())) for n, s in scores.items()), key=lambda t: scores[t[0]][t[1]])
    net.eval()
    zeroed = copy.deepcopy(net)
    layer = dict(zeroed.named_modules())[name]
    bn = dict(zeroed.named_modules())[_next_bn(name)]
    with torch.no_grad():
        layer.weight[index] = 0
        bn.weight[index] = 0
        bn.bias[index] = 0
        bn.running_mean[index] = 0
    assert net.prune() == (name, index)
    torch.testing.assert_close(net(x), zeroed(x), atol=1e-5, rtol=1e-5)


def _hand_normalized_taylor(a, g):
    """Eq. 8 by hand (|per-example mean over positions of a·g|, mean over examples), divided by its L2 norm."""
    n, c = a.shape[:2]
    per_channel = [sum(abs(float((a[i, k] * g[i, k]).mean())) for i in range(n)) / n for k in range(c)]
    norm = sum(v * v for v in per_channel) ** 0.5
    return torch.tensor([v / norm for v in per_channel])


def _next_bn(name):
    prefix, idx = name.rsplit(".", 1)
    return f"{prefix}.{int(idx) + 1}"


def test_prune_without_estimates_raises():
    net = vgg([4, "M"], 3, input_size=8)
    with pytest.raises(EstimationError, match="no Taylor estimates"):
        net.prune()


def test_charnet_default_config_shapes():
    net = CharNet(46, input_size=48)
    net.eval()
    assert net(torch.randn(1, 1, 48, 48)).shape == (1, 46)
    assert [m.out_channels for m in net.features if hasattr(m, "out_channels")] == [96, 128, 160, 256, 256, 384, 384]
