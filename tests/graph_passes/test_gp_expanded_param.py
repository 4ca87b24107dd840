"""A parameter broadcast by ``expand`` (ViT/DeiT class and distillation tokens) keeps the batch
size of the input after speedup, while its channel axis is pruned with the stream."""
from __future__ import annotations

import torch
from torch import nn

from _gp_helpers import kept_count, prune


class ClassToken(nn.Module):
    def __init__(self, dim: int = 8) -> None:
        super().__init__()
        self.embed = nn.Linear(6, dim)
        self.cls_token = nn.Parameter(torch.randn(1, 1, dim))
        self.head = nn.Linear(dim, 3)

    def forward(self, x):
        x = self.embed(x)
        x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1)
        return self.head(x[:, 0] + x[:, 1:].mean(1))


def test_expanded_parameter_keeps_the_batch_axis_and_loses_pruned_channels():
    r = prune(ClassToken(), torch.randn(2, 5, 6))
    kept = kept_count(r, "embed")
    assert kept < 8
    assert r.pruned.cls_token.shape == (1, 1, kept)
    out = r.pruned(torch.randn(3, 5, 6))  # another batch size than the traced one
    assert out.shape == (3, 3)
