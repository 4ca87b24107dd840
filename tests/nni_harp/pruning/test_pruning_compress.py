"""Unstructured HARP / HYDRA driven by an NNI TorchEvaluator on a tiny CNN trained on digits."""
from __future__ import annotations

import copy
import logging
import math
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from torch import nn

from nni_harp.pruning import HARPPruner, HARPSettings, HydraPruner, apply_masks
from nni_harp.pruning import _loop
from nni_harp.pruning._loop import force_target
from nni_harp.pruning._optim import HarpOptimizer, norm_affine_parameters

from _pruning_helpers import Digits, accuracy, make_evaluator

CONFIG = [{"op_types": ["Conv2d", "Linear"], "sparse_ratio": 0.9}]


def _weights(model: nn.Module) -> dict[str, torch.Tensor]:
    return {n.replace("_nni_wrapper.", ""): p.detach().clone() for n, p in model.named_parameters() if "harp" not in n}


NORMS = {"1.weight", "1.bias", "4.weight", "4.bias", "7.weight", "7.bias"}  # tiny_cnn's BatchNorm affine


def test_harp_compress_meets_the_target_with_learned_non_uniform_rates(
    pretrained: Callable[[], nn.Sequential], digits: Digits, caplog: pytest.LogCaptureFixture
) -> None:
    torch.manual_seed(0)
    model = pretrained()
    dense = copy.deepcopy(model)
    seen: list[tuple[type, frozenset[str]]] = []
    evaluator = make_evaluator(model, digits, log=seen)
    pruner = HARPPruner(model, CONFIG, evaluator, gamma_0=0.5, train_norm_affine=True)
    weights_before = _weights(model)
    with caplog.at_level(logging.INFO, logger="nni_harp.pruning.harp"):
        pruned, masks = pruner.compress(max_steps=None, max_epochs=4)

    # the target holds within 1 percentage point (measured from the returned masks)
    kept = sum(float(m["weight"].sum()) for m in masks.values()) / sum(m["weight"].numel() for m in masks.values())
    assert abs(kept - 0.1) <= 0.01
    assert kept == pytest.approx(pruner.kept_fraction())
    # masks: NNI format, float 0/1, full parameter shape, every layer keeps something
    assert set(masks) == {"0", "3", "6", "11"}
    for name, targets in masks.items():
        weight = targets["weight"]
        assert weight.dtype == torch.float32 and set(weight.unique().tolist()) <= {0.0, 1.0}
        assert weight.shape == dense.get_submodule(name).weight.shape and weight.sum() >= 1
    # rates are learned: non-uniform, each above its floor alpha * target
    rates = pruner.layer_rates()
    assert set(rates) == set(masks)
    assert max(rates.values()) - min(rates.values()) > 0.05
    assert min(rates.values()) >= 0.1 * 0.1 - 1e-9
    # weights were frozen while pruning and their flags restored afterwards; the BatchNorm affine
    # parameters were trained with the scores (train_norm_affine=True, as the authors and HYDRA do)
    after = _weights(pruned)
    assert set(weights_before) > NORMS
    assert all(torch.equal(after[n], weights_before[n]) for n in weights_before if n not in NORMS)
    assert all(not torch.equal(after[n], weights_before[n]) for n in NORMS)
    assert all(p.requires_grad for n, p in pruned.named_parameters())
    assert not any("harp" in n for n, _ in pruned.named_parameters())  # HARP's tensors are gone
    # the wrapped model applies the final masks: same outputs as its unwrapped self with masks baked in
    # (BatchNorm statistics moved while pruning ran in train mode; the weights did not)
    pruner.unwrap_model()
    masked = apply_masks(copy.deepcopy(pruned), masks)
    pruner.wrap_model()
    x = digits.x_test[:16]
    pruned.eval(), masked.eval()
    torch.testing.assert_close(pruned(x), masked(x))
    # pruning kept the network useful (chance is 0.1)
    assert accuracy(pruned, digits) > 0.3
    # history: one record per epoch, gamma follows the schedule and is frozen once the target was met
    assert [h["epoch"] for h in pruner.history] == [0, 1, 2, 3]
    gammas = [h["gamma"] for h in pruner.history]
    first_met = next((h["epoch"] for h in pruner.history if h["target_met"]), None)
    for h in pruner.history:
        growing = first_met is None or h["epoch"] <= first_met
        expected = 0.5 * (h["epoch"] + 1) if growing else gammas[first_met]
        assert h["gamma"] == pytest.approx(expected)
        assert math.isfinite(h["adv_loss"]) and h["hw_loss"] >= 0 and 0 < h["kept_fraction"] < 1
    assert sum("epoch" in r.getMessage() and "gamma=" in r.getMessage() for r in caplog.records) == 4
    # during pruning only HARP's scores and rates, and the BatchNorm affine parameters, were trainable
    assert seen and all(names and all(n.endswith(("_harp_score", "_harp_rate")) or n in NORMS for n in names)
                        for _, names in seen)
    assert all(NORMS <= names for _, names in seen)


