"""Resuming HARP: pruning N epochs in one go equals pruning k epochs, saving the pruner's state (and
the model's BatchNorm statistics), building a fresh pruner on a fresh model, loading, and pruning
the remaining N - k epochs."""
from __future__ import annotations

import copy
import io
from collections.abc import Callable
from typing import Any

import nni
import pytest
import torch
import torch.nn.functional as F
from nni.compression import TorchEvaluator
from torch import nn

from nni_harp.pruning import HARPPruner, HydraPruner, PruningError

from _pruning_helpers import Digits

CONFIG = [{"op_types": ["Conv2d", "Linear"], "sparse_ratio": 0.9, "global_group_id": 0}]
EPOCHS, SPLIT = 4, 2
SETTINGS: dict[str, Any] = {"gamma_0": 0.5}


class Interrupted(RuntimeError):
    """Raised by the training function to stop a pruning run, as a kill would."""


def _norm_stats(model: nn.Module) -> dict[str, dict[str, torch.Tensor]]:
    return {n: copy.deepcopy(m.state_dict()) for n, m in model.named_modules() if isinstance(m, nn.BatchNorm2d)}


def _evaluator(model: nn.Module, data: Digits, holder: dict[str, Any], stop_at: int | None = None) -> TorchEvaluator:
    """Each epoch's batch order depends on the pruner's epoch only, so runs are comparable. With
    ``stop_at``, the state is saved when that epoch starts and the run is interrupted."""

    def training_func(model, optimizers, training_step, lr_schedulers=None, max_steps=None, max_epochs=None):
        pruner = holder["pruner"]
        epoch = len(pruner.history)
        if epoch == stop_at:
            buffer = io.BytesIO()
            torch.save({"pruner": pruner.state_dict(), "norms": _norm_stats(model)}, buffer)
            holder["saved"] = buffer.getvalue()
            raise Interrupted(f"stopped at epoch {epoch}")
        model.train()
        for x, y in data.batches(batch_size=128, seed=1000 + epoch):
            optimizers.zero_grad()
            training_step((x, y), model).backward()
            optimizers.step()

    optimizer = nni.trace(torch.optim.SGD)(model.parameters(), lr=0.01)
    return TorchEvaluator(training_func, optimizer, lambda b, m: F.cross_entropy(m(b[0]), b[1]),
                          dummy_input=data.x_train[:2])


def _prune(model: nn.Module, data: Digits, cls: type = HARPPruner, stop_at: int | None = None,
           state: dict[str, Any] | None = None, settings: dict[str, Any] | None = None,
           epochs: int = EPOCHS) -> tuple[HARPPruner, dict[str, Any], dict[str, Any]]:
    holder: dict[str, Any] = {}
    pruner = cls(model, CONFIG, _evaluator(model, data, holder, stop_at), **(settings or SETTINGS))
    holder["pruner"] = pruner
    if state is not None:
        pruner.load_state_dict(state)
    masks: dict[str, Any] = {}
    try:
        _, masks = pruner.compress(max_steps=None, max_epochs=epochs)
    except Interrupted:
        pass
    return pruner, masks, holder


def _resume(pretrained: Callable[[], nn.Module], data: Digits, saved: bytes, cls: type = HARPPruner,
            drop_optimizer: bool = False) -> tuple[HARPPruner, dict[str, Any], nn.Module]:
    stored = torch.load(io.BytesIO(saved), weights_only=True)
    model = pretrained()
    for name, norm_state in stored["norms"].items():
        model.get_submodule(name).load_state_dict(norm_state)
    state = stored["pruner"]
    if drop_optimizer:
        state = {**state, "optimizer": None}
    pruner, masks, _ = _prune(model, data, cls, state=state)
    return pruner, masks, model


