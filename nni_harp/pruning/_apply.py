"""HARP's NNI apply method: how a wrapped module's parameter meets its mask.

NNI's ``ModuleWrapper`` multiplies each pruning target by ``pruning_apply_methods[name](target,
target_space)``. While HARP prunes, the targets it controls use ``'harp_mul'``, which asks the
wrapper's registered masker for the target times a differentiable straight-through mask; without
a masker (before installation, after pruning), or where the masker leaves a target alone, it
multiplies by the stored 0/1 mask like NNI's ``'mul'``. The wrapper holds its masker itself, so the
wrapped model masks as long as it is wrapped, whether or not the pruner object is still referenced
(it used to depend on when the garbage collector found a dropped pruner).

NNI's target space answers ``apply_method`` from a deep copy of its whole setting (the config
list entry, about 5 us), and the wrapper asks twice per target per forward pass: on test_resnet
about 2 ms of a 60 ms pruning step. :func:`quick_apply_method` gives HARP's wrappers target
spaces that read the one field instead.
"""
from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor, nn

from nni.compression.base.apply_method import pruning_apply_methods
from nni.compression.base.target_space import PruningTargetSpace

__all__ = ["APPLY_METHOD", "Masker", "set_masker", "clear_masker", "quick_apply_method"]

APPLY_METHOD = "harp_mul"

# masker(target_name, target) -> target times its differentiable mask, or None: use the stored mask
Masker = Callable[[str, Tensor], "Tensor | None"]
_MASKER_ATTR = "_harp_masker"  # in the wrapper's __dict__


def _harp_mul(target: Tensor, target_space: PruningTargetSpace) -> Tensor:
    masker = target_space._wrapper.__dict__.get(_MASKER_ATTR)
    masked = masker(target_space._target_name, target) if masker is not None else None
    return torch.mul(target, target_space.mask) if masked is None else masked


def set_masker(wrapper: nn.Module, masker: Masker) -> None:
    """Route ``wrapper``'s ``'harp_mul'`` targets through ``masker`` (held by the wrapper)."""
    wrapper.__dict__[_MASKER_ATTR] = masker


def clear_masker(wrapper: nn.Module) -> None:
    wrapper.__dict__.pop(_MASKER_ATTR, None)


class _QuickTargetSpace(PruningTargetSpace):
    """NNI's pruning target space whose ``apply_method`` reads its setting without copying it."""

    @property
    def apply_method(self) -> str:
        return self._setting.get("apply_method") or "mul"  # NNI's rule, without deepcopy(self._setting)

    @apply_method.setter
    def apply_method(self, val: str) -> None:
        self._setting["apply_method"] = val


def quick_apply_method(wrapper: nn.Module) -> None:
    """Give ``wrapper``'s pruning target spaces the ``apply_method`` of :class:`_QuickTargetSpace`."""
    for space in wrapper.pruning_target_spaces.values():
        if type(space) is PruningTargetSpace:
            space.__class__ = _QuickTargetSpace


pruning_apply_methods.setdefault(APPLY_METHOD, _harp_mul)
