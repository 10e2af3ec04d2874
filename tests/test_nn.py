import contextlib
import copy
import gc
import math

import pytest
import torch
from torch import nn

from prunable import PBatchNorm1d, PBatchNorm2d, PConv2d, PLinear, PruningValueError, convert
from prunable.surgery import Cut, Role, apply_cuts, keep_indices
from conftest import assert_state_equal, state_copy
from helpers import hand_per_example


def _seed_net():
    """PConv2d → ReLU → flatten → PLinear → ReLU → PLinear: both seed layer types, logits last."""
    return nn.Sequential(PConv2d(2, 3, 3, padding=1), nn.ReLU(), nn.Flatten(), PLinear(3 * 5 * 5, 6), nn.ReLU(),
                         PLinear(6, 4))


def _cross_entropy_batches(net, layers, batches):
    """Cross-entropy with random targets on ``batches``; each layer's (output, grad) per batch."""
    seen = {id(m): [] for m in layers}

    def keep(module, inputs, output):
        output.retain_grad()
        seen[id(module)].append(output)

    for m in layers:
        m.register_forward_hook(keep)
    with contextlib.ExitStack() as stack:
        for m in layers:
            stack.enter_context(m.pruning(True))
        for x, y in batches:
            nn.functional.cross_entropy(net(x), y).backward()
    return {key: [(o.detach(), o.grad) for o in outs] for key, outs in seen.items()}


