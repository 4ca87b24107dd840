"""training_step_for inside a real nni.compression TorchEvaluator."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import nni
import pytest
import torch
from nni.compression import TorchEvaluator
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset

from nni_harp.adversarial import AttackConfig, InputError, make_adversarial_loss, training_step_for

ATTACK = AttackConfig(norm="linf", eps=0.1, step_size=0.05, steps=2)


def test_training_step_drives_a_torch_evaluator(
    trained_model: nn.Module, digits: tuple[Tensor, Tensor, Tensor, Tensor]
) -> None:
    x_train, y_train, _, _ = digits
    loader = DataLoader(TensorDataset(x_train[:64], y_train[:64]), batch_size=16)
    losses: list[float] = []

    def training_func(
        model: nn.Module,
        optimizers: Any,
        training_step: Callable,
        lr_schedulers: Any,
        max_steps: int | None,
        max_epochs: int | None,
    ) -> None:
        model.train()
        for step, batch in enumerate(loader):
            if max_steps is not None and step >= max_steps:
                break
            optimizers.zero_grad()
            loss = training_step(batch, model)
            loss.backward()
            optimizers.step()
            losses.append(loss.item())

    patched: list[int] = []

    def loss_patch(loss: Tensor, batch: Any) -> Tensor:
        patched.append(len(batch[0]))
        return loss

    optimizer = nni.trace(torch.optim.SGD)(trained_model.parameters(), lr=0.05)
    step = training_step_for(make_adversarial_loss("trades", ATTACK, beta=1.0))
    evaluator = TorchEvaluator(training_func, optimizer, step)
    evaluator._init_optimizer_helpers(trained_model)
    evaluator.bind_model(trained_model)
    evaluator.patch_loss(loss_patch)
    before = [p.detach().clone() for p in trained_model.parameters()]
    evaluator.train(max_steps=3)
    evaluator.unbind_model()

    assert len(losses) == 3 and all(torch.isfinite(torch.tensor(losses)))
    assert patched == [16, 16, 16]
    assert all(not torch.equal(b, p) for b, p in zip(before, trained_model.parameters()))


def test_training_step_ignores_extra_batch_entries_and_keeps_the_device(
    trained_model: nn.Module, test_batch: tuple[Tensor, Tensor]
) -> None:
    x, y = test_batch
    step = training_step_for(make_adversarial_loss("pgd", ATTACK))
    loss = step((x[:8], y[:8], torch.arange(8)), trained_model)
    assert loss.dim() == 0 and loss.device == next(trained_model.parameters()).device


@pytest.mark.parametrize("batch", [{"x": 1, "y": 2}, torch.zeros(2, 1, 8, 8), ([0.0], [1])])
def test_malformed_batches_are_rejected(trained_model: nn.Module, batch: Any) -> None:
    step = training_step_for(make_adversarial_loss("pgd", ATTACK))
    with pytest.raises(InputError, match="batch"):
        step(batch, trained_model)


def test_training_step_for_needs_an_adversarial_loss() -> None:
    with pytest.raises(InputError, match="make_adversarial_loss"):
        training_step_for(lambda model, x, y: x.sum())  # type: ignore[arg-type]
