"""The rates' optimizer: SharedScaleAdam moves every rate by its share of one running RMS."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from nni_harp.pruning import HARPSettings
from nni_harp.pruning._optim import SharedScaleAdam


def _step(optimizer: SharedScaleAdam, params: list[nn.Parameter], grads: list[float]) -> list[float]:
    before = [float(p.detach()) for p in params]
    for p, g in zip(params, grads):
        p.grad = torch.tensor(g)
    optimizer.step()
    return [float(p.detach()) - b for p, b in zip(params, before)]


def test_units_keep_their_relative_speeds_and_the_overall_step_is_scale_free() -> None:
    for scale in (1e-4, 1.0, 1e3):
        params = [nn.Parameter(torch.tensor(0.0)) for _ in range(3)]
        optimizer = SharedScaleAdam(params, lr=0.1)
        moves = _step(optimizer, params, [scale * 1.0, scale * -3.0, 0.0])
        rms = (10 / 3) ** 0.5  # of the gradients (1, -3, 0) in units of `scale`
        assert moves == pytest.approx([-0.1 / rms, 0.3 / rms, 0.0], rel=1e-4)
    # per-entry Adam, for contrast, moves the first two by the same amount
    params = [nn.Parameter(torch.tensor(0.0)) for _ in range(2)]
    adam = torch.optim.Adam(params, lr=0.1)
    for p, g in zip(params, (1.0, -3.0)):
        p.grad = torch.tensor(g)
    adam.step()
    assert [abs(float(p.detach())) for p in params] == pytest.approx([0.1, 0.1], rel=1e-4)


def test_weight_decay_is_decoupled_and_state_round_trips() -> None:
    params = [nn.Parameter(torch.tensor(2.0)), nn.Parameter(torch.tensor(-1.0))]
    optimizer = SharedScaleAdam(params, lr=0.1, weight_decay=0.5)
    moves = _step(optimizer, params, [0.0, 0.0])  # zero gradient: only the decay acts
    assert moves == pytest.approx([-0.1 * 0.5 * 2.0, 0.1 * 0.5 * 1.0])
    _step(optimizer, params, [1.0, 2.0])
    clone = [nn.Parameter(p.detach().clone()) for p in params]
    restored = SharedScaleAdam(clone, lr=0.1, weight_decay=0.5)
    restored.load_state_dict(optimizer.state_dict())
    assert _step(restored, clone, [0.5, -1.0]) == pytest.approx(_step(optimizer, params, [0.5, -1.0]))


def test_rate_optimizer_names() -> None:
    assert HARPSettings().rate_optimizer == "adam"
    assert HARPSettings(rate_optimizer="shared-adam").rate_optimizer == "shared-adam"
    with pytest.raises(ValueError, match="rate_optimizer"):
        HARPSettings(rate_optimizer="rmsprop")