@pytest.mark.parametrize("which", [0, 3, 5])
def test_taylor_matches_hand_computation_with_mixed_signs(which):
    """Eq. 8 by hand on each seed layer: |per-example spatial mean of a·g|, averaged over all examples."""
    net = _seed_net()
    layer = net[which]
    batches = [(torch.randn(4, 2, 5, 5), torch.randint(0, 4, (4,))) for _ in range(2)]
    pairs = _cross_entropy_batches(net, [layer], batches)[id(layer)]
    per_example = torch.cat([hand_per_example(a, g) for a, g in pairs])
    assert (per_example < 0).any() and (per_example > 0).any(), "a·g of one sign: abs would not matter"
    expected = per_example.abs().mean(0)
    assert len(set(expected.tolist())) == len(expected)
    torch.testing.assert_close(layer.taylor_estimates, expected, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(layer.normalized_estimates(), expected / math.sqrt(float((expected ** 2).sum())))


def test_two_batches_accumulate_like_combined_batch():
    torch.manual_seed(1)
    layer = PLinear(6, 4)
    twin = copy.deepcopy(layer)
    x = torch.randn(10, 6)
    with layer.pruning(True):
        layer(x[:3]).sin().sum().backward()
        layer(x[3:]).sin().sum().backward()
    with twin.pruning(True):
        twin(x).sin().sum().backward()
    torch.testing.assert_close(layer.taylor_estimates, twin.taylor_estimates, rtol=1e-5, atol=1e-8)
    assert layer.taylor_estimates.abs().sum() > 0


def test_reset_and_normalized_estimates():
    conv = PConv2d(1, 4, 1)
    assert torch.equal(conv.normalized_estimates(), torch.zeros(4))  # no NaN before data
    with conv.pruning(True):
        conv(torch.randn(2, 1, 3, 3)).sum().backward()
    assert torch.linalg.vector_norm(conv.normalized_estimates()).item() == pytest.approx(1.0)
    conv.reset_estimates()
    assert torch.equal(conv.taylor_estimates, torch.zeros(4))


def test_pruning_off_removes_hooks_and_memory_does_not_grow():
    conv = PConv2d(3, 8, 3)
    conv.pruning(True)
    assert len(conv._forward_hooks) == 1
    conv.pruning(False)
    assert len(conv._forward_hooks) == 0
    conv.pruning(True)
    sizes = []
    for i in range(50):
        conv(torch.randn(2, 3, 8, 8)).sum().backward()
        if i % 10 == 9:  # a full collection costs ~0.3 s on a loaded machine
            gc.collect()
        sizes.append(len(conv._forward_hooks))
    assert set(sizes) == {1}
    assert conv._estimates.count == 100
    conv.pruning(False)
    assert not conv._forward_hooks and not conv.is_pruning


def test_context_manager_restores_state():
    conv = PConv2d(1, 2, 1)
    with conv.pruning(True):
        assert conv.is_pruning
    assert not conv.is_pruning


def _zero_channel_copy(conv, bn, k):
    """Copy with the outgoing contribution of channel k made exactly zero."""
    with torch.no_grad():
        conv.weight[k] = 0
        if conv.bias is not None:
            conv.bias[k] = 0
        bn.weight[k] = 0
        bn.bias[k] = 0


def test_zeroed_copy_equals_pruned():
    net = nn.Sequential(PConv2d(3, 6, 3, padding=1), PBatchNorm2d(6), nn.ReLU(), PConv2d(6, 4, 3))
    net.eval()
    with torch.no_grad():
        net[1].running_mean.uniform_(-1, 1)
        net[1].running_var.uniform_(0.5, 2)
    zeroed = copy.deepcopy(net)
    _zero_channel_copy(zeroed[0], zeroed[1], [1, 4])
    net[0].prune_feature_map([1, 4])
    net[1].drop_input_channel([1, 4])
    net[3].drop_input_channel([1, 4])
    x = torch.randn(2, 3, 9, 9)
    torch.testing.assert_close(net(x), zeroed(x), atol=1e-5, rtol=1e-5)
    assert net[0].out_channels == 4 and net[1].num_features == 4 and net[3].in_channels == 4


def test_linear_prune_and_drop_inputs():
    fc = PLinear(3 * 2 * 2, 5)
    x = torch.randn(2, 3, 2, 2)
    expected = fc((x * torch.tensor([1.0, 0.0, 1.0]).view(1, 3, 1, 1)).flatten(1)).detach()
    fc.drop_inputs((3, 2, 2), 1)
    torch.testing.assert_close(fc(x[:, [0, 2]].flatten(1)), expected, atol=1e-6, rtol=1e-6)
    fc.prune_feature_map([0, 3])
    assert fc.weight.shape == (3, 8) and fc.bias.shape == (3,) and fc.out_features == 3


def test_batchnorm_non_affine_trims_running_stats():
    bn = PBatchNorm1d(5, affine=False)
    bn.drop_input_channel([0, 2])
    assert bn.running_mean.shape == (3,) and bn.running_var.shape == (3,) and bn.num_features == 3


def _distinct_rows(t, dim=0):
    """Every slice of ``t`` along ``dim`` differs from every other (a wrong slice cannot hide)."""
    rows = t.movedim(dim, 0).reshape(t.shape[dim], -1)
    return len({tuple(r.tolist()) for r in rows}) == len(rows)


@pytest.mark.parametrize("make_opt, keys", [
    (lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9), ("momentum_buffer",)),
    (lambda p: torch.optim.Adam(p, lr=1e-2), ("exp_avg", "exp_avg_sq")),
])
def test_optimizer_state_and_estimates_follow_channel_identity(make_opt, keys):
    """Rows of momentum / Adam moments and of the accumulated estimates move with their channels."""
    net = _seed_net()
    conv, fc = net[0], net[3]
    weight = conv.weight
    opt = make_opt(net.parameters())
    with conv.pruning(True):
        for _ in range(2):
            nn.functional.cross_entropy(net(torch.randn(4, 2, 5, 5)), torch.randint(0, 4, (4,))).backward()
            opt.step()
    state = {(name, k): opt.state[t][k].clone() for name, t in [("w", conv.weight), ("b", conv.bias),
                                                              ("fc", fc.weight)] for k in keys}
    estimates = conv.taylor_estimates.clone()
    assert _distinct_rows(estimates) and all(
        _distinct_rows(v, 1 if name == "fc" else 0) for (name, _), v in state.items())
    conv.prune_feature_map(1, optimizer=opt)
    fc.drop_inputs((3, 5, 5), 1, optimizer=opt)
    assert conv.weight is weight
    torch.testing.assert_close(conv.taylor_estimates, estimates[[0, 2]], rtol=0, atol=0)
    kept_inputs = [i for i in range(75) if not 25 <= i < 50]
    for (name, k), old in state.items():
        new = opt.state[{"w": conv.weight, "b": conv.bias, "fc": fc.weight}[name]][k]
        expected = old[:, kept_inputs] if name == "fc" else old[[0, 2]]
        torch.testing.assert_close(new, expected, rtol=0, atol=0, msg=f"{name} {k}")
    nn.functional.cross_entropy(net(torch.randn(4, 2, 5, 5)), torch.randint(0, 4, (4,))).backward()
    opt.step()


