"""with_normalization: the model normalises internally, eps stays in pixel space."""

from __future__ import annotations

import pytest
import torch
from torch import Tensor, nn

from nni_harp.adversarial import AttackConfig, AttackConfigError, InputNormalization, pgd, with_normalization

MEAN, STD = [0.3], [0.2]


def test_wrapper_normalises_before_the_model(trained_model: nn.Module, test_batch: tuple[Tensor, Tensor]) -> None:
    x, _ = test_batch
    wrapped = with_normalization(trained_model, MEAN, STD)
    assert isinstance(wrapped, InputNormalization) and wrapped.model is trained_model
    with torch.no_grad():
        torch.testing.assert_close(wrapped(x), trained_model((x - MEAN[0]) / STD[0]))


def test_eps_is_measured_on_the_pixel_input(trained_model: nn.Module, test_batch: tuple[Tensor, Tensor]) -> None:
    x, y = test_batch
    wrapped = with_normalization(trained_model, MEAN, STD)
    config = AttackConfig(norm="linf", eps=0.05, step_size=0.0125, steps=10)
    torch.manual_seed(0)
    x_adv = pgd(wrapped, x, y, config)
    pixel_delta = (x_adv - x).abs().amax()
    normalised_delta = ((x_adv - MEAN[0]) / STD[0] - (x - MEAN[0]) / STD[0]).abs().amax()
    assert float(pixel_delta) <= config.eps + 1e-6
    assert float(pixel_delta) > 0.9 * config.eps
    # what the inner model sees moved by eps / std, not by eps
    assert float(normalised_delta) == pytest.approx(float(pixel_delta) / STD[0], rel=1e-4)


def test_statistics_are_buffers_outside_the_state_dict(trained_model: nn.Module) -> None:
    wrapped = with_normalization(trained_model, torch.tensor(MEAN), torch.tensor(STD))
    buffers = dict(wrapped.named_buffers())
    assert "mean" in buffers and "std" in buffers
    assert set(wrapped.state_dict()) == {f"model.{k}" for k in trained_model.state_dict()}


def test_wrapper_is_fx_traceable(trained_model: nn.Module, test_batch: tuple[Tensor, Tensor]) -> None:
    x, _ = test_batch
    wrapped = with_normalization(trained_model, MEAN, STD).eval()
    traced = torch.fx.symbolic_trace(wrapped)
    with torch.no_grad():
        torch.testing.assert_close(traced(x), wrapped(x))


@pytest.mark.parametrize(
    ("mean", "std", "field"),
    [
        ([0.5], [0.0], "std"),
        ([0.5], [-1.0], "std"),
        ([0.5, 0.5], [0.2], "std"),
        ([], [], "mean"),
        ("abc", [0.2], "mean"),
    ],
)
def test_invalid_statistics_are_rejected(trained_model: nn.Module, mean: object, std: object, field: str) -> None:
    with pytest.raises(AttackConfigError, match=field):
        with_normalization(trained_model, mean, std)
