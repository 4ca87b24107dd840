"""Adapter from an adversarial loss to the ``training_step(batch, model)`` of NNI's evaluators."""
from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

from torch import Tensor, nn

from ._model_state import model_device
from .errors import InputError
from .losses import AdversarialLoss

__all__ = ["TrainingStep", "training_step_for", "split_batch"]

TrainingStep = Callable[[Any, nn.Module], Tensor]


def split_batch(batch: Any) -> tuple[Tensor, Tensor]:
    """``(inputs, labels)`` from a ``(inputs, labels, *ignored)`` batch, or :class:`InputError`."""
    if isinstance(batch, Mapping):
        raise InputError(
            f"training batch is a mapping with keys {sorted(batch)}; expected a pair (inputs, labels)"
        )
    if not isinstance(batch, Sequence) or len(batch) < 2:
        kind = type(batch).__name__
        raise InputError(f"training batch must be a pair (inputs, labels), got {kind}")
    x, y = batch[0], batch[1]
    if not isinstance(x, Tensor) or not isinstance(y, Tensor):
        raise InputError(
            f"training batch must hold tensors (inputs, labels), got "
            f"({type(x).__name__}, {type(y).__name__})"
        )
    return x, y


def training_step_for(adv_loss: AdversarialLoss) -> TrainingStep:
    """A ``training_step(batch, model) -> loss`` for ``nni.compression.TorchEvaluator``.

    ``batch`` is ``(inputs, labels, *ignored)`` as a data loader yields it; both tensors are moved
    to the device of the model's parameters before ``adv_loss(model, inputs, labels)`` is
    returned. Pruners that patch the evaluator's loss (``evaluator.patch_loss``) add their terms
    to this value.
    """
    if not isinstance(adv_loss, AdversarialLoss):
        raise InputError(
            f"training_step_for expects an AdversarialLoss (see make_adversarial_loss), "
            f"got {type(adv_loss).__name__}"
        )

    def training_step(batch: Any, model: nn.Module) -> Tensor:
        x, y = split_batch(batch)
        device = model_device(model)
        x = x.to(device, non_blocking=True)
        y = y.to(device, non_blocking=True)
        return adv_loss(model, x, y)

    training_step.__qualname__ = f"training_step_for({type(adv_loss).__name__})"
    return training_step
