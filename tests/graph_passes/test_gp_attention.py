"""Attention blocks: q/k/v/proj stay consistent, the head dim is pruned alike in every head."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from _gp_helpers import group_of, kept_count, prune


class Attention(nn.Module):
    def __init__(self, explicit: bool, dim: int = 16, heads: int = 2) -> None:
        super().__init__()
        self.explicit, self.heads, self.head_dim = explicit, heads, dim // heads
        self.scale = self.head_dim ** -0.5
        self.embed = nn.Linear(6, dim)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.head = nn.Linear(dim, 4)

    def forward(self, x):
        x = self.embed(x)
        B, N, C = x.shape
        qkv = self.qkv(x).reshape(B, N, 3, self.heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        if self.explicit:
            attn = (q @ k.transpose(-2, -1)) * self.scale
            attn = attn.softmax(dim=-1)
            y = attn @ v
        else:
            y = F.scaled_dot_product_attention(q, k, v)
        y = y.transpose(1, 2).reshape(B, N, C)
        return self.head(x + self.proj(y))


@pytest.mark.parametrize("explicit", [False, True], ids=["sdpa", "explicit"])
def test_attention_prunes_head_dim_alike_in_q_k_v(explicit):
    model = Attention(explicit)
    r = prune(model, torch.randn(2, 5, 6))
    g = group_of(r.groups, "qkv")
    assert g.prunable and g.size == 8  # one channel per head-dim position, shared by q, k, v and every head
    kept = r.keep[g.id].nonzero().flatten()
    d = len(kept)
    assert d < 8
    assert r.pruned.qkv.weight.shape == (3 * 2 * d, kept_count(r, "embed"))
    assert r.pruned.proj.weight.shape[1] == 2 * d
    rows = torch.cat([part * 8 + kept for part in range(6)])  # (q|k|v) x heads, same head dims
    assert torch.equal(r.pruned.qkv.bias, model.qkv.bias[rows])
    # the residual stream (embed, proj output) is one group
    assert group_of(r.groups, "embed").id == group_of(r.groups, "proj").id
    assert r.pruned.proj.out_features == kept_count(r, "embed") < 16
