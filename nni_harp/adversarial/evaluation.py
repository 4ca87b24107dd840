"""Clean, PGD and AutoAttack accuracy of a classifier over a data loader."""
from __future__ import annotations

import logging
from collections.abc import Iterable
from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import Tensor, nn

from ._model_state import eval_mode, frozen_parameters, model_device, unwrap_parallel
from .attacks import logits_of, pgd
from .autoattack import AUTOATTACK_VERSIONS, autoattack_examples
from .config import AttackConfig
from .errors import AttackConfigError, InputError, UnknownNameError
from .training import split_batch

__all__ = ["RobustnessReport", "evaluate_robustness"]

logger = logging.getLogger(__name__)


def _fraction(field: str, value: object) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= value <= 1.0:
        raise AttackConfigError(field, value, "a fraction in [0, 1]")


@dataclass(frozen=True)
class RobustnessReport:
    """Accuracies (fractions in ``[0, 1]``) on the same ``n`` samples.

    ``autoattack`` is ``None`` when AutoAttack was not run.
    """

    clean: float
    pgd: float
    autoattack: float | None
    n: int

    def __post_init__(self) -> None:
        _fraction("clean", self.clean)
        _fraction("pgd", self.pgd)
        if self.autoattack is not None:
            _fraction("autoattack", self.autoattack)
        if isinstance(self.n, bool) or not isinstance(self.n, int) or self.n < 1:
            raise AttackConfigError("n", self.n, "an int >= 1 (number of evaluated samples)")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def evaluate_robustness(
    model: nn.Module,
    loader: Iterable[Any],
    attack: AttackConfig,
    autoattack: bool = True,
    max_batches: int | None = None,
    device: torch.device | str | None = None,
    *,
    autoattack_version: str = "standard",
    n_classes: int | None = None,
    seed: int = 0,
) -> RobustnessReport:
    """Accuracy on clean inputs, on PGD examples (``attack``) and on AutoAttack examples.

    Args:
        model: classifier taking inputs in ``[0, 1]`` (see :func:`with_normalization`).
        loader: yields ``(inputs, labels, *ignored)`` batches.
        attack: PGD settings; AutoAttack uses its ``norm`` and ``eps`` only.
        autoattack: also run AutoAttack (slow with ``autoattack_version='standard'``).
        max_batches: evaluate at most this many batches (``None``: the whole loader).
        device: where to evaluate; the model is moved there (``model.to(device)``, in place).
            ``None`` keeps the model where it is and moves batches to it.
        autoattack_version: one of :data:`AUTOATTACK_VERSIONS`; ``'standard'`` is the number to
            report, ``'apgd-ce'`` a quick approximation.
        n_classes: number of classes for AutoAttack's targeted parts; default: the model's logits
            width.
        seed: seed of AutoAttack's random starts (the caller's RNG state is not changed).

    The model is evaluated in eval mode with its parameters frozen; its train/eval flags and
    ``requires_grad`` flags are restored afterwards.
    """
    if not isinstance(attack, AttackConfig):
        raise AttackConfigError("attack", attack, "an AttackConfig instance")
    if max_batches is not None and (
        isinstance(max_batches, bool) or not isinstance(max_batches, int) or max_batches < 1
    ):
        raise AttackConfigError("max_batches", max_batches, "None or an int >= 1")
    if autoattack and autoattack_version not in AUTOATTACK_VERSIONS:
        raise UnknownNameError("AutoAttack version", autoattack_version, AUTOATTACK_VERSIONS)
    if device is not None:
        model.to(device)
    target = model_device(model)
    net = unwrap_parallel(model)

    n = clean_ok = pgd_ok = aa_ok = 0
    with frozen_parameters(net), eval_mode(net):
        for index, batch in enumerate(loader):
            if max_batches is not None and index >= max_batches:
                break
            x, y = split_batch(batch)
            x, y = x.to(target), y.to(target)
            with torch.no_grad():
                logits = logits_of(net, x)
            classes = logits.shape[1] if n_classes is None else n_classes
            if classes != logits.shape[1]:
                raise InputError(f"n_classes={n_classes} but the model returns {logits.shape[1]} logits")
            clean_ok += _correct(logits, y)
            pgd_ok += _correct(_predict(net, pgd(net, x, y, attack)), y)
            if autoattack:
                x_aa = autoattack_examples(net, x, y, attack, classes, version=autoattack_version, seed=seed)
                aa_ok += _correct(_predict(net, x_aa), y)
            n += x.shape[0]
            logger.debug("batch %d: %d samples evaluated", index, n)
    if n == 0:
        raise InputError("the loader yielded no samples; nothing to evaluate")
    report = RobustnessReport(
        clean=clean_ok / n, pgd=pgd_ok / n, autoattack=aa_ok / n if autoattack else None, n=n
    )
    aa_text = "off" if report.autoattack is None else f"{report.autoattack:.4f} ({autoattack_version})"
    logger.info(
        "robustness on %d samples (%s, eps=%.4g): clean %.4f, PGD-%d %.4f, AutoAttack %s",
        n, attack.norm, attack.eps, report.clean, attack.steps, report.pgd, aa_text,
    )
    return report


def _predict(model: nn.Module, x: Tensor) -> Tensor:
    with torch.no_grad():
        return logits_of(model, x)


def _correct(logits: Tensor, y: Tensor) -> int:
    return int((logits.argmax(dim=1) == y).sum())

