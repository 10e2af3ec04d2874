"""Cuts through the handler registry: transposed and grouped convs, parametrized weights, errors."""

import pytest
import torch
from torch import nn
from torch.nn.utils import parametrizations, parametrize

from conftest import assert_state_equal, state_copy
from prunable import SurgeryError
from prunable.surgery import Cut, Role, apply_cuts, channel_parameters, handler_for, keep_indices


def test_grouped_transposed_conv_cuts_the_same_position_of_every_group():
    conv = nn.ConvTranspose2d(6, 8, 3, groups=2)  # weight (6, 4, 3, 3): (in, out / groups, k, k)
    keep_out = torch.tensor([0, 2, 3, 4, 6, 7])  # position 1 of both output groups
    apply_cuts([Cut(conv, Role.OUT, keep_out), Cut(conv, Role.IN, keep_indices(6, [0, 3]))])
    assert conv.weight.shape == (4, 3, 3, 3) and conv.bias.shape == (6,)
    assert (conv.in_channels, conv.out_channels, conv.groups) == (4, 6, 2)
    assert conv(torch.randn(1, 4, 5, 5)).shape == (1, 6, 7, 7)


def test_out_view_of_a_grouped_transposed_conv_has_one_row_per_output_channel():
    conv = nn.ConvTranspose2d(4, 6, 1, groups=2, bias=False)
    with torch.no_grad():
        conv.weight.copy_(torch.arange(12.0).view(4, 3, 1, 1))
    rows = handler_for(conv).out_view(conv, "weight")
    # output channel o of group g reads inputs 2g, 2g+1 at position o % 3
    assert rows.tolist() == [[0, 3], [1, 4], [2, 5], [6, 9], [7, 10], [8, 11]]


def test_spectral_norm_slices_original_and_power_iteration_vectors():
    conv = parametrizations.spectral_norm(nn.Conv2d(3, 6, 3))
    opt = torch.optim.Adam(conv.parameters())
    conv(torch.randn(2, 3, 5, 5)).sum().backward()
    opt.step()
    p = conv.parametrizations.weight[0]
    u, v = p._u.clone(), p._v.clone()
    apply_cuts([Cut(conv, Role.OUT, torch.tensor([0, 2, 5])), Cut(conv, Role.IN, torch.tensor([1, 2]))], opt)
    original = conv.parametrizations.weight.original
    assert original.shape == (3, 2, 3, 3) and opt.state[original]["exp_avg"].shape == (3, 2, 3, 3)
    assert torch.equal(p._u, u[[0, 2, 5]])
    assert torch.equal(p._v, v.view(3, 9)[[1, 2]].flatten())  # _v runs over (in, kh, kw)
    conv.train()(torch.randn(1, 2, 5, 5)).sum().backward()  # the power iteration runs on the sliced vectors


def test_weight_norm_leaves_the_size_one_axes_of_g():
    conv = parametrizations.weight_norm(nn.Conv2d(3, 6, 3))
    apply_cuts([Cut(conv, Role.IN, torch.tensor([0, 2]))])
    weights = conv.parametrizations.weight
    assert weights.original0.shape == (6, 1, 1, 1) and weights.original1.shape == (6, 2, 3, 3)
    assert [tuple(t.shape) for t, _, _ in channel_parameters(Cut(conv, Role.OUT, torch.tensor([1])))] == [
        (6, 1, 1, 1), (6, 2, 3, 3), (6,)]


def test_unknown_parametrization_refuses_the_cut_and_leaves_the_module():
    class Doubled(nn.Module):
        def forward(self, w):
            return 2 * w

    conv = nn.Conv2d(3, 6, 3)
    parametrize.register_parametrization(conv, "weight", Doubled())
    before = state_copy(conv)
    with pytest.raises(SurgeryError, match="parametrized by Doubled"):
        apply_cuts([Cut(conv, Role.OUT, torch.tensor([0, 1]), name="conv")])
    assert_state_equal(conv, before)
    assert conv.out_channels == 6


def test_spectral_norm_of_a_transposed_conv_follows_its_dim():
    conv = parametrizations.spectral_norm(nn.ConvTranspose2d(4, 6, 2))  # dim=1: _u over outputs, _v over (in, k, k)
    p = conv.parametrizations.weight[0]
    u, v = p._u.clone(), p._v.clone()
    apply_cuts([Cut(conv, Role.OUT, torch.tensor([1, 4])), Cut(conv, Role.IN, torch.tensor([0, 3]))])
    assert torch.equal(p._u, u[[1, 4]]) and torch.equal(p._v, v.view(4, 4)[[0, 3]].flatten())
    assert conv.eval()(torch.randn(1, 2, 3, 3)).shape == (1, 2, 4, 4)
