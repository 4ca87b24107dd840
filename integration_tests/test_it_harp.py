"""HARP end to end on a tiny timm model and the embedded digits data.

A ``test_resnet`` (inputs normalised inside the model, so eps is in pixel space) is adversarially
trained with PGD-AT, then pruned by HARPPruner through NNI's ``TorchEvaluator`` with the same PGD-AT
training step: to 90 % of its weights (unstructured) and to half of its FLOPs (structured, coupled
channel groups). The structured result is fine-tuned adversarially with its masks fixed and then
physically shrunk by ``graph_passes.ModelSpeedup``. Checked: the targets are met, the learned
per-layer rates are far from uniform, the shrunk model is smaller in parameters and FLOPs and
computes what the masked model computes.
"""
from __future__ import annotations

import copy
import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import nni
import pytest
import timm
import torch
from nni.compression import TorchEvaluator
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

import graph_passes as gp
from nni_harp.adversarial import AttackConfig, evaluate_robustness, make_adversarial_loss, training_step_for, with_normalization
from nni_harp.data import build_datasets
from nni_harp.pruning import HARPPruner, fix_masks, release_masks

MODEL = "test_resnet"
IMAGE_SIZE = 16
BATCH = 64
PRETRAIN_EPOCHS = 3
PRUNE_EPOCHS = 2
SCHEDULE_EPOCHS = 8  # long enough for all three phases of HARP's schedule with its default settings
# PGD-AT with a short attack keeps the test at about a minute on two CPU cores
ATTACK = AttackConfig(norm="linf", eps=8 / 255, step_size=3 / 255, steps=3, random_start=True)
ATOL = RTOL = 1e-4  # as in test_it_timm_models: the pruned model equals the masked one


@pytest.fixture(scope="module", autouse=True)
def _one_thread() -> Iterator[None]:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@dataclass(frozen=True)
class Data:
    x_train: torch.Tensor
    y_train: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor
    mean: tuple[float, ...]
    std: tuple[float, ...]

    def batches(self, seed: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        order = torch.randperm(len(self.x_train), generator=torch.Generator().manual_seed(seed))
        for i in range(0, len(order), BATCH):
            idx = order[i:i + BATCH]
            yield self.x_train[idx], self.y_train[idx]

    def test_batches(self) -> list[tuple[torch.Tensor, torch.Tensor]]:
        return [(self.x_test[i:i + 128], self.y_test[i:i + 128]) for i in range(0, len(self.x_test), 128)]


@pytest.fixture(scope="module")
def data() -> Data:
    train, test, info = build_datasets("digits", image_size=IMAGE_SIZE, seed=0)
    xs, ys = zip(*(train[i] for i in range(len(train))))
    xt, yt = zip(*(test[i] for i in range(len(test))))
    return Data(torch.stack(xs), torch.tensor(ys), torch.stack(xt), torch.tensor(yt), tuple(info.mean), tuple(info.std))


def _training_func(data: Data) -> Callable[..., None]:
    """The training loop handed to TorchEvaluator (and used for pre- and fine-training): one pass
    over the data per epoch, honouring max_steps / max_epochs as NNI asks."""
    epochs_seen = {"n": 0}

    def training_func(model, optimizers, training_step, lr_schedulers=None, max_steps=None, max_epochs=None):
        steps = 0
        for _ in range(max_epochs or 1):
            model.train()
            for batch in data.batches(seed=epochs_seen["n"]):
                optimizers.zero_grad()
                training_step(batch, model).backward()
                optimizers.step()
                steps += 1
                if max_steps is not None and steps >= max_steps:
                    return
            epochs_seen["n"] += 1

    return training_func


STEP = training_step_for(make_adversarial_loss("pgd", ATTACK))


def _fresh_model(data: Data) -> nn.Module:
    return with_normalization(timm.create_model(MODEL, num_classes=10), data.mean, data.std)


@pytest.fixture(scope="module")
def robust_state(data: Data) -> dict[str, torch.Tensor]:
    """PGD-AT of the dense model; its state dict."""
    torch.manual_seed(0)
    model = _fresh_model(data)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=5e-4)
    _training_func(data)(model, optimizer, STEP, max_epochs=PRETRAIN_EPOCHS)
    return copy.deepcopy(model.state_dict())


def _robust_model(data: Data, state: dict[str, torch.Tensor]) -> nn.Module:
    model = _fresh_model(data)
    model.load_state_dict(state)
    return model