@pytest.mark.parametrize(
    "call, value",
    [
        (lambda m: m.prune_feature_map(8), "8"),
        (lambda m: m.prune_feature_map(-1), "-1"),
        (lambda m: m.prune_feature_map(list(range(8))), "8 of 8"),
        (lambda m: m.drop_input_channel(3), "3"),
    ],
)
def test_bad_input_names_layer_and_value_and_leaves_layer_unchanged(call, value):
    conv = PConv2d(3, 8, 3)
    conv.pruning_name = "features.0"
    before = state_copy(conv)
    with pytest.raises(ValueError, match=value) as info:
        call(conv)
    assert "features.0" in str(info.value)
    assert isinstance(info.value, PruningValueError)
    assert_state_equal(conv, before)
    assert conv.out_channels == 8 and conv.in_channels == 3


def test_last_channel_cannot_be_pruned():
    conv = PConv2d(3, 1, 3)
    with pytest.raises(ValueError, match="leave none"):
        conv.prune_feature_map(0)


def test_wrong_input_shape():
    fc = PLinear(12, 3)
    before = state_copy(fc)
    with pytest.raises(ValueError, match=r"\(3, 2, 3\)"):
        fc.drop_inputs((3, 2, 3), 0)
    assert_state_equal(fc, before)


def test_convert_keeps_parameters():
    net = nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.Flatten(), nn.Linear(4, 2))
    weight = net[0].weight
    convert(net)
    assert isinstance(net[0], PConv2d) and isinstance(net[1], PBatchNorm2d) and isinstance(net[3], PLinear)
    assert net[0].weight is weight and net[0].pruning_name == "0"
    with net[0].pruning(True):
        net(torch.randn(2, 1, 3, 3)).sum().backward()
    assert net[0].taylor_estimates.shape == (4,)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_dtypes(dtype):
    conv = PConv2d(2, 3, 3).to(dtype)
    with conv.pruning(True):
        conv(torch.randn(2, 2, 5, 5, dtype=dtype)).float().sum().backward()
    assert conv.taylor_estimates.dtype == torch.float32
    conv.prune_feature_map(0)
    assert conv.weight.dtype == dtype and conv.weight.shape[0] == 2


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda():
    conv = PConv2d(2, 3, 3).cuda()
    with conv.pruning(True):
        conv(torch.randn(2, 2, 5, 5, device="cuda")).sum().backward()
    conv.prune_feature_map(int(conv.taylor_estimates.argmin()))
    assert conv.weight.is_cuda and conv.weight.shape[0] == 2


def test_old_autograd_graph_alive_during_prune_does_not_break_next_backward():
    fc = PLinear(4, 3)
    opt = torch.optim.SGD(fc.parameters(), lr=0.1, momentum=0.9)
    loss = fc(torch.randn(2, 4)).sum()  # this graph stays alive across the cut
    loss.backward()
    opt.step()
    fc.prune_feature_map(1, optimizer=opt)
    loss = fc(torch.randn(2, 4)).sum()
    loss.backward()
    opt.step()
    assert fc.weight.grad.shape == (2, 4) and fc.bias.grad.shape == (2,)


def test_gradient_hooks_fire_on_a_parameter_pruned_after_it_had_hooks():
    """Regression: after swap_tensors the old hook dict silenced every later hook
    (TaylorBN / TaylorWeight collected nothing after the first prune)."""
    conv = nn.Conv2d(3, 6, 3)
    fired = []
    old = conv.weight.register_hook(lambda g: fired.append("before"))
    kept = conv.bias.register_hook(lambda g: fired.append("user hook"))
    conv(torch.randn(1, 3, 5, 5)).sum().backward()
    old.remove()
    apply_cuts([Cut(conv, Role.OUT, keep_indices(6, [1, 4]))])
    conv.weight.register_hook(lambda g: fired.append("after"))
    conv(torch.randn(1, 3, 5, 5)).sum().backward()
    assert sorted(fired) == ["after", "before", "user hook", "user hook"]
