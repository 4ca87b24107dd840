"""White-box attacks on classifiers whose inputs lie in ``[0, 1]``: FGSM and L-inf / L2 PGD.

PGD follows Madry et al. (2018): start at the input or at a uniformly random point of the
``eps``-ball, take ``steps`` ascent steps on the objective (signed gradient for L-inf, gradient
scaled to unit Euclidean length for L2), and after each step project back onto the ball and onto
the valid pixel box ``[0, 1]``.

Common to every attack here:

- the model runs in eval mode during the attack; every submodule's own train/eval flag is restored
  afterwards (so BatchNorm statistics are neither used from the batch nor updated);
- gradients are taken with respect to the input only (``torch.autograd.grad``), with every
  parameter frozen meanwhile (``requires_grad`` restored afterwards), so no ``.grad`` of a
  parameter is created or changed and no graph is recorded for the parameters (a pruner's masked
  weights are then constants it can reuse across the attack's steps);
- the returned tensor is detached and lies in ``[0, 1]``.
"""
from __future__ import annotations

import logging
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ._model_state import eval_mode, frozen_parameters, unwrap_parallel
from .config import AttackConfig
from .errors import AttackConfigError, InputError

__all__ = ["Objective", "fgsm", "pgd", "projected_gradient_ascent", "logits_of", "check_inputs"]

logger = logging.getLogger(__name__)

Objective = Callable[[Tensor], Tensor]
"""Maps the logits of the perturbed batch to a scalar that the adversary maximises."""

# Slack allowed on the [0, 1] input range check (data pipelines can overshoot by rounding).
_RANGE_TOLERANCE = 1e-5
# Floor on Euclidean norms that are divided by (all-zero gradients or perturbations).
_NORM_FLOOR = 1e-12


def logits_of(model: nn.Module, x: Tensor) -> Tensor:
    """``model(x)``, checked to be a ``[N, num_classes]`` tensor of logits."""
    out = model(x)
    if not isinstance(out, Tensor):
        raise InputError(
            f"the model returned {type(out).__name__}, expected a logits tensor of shape "
            f"[N, num_classes]; wrap the model so that forward() returns the logits only"
        )
    if out.dim() != 2 or out.shape[0] != x.shape[0]:
        raise InputError(
            f"the model returned shape {tuple(out.shape)} for a batch of {x.shape[0]}; "
            f"expected logits of shape [{x.shape[0]}, num_classes]"
        )
    return out


def check_inputs(x: Tensor, y: Tensor | None = None) -> None:
    """Raise :class:`InputError` unless ``x`` is a float batch in ``[0, 1]`` and ``y`` its labels."""
    if not isinstance(x, Tensor) or not x.is_floating_point() or x.dim() < 2:
        shape = tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__
        raise InputError(f"inputs must be a floating-point tensor [N, ...], got {shape}")
    if torch.is_inference_mode_enabled():
        raise InputError(
            "attacks need autograd and cannot run under torch.inference_mode(); "
            "use torch.no_grad() or no context instead"
        )
    if x.numel() > 0:
        low, high = float(x.min()), float(x.max())
        if low < -_RANGE_TOLERANCE or high > 1.0 + _RANGE_TOLERANCE:
            raise InputError(
                f"inputs must lie in [0, 1] (pixel space), found values in [{low:.4g}, {high:.4g}]; "
                f"if the model expects normalised inputs, wrap it with "
                f"nni_harp.adversarial.with_normalization(model, mean, std) and pass raw pixels"
            )
    if y is not None:
        if not isinstance(y, Tensor) or y.dim() != 1 or y.shape[0] != x.shape[0]:
            shape = tuple(y.shape) if isinstance(y, Tensor) else type(y).__name__
            raise InputError(f"labels must be a tensor of shape [{x.shape[0]}], got {shape}")
        if y.is_floating_point() or y.is_complex():
            raise InputError(f"labels must be integer class indices, got dtype {y.dtype}")


def _per_sample_norm(t: Tensor) -> Tensor:
    """Euclidean norm of each sample, shaped to broadcast against ``t``."""
    return t.flatten(1).norm(p=2, dim=1).view(-1, *([1] * (t.dim() - 1)))