def _evaluator(model: nn.Module, data: Data) -> TorchEvaluator:
    optimizer = nni.trace(torch.optim.SGD)(model.parameters(), lr=0.01)
    return TorchEvaluator(_training_func(data), optimizer, STEP, dummy_input=data.x_train[:2])


def _assert_not_uniform(rates: dict[str, float], spread: float) -> None:
    # HARP starts every layer (group) at one uniform rate, where HYDRA keeps them; learned rates spread
    values = list(rates.values())
    assert len(values) >= 4
    assert max(values) - min(values) > spread, rates


def _flops(model: nn.Module, x: torch.Tensor) -> int:
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        model(x)
    return counter.get_total_flops()


def test_pgd_at_makes_the_dense_model_accurate_and_somewhat_robust(data: Data, robust_state: dict) -> None:
    report = evaluate_robustness(_robust_model(data, robust_state), data.test_batches(), ATTACK, autoattack=False)
    assert report.clean > 0.6  # chance is 0.1
    assert report.pgd > 0.2


def test_harp_unstructured_90_percent(data: Data, robust_state: dict) -> None:
    torch.manual_seed(1)
    model = _robust_model(data, robust_state)
    config = [{"op_types": ["Conv2d", "Linear"], "sparse_ratio": 0.9, "global_group_id": 0}]
    # two epochs are too few for the default start above the target to come down (the schedule has
    # its own test below); starting at the target, both epochs train the weights that stay, so the
    # final masks leave a working model
    pruner = HARPPruner(model, config, _evaluator(model, data), gamma_0=0.5, init_keep=0.1)
    pruned, masks = pruner.compress(max_steps=None, max_epochs=PRUNE_EPOCHS)

    kept = sum(float(m["weight"].sum()) for m in masks.values()) / sum(m["weight"].numel() for m in masks.values())
    assert abs(kept - 0.1) <= 0.01
    layers = [n for n, m in _robust_model(data, robust_state).named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    assert set(masks) == set(layers) == set(pruner.layer_rates())
    _assert_not_uniform(pruner.layer_rates(), 0.1)
    assert min(pruner.layer_rates().values()) >= 0.1 * 0.1 - 1e-9  # the alpha floor holds per layer
    assert [h["epoch"] for h in pruner.history] == list(range(PRUNE_EPOCHS))
    # with the final masks and without any fine-tuning the model is still well above chance (NNI's
    # unwrap_model restores the unmasked weights, so the masks are applied to a copy)
    pruner.unwrap_model()
    report = evaluate_robustness(gp.masked_copy(pruned, masks), data.test_batches(), ATTACK, autoattack=False)
    assert report.clean > 0.2


def test_harp_structured_half_flops_then_speedup(data: Data, robust_state: dict) -> None:
    torch.manual_seed(2)
    model = _robust_model(data, robust_state)
    dense = copy.deepcopy(model).eval()
    x = data.x_test[:2]
    config = [{"op_types": ["Conv2d", "Linear"], "sparse_ratio": 0.5, "granularity": "out_channel", "global_group_id": 0}]
    pruner = HARPPruner(model, config, _evaluator(model, data), gamma_0=0.5, dummy_input=x)
    pruned, masks = pruner.compress(max_steps=None, max_epochs=PRUNE_EPOCHS)
    assert abs(pruner.kept_fraction() - 0.5) <= 0.01
    _assert_not_uniform(pruner.layer_rates(), 0.1)
    pruner.unwrap_model()

    # masked adversarial fine-tuning of the remaining weights, one epoch
    fix_masks(pruned, masks)
    optimizer = torch.optim.SGD([p for p in pruned.parameters() if p.requires_grad], lr=0.01, momentum=0.9)
    _training_func(data)(pruned, optimizer, STEP, max_epochs=1)
    release_masks(pruned)
    pruned.eval()
    for module_name, targets in masks.items():  # fine-tuning left the removed channels at zero
        for param_name, mask in targets.items():
            if mask is None:
                continue
            values = getattr(pruned.get_submodule(module_name), param_name).detach()
            assert bool((values[mask == 0] == 0).all()), f"{module_name}.{param_name}"

    masked = gp.masked_copy(pruned, masks).eval()
    small = gp.ModelSpeedup(copy.deepcopy(pruned), x, masks).speedup_model(inplace=False).eval()
    n_params = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    assert n_params(small) < 0.75 * n_params(dense)
    # the physically pruned model's measured FLOPs meet the target within one percentage point
    assert abs(_flops(small, x) / _flops(dense, x) - 0.5) <= 0.01
    with torch.no_grad():
        inputs = data.x_test[:64]
        out_small, out_masked = small(inputs), masked(inputs)
    assert torch.allclose(out_small, out_masked, atol=ATOL, rtol=RTOL)
    assert float((out_small.argmax(1) == data.y_test[:64]).float().mean()) > 0.3


def _assert_three_phase_schedule(pruner: HARPPruner, epochs: int) -> None:
    """Above the target at the start, down to it, gamma frozen at the first epoch that met it."""
    history = pruner.history
    target = pruner.target_fraction
    assert [h["epoch"] for h in history] == list(range(epochs))
    # started above the target, at the default sqrt(target); a structured unit's hard count sits on
    # its round_to grid (HARPSettings.round_to), up to half a step (4 of 8 channels) off its share,
    # so there the hard start only has to be clearly above the target: half-way to sqrt(target) or more
    start = math.sqrt(target)
    assert history[0]["kept_start"] >= (start - 0.02 if not pruner.structured else target + 0.5 * (start - target))
    frozen = pruner.frozen_at
    assert frozen is not None and frozen < epochs - 1, [(h["kept_fraction"], h["gamma"]) for h in history]
    assert frozen == next(h["epoch"] for h in history if h["target_met"])
    # the kept fraction came down: at the freeze it is near the target, far below the start
    assert history[frozen]["kept_fraction"] <= target + 0.25 * (history[0]["kept_start"] - target)
    assert any(h["phase"] == "descent" for h in history[: frozen + 1])
    # gamma grew by gamma_0 per epoch until then, and stays frozen afterwards
    gamma_0 = pruner.settings.gamma_0
    assert [h["gamma"] for h in history[: frozen + 1]] == pytest.approx([gamma_0 * (e + 1) for e in range(frozen + 1)])
    assert all(h["gamma"] == pytest.approx(history[frozen]["gamma"]) for h in history[frozen:])
    assert all(h["phase"] == "balance" for h in history[frozen + 1:])


@pytest.mark.parametrize("structured", [False, True], ids=["unstructured-90", "structured-half-flops"])
def test_default_harp_descends_to_the_target_then_freezes_gamma(data: Data, robust_state: dict, structured: bool) -> None:
    """HARP with its default settings shows its stagewise schedule: the kept fraction starts above
    the target, comes down while gamma grows, and gamma freezes at the first epoch that meets it."""
    torch.manual_seed(3)
    model = _robust_model(data, robust_state)
    x = data.x_test[:2]
    entry = {"op_types": ["Conv2d", "Linear"], "global_group_id": 0}
    entry.update({"sparse_ratio": 0.5, "granularity": "out_channel"} if structured else {"sparse_ratio": 0.9})
    pruner = HARPPruner(model, [entry], _evaluator(model, data), dummy_input=x)
    epochs = SCHEDULE_EPOCHS
    _, masks = pruner.compress(max_epochs=epochs)
    _assert_three_phase_schedule(pruner, epochs)
    assert abs(pruner.kept_fraction() - pruner.target_fraction) <= 0.01
    _assert_not_uniform(pruner.layer_rates(), 0.1)


def test_nni_api_three_epochs_at_90_percent_learns_a_non_uniform_plan(data: Data, robust_state: dict) -> None:
    """README's NNI-API call, defaults, three epochs: the target is met and the per-layer
    sparsities are far from uniform."""
    torch.manual_seed(4)
    model = _robust_model(data, robust_state)
    config = [{"op_types": ["Conv2d", "Linear"], "sparse_ratio": 0.9, "global_group_id": "all"}]
    pruner = HARPPruner(model, config, _evaluator(model, data))
    pruned, masks = pruner.compress(max_steps=None, max_epochs=3)
    sparsity = {name: 1.0 - float(m["weight"].mean()) for name, m in masks.items()}
    total = sum(m["weight"].numel() for m in masks.values())
    kept = sum(float(m["weight"].sum()) for m in masks.values()) / total
    assert abs(kept - 0.1) <= 0.01
    assert max(sparsity.values()) - min(sparsity.values()) > 0.05, sparsity
    assert pruner.history[0]["kept_start"] > 0.2  # it started above the target and came down
    assert pruner.history[-1]["kept_fraction"] < pruner.history[0]["kept_start"]
