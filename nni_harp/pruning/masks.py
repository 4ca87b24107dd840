"""Using NNI-format masks ``{module: {param: 0/1 tensor}}`` on a plain (unwrapped) model.

- :func:`apply_masks` multiplies the parameters by their masks once, in place;
- :func:`fix_masks` keeps them multiplied while training (masked fine-tuning of the remaining
  weights): each masked parameter gets a ``torch.nn.utils.parametrize`` parametrisation, so the
  module computes with ``weight * mask`` and masked entries receive zero gradient;
- :func:`release_masks` bakes the masks into the parameters and removes the parametrisations.

``fix_masks`` renames the parameters (``conv.weight`` -> ``conv.parametrizations.weight.original``):
build the fine-tuning optimizer after calling it.
"""
from __future__ import annotations

from typing import Mapping

import torch
from torch import Tensor, nn
from torch.nn.utils import parametrize

from .errors import MaskError

__all__ = ["apply_masks", "fix_masks", "release_masks", "FixedMask"]

Masks = Mapping[str, Mapping[str, "Tensor | None"]]


class FixedMask(nn.Module):
    """Parametrisation ``x -> x * mask`` with the mask stored as a buffer."""

    def __init__(self, mask: Tensor) -> None:
        super().__init__()
        self.register_buffer("mask", mask)

    def forward(self, x: Tensor) -> Tensor:
        return x * self.mask


def _targets(model: nn.Module, masks: Masks) -> list[tuple[str, nn.Module, str, Tensor]]:
    """Resolve and check every (module, param, mask); errors name the module and parameter."""
    modules = dict(model.named_modules())
    resolved = []
    for module_name, targets in masks.items():
        module = modules.get(module_name)
        if module is None:
            raise MaskError(f"masks name module {module_name!r}, which the model does not have", module=module_name)
        if hasattr(module, "_nni_wrapper"):
            raise MaskError(
                f"module {module_name!r} is still wrapped by NNI; call pruner.unwrap_model() first", module=module_name
            )
        for param_name, mask in targets.items():
            if mask is None:
                continue
            if parametrize.is_parametrized(module, param_name):
                tensor = getattr(module.parametrizations, param_name).original
            else:
                tensor = getattr(module, param_name, None)
            if not isinstance(tensor, Tensor):
                raise MaskError(f"{module_name or '<root>'} has no tensor {param_name!r} to mask", module=module_name)
            if tuple(mask.shape) != tuple(tensor.shape):
                raise MaskError(
                    f"mask for {module_name}.{param_name} has shape {tuple(mask.shape)}, the tensor has {tuple(tensor.shape)}",
                    module=module_name,
                )
            resolved.append((module_name, module, param_name, mask.detach().to(device=tensor.device, dtype=tensor.dtype)))
    return resolved


@torch.no_grad()
def apply_masks(model: nn.Module, masks: Masks) -> nn.Module:
    """Multiply each masked parameter (or buffer) by its mask, in place; returns ``model``."""
    for _, module, param_name, mask in _targets(model, masks):
        if parametrize.is_parametrized(module, param_name):
            getattr(module.parametrizations, param_name).original.mul_(mask)
        else:
            getattr(module, param_name).mul_(mask)
    return model


def fix_masks(model: nn.Module, masks: Masks) -> nn.Module:
    """Keep the masks applied while the remaining weights are trained; see the module docstring.
    All-ones masks are skipped. Returns ``model``."""
    for module_name, module, param_name, mask in _targets(model, masks):
        if bool((mask != 0).all()):
            continue
        if not isinstance(getattr(module, param_name, None), nn.Parameter) and not parametrize.is_parametrized(module, param_name):
            raise MaskError(f"{module_name}.{param_name} is not a parameter; use apply_masks for buffers", module=module_name)
        if parametrize.is_parametrized(module, param_name):
            existing = getattr(module.parametrizations, param_name)
            if any(isinstance(p, FixedMask) for p in existing):
                raise MaskError(f"{module_name}.{param_name} already has a fixed mask; release_masks first", module=module_name)
        with torch.no_grad():
            parametrize.register_parametrization(module, param_name, FixedMask(mask))
    return model


def release_masks(model: nn.Module) -> nn.Module:
    """Bake fixed masks into their parameters and remove the parametrisations; returns ``model``."""
    for module_name, module in model.named_modules():
        if not parametrize.is_parametrized(module):
            continue
        for param_name in list(module.parametrizations.keys()):
            chain = getattr(module.parametrizations, param_name)
            if not any(isinstance(p, FixedMask) for p in chain):
                continue
            if len(chain) != 1:
                raise MaskError(
                    f"{module_name}.{param_name} has other parametrisations besides its fixed mask; remove those first",
                    module=module_name,
                )
            parametrize.remove_parametrizations(module, param_name, leave_parametrized=True)
    return model