def _random_start(x: Tensor, config: AttackConfig) -> Tensor:
    """A uniformly random point of the ``eps``-ball around 0 (before the pixel-box clamp)."""
    if config.norm == "linf":
        return torch.empty_like(x).uniform_(-config.eps, config.eps)
    direction = torch.randn_like(x)
    direction = direction / _per_sample_norm(direction).clamp_min(_NORM_FLOOR)
    dims = x[0].numel()
    # Radius eps * U^(1/d) makes the point uniform in the d-dimensional ball.
    radius = config.eps * torch.rand(x.shape[0], device=x.device, dtype=x.dtype) ** (1.0 / dims)
    return direction * radius.view(-1, *([1] * (x.dim() - 1)))


def _project(delta: Tensor, x: Tensor, config: AttackConfig) -> Tensor:
    """Project ``delta`` onto the ``eps``-ball, then make ``x + delta`` a valid image.

    The pixel clamp only shrinks each coordinate of ``delta`` towards 0, so the result stays in
    the ball for both norms.
    """
    if config.norm == "linf":
        delta = delta.clamp(-config.eps, config.eps)
    else:
        scale = (config.eps / _per_sample_norm(delta).clamp_min(_NORM_FLOOR)).clamp(max=1.0)
        delta = delta * scale
    return (x + delta).clamp(0.0, 1.0) - x


def _ascent_direction(grad: Tensor, config: AttackConfig) -> Tensor:
    if config.norm == "linf":
        return grad.sign()
    return grad / _per_sample_norm(grad).clamp_min(_NORM_FLOOR)


def projected_gradient_ascent(
    model: nn.Module,
    x: Tensor,
    objective: Objective,
    config: AttackConfig,
    *,
    init: Tensor | None = None,
) -> Tensor:
    """Maximise ``objective(model(x + delta))`` over ``delta`` in the ``config`` threat model.

    ``init`` (a starting perturbation, projected before the first step) overrides
    ``config.random_start``; TRADES uses it for its small Gaussian start.
    """
    check_inputs(x)
    net = unwrap_parallel(model)
    x = x.detach()
    if init is not None:
        delta = init.detach().to(dtype=x.dtype, device=x.device)
    elif config.random_start:
        delta = _random_start(x, config)
    else:
        delta = torch.zeros_like(x)
    delta = _project(delta, x, config)
    with eval_mode(net), frozen_parameters(net), torch.enable_grad():
        for _ in range(config.steps):
            delta.requires_grad_(True)
            value = objective(logits_of(net, x + delta))
            (grad,) = torch.autograd.grad(value, delta, allow_unused=True)
            if grad is None:  # the objective does not depend on the input
                grad = torch.zeros_like(delta)
            step = config.step_size * _ascent_direction(grad, config)
            delta = _project(delta.detach() + step, x, config)
    return (x + delta).clamp(0.0, 1.0).detach()


def pgd(model: nn.Module, x: Tensor, y: Tensor, config: AttackConfig) -> Tensor:
    """Untargeted PGD on the cross-entropy of the true labels ``y``; returns ``x_adv``."""
    check_inputs(x, y)
    y = y.detach()

    def cross_entropy(logits: Tensor) -> Tensor:
        # Summed, not averaged: each sample's gradient does not shrink with the batch size.
        return F.cross_entropy(logits, y, reduction="sum")

    return projected_gradient_ascent(model, x, cross_entropy, config)


def fgsm(model: nn.Module, x: Tensor, y: Tensor, eps: float) -> Tensor:
    """Fast gradient sign method (Goodfellow et al., 2015): ``clamp(x + eps * sign(grad), 0, 1)``.

    The gradient is that of the cross-entropy of ``y`` at ``x``; ``eps`` is in pixel space, in
    ``(0, 1]``.
    """
    if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not 0.0 < float(eps) <= 1.0:
        raise AttackConfigError("eps", eps, "a number in (0, 1]")
    check_inputs(x, y)
    net = unwrap_parallel(model)
    x = x.detach()
    with eval_mode(net), frozen_parameters(net), torch.enable_grad():
        x_var = x.clone().requires_grad_(True)
        loss = F.cross_entropy(logits_of(net, x_var), y.detach(), reduction="sum")
        (grad,) = torch.autograd.grad(loss, x_var)
    return (x + float(eps) * grad.sign()).clamp(0.0, 1.0).detach()
