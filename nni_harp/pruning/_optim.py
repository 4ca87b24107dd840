"""HARP's own optimization: what is trained while pruning, by which optimizer, at which rate.

Scores (and, with ``train_norm_affine``, the normalisation layers' affine weight and bias, at
their own ``norm_lr``) are trained by one optimizer (``HARPSettings.optimizer``: SGD with
momentum by default, as the authors); the rates by another (``rate_optimizer``: AdamW by default,
or :class:`SharedScaleAdam`; see ``HARPSettings`` for why and what was measured). Both follow one per-epoch learning-rate schedule. The step runs as a *before-step task* of
the evaluator's optimizer (NNI patches only the first optimizer), after which the gradients of
everything stepped here are cleared, so the evaluator's optimizer leaves those tensors alone.
"""
from __future__ import annotations

import math
from typing import Any, Iterable, Sequence

import timm.layers
import torch
from torch import nn

from ._units import ScoreUnit
from .settings import HARPSettings

__all__ = ["NORM_TYPES", "norm_affine_parameters", "freeze_for_pruning", "SharedScaleAdam", "HarpOptimizer"]

#: Normalisation layers whose per-channel affine weight and bias HARP trains while pruning.
NORM_TYPES: tuple[type[nn.Module], ...] = (
    nn.modules.batchnorm._NormBase, nn.LayerNorm, nn.GroupNorm, nn.RMSNorm,
    timm.layers.RmsNorm, timm.layers.RmsNorm2d,
)


def norm_affine_parameters(model: nn.Module) -> list[nn.Parameter]:
    """The affine weight and bias of every normalisation layer of ``model`` (NNI-wrapped or not:
    a wrapped module's parameters live on its wrapper's target spaces)."""
    found: dict[int, nn.Parameter] = {}
    for module in model.modules():
        if not isinstance(module, NORM_TYPES):
            continue
        wrapper = getattr(module, "_nni_wrapper", None)
        for name in ("weight", "bias"):
            space = wrapper.pruning_target_spaces.get(name) if wrapper is not None else None
            value = space.target if space is not None else getattr(module, name, None)
            if isinstance(value, nn.Parameter):
                found.setdefault(id(value), value)
    return list(found.values())


def freeze_for_pruning(model: nn.Module, units: Sequence[ScoreUnit], train_norm_affine: bool) -> dict[nn.Parameter, bool]:
    """Freeze every parameter of ``model`` but the units' scores and rates and (``train_norm_affine``)
    the norm layers' affine ones; returns the ``requires_grad`` flags to restore afterwards."""
    trained = {id(p) for unit in units for p in (unit.scores, unit.rate)}
    if train_norm_affine:
        trained |= {id(p) for p in norm_affine_parameters(model)}
    saved: dict[nn.Parameter, bool] = {}
    for param in model.parameters():
        if id(param) not in trained:
            saved[param] = param.requires_grad
            param.requires_grad_(False)
    return saved


class SharedScaleAdam(torch.optim.Optimizer):
    """Adam whose second moment is one number per parameter group: the running mean of the squared
    gradient over *all* the group's entries, not one per entry (decoupled weight decay as AdamW).

    For HARP's rates (``rate_optimizer='shared-adam'``): the step's overall size does not depend
    on the gradient's scale (rates move in a 60-step run as in an 8,000-step one, as with Adam),
    but the units keep their relative speeds, as with SGD: a unit whose FLOPs or loss matter
    little gets a small gradient and moves little, where per-entry Adam moves every unit by about
    ``lr`` per step in the direction of its gradient's sign. Which is better depends on the mode;
    ``HARPSettings.rate_optimizer`` has the measurements.
    """

    def __init__(self, params: Iterable[Any], lr: float, betas: tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-12, weight_decay: float = 0.0) -> None:
        super().__init__(params, {"lr": lr, "betas": betas, "eps": eps, "weight_decay": weight_decay})

    @torch.no_grad()
    def step(self, closure: Any = None) -> None:  # type: ignore[override]
        assert closure is None, "SharedScaleAdam takes no closure"
        for group in self.param_groups:
            params = [p for p in group["params"] if p.grad is not None]
            if not params:
                continue
            beta1, beta2 = group["betas"]
            state = self.state.setdefault(params[0], {})  # the group's shared state lives on its first entry
            count = sum(p.grad.numel() for p in params)
            mean_sq = sum(p.grad.float().pow(2).sum() for p in params) / count
            step = state["shared_step"] = state.get("shared_step", 0) + 1
            shared = state.get("shared_sq")
            state["shared_sq"] = mean_sq * (1 - beta2) if shared is None else shared * beta2 + mean_sq * (1 - beta2)
            scale = (state["shared_sq"] / (1 - beta2 ** step)).sqrt() + group["eps"]
            for p in params:
                moment = self.state.setdefault(p, {}).get("moment")
                moment = p.grad * (1 - beta1) if moment is None else moment * beta1 + p.grad * (1 - beta1)
                self.state[p]["moment"] = moment
                if group["weight_decay"]:
                    p.mul_(1 - group["lr"] * group["weight_decay"])
                p.sub_(group["lr"] * moment / (1 - beta1 ** step) / scale)