def test_harp_without_norm_training_freezes_every_model_parameter(
    pretrained: Callable[[], nn.Sequential], digits: Digits
) -> None:
    torch.manual_seed(0)
    model = pretrained()
    pruner = HARPPruner(model, CONFIG, make_evaluator(model, digits), train_norm_affine=False)
    weights_before = _weights(model)
    pruned, _ = pruner.compress(max_epochs=1)
    after = _weights(pruned)
    assert all(torch.equal(after[n], weights_before[n]) for n in weights_before)


@pytest.mark.parametrize("deadline", [0.5, 1.0])
def test_descent_deadline_forces_an_unmet_target_and_keeps_the_learned_ratios(
    pretrained: Callable[[], nn.Sequential], digits: Digits, deadline: float, monkeypatch: pytest.MonkeyPatch
) -> None:
    """gamma_0 so small that the hinge cannot win in 4 epochs: with a deadline at half the run the
    rates are projected onto the budget at the end of epoch 1, gamma freezes there and epochs 2-3
    train the scores at the target (balance), which every epoch end from the deadline on holds
    (the frozen gamma is too weak to: an epoch that drifted back up is projected again); with
    deadline 1.0 nothing is forced."""
    torch.manual_seed(0)
    model = pretrained()
    pruner = HARPPruner(model, CONFIG, make_evaluator(model, digits), gamma_0=1e-6, descent_deadline=deadline,
                        settle_epochs=0)  # settling would project too (test_the_last_epoch_settles_on_the_final_masks)
    seen: list[tuple[dict[str, float], dict[str, float]]] = []

    def watched(p: HARPPruner) -> None:
        before = {u.name: u.keep_value() for u in p._units}
        force_target(p)
        seen.append((before, {u.name: u.keep_value() for u in p._units}))

    monkeypatch.setattr(_loop, "force_target", watched)
    pruner.compress(max_epochs=4)
    history = pruner.history
    if deadline == 1.0:
        assert not seen and not any(h["forced"] or h["target_met"] for h in history) and pruner.frozen_at is None
        return
    assert [h["forced"] for h in history[:2]] == [False, True] and len(seen) == sum(h["forced"] for h in history)
    assert pruner.frozen_at == 1 and all(h["target_met"] for h in history[1:]) and not history[0]["target_met"]
    assert history[0]["kept_fraction"] > 0.2
    assert [h["kept_fraction"] for h in history[1:]] == pytest.approx([0.1] * 3, abs=0.01)
    assert [h["gamma"] for h in history] == pytest.approx([1e-6, 2e-6, 2e-6, 2e-6])
    assert [h["phase"] for h in history[2:]] == ["balance", "balance"]
    # one common factor: the units the projection did not clip to their floor keep their learned ratios
    before, after = seen[0]
    floors = {u.name: u.floor for u in pruner._units} if pruner._units else {}
    free = [n for n in before if after[n] > 1.001 * floors.get(n, 0.01)]
    assert len(free) >= 2
    factors = [after[n] / before[n] for n in free]
    assert max(factors) == pytest.approx(min(factors), rel=1e-3) and factors[0] < 1
    assert max(before[n] for n in free) / min(before[n] for n in free) > 1.05  # a non-uniform plan to keep


@pytest.mark.parametrize("glide", [True, False])
def test_a_lagging_descent_is_held_to_the_glide_path(
    pretrained: Callable[[], nn.Sequential], digits: Digits, glide: bool
) -> None:
    """gamma_0 so small that the rates cannot descend by themselves in 6 epochs: with the glide path
    (default) every end of epochs 1-3 is projected onto the geometric path from the kept fraction
    after epoch 0 to the target after epoch 4 (the epoch before settling), so the cut comes in
    steps; without it the rates stay up until settling projects them all at once."""
    torch.manual_seed(0)
    model = pretrained()
    pruner = HARPPruner(model, CONFIG, make_evaluator(model, digits), gamma_0=1e-6, descent_glide=glide)
    pruner.compress(max_epochs=6)
    history = pruner.history
    kept = [h["kept_fraction"] for h in history]
    assert [h["held"] for h in history] == [False, glide, glide, glide, False, False]
    assert [h["forced"] for h in history] == [False, False, False, False, True, False]
    assert kept[4] == pytest.approx(0.1, abs=0.005) and pruner.frozen_at == 4
    r0 = kept[0] / 0.1
    assert r0 > 2  # far above the target: the path has somewhere to go
    if glide:
        path = [0.1 * r0 ** ((4 - t) / 4) for t in (1, 2, 3)]
        assert kept[1:4] == pytest.approx(path, rel=0.03)  # hard-mask counts round the projected rates
        assert all(h["phase"] == "descent" for h in history[1:4])
    else:
        assert min(kept[1:4]) > 0.9 * kept[0]  # nothing pulled them down before the cut


