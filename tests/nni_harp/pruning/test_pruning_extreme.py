"""HARP at extreme (99 %) sparsity: rates must not be thrown into the sigmoid's flat tails by one
huge straight-through gradient, and small layers must keep enough weights to carry signal."""
from __future__ import annotations

from collections.abc import Callable

import nni
import pytest
import torch
import torch.nn.functional as F
from nni.compression import TorchEvaluator
from torch import nn

from nni_harp.pruning import HARPPruner, HydraPruner

from _pruning_helpers import Digits, make_evaluator

CONFIG = [{"op_types": ["Conv2d", "Linear"], "sparse_ratio": 0.99, "global_group_id": 0}]


def _recording_evaluator(model: nn.Module, data: Digits, record: list[dict[str, float]], loss_scale: float) -> TorchEvaluator:
    """Cross-entropy times ``loss_scale`` (a stand-in for the huge gradients of a nearly emptied
    network in front of BatchNorm); after every step it records each HARP rate parameter."""

    def training_func(model, optimizers, training_step, lr_schedulers=None, max_steps=None, max_epochs=None):
        steps = 0
        model.train()
        for batch in data.batches(seed=0):
            optimizers.zero_grad()
            training_step(batch, model).backward()
            optimizers.step()
            record.append({n: float(p.detach()) for n, p in model.named_parameters() if n.endswith("_harp_rate")})
            steps += 1
            if max_steps is not None and steps >= max_steps:
                return

    def step(batch: tuple[torch.Tensor, torch.Tensor], model: nn.Module) -> torch.Tensor:
        x, y = batch
        return loss_scale * F.cross_entropy(model(x), y)

    optimizer = nni.trace(torch.optim.SGD)(model.parameters(), lr=0.01)
    return TorchEvaluator(training_func, optimizer, step, dummy_input=data.x_train[:2])


def test_a_huge_rate_gradient_moves_the_rate_a_bounded_step(pretrained: Callable[[], nn.Sequential], digits: Digits) -> None:
    torch.manual_seed(0)
    model = pretrained()
    record: list[dict[str, float]] = []
    pruner = HARPPruner(model, CONFIG, _recording_evaluator(model, digits, record, loss_scale=1e4),
                        rate_lr=0.1, rate_optimizer="sgd", momentum=0.0, rate_weight_decay=0.0, lr_schedule="constant",
                        rate_grad_clip=1.0)
    start = {n: float(p.detach()) for n, p in model.named_parameters() if n.endswith("_harp_rate")}
    assert start
    pruner.compress(max_epochs=1)
    assert len(record) >= 3
    previous = start
    for rates in record:
        for name, value in rates.items():
            # SGD without momentum: one step moves r by at most lr * clip
            assert abs(value - previous[name]) <= 0.1 * 1.0 + 1e-6, name
        previous = rates
    # so after a few steps no rate sits deep in the sigmoid's tails (|r| stays within start + steps * lr)
    assert all(abs(v) <= abs(start[n]) + 0.1 * len(record) + 1e-6 for n, v in record[-1].items())


def test_without_the_clip_the_same_step_is_larger(pretrained: Callable[[], nn.Sequential], digits: Digits) -> None:
    """The scenario above really exceeds the bound when unclipped (so that test can fail)."""
    torch.manual_seed(0)
    model = pretrained()
    record: list[dict[str, float]] = []
    pruner = HARPPruner(model, CONFIG, _recording_evaluator(model, digits, record, loss_scale=1e4),
                        rate_lr=0.1, rate_optimizer="sgd", momentum=0.0, rate_weight_decay=0.0, lr_schedule="constant",
                        rate_grad_clip=None)
    start = {n: float(p.detach()) for n, p in model.named_parameters() if n.endswith("_harp_rate")}
    pruner.compress(max_steps=1, max_epochs=1)
    assert max(abs(record[0][n] - start[n]) for n in start) > 2 * 0.1 * 1.0


def test_every_layer_keeps_a_weight_per_output_channel_at_99_percent(
    pretrained: Callable[[], nn.Sequential], digits: Digits
) -> None:
    torch.manual_seed(0)
    model = pretrained()
    rows = {n: m.weight.shape[0] for n, m in model.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))}
    sizes = {n: m.weight.numel() for n, m in model.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))}
    pruner = HARPPruner(model, CONFIG, make_evaluator(model, digits), gamma_0=0.5)
    _, masks = pruner.compress(max_epochs=2)
    kept = {n: int(m["weight"].sum()) for n, m in masks.items()}
    assert all(kept[n] >= rows[n] for n in rows), (kept, rows)  # default min_kept_per_output=1
    # the budget still holds: 1 % of the weights, to within one weight per layer
    assert abs(sum(kept.values()) - 0.01 * sum(sizes.values())) <= len(sizes)


def test_output_floor_can_be_raised_or_disabled_and_hydra_ignores_it(
    pretrained: Callable[[], nn.Sequential], digits: Digits
) -> None:
    model = pretrained()
    fc_rows, fc_size = 10, 240
    floors = {}
    for per_output in (0, 1, 3):
        pruner = HARPPruner(pretrained(), CONFIG, make_evaluator(model, digits), min_kept_per_output=per_output)
        floors[per_output] = {u.name: u.floor for u in pruner._units}
    assert floors[0]["11"] == pytest.approx(0.1 * 0.01)  # only alpha * target_keep
    assert floors[1]["11"] == pytest.approx(fc_rows / fc_size)
    assert floors[3]["11"] == pytest.approx(3 * fc_rows / fc_size)
    hydra = HydraPruner(pretrained(), CONFIG, make_evaluator(model, digits), min_kept_per_output=3)
    assert all(u.floor == pytest.approx(0.1 * 0.01) for u in hydra._units)
