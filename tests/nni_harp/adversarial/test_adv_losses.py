"""PGD-AT, TRADES and MART: differentiability, special cases and hand-computed values."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from nni_harp.adversarial import (
    LOSSES,
    AttackConfig,
    AttackConfigError,
    MARTLoss,
    PGDATLoss,
    TRADESLoss,
    UnknownNameError,
    make_adversarial_loss,
    mart_objective,
    pgd,
    trades_objective,
)

ATTACK = AttackConfig(norm="linf", eps=0.1, step_size=0.025, steps=5)


@pytest.mark.parametrize("name", sorted(LOSSES))
def test_loss_is_finite_scalar_and_reaches_every_parameter(
    trained_model: nn.Module, test_batch: tuple[Tensor, Tensor], name: str
) -> None:
    x, y = test_batch
    trained_model.train()
    loss_fn = make_adversarial_loss(name, ATTACK)
    torch.manual_seed(0)
    loss = loss_fn(trained_model, x[:32], y[:32])
    assert loss.dim() == 0 and torch.isfinite(loss)
    loss.backward()
    for param_name, param in trained_model.named_parameters():
        assert param.grad is not None and torch.isfinite(param.grad).all(), param_name
        assert float(param.grad.abs().sum()) > 0, param_name
    assert trained_model.training


def test_registry_builds_the_right_classes() -> None:
    assert isinstance(make_adversarial_loss("pgd", ATTACK), PGDATLoss)
    assert isinstance(make_adversarial_loss("TRADES", ATTACK, beta=1.0), TRADESLoss)
    mart = make_adversarial_loss("mart", ATTACK, beta=3.0)
    assert isinstance(mart, MARTLoss) and mart.beta == 3.0 and mart.attack is ATTACK
    # without a beta each loss takes its authors' value: TRADES 6, MART 5
    assert make_adversarial_loss("trades", ATTACK).beta == 6.0
    assert make_adversarial_loss("mart", ATTACK).beta == 5.0


def test_unknown_loss_name_lists_the_allowed_names() -> None:
    with pytest.raises(UnknownNameError) as info:
        make_adversarial_loss("fgsm-at", ATTACK)
    for name in ("pgd", "trades", "mart"):
        assert repr(name) in str(info.value)


@pytest.mark.parametrize(
    ("kwargs", "field"), [({"beta": -1.0}, "beta"), ({"beta": math.nan}, "beta"), ({"attack": 0.1}, "attack")]
)
def test_loss_settings_are_validated(kwargs: dict, field: str) -> None:
    arguments = {"attack": ATTACK, "beta": 6.0, **kwargs}
    with pytest.raises(AttackConfigError, match=field):
        make_adversarial_loss("trades", **arguments)


def test_pgd_at_is_cross_entropy_on_pgd_examples(trained_model: nn.Module, test_batch: tuple[Tensor, Tensor]) -> None:
    x, y = test_batch
    deterministic = AttackConfig(norm="linf", eps=0.1, step_size=0.025, steps=5, random_start=False)
    loss = make_adversarial_loss("pgd", deterministic)(trained_model, x, y)
    with torch.no_grad():
        expected = F.cross_entropy(trained_model(pgd(trained_model, x, y, deterministic)), y)
        clean = F.cross_entropy(trained_model(x), y)
    torch.testing.assert_close(loss.detach(), expected)
    assert loss.item() > clean.item()


def test_trades_with_beta_zero_is_clean_cross_entropy(
    trained_model: nn.Module, test_batch: tuple[Tensor, Tensor]
) -> None:
    x, y = test_batch
    loss = make_adversarial_loss("trades", ATTACK, beta=0.0)(trained_model, x, y)
    torch.testing.assert_close(loss.detach(), F.cross_entropy(trained_model(x), y).detach())
    with_kl = make_adversarial_loss("trades", ATTACK, beta=6.0)(trained_model, x, y)
    assert with_kl.item() > loss.item()


def test_mart_with_beta_zero_is_boosted_cross_entropy_on_pgd_examples(
    trained_model: nn.Module, test_batch: tuple[Tensor, Tensor]
) -> None:
    x, y = test_batch
    deterministic = AttackConfig(norm="linf", eps=0.1, step_size=0.025, steps=5, random_start=False)
    loss = make_adversarial_loss("mart", deterministic, beta=0.0)(trained_model, x, y)
    with torch.no_grad():
        probs = F.softmax(trained_model(pgd(trained_model, x, y, deterministic)), dim=1)
    p_true = probs[torch.arange(len(y)), y]
    p_wrong = probs.scatter(1, y[:, None], 0.0).amax(dim=1)
    expected = (-torch.log(p_true) - torch.log(1 - p_wrong)).mean()
    torch.testing.assert_close(loss.detach(), expected, rtol=1e-5, atol=1e-6)


def test_trades_adversary_maximises_the_divergence(trained_model: nn.Module, test_batch: tuple[Tensor, Tensor]) -> None:
    x, y = test_batch
    torch.manual_seed(0)
    x_adv = TRADESLoss(attack=ATTACK).adversarial_examples(trained_model, x, y)
    assert float((x_adv - x).abs().max()) <= ATTACK.eps + 1e-6
    noise = (x + torch.empty_like(x).uniform_(-ATTACK.eps, ATTACK.eps)).clamp(0, 1)
    with torch.no_grad():
        log_p = F.log_softmax(trained_model(x), dim=1)

        def kl(inputs: torch.Tensor) -> float:
            return float(
                F.kl_div(F.log_softmax(trained_model(inputs), 1), log_p, reduction="batchmean", log_target=True)
            )

        assert kl(x_adv) > 2 * kl(noise)


def _softmax(row: list[float]) -> list[float]:
    exps = [math.exp(v) for v in row]
    return [e / sum(exps) for e in exps]


LOGITS_CLEAN = [[2.0, 0.5, -1.0], [0.1, 0.3, 1.2]]
LOGITS_ADV = [[0.5, 1.5, -0.5], [-0.2, 0.9, 0.4]]
LABELS = [0, 2]


@pytest.mark.parametrize("beta", [0.0, 1.0, 6.0])
def test_trades_objective_matches_hand_computation(beta: float) -> None:
    total = 0.0
    for clean, adv, label in zip(LOGITS_CLEAN, LOGITS_ADV, LABELS):
        p, q = _softmax(clean), _softmax(adv)
        total += -math.log(p[label]) + beta * sum(pi * math.log(pi / qi) for pi, qi in zip(p, q))
    got = trades_objective(torch.tensor(LOGITS_CLEAN), torch.tensor(LOGITS_ADV), torch.tensor(LABELS), beta)
    assert got.item() == pytest.approx(total / len(LABELS), rel=1e-5)


@pytest.mark.parametrize("beta", [0.0, 1.0, 6.0])
def test_mart_objective_matches_hand_computation(beta: float) -> None:
    total = 0.0
    for clean, adv, label in zip(LOGITS_CLEAN, LOGITS_ADV, LABELS):
        p, q = _softmax(clean), _softmax(adv)
        best_wrong = max(qk for k, qk in enumerate(q) if k != label)
        boosted_ce = -math.log(q[label]) - math.log(1 - best_wrong)
        kl = sum(pi * math.log(pi / qi) for pi, qi in zip(p, q))
        total += boosted_ce + beta * kl * (1 - p[label])
    got = mart_objective(torch.tensor(LOGITS_CLEAN), torch.tensor(LOGITS_ADV), torch.tensor(LABELS), beta)
    assert got.item() == pytest.approx(total / len(LABELS), rel=1e-5)


def test_mart_objective_stays_finite_when_a_wrong_class_is_certain() -> None:
    logits_adv = torch.tensor([[0.0, 200.0, 0.0]], requires_grad=True)
    loss = mart_objective(torch.tensor([[3.0, 0.0, 0.0]]), logits_adv, torch.tensor([0]), beta=6.0)
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(logits_adv.grad).all()
