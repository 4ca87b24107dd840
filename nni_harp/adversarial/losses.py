"""Adversarial training objectives: PGD-AT, TRADES and MART.

Each loss is a frozen dataclass holding the adversary's settings and a trade-off weight ``beta``;
calling it as ``loss(model, x, y)`` crafts adversarial examples against ``model`` (in eval mode,
see :mod:`nni_harp.adversarial.attacks`) and returns a differentiable scalar computed with the
model in whatever mode it was given (train mode while training).

- ``'pgd'`` — PGD adversarial training (Madry et al., 2018): cross-entropy on PGD examples.
  ``beta`` is not used.
- ``'trades'`` — TRADES (Zhang et al., 2019): ``CE(f(x), y) + beta * KL(p(x) || p(x'))``, where
  the adversary maximises that KL term (from a small Gaussian start, since the KL has zero
  gradient at ``x' = x``).
- ``'mart'`` — MART (Wang et al., 2020): a boosted cross-entropy on PGD examples,
  ``-log p_y(x') - log(1 - max_{k != y} p_k(x'))``, plus
  ``beta * KL(p(x) || p(x')) * (1 - p_y(x))``, which weighs the consistency term most on
  the samples the model gets wrong on clean inputs.

New losses are added with the :func:`register_loss` decorator.
"""
from __future__ import annotations

import logging
import math
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import ClassVar, TypeVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ._model_state import eval_mode, unwrap_parallel
from .attacks import check_inputs, logits_of, pgd, projected_gradient_ascent
from .config import AttackConfig
from .errors import AdversarialError, AttackConfigError, UnknownNameError

__all__ = [
    "AdversarialLoss",
    "PGDATLoss",
    "TRADESLoss",
    "MARTLoss",
    "LOSSES",
    "register_loss",
    "make_adversarial_loss",
    "trades_objective",
    "mart_objective",
]

logger = logging.getLogger(__name__)

# Standard deviation of TRADES' Gaussian starting perturbation (pixel space).
TRADES_START_STD = 1e-3

LOSSES: dict[str, type[AdversarialLoss]] = {}

_L = TypeVar("_L", bound="type[AdversarialLoss]")


def register_loss(name: str) -> Callable[[_L], _L]:
    """Class decorator: make a loss available to :func:`make_adversarial_loss` under ``name``."""

    def decorate(cls: _L) -> _L:
        if name in LOSSES:
            raise AdversarialError(f"an adversarial loss named {name!r} is already registered; pick another name")
        cls.name = name
        LOSSES[name] = cls
        return cls

    return decorate


@dataclass(frozen=True)
class AdversarialLoss(ABC):
    """``loss(model, x, y) -> scalar``: an adversarial training objective.

    Args:
        attack: the adversary used to craft the training examples.
        beta: weight of the robustness term, a finite number ``>= 0`` (ignored by PGD-AT); ``None``
            takes the loss's own ``default_beta`` (TRADES 6, MART 5, as their authors use them).
    """

    attack: AttackConfig = field(default_factory=AttackConfig)
    beta: float | None = None

    name: ClassVar[str] = ""
    default_beta: ClassVar[float] = 6.0

    def __post_init__(self) -> None:
        if not isinstance(self.attack, AttackConfig):
            raise AttackConfigError("attack", self.attack, "an AttackConfig instance")
        if self.beta is None:
            object.__setattr__(self, "beta", float(self.default_beta))
        if (
            isinstance(self.beta, bool)
            or not isinstance(self.beta, (int, float))
            or not math.isfinite(self.beta)
            or self.beta < 0
        ):
            raise AttackConfigError("beta", self.beta, "a finite number >= 0")

    @abstractmethod
    def adversarial_examples(self, model: nn.Module, x: Tensor, y: Tensor) -> Tensor:
        """The (detached) adversarial inputs this loss trains on."""

    @abstractmethod
    def __call__(self, model: nn.Module, x: Tensor, y: Tensor) -> Tensor:
        """Scalar loss on the batch ``(x, y)``, differentiable w.r.t. the model's parameters."""


@register_loss("pgd")
@dataclass(frozen=True)
class PGDATLoss(AdversarialLoss):
    """Cross-entropy on PGD adversarial examples (Madry et al., 2018)."""

    def adversarial_examples(self, model: nn.Module, x: Tensor, y: Tensor) -> Tensor:
        return pgd(model, x, y, self.attack)

    def __call__(self, model: nn.Module, x: Tensor, y: Tensor) -> Tensor:
        x_adv = self.adversarial_examples(model, x, y)
        return F.cross_entropy(logits_of(model, x_adv), y)