def _assert_same_run(a: HARPPruner, masks_a: dict, b: HARPPruner, masks_b: dict) -> None:
    assert set(masks_a) == set(masks_b)
    for name in masks_a:
        assert torch.equal(masks_a[name]["weight"], masks_b[name]["weight"]), name
    assert a.layer_rates() == b.layer_rates()
    assert len(a.history) == len(b.history) == EPOCHS
    for ha, hb in zip(a.history, b.history):
        assert ha.keys() == hb.keys()
        numbers = {k for k, v in ha.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
        assert {k: ha[k] for k in numbers} == pytest.approx({k: hb[k] for k in numbers}, rel=1e-6, abs=1e-9)
        assert {k: v for k, v in ha.items() if k not in numbers} == {k: v for k, v in hb.items() if k not in numbers}


@pytest.mark.parametrize("cls", [HARPPruner, HydraPruner])
def test_resumed_pruning_equals_pruning_in_one_go(
    cls: type, pretrained: Callable[[], nn.Sequential], digits: Digits
) -> None:
    whole_model = pretrained()
    whole, whole_masks, _ = _prune(whole_model, digits, cls)
    assert len(whole_masks) == 4

    first, masks, holder = _prune(pretrained(), digits, cls, stop_at=SPLIT)
    assert masks == {} and len(first.history) == SPLIT  # really interrupted after SPLIT epochs
    resumed, resumed_masks, resumed_model = _resume(pretrained, digits, holder["saved"], cls)

    _assert_same_run(whole, whole_masks, resumed, resumed_masks)
    if cls is HARPPruner:
        # the resumed run kept the schedule: same gammas (grown, then frozen) in every epoch
        assert [h["gamma"] for h in resumed.history] == [h["gamma"] for h in whole.history]
    x = digits.x_test[:32]
    whole_model.eval(), resumed_model.eval()
    torch.testing.assert_close(resumed_model(x), whole_model(x), rtol=0, atol=0)


def test_resuming_without_the_optimizer_state_loses_momentum(
    pretrained: Callable[[], nn.Sequential], digits: Digits
) -> None:
    """The check above is sensitive to momentum: dropping the stored optimizer state changes the run."""
    whole, whole_masks, _ = _prune(pretrained(), digits)
    _, _, holder = _prune(pretrained(), digits, stop_at=SPLIT)
    stored = torch.load(io.BytesIO(holder["saved"]), weights_only=True)["pruner"]
    # momentum buffers (scores) and Adam moments (rates) were saved
    assert stored["optimizer"] is not None and stored["optimizer"]["scores"]["state"] and stored["optimizer"]["rates"]["state"]
    assert stored["epoch"] == SPLIT and stored["total_epochs"] == EPOCHS
    _, cold_masks, _ = _resume(pretrained, digits, holder["saved"], drop_optimizer=True)
    differ = any(not torch.equal(whole_masks[n]["weight"], cold_masks[n]["weight"]) for n in whole_masks)
    assert differ


def test_state_dict_misuse_errors(pretrained: Callable[[], nn.Sequential], digits: Digits) -> None:
    _, _, holder = _prune(pretrained(), digits, stop_at=1)
    state = torch.load(io.BytesIO(holder["saved"]), weights_only=True)["pruner"]

    model = pretrained()
    other = HARPPruner(model, CONFIG, _evaluator(model, digits, {}), gamma_0=0.25)
    with pytest.raises(PruningError, match=r"HARPSettings.gamma_0=0.5.*0.25"):
        other.load_state_dict(state)

    with pytest.raises(PruningError, match="run of 4 pruning epochs, but compress\\(\\) was asked for 3"):
        _prune(pretrained(), digits, state=state, epochs=3)

    model = pretrained()
    hydra = HydraPruner(model, CONFIG, _evaluator(model, digits, {}), gamma_0=0.5)
    with pytest.raises(PruningError, match="learn_rates"):
        hydra.load_state_dict(state)

    # a state written before a setting existed (here: latency_checks) resumes where the pruner has
    # that setting at its default, and is refused where it was set otherwise
    older = dict(state, settings={k: v for k, v in state["settings"].items() if k != "latency_checks"})
    model = pretrained()
    HARPPruner(model, CONFIG, _evaluator(model, digits, {}), **SETTINGS).load_state_dict(older)
    model = pretrained()
    with pytest.raises(PruningError, match=r"HARPSettings.latency_checks='<missing>'.*0"):
        HARPPruner(model, CONFIG, _evaluator(model, digits, {}), latency_checks=0, **SETTINGS).load_state_dict(older)

    # after compress() the scores and rates are gone; a finished pruner cannot be loaded into either
    done, _, _ = _prune(pretrained(), digits, epochs=1)
    with pytest.raises(PruningError, match="finished pruning"):
        done.state_dict()
    with pytest.raises(PruningError, match="fresh pruner"):
        done.load_state_dict(state)
