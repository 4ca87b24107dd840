"""Traced and sped-up models keep the eager model's state-dict keys: non-persistent buffers stay
non-persistent (torch.fx's GraphModule made them persistent before torch 2.15)."""
from __future__ import annotations

import torch
from torch import nn

import graph_passes as gp
from _gp_helpers import prune


class Normalized(nn.Module):
    """Input normalisation with non-persistent buffers around a conv net, read through get_attr."""

    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Conv2d(8, 4, 3))
        self.register_buffer("mean", torch.full((3, 1, 1), 0.5), persistent=False)
        self.register_buffer("std", torch.full((3, 1, 1), 0.25), persistent=False)
        self.inner = nn.Module()
        self.inner.register_buffer("gain", torch.ones(8, 1, 1), persistent=False)
        self.inner.register_buffer("offset", torch.zeros(8, 1, 1))  # persistent: stays in the state dict

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.body[1](self.body[0]((x - self.mean) / self.std))
        return self.body[2](y * self.inner.gain + self.inner.offset)


def test_traced_model_has_the_eager_state_dict_keys():
    model = Normalized().eval()
    gm = gp.trace(model, torch.rand(1, 3, 8, 8))
    assert set(gm.state_dict()) == set(model.state_dict())
    assert "mean" not in gm.state_dict() and "inner.gain" not in gm.state_dict()
    assert "inner.offset" in gm.state_dict()


def test_sped_up_model_loads_into_a_model_rebuilt_from_the_plan(tmp_path):
    model = Normalized().eval()
    x = torch.rand(2, 3, 8, 8)
    r = prune(model, x)
    assert r.pruned.inner.gain.shape[0] < 8  # the channel-wise buffer was sliced ...
    assert set(r.pruned.state_dict()) == set(model.state_dict())  # ... and stayed non-persistent
    plan = gp.PruningPlan.from_masks(model, (x,), r.masks)
    rebuilt = plan.apply(Normalized().eval(), (x,))
    rebuilt.load_state_dict(r.pruned.state_dict())  # strict: same keys, same shapes
    rebuilt.inner.gain.copy_(r.pruned.inner.gain)  # not in the state dict, as in eager
    with torch.no_grad():
        assert torch.allclose(rebuilt(x), r.pruned(x), atol=1e-6)