@pytest.mark.parametrize("settle", [1, 0])
def test_the_last_epoch_settles_on_the_final_masks(
    pretrained: Callable[[], nn.Sequential], digits: Digits, settle: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With ``settle_epochs=1`` the final masks are fixed when the last epoch starts (at the end of the
    one before, projected onto the budget: gamma_0 is too small for the rates to get there in 3
    epochs): no mask, score or rate
    moves during it while the BatchNorm affine parameters still train, and the masks returned are
    those it trained with. With 0 the scores move to the end."""
    torch.manual_seed(0)
    model = pretrained()
    pruner = HARPPruner(model, CONFIG, make_evaluator(model, digits), gamma_0=1e-6, settle_epochs=settle)
    snapshots: list[dict[str, torch.Tensor]] = []

    def snapshot(p: HARPPruner) -> dict[str, torch.Tensor]:
        state = {f"{u.name}.{k}": t.detach().clone() for u in p._units
                 for k, t in (("hard", u.hard), ("scores", u.scores), ("rate", u.rate))}
        norms = {n.replace("_nni_wrapper.", ""): t for n, t in p.bound_model.named_parameters()}
        return state | {n: t.detach().clone() for n, t in norms.items() if n in NORMS}

    original, finalize = _loop.fix_final_masks, pruner._finalize

    def watched(p: HARPPruner, optimizer: HarpOptimizer) -> bool:
        forced = original(p, optimizer)
        snapshots.append(snapshot(p))
        return forced

    def last_epoch_then_finalize() -> None:
        snapshots.append(snapshot(pruner))
        finalize()

    monkeypatch.setattr(_loop, "fix_final_masks", watched)
    monkeypatch.setattr(pruner, "_finalize", last_epoch_then_finalize)
    _, masks = pruner.compress(max_epochs=3)
    history = pruner.history
    assert [h["settled"] for h in history] == [False, False, settle == 1]
    if settle == 0:
        assert len(snapshots) == 1 and not history[-1]["forced"]
        return
    # fixed at the end of epoch 1 (projected: the rates had not met the target), trained on in epoch 2
    assert len(snapshots) == 2 and [h["forced"] for h in history] == [False, True, False]
    assert history[1]["target_met"] and history[2]["target_met"] and pruner.frozen_at == 1
    assert history[1]["kept_fraction"] == pytest.approx(0.1, abs=0.01) == history[2]["kept_fraction"]
    start, end = snapshots
    units = [k for k in start if k.endswith((".hard", ".scores", ".rate"))]
    assert len(units) == 3 * len(pruner._units) and all(torch.equal(end[k], start[k]) for k in units)
    norms = set(start) - set(units)
    assert norms == NORMS and any(not torch.equal(end[n], start[n]) for n in norms)  # they still train
    for unit in pruner._units:  # the returned masks are the ones the settling epoch trained with
        assert torch.equal(masks[unit.name]["weight"].flatten().bool(), start[f"{unit.name}.hard"].flatten().bool())


def test_norm_affine_parameters_have_their_own_learning_rate(pretrained: Callable[[], nn.Sequential], digits: Digits) -> None:
    model = pretrained()
    optimizer = HarpOptimizer(HARPSettings(norm_lr=0.003, score_lr=0.2), [], norm_affine_parameters(model))
    assert [g["lr"] for g in optimizer.scores.param_groups] == [0.2, 0.003]
    assert sum(p.numel() for p in optimizer.scores.param_groups[1]["params"]) == 2 * (12 + 24 + 24)
    # left at None: a tenth of the score rate
    default = HarpOptimizer(HARPSettings(norm_lr=None, score_lr=0.2), [], norm_affine_parameters(model))
    assert [g["lr"] for g in default.scores.param_groups] == pytest.approx([0.2, 0.02])


def test_hydra_keeps_uniform_rates_and_learns_scores(pretrained: Callable[[], nn.Sequential], digits: Digits) -> None:
    torch.manual_seed(0)
    model = pretrained()
    dense = copy.deepcopy(model)
    pruner = HydraPruner(model, CONFIG, make_evaluator(model, digits))
    _, masks = pruner.compress(max_epochs=2)
    rates = pruner.layer_rates()
    for name, rate in rates.items():
        n = dense.get_submodule(name).weight.numel()
        assert abs(rate - 0.1) <= 1.0 / n + 1e-9  # fixed at the target, up to one weight
    assert all(h["gamma"] == 0.0 and h["hw_loss"] == 0.0 for h in pruner.history)
    # learned scores moved the masks away from HYDRA's magnitude initialisation
    changed = 0
    for name, targets in masks.items():
        w = dense.get_submodule(name).weight.detach().abs().flatten()
        magnitude = torch.zeros_like(w)
        magnitude[torch.topk(w, int(targets["weight"].sum())).indices] = 1
        changed += int((magnitude != targets["weight"].flatten()).sum())
    assert changed > 0


def test_entries_without_global_group_are_separate_budgets(pretrained: Callable[[], nn.Sequential], digits: Digits) -> None:
    model = pretrained()
    config = [
        {"op_types": ["Conv2d"], "sparse_ratio": 0.8, "max_sparse_ratio": 0.95},
        {"op_names": ["11"], "sparse_ratio": 0.5},
    ]
    pruner = HARPPruner(model, config, make_evaluator(model, digits), gamma_0=0.5, steps_per_epoch=3)
    _, masks = pruner.compress(max_steps=5)  # driven by steps: two gamma epochs of 3 and 2 steps
    assert [h["steps"] for h in pruner.history] == [3, 2]
    conv = [masks[n]["weight"] for n in ("0", "3", "6")]
    conv_kept = sum(float(m.sum()) for m in conv) / sum(m.numel() for m in conv)
    assert abs(conv_kept - 0.2) <= 0.01
    assert abs(float(masks["11"]["weight"].mean()) - 0.5) <= 0.01
    assert all(float(m.mean()) >= 0.05 - 1 / m.numel() for m in conv)  # max_sparse_ratio floor


@pytest.mark.filterwarnings("ignore:`broadcast_buffers` is deprecated:FutureWarning")
def test_distributed_data_parallel_model(tmp_path: Path, pretrained: Callable[[], nn.Sequential], digits: Digits) -> None:
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'pg'}", rank=0, world_size=1)
    try:
        ddp = nn.parallel.DistributedDataParallel(pretrained())
        seen: list[tuple[type, frozenset[str]]] = []
        pruner = HARPPruner(ddp, CONFIG, make_evaluator(ddp, digits, log=seen), gamma_0=0.5, train_norm_affine=True)
        _, masks = pruner.compress(max_epochs=1)
        assert set(masks) == {"module.0", "module.3", "module.6", "module.11"}
        kept = sum(float(m["weight"].sum()) for m in masks.values()) / sum(m["weight"].numel() for m in masks.values())
        assert abs(kept - 0.1) <= 0.01
        # training ran on a DDP model whose only trainable tensors were HARP's scores and rates and
        # (train_norm_affine=True) the BatchNorm affine parameters
        model_type, trainable = seen[0]
        assert model_type is nn.parallel.DistributedDataParallel
        assert {"module." + n for n in NORMS} <= trainable
        assert all(n.endswith(("_harp_score", "_harp_rate")) or n[len("module."):] in NORMS for n in trainable)
    finally:
        dist.destroy_process_group()


def test_unstructured_flops_budget_weighs_layers_by_their_flops(pretrained: Callable[[], nn.Sequential], digits: Digits) -> None:
    model = pretrained()
    pruner = HARPPruner(model, [{"op_types": ["Conv2d", "Linear"], "sparse_ratio": 0.8}], make_evaluator(model, digits),
                        budget="flops", gamma_0=0.5)
    _, masks = pruner.compress(max_epochs=1)
    # dense FLOPs per sample of each layer at 16 x 16 (2 per multiply-accumulate), counted by hand
    flops = {"0": 2 * 16 * 16 * 12 * 27, "3": 2 * 8 * 8 * 24 * 108, "6": 2 * 4 * 4 * 24 * 216, "11": 2 * 10 * 24}
    density = {n: int(masks[n]["weight"].count_nonzero()) / masks[n]["weight"].numel() for n in flops}  # exact counts
    kept = sum(flops[n] * density[n] for n in flops) / sum(flops.values())
    assert pruner.budget_kind == "flops"
    assert abs(kept - 0.2) <= 0.01
    assert kept == pytest.approx(pruner.kept_fraction(), abs=1e-9)
