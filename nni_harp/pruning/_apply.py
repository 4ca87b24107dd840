"""HARP's NNI apply method: how a wrapped module's parameter meets its mask.

NNI's ``ModuleWrapper`` multiplies each pruning target by ``pruning_apply_methods[name](target,
target_space)``. While HARP prunes, the targets it controls use ``'harp_mul'``, which asks the
wrapper's registered masker for the target times a differentiable straight-through mask (or,
for a target HARP learns no mask for, times the stored 0/1 mask, computed once per step where no
gradient can flow); without a masker (before installation, after pruning) it multiplies by the
stored mask like NNI's ``'mul'``. The wrapper holds its masker itself, so the
wrapped model masks as long as it is wrapped, whether or not the pruner object is still referenced
(it used to depend on when the garbage collector found a dropped pruner).

NNI's target space answers ``apply_method`` from a deep copy of its whole setting (the config
list entry, about 5 us), and the wrapper asks twice per target per forward pass: on test_resnet
about 2 ms of a 60 ms pruning step. NNI's wrapper also runs every input and output of the module
through its target machinery (argument binding, shape tracking) although HARP's wrappers have
parameter targets only. :func:`quicken` gives HARP's wrappers target spaces that read the one field
and a forward pass that goes straight to the parameters' masks where nothing else is configured.
"""
from __future__ import annotations

from typing import Any, Callable

import torch
from torch import Tensor, nn

from nni.compression.base.apply_method import pruning_apply_methods
import torch.nn.modules.module as _torch_module
from nni.compression.base.target_space import PruningTargetSpace, TargetType
from nni.compression.base.wrapper import ModuleWrapper, track_target_shape

__all__ = ["APPLY_METHOD", "Masker", "set_masker", "clear_masker", "quicken"]

APPLY_METHOD = "harp_mul"

# masker(target_name, target, stored_mask) -> target times its (differentiable) mask
Masker = Callable[[str, Tensor, Tensor], Tensor]
_MASKER_ATTR = "_harp_masker"  # in the wrapper's __dict__


def _harp_mul(target: Tensor, target_space: PruningTargetSpace) -> Tensor:
    return _masked(target_space._wrapper, target_space._target_name, target, target_space.mask)


def _masked(wrapper: nn.Module, name: str, target: Tensor, mask: Tensor) -> Tensor:
    masker = wrapper.__dict__.get(_MASKER_ATTR)
    return torch.mul(target, mask) if masker is None else masker(name, target, mask)


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


class _QuickWrapper(ModuleWrapper):
    """NNI's module wrapper whose forward pass, for a wrapper with parameter pruning targets only (no
    input or output targets, quantization, distillation, fused modules or extra tracking: HARP's),
    masks the parameters and calls the module, as NNI's forward does then, without binding the
    arguments and passing the inputs and outputs through the (empty) target machinery."""

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        if not _parameters_only(self):
            return super().forward(*args, **kwargs)
        masked = []
        for name, space in self.pruning_target_spaces.items():
            target = getattr(self, space._target_name)  # space.target of a parameter target
            mask = getattr(self, space._mask_name)  # space.mask
            # NNI's _apply_mask_helper, straight to 'harp_mul' for HARP's targets
            quick = mask is not None and space.apply_method == APPLY_METHOD
            masked.append((name, _masked(self, name, target, mask) if quick else self._apply_mask_helper(target, space)))
        buffers = self.module.__dict__.get("_buffers", {}) if _no_buffer_hooks() else {}
        for name, value in masked:
            if buffers.get(name) is not value:  # a cached product may be set already
                setattr(self.module, name, value)
        outputs = self.module_forward(*args, **kwargs)
        if not isinstance(outputs, Tensor):
            outputs = self.patch_outputs(outputs)  # NNI's checks of other outputs
        torch.cuda.empty_cache()  # as NNI's forward
        return outputs


def _no_buffer_hooks() -> bool:
    """Whether no global buffer registration hook exists (torch's private registry of them; where
    it cannot be read, assume one does), so that setting a buffer to its own value does nothing."""
    hooks = getattr(_torch_module, "_global_buffer_registration_hooks", None)
    return hooks is not None and not hooks


def _parameters_only(wrapper: ModuleWrapper) -> bool:
    return (not wrapper.quantization_target_spaces and not wrapper.distillation_target_spaces
            and not wrapper.fused_modules and not wrapper.__dict__.get("is_bias_correction", False)
            and len(wrapper._track_funcs) == 1 and wrapper._track_funcs[0] is track_target_shape
            and all(space.type is TargetType.PARAMETER for space in wrapper.pruning_target_spaces.values()))


def quicken(wrapper: nn.Module) -> None:
    """Give ``wrapper`` the forward pass of :class:`_QuickWrapper` and its pruning target spaces the
    ``apply_method`` of :class:`_QuickTargetSpace`."""
    for space in wrapper.pruning_target_spaces.values():
        if type(space) is PruningTargetSpace:
            space.__class__ = _QuickTargetSpace
    if type(wrapper) is ModuleWrapper:
        wrapper.__class__ = _QuickWrapper
        if getattr(wrapper.module, "_nni_wrapper", None) is wrapper:  # wrapped: forward was bound before
            wrapper.module.forward = wrapper.forward


pruning_apply_methods.setdefault(APPLY_METHOD, _harp_mul)
