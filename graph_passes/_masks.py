"""NNI-format masks ``{module_name: {tensor_name: mask}}`` as NNI's pruners and users write them:
read from a file or a dict, checked against the model, multiplied into it."""
from __future__ import annotations

import copy
import os
from typing import Any, Mapping

import torch
from torch import nn

from .errors import SpeedupError

__all__ = ["Masks", "load_masks", "normalize_masks", "bake", "masked_copy", "combine_masks", "leftover_zeros"]

Masks = dict[str, dict[str, torch.Tensor]]


def load_masks(masks_or_file: Any, map_location: Any = None) -> Mapping[str, Any]:
    """NNI's ``masks_or_file``: a mapping, or the path of one saved with ``torch.save`` (read with
    ``weights_only=True``)."""
    if isinstance(masks_or_file, (str, os.PathLike)):
        if not os.path.isfile(masks_or_file):
            raise SpeedupError(f"masks file not found: {os.fspath(masks_or_file)}")
        masks_or_file = torch.load(masks_or_file, map_location=map_location, weights_only=True)
    if not isinstance(masks_or_file, Mapping):
        raise SpeedupError(f"masks must be a dict {{module name: {{tensor name: mask}}}} or the path of a saved one, "
                           f"got {type(masks_or_file).__name__}")
    return masks_or_file


def _wrapped(model: nn.Module) -> list[str]:
    return [name for name, m in model.named_modules() if hasattr(m, "_nni_wrapper")]


def normalize_masks(model: nn.Module, masks: Mapping[str, Any]) -> Masks:
    """The masks as tensors of their targets' shapes, in the targets' dtypes and devices.

    As NNI's pruners write them: a ``None`` mask (a target the layer does not have, such as the
    bias of a conv without one) is dropped; bool, integer and float masks are accepted. A mask
    for a module or tensor the model does not have, or of another shape, is an error naming it.
    """
    wrapped = _wrapped(model)
    if wrapped:
        raise SpeedupError(f"the model is still wrapped by an NNI pruner ({wrapped[0]}._nni_wrapper, ...): call "
                           "pruner.unwrap_model() before the speedup")
    out: Masks = {}
    for module_name, targets in masks.items():
        if targets is None:
            continue
        if not isinstance(targets, Mapping):
            raise SpeedupError(f"masks[{module_name!r}] must map tensor names to masks, got {type(targets).__name__}")
        try:
            owner = model.get_submodule(module_name) if module_name else model
        except AttributeError:
            raise SpeedupError(f"mask given for module {module_name!r}, which the model does not have") from None
        for name, mask in targets.items():
            if mask is None:
                continue
            value = getattr(owner, name, None)
            if not isinstance(value, torch.Tensor):
                raise SpeedupError(f"mask given for {module_name}.{name}, which the model does not have")
            mask = torch.as_tensor(mask)
            if tuple(mask.shape) != tuple(value.shape):
                raise SpeedupError(f"mask for {module_name}.{name} has shape {tuple(mask.shape)}, the tensor {tuple(value.shape)}")
            out.setdefault(module_name, {})[name] = mask.detach().to(device=value.device, dtype=value.dtype)
    return out


def bake(model: nn.Module, masks: Masks) -> None:
    """Multiply the (normalised) masks into the model's tensors, in place."""
    with torch.no_grad():
        for module_name, targets in masks.items():
            owner = model.get_submodule(module_name) if module_name else model
            for name, mask in targets.items():
                getattr(owner, name).mul_(mask)


def masked_copy(model: nn.Module, masks: Mapping[str, Any]) -> nn.Module:
    """A deep copy of ``model`` with NNI-format ``masks`` multiplied into its tensors (``None``
    entries skipped). With ``ModelSpeedup.applied_masks`` it is the model the speedup's result
    equals."""
    masked = copy.deepcopy(model)
    bake(masked, normalize_masks(masked, masks))
    return masked


def combine_masks(a: Masks, b: Masks) -> Masks:
    """The product of two mask sets (a tensor masked in one of them only keeps that mask)."""
    out: Masks = {m: dict(t) for m, t in a.items()}
    for module, targets in b.items():
        for name, mask in targets.items():
            have = out.setdefault(module, {}).get(name)
            out[module][name] = mask if have is None else have * mask.to(have)
    return out


def leftover_zeros(raw: Masks, removed: Masks) -> tuple[int, int]:
    """``(zeros that stay, all zeros)`` of the ``raw`` masks: masked entries in channels the
    speedup keeps (the channel masks ``removed`` are one there), i.e. element-wise sparsity it
    cannot remove."""
    left = total = 0
    for module, targets in raw.items():
        for name, mask in targets.items():
            zero = mask == 0
            total += int(zero.sum())
            gone = removed.get(module, {}).get(name)
            left += int(zero.sum()) if gone is None else int((zero & (gone != 0)).sum())
    return left, total
