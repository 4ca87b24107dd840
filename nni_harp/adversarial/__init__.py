"""Adversarial attacks, adversarial training losses and robustness evaluation for HARP.

Inputs are images in pixel space ``[0, 1]``; models that normalise their inputs are wrapped with
:func:`with_normalization` so that ``eps`` keeps its usual meaning (e.g. ``8/255`` per pixel).
AutoAttack comes from the ``torchattacks`` library (see :mod:`nni_harp.adversarial.autoattack`).
"""
from __future__ import annotations

from .attacks import fgsm, pgd, projected_gradient_ascent
from .autoattack import AUTOATTACK_VERSIONS, autoattack_examples, build_autoattack
from .config import NORMS, AttackConfig
from .errors import AdversarialError, AttackConfigError, AutoAttackError, InputError, UnknownNameError
from .evaluation import RobustnessReport, evaluate_robustness
from .losses import (
    LOSSES,
    AdversarialLoss,
    MARTLoss,
    PGDATLoss,
    TRADESLoss,
    make_adversarial_loss,
    mart_objective,
    register_loss,
    trades_objective,
)
from .normalize import InputNormalization, with_normalization
from .training import training_step_for

__all__ = [
    # settings
    "AttackConfig",
    "NORMS",
    # attacks
    "fgsm",
    "pgd",
    "projected_gradient_ascent",
    "AUTOATTACK_VERSIONS",
    "build_autoattack",
    "autoattack_examples",
    # training losses
    "AdversarialLoss",
    "PGDATLoss",
    "TRADESLoss",
    "MARTLoss",
    "LOSSES",
    "register_loss",
    "make_adversarial_loss",
    "trades_objective",
    "mart_objective",
    "training_step_for",
    # evaluation
    "RobustnessReport",
    "evaluate_robustness",
    # normalisation
    "InputNormalization",
    "with_normalization",
    # errors
    "AdversarialError",
    "AttackConfigError",
    "UnknownNameError",
    "InputError",
    "AutoAttackError",
]
