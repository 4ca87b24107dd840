"""FGSM / PGD: threat-model bounds, attack strength, and the model state they leave behind."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from nni_harp.adversarial import (
    AdversarialError,
    AttackConfig,
    AttackConfigError,
    InputError,
    UnknownNameError,
    fgsm,
    pgd,
)

LINF = AttackConfig(norm="linf", eps=0.1, step_size=0.025, steps=10)
L2 = AttackConfig(norm="l2", eps=0.5, step_size=0.15, steps=10)


def _per_sample(delta: Tensor, norm: str) -> Tensor:
    flat = delta.flatten(1)
    return flat.abs().amax(dim=1) if norm == "linf" else flat.norm(p=2, dim=1)


@pytest.mark.parametrize("random_start", [True, False])
def test_pgd_linf_stays_in_eps_box_and_pixel_range(
    trained_model: nn.Module, test_batch: tuple[Tensor, Tensor], random_start: bool
) -> None:
    x, y = test_batch
    torch.manual_seed(0)
    config = AttackConfig(norm="linf", eps=0.1, step_size=0.025, steps=10, random_start=random_start)
    x_adv = pgd(trained_model, x, y, config)
    size = _per_sample(x_adv - x, "linf")
    assert float(size.max()) <= config.eps + 1e-6
    assert float(x_adv.min()) >= 0.0 and float(x_adv.max()) <= 1.0
    # the attack uses its budget: most samples are pushed to the border of the box
    assert float(size.median()) > 0.9 * config.eps


def test_pgd_l2_stays_in_eps_ball(trained_model: nn.Module, test_batch: tuple[Tensor, Tensor]) -> None:
    x, y = test_batch
    torch.manual_seed(0)
    x_adv = pgd(trained_model, x, y, L2)
    size = _per_sample(x_adv - x, "l2")
    assert float(size.max()) <= L2.eps * (1 + 1e-5)
    assert float(x_adv.min()) >= 0.0 and float(x_adv.max()) <= 1.0
    assert float(size.median()) > 0.5 * L2.eps
    # an L2 attack is not an L-inf one: single pixels move by more than eps / sqrt(d)
    assert float(_per_sample(x_adv - x, "linf").max()) > L2.eps / 8


@pytest.mark.parametrize("config", [LINF, L2], ids=["linf", "l2"])
def test_more_pgd_steps_increase_the_loss(
    trained_model: nn.Module, test_batch: tuple[Tensor, Tensor], config: AttackConfig
) -> None:
    x, y = test_batch
    one = AttackConfig(norm=config.norm, eps=config.eps, step_size=config.step_size, steps=1, random_start=False)
    many = AttackConfig(norm=config.norm, eps=config.eps, step_size=config.step_size, steps=10, random_start=False)
    with torch.no_grad():
        clean = F.cross_entropy(trained_model(x), y).item()
        after_one = F.cross_entropy(trained_model(pgd(trained_model, x, y, one)), y).item()
        after_many = F.cross_entropy(trained_model(pgd(trained_model, x, y, many)), y).item()
    assert clean < after_one < after_many


def test_fgsm_is_one_signed_gradient_step(trained_model: nn.Module, test_batch: tuple[Tensor, Tensor]) -> None:
    x, y = test_batch
    eps = 0.05
    x_var = x.clone().requires_grad_(True)
    F.cross_entropy(trained_model(x_var), y).backward()
    expected = (x + eps * x_var.grad.sign()).clamp(0, 1)
    trained_model.zero_grad(set_to_none=True)

    x_fgsm = fgsm(trained_model, x, y, eps)
    assert torch.equal(x_fgsm, expected)
    one_step = AttackConfig(norm="linf", eps=eps, step_size=eps, steps=1, random_start=False)
    torch.testing.assert_close(pgd(trained_model, x, y, one_step), x_fgsm, atol=1e-6, rtol=0)


@pytest.mark.parametrize("attack", ["pgd", "fgsm"])
def test_attack_restores_modes_and_leaves_no_gradients(
    trained_model: nn.Module, test_batch: tuple[Tensor, Tensor], attack: str
) -> None:
    x, y = test_batch
    trained_model.train()
    trained_model[1].eval()  # a submodule deliberately frozen in eval mode must stay so
    running_mean = trained_model[1].running_mean.clone()
    seen_modes: list[bool] = []
    hook = trained_model[4].register_forward_pre_hook(lambda m, _: seen_modes.append(m.training))

    x_adv = pgd(trained_model, x, y, LINF) if attack == "pgd" else fgsm(trained_model, x, y, 0.1)
    hook.remove()

    assert seen_modes and not any(seen_modes), "the model must run in eval mode during the attack"
    assert trained_model.training and trained_model[4].training and not trained_model[1].training
    assert torch.equal(trained_model[1].running_mean, running_mean)
    assert all(p.grad is None for p in trained_model.parameters())
    assert not x_adv.requires_grad and x_adv.grad_fn is None


def test_pgd_runs_under_no_grad_and_keeps_input_untouched(
    trained_model: nn.Module, test_batch: tuple[Tensor, Tensor]
) -> None:
    x, y = test_batch
    x_before = x.clone()
    with torch.no_grad():
        x_adv = pgd(trained_model, x, y, LINF)
    assert torch.equal(x, x_before)
    assert float((x_adv - x).abs().max()) > 0.5 * LINF.eps


def test_inputs_outside_pixel_range_are_rejected(trained_model: nn.Module, test_batch: tuple[Tensor, Tensor]) -> None:
    x, y = test_batch
    with pytest.raises(InputError, match="with_normalization"):
        pgd(trained_model, (x - 0.5) / 0.25, y, LINF)
    with pytest.raises(InputError, match="labels"):
        pgd(trained_model, x, y[:-1], LINF)


@pytest.mark.parametrize(
    ("kwargs", "field", "error"),
    [
        ({"norm": "l1"}, "norm", UnknownNameError),
        ({"eps": 0.0}, "eps", AttackConfigError),
        ({"eps": 2.0}, "eps", AttackConfigError),
        ({"step_size": -1.0}, "step_size", AttackConfigError),
        ({"steps": 0}, "steps", AttackConfigError),
        ({"steps": 2.5}, "steps", AttackConfigError),
        ({"random_start": 1}, "random_start", AttackConfigError),
    ],
)
def test_attack_config_validation_names_the_field(kwargs: dict, field: str, error: type) -> None:
    with pytest.raises(error, match=field) as info:
        AttackConfig(**kwargs)
    assert isinstance(info.value, AdversarialError) and isinstance(info.value, ValueError)


def test_attack_config_allows_large_l2_eps_and_is_frozen() -> None:
    config = AttackConfig(norm="l2", eps=2.0, step_size=0.5)
    assert config.torchattacks_norm == "L2"
    with pytest.raises(AttributeError):
        config.eps = 0.1  # type: ignore[misc]
    with pytest.raises(AttackConfigError, match="eps"):
        fgsm(nn.Identity(), torch.zeros(1, 2), torch.zeros(1, dtype=torch.long), 0.0)