def _build(kind: str, groups: list[dict[str, Any]], momentum: float) -> torch.optim.Optimizer:
    if kind == "sgd":
        return torch.optim.SGD(groups, lr=groups[0]["lr"], momentum=momentum)
    if kind == "shared-adam":
        return SharedScaleAdam(groups, lr=groups[0]["lr"])
    return torch.optim.AdamW(groups, lr=groups[0]["lr"])


class HarpOptimizer:
    """The score (+ norm affine) optimizer and, when rates are learned, the rate optimizer."""

    def __init__(self, settings: HARPSettings, units: Sequence[ScoreUnit], norm_params: Iterable[nn.Parameter]) -> None:
        s = self.settings = settings
        self.units = list(units)
        score_groups: list[dict[str, Any]] = [
            {"params": [u.scores for u in self.units], "lr": s.score_lr, "weight_decay": s.score_weight_decay}
        ]
        norms = list(norm_params)
        if norms:
            score_groups.append({"params": norms, "lr": s.norm_lr_value(), "weight_decay": s.score_weight_decay})
        self.scores = _build(s.optimizer, score_groups, s.momentum)
        self.rates: torch.optim.Optimizer | None = None
        if s.learn_rates:
            rate_group = {"params": [u.rate for u in self.units], "lr": s.rate_lr, "weight_decay": s.rate_weight_decay}
            self.rates = _build(s.rate_optimizer, [rate_group], s.momentum)
        self._base = [[g["lr"] for g in o.param_groups] for o in self._optimizers()]
        self.masks_fixed = False  # settling (HARPSettings.settle_epochs): scores and rates stay put

    def _optimizers(self) -> list[torch.optim.Optimizer]:
        return [self.scores] + ([self.rates] if self.rates is not None else [])

    def set_epoch(self, epoch: int, epochs: int) -> None:
        """Learning rates of ``epoch`` (0-based) of ``epochs``: cosine-annealed or constant."""
        factor = 0.5 * (1.0 + math.cos(math.pi * epoch / epochs)) if self.settings.lr_schedule == "cosine" else 1.0
        for optimizer, base in zip(self._optimizers(), self._base):
            for group, lr in zip(optimizer.param_groups, base):
                group["lr"] = lr * factor

    def step(self) -> None:
        """Clip the rates' gradients, step, clear every gradient stepped here, refresh the masks
        (once the masks are fixed, only the norm affine parameters are stepped)."""
        if self.masks_fixed:
            for unit in self.units:
                unit.scores.grad = None
                unit.rate.grad = None
        clip = self.settings.rate_grad_clip
        if self.rates is not None and clip is not None:
            for unit in self.units:
                if unit.rate.grad is not None:
                    unit.rate.grad.clamp_(-clip, clip)
        for optimizer in self._optimizers():
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        if not self.masks_fixed:
            for unit in self.units:
                unit.refresh()

    def state_dict(self) -> dict[str, Any]:
        return {"scores": self.scores.state_dict(), "rates": None if self.rates is None else self.rates.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.scores.load_state_dict(state["scores"])
        if self.rates is not None and state.get("rates") is not None:
            self.rates.load_state_dict(state["rates"])