def trades_objective(logits_clean: Tensor, logits_adv: Tensor, y: Tensor, beta: float) -> Tensor:
    """``mean CE(clean, y) + beta * mean_i KL(p(x_i) || p(x'_i))``; gradients reach both inputs."""
    log_p_clean = F.log_softmax(logits_clean, dim=1)
    log_p_adv = F.log_softmax(logits_adv, dim=1)
    natural = F.nll_loss(log_p_clean, y)
    # kl_div(input=log q, target=log p, log_target=True) sums p * (log p - log q) = KL(p || q).
    robust = F.kl_div(log_p_adv, log_p_clean, reduction="batchmean", log_target=True)
    return natural + beta * robust


@register_loss("trades")
@dataclass(frozen=True)
class TRADESLoss(AdversarialLoss):
    """TRADES (Zhang et al., 2019); the adversary maximises ``KL(p(x) || p(x'))``."""

    def adversarial_examples(self, model: nn.Module, x: Tensor, y: Tensor) -> Tensor:
        check_inputs(x, y)
        net = unwrap_parallel(model)
        with eval_mode(net), torch.no_grad():
            log_p_clean = F.log_softmax(logits_of(net, x), dim=1)

        def divergence(logits_adv: Tensor) -> Tensor:
            log_p_adv = F.log_softmax(logits_adv, dim=1)
            return F.kl_div(log_p_adv, log_p_clean, reduction="sum", log_target=True)

        start = TRADES_START_STD * torch.randn_like(x)
        return projected_gradient_ascent(model, x, divergence, self.attack, init=start)

    def __call__(self, model: nn.Module, x: Tensor, y: Tensor) -> Tensor:
        x_adv = self.adversarial_examples(model, x, y)
        return trades_objective(logits_of(model, x), logits_of(model, x_adv), y, self.beta)


def mart_objective(logits_clean: Tensor, logits_adv: Tensor, y: Tensor, beta: float) -> Tensor:
    """MART: ``mean BCE(p(x'), y) + beta * mean_i KL(p(x_i) || p(x'_i)) * (1 - p_y(x_i))``.

    ``BCE(p, y) = -log p_y - log(1 - max_{k != y} p_k)``; ``log(1 - p_k)`` is evaluated as the
    log-sum-exp of the other classes' log-probabilities, which stays finite when ``p_k -> 1``.
    """
    log_p_adv = F.log_softmax(logits_adv, dim=1)
    true_class = F.one_hot(y, num_classes=logits_adv.shape[1]).bool()
    wrong = log_p_adv.detach().masked_fill(true_class, float("-inf")).argmax(dim=1)
    without_wrong = log_p_adv.masked_fill(F.one_hot(wrong, logits_adv.shape[1]).bool(), float("-inf"))
    boosted_ce = -log_p_adv.gather(1, y[:, None]).squeeze(1) - torch.logsumexp(without_wrong, dim=1)

    log_p_clean = F.log_softmax(logits_clean, dim=1)
    p_clean = log_p_clean.exp()
    kl = (p_clean * (log_p_clean - log_p_adv)).sum(dim=1)
    weight = 1.0 - p_clean.gather(1, y[:, None]).squeeze(1)
    return boosted_ce.mean() + beta * (kl * weight).mean()


@register_loss("mart")
@dataclass(frozen=True)
class MARTLoss(AdversarialLoss):
    """MART (Wang et al., 2020); the adversary is cross-entropy PGD."""

    default_beta: ClassVar[float] = 5.0

    def adversarial_examples(self, model: nn.Module, x: Tensor, y: Tensor) -> Tensor:
        return pgd(model, x, y, self.attack)

    def __call__(self, model: nn.Module, x: Tensor, y: Tensor) -> Tensor:
        x_adv = self.adversarial_examples(model, x, y)
        return mart_objective(logits_of(model, x), logits_of(model, x_adv), y, self.beta)


def make_adversarial_loss(name: str, attack: AttackConfig, beta: float | None = None) -> AdversarialLoss:
    """Build the registered loss ``name`` (``'pgd'``, ``'trades'`` or ``'mart'``); ``beta=None``: the
    loss's own default."""
    key = name.lower() if isinstance(name, str) else name
    if key not in LOSSES:
        raise UnknownNameError("adversarial loss", name, tuple(LOSSES))
    loss = LOSSES[key](attack=attack, beta=beta)
    logger.debug("adversarial loss %s with %s, beta=%s", key, attack, loss.beta)
    return loss
