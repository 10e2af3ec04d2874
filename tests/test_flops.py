"""prunable.flops: counting works on models that pass a view of a parameter to a child module."""

from __future__ import annotations

import torch
from torch import nn

from prunable import count_flops, module_flops


class TokenHead(nn.Module):
    """A class token expanded from a parameter (as timm's CaiT does) is an input of a child module."""

    def __init__(self, dim: int = 8, out: int = 5) -> None:
        super().__init__()
        self.token = nn.Parameter(torch.randn(1, 1, dim))
        self.head = nn.Linear(dim, out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        tokens = self.token.expand(x.shape[0], -1, -1)
        return self.head(tokens) * x.mean()  # the view itself is the child's input


def test_count_flops_accepts_an_expanded_parameter_as_a_module_input():
    model = TokenHead()
    x = torch.randn(3, 4, 8)
    assert count_flops(model, x) == 2 * 3 * 8 * 5  # one token per example through Linear(8, 5)
    assert module_flops(model, x)["head"] == 2 * 3 * 8 * 5


def test_counting_leaves_the_models_parameters_and_mode_as_they_were():
    model = TokenHead().train()
    model.head.weight.requires_grad_(False)
    before = {n: (p.requires_grad, p.detach().clone()) for n, p in model.named_parameters()}
    count_flops(model, torch.randn(2, 4, 8))
    assert model.training
    for name, param in model.named_parameters():
        assert param.requires_grad == before[name][0], name
        assert torch.equal(param.detach(), before[name][1]), name
