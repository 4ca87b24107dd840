"""Helpers of the pruning tests: digits data holder, a tiny CNN, a plain cross-entropy TorchEvaluator
(no adversarial loss here; that lives in nni_harp.adversarial and is tested there)."""
from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import nni
import torch
import torch.nn.functional as F
from nni.compression import TorchEvaluator
from torch import nn


@dataclass(frozen=True)
class Digits:
    x_train: torch.Tensor
    y_train: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor

    def batches(self, batch_size: int = 64, seed: int = 0) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        order = torch.randperm(len(self.x_train), generator=torch.Generator().manual_seed(seed))
        for i in range(0, len(order), batch_size):
            idx = order[i:i + batch_size]
            yield self.x_train[idx], self.y_train[idx]


def tiny_cnn() -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(3, 12, 3, padding=1, bias=False), nn.BatchNorm2d(12), nn.ReLU(),
        nn.Conv2d(12, 24, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(24), nn.ReLU(),
        nn.Conv2d(24, 24, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(24), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(24, 10),
    )


def accuracy(model: nn.Module, data: Digits) -> float:
    was = model.training
    model.eval()
    with torch.no_grad():
        acc = (model(data.x_test).argmax(1) == data.y_test).float().mean().item()
    model.train(was)
    return acc


def ce_step(batch: tuple[torch.Tensor, torch.Tensor], model: nn.Module) -> torch.Tensor:
    x, y = batch
    return F.cross_entropy(model(x), y)


def make_evaluator(model: nn.Module, data: Digits, lr: float = 0.01, log: list | None = None) -> TorchEvaluator:
    """A TorchEvaluator whose training function respects max_steps / max_epochs, as NNI asks."""
    calls = {"epoch": 0}

    def training_func(model, optimizers, training_step, lr_schedulers=None, max_steps=None, max_epochs=None):
        steps = 0
        for _ in range(max_epochs or 1000):
            model.train()
            for batch in data.batches(seed=calls["epoch"]):
                optimizers.zero_grad()
                loss = training_step(batch, model)
                loss.backward()
                optimizers.step()
                steps += 1
                if log is not None:  # what the training loop saw: model type and trainable tensors
                    log.append((type(model), frozenset(n for n, p in model.named_parameters() if p.requires_grad)))
                if max_steps is not None and steps >= max_steps:
                    return
            calls["epoch"] += 1

    optimizer = nni.trace(torch.optim.SGD)(model.parameters(), lr=lr, momentum=0.9)
    return TorchEvaluator(training_func, optimizer, ce_step, dummy_input=data.x_train[:2])
