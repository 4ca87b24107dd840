"""Temporary changes to a model's state that are always undone (private infrastructure)."""
from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn

__all__ = ["eval_mode", "frozen_parameters", "unwrap_parallel", "model_device"]


@contextmanager
def eval_mode(model: nn.Module) -> Iterator[nn.Module]:
    """Put every submodule in eval mode; restore each submodule's own flag on exit.

    Restoring per submodule (not just ``model.train(was_training)``) keeps deliberately frozen parts
    of a training model (e.g. BatchNorm layers held in eval) as they were.
    """
    modes = [(module, module.training) for module in model.modules()]
    model.eval()
    try:
        yield model
    finally:
        # train() first, so that modules overriding it see the switch back; then the exact flags.
        model.train(modes[0][1])
        for module, training in modes:
            module.training = training


@contextmanager
def frozen_parameters(model: nn.Module) -> Iterator[nn.Module]:
    """Switch ``requires_grad`` off for every parameter; restore the previous flags on exit.

    Attacks only need gradients with respect to the input; with the parameters frozen, code that
    calls ``.backward()`` (torchattacks' FAB does) cannot accumulate into ``param.grad``.
    """
    flags = [(param, param.requires_grad) for param in model.parameters()]
    for param, _ in flags:
        param.requires_grad_(False)
    try:
        yield model
    finally:
        for param, flag in flags:
            param.requires_grad_(flag)


def unwrap_parallel(model: nn.Module) -> nn.Module:
    """The module inside ``DataParallel`` / ``DistributedDataParallel``, else ``model`` itself.

    Attack forward passes go to the inner module: a DDP forward with gradients enabled expects a
    backward into the parameters, which an input-gradient attack never runs; the next DDP forward
    would then fail ("Expected to have finished reduction in the prior iteration").
    """
    parallel = (nn.DataParallel, nn.parallel.DistributedDataParallel)
    while isinstance(model, parallel):
        model = model.module
    return model


def model_device(model: nn.Module) -> torch.device:
    """Device of the model's first parameter (or buffer); CPU for a model holding neither."""
    for param in model.parameters():
        return param.device
    for buffer in model.buffers():
        return buffer.device
    return torch.device("cpu")
