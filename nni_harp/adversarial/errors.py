"""Errors raised by :mod:`nni_harp.adversarial`.

Every error is a ``ValueError`` (callers that only catch ``ValueError`` keep working) and says what
was wrong and how to fix it.
"""
from __future__ import annotations

__all__ = [
    "AdversarialError",
    "AttackConfigError",
    "UnknownNameError",
    "InputError",
    "AutoAttackError",
]


class AdversarialError(ValueError):
    """Base class of every error raised by the adversarial package."""


class AttackConfigError(AdversarialError):
    """A setting (attack, loss, normalisation) is outside its allowed range."""

    def __init__(self, field: str, value: object, allowed: str) -> None:
        self.field = field
        self.value = value
        self.allowed = allowed
        super().__init__(f"{field}={value!r} is invalid: {field} must be {allowed}")


class UnknownNameError(AdversarialError):
    """A name (loss, AutoAttack version, norm) is not one of the registered ones."""

    def __init__(self, kind: str, name: object, allowed: tuple[str, ...]) -> None:
        self.kind = kind
        self.name = name
        self.allowed = allowed
        choices = ", ".join(repr(a) for a in allowed)
        super().__init__(f"unknown {kind} {name!r}; choose one of: {choices}")


class InputError(AdversarialError):
    """A batch, model output or data loader does not have the expected form."""


class AutoAttackError(AdversarialError):
    """AutoAttack (from torchattacks) cannot run with the given model or settings."""
