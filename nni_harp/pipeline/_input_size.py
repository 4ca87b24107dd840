"""Does a model take the run's input size? Checked once, before any training, with the sizes that do.

A ViT's patch size must divide the image size; a deep CNN needs a minimum size before its
kernels outgrow the feature maps. Rather than a table per architecture, the model is run once on
a zero image of the requested size; when that fails, nearby sizes (multiples of the patch size
where the model has one) are tried on freshly built models, and the error lists those that work.
"""
from __future__ import annotations

from typing import Callable

import torch
from torch import nn

from .checkpoint import first_line
from .config import ConfigError

__all__ = ["check_input_size", "input_size_error"]

_MAX_PROBES = 8
_COMMON_SIZES = (32, 64, 96, 128, 160, 224)


def _forward_error(model: nn.Module, size: int, in_chans: int) -> str | None:
    """None when ``model`` takes a ``[1, in_chans, size, size]`` input, else the error's first line."""
    was_training = model.training
    device = next((p.device for p in model.parameters()), torch.device("cpu"))
    model.eval()
    try:
        with torch.no_grad(), torch.random.fork_rng(devices=[]):
            model(torch.zeros(1, in_chans, size, size, device=device))
    except Exception as exc:  # noqa: BLE001 - whatever the architecture raises is the answer
        return f"{type(exc).__name__}: {first_line(exc)}" if str(exc).strip() else type(exc).__name__
    finally:
        model.train(was_training)
    return None


def _patch_size(model: nn.Module) -> int | None:
    """The (square) patch size of the first patch embedding in ``model``, if it has one."""
    for module in model.modules():
        size = getattr(module, "patch_size", None)
        if isinstance(size, int) and size > 1:
            return size
        if isinstance(size, (tuple, list)) and len(set(size)) == 1 and isinstance(size[0], int) and size[0] > 1:
            return int(size[0])
    return None


def _sizes_that_work(build: Callable[[int], nn.Module], size: int, in_chans: int, patch: int | None) -> list[int]:
    step = patch or 8
    candidates = {-(-size // m) * m for m in (step, 16, 32)} | {size // step * step} | set(_COMMON_SIZES)
    if patch:
        candidates = {c for c in candidates if c % patch == 0}
    ordered = sorted((c for c in candidates if 8 <= c <= 1024 and c != size), key=lambda c: (abs(c - size), c))
    works: list[int] = []
    for candidate in ordered[:_MAX_PROBES]:
        try:
            model = build(candidate)
        except Exception:  # noqa: BLE001 - a size the model cannot even be built for
            continue
        if _forward_error(model, candidate, in_chans) is None:
            works.append(candidate)
            if len(works) == 3:
                break
    return sorted(works)


def input_size_error(name: str, size: int, reason: str, build: Callable[[int], nn.Module], in_chans: int,
                     model: nn.Module | None = None) -> ConfigError:
    """The :class:`ConfigError` for a model that cannot take ``size`` px inputs: why, and the sizes
    that work (tried on models from ``build(size)``)."""
    patch = _patch_size(model) if model is not None else None
    works = _sizes_that_work(build, size, in_chans, patch)
    rule = f" (a multiple of its patch size {patch})" if patch else ""
    if works:
        hint = f"sizes that work{rule}: {', '.join(map(str, works))}; pass one with --image-size"
    else:
        hint = f"no nearby size worked either{rule}; try the model's own input size or another model"
    return ConfigError("image_size", f"{name} cannot take {size}x{size} inputs ({reason}); {hint}")


def check_input_size(name: str, model: nn.Module, size: int, in_chans: int,
                     build: Callable[[int], nn.Module]) -> None:
    """Raise :class:`ConfigError` (field ``image_size``) when ``model`` cannot run on ``size`` px
    images, naming sizes that work; ``build(s)`` makes the same architecture for ``s`` px."""
    reason = _forward_error(model, size, in_chans)
    if reason is not None:
        raise input_size_error(name, size, reason, build, in_chans, model)
