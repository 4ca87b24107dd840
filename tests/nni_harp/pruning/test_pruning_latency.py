"""HARP with a latency budget: the hinge on predicted latency reaches the rates and the final
masks meet the target; misuse is refused with a message. The timer is a known function of the
pruned model (wall-clock accuracy is benchmarks/speedup.py's business)."""
from __future__ import annotations

import copy
import dataclasses
import io
from collections.abc import Callable
from typing import Any

import nni
import pytest
import torch
from nni.compression import TorchEvaluator
from torch import nn

import graph_passes as gp
from graph_passes import latency as lat
from nni_harp.pruning import HARPPruner, HARPSettings, SettingsError

from _pruning_helpers import Digits, ce_step, make_evaluator

CONFIG = [{"op_types": ["Conv2d", "Linear"], "sparse_ratio": 0.5, "granularity": "out_channel"}]


@pytest.fixture
def known_timer(monkeypatch: pytest.MonkeyPatch) -> None:
    """'Time' = 0.2 ms + 1e-5 ms per FLOP + 1e-4 ms per activation element of the pruned model."""

    class Known:
        def __init__(self, model: nn.Module, inputs: tuple[torch.Tensor, ...]) -> None:
            cost = gp.cost(copy.deepcopy(model), inputs)
            self.ms = 0.2 + 1e-5 * cost.total_flops + 1e-4 * cost.total_activations

    def runner(model, example_inputs, backend, threads, work):
        return Known(model, tuple(example_inputs) if isinstance(example_inputs, (tuple, list)) else (example_inputs,))

    monkeypatch.setattr(lat, "latency_runner", runner)
    monkeypatch.setattr(lat, "measure_ms", lambda run, reps=20, warmup=3: run.ms)


def test_latency_hinge_reaches_the_rates_and_the_masks_meet_the_target(
    pretrained: Callable[[], nn.Sequential], digits: Digits, known_timer: None, tmp_path
) -> None:
    torch.manual_seed(0)
    model = pretrained()
    x = digits.x_train[:1]
    pruner = HARPPruner(model, CONFIG, make_evaluator(model, digits), dummy_input=x, budget="latency",
                        latency_cache=str(tmp_path))
    assert pruner.budget_kind == "latency" and pruner.latency_model is not None
    assert list(tmp_path.glob("latency-*.json"))  # cached for the next run
    # above the target at the start, the hinge is positive and its gradient reaches every rate
    pruner._gamma = 1.0
    hw = pruner._hardware_loss()
    assert float(hw.detach()) > 0
    hw.backward()
    assert all(u.rate.grad is not None and float(u.rate.grad) > 0 for u in pruner._units)
    for u in pruner._units:
        u.rate.grad = None
    _, masks = pruner.compress(max_epochs=2)
    assert pruner.kept_fraction() == pytest.approx(0.5, abs=0.02)
    # the kept fraction is the latency the model predicts for the pruned channels
    groups = gp.channel_groups(pretrained(), x)
    keep = gp.keep_from_masks(groups, masks)
    fractions = {g: float(k.float().mean()) for g, k in keep.items()}
    cost = gp.cost(pretrained(), x)
    assert float(pruner.latency_model.fraction(cost, fractions)) == pytest.approx(pruner.kept_fraction(), abs=1e-6)
    assert pruner.latency_model.norms == "exact"
    # latency_norms reaches the fit (a model fine-tuned with kept-channel norms is timed with plain norms)
    model = pretrained()
    kept = HARPPruner(model, CONFIG, make_evaluator(model, digits), dummy_input=x, budget="latency",
                      latency_cache=str(tmp_path), latency_norms="kept")
    assert kept.latency_model.norms == "kept" and len(list(tmp_path.glob("latency-*.json"))) == 4
    assert len(list(tmp_path.glob("latency-*-target0.500000.json"))) == 2  # each fit refined for the target


def test_the_fit_is_refined_at_the_target_once(pretrained: Callable[[], nn.Sequential], digits: Digits,
                                                monkeypatch: pytest.MonkeyPatch, tmp_path) -> None:
    """A 'backend' with a part the model's terms cannot express (a fixed cost per channel group
    that grows with the square root of its width: kernels whose overhead shrinks slower than their
    work): the uniform plan at the target is measured and the fit refined until a measured plan
    lies within 10 % of the target; the refined model is cached per target, so asking again
    measures nothing; another target is refined on its own."""
    from nni_harp.pruning._latency import REFINE_PLANS, latency_for_target

    model = pretrained()
    x = digits.x_train[:1]

    class SqrtWidth:
        def __init__(self, m: nn.Module, inputs: tuple[torch.Tensor, ...]) -> None:
            cost = gp.cost(copy.deepcopy(m), inputs)
            widths = [g.size for g in gp.channel_groups(copy.deepcopy(m), inputs) if g.prunable]
            self.ms = 0.2 + 1e-5 * cost.total_flops + 1e-4 * cost.total_activations + 0.2 * sum(w ** 0.5 for w in widths)

    timed: list[float] = []
    monkeypatch.setattr(lat, "latency_runner", lambda m, xs, backend, threads, work: SqrtWidth(m, (xs,)))
    monkeypatch.setattr(lat, "measure_ms", lambda run, reps=20, warmup=3: timed.append(run.ms) or run.ms)
    settings = HARPSettings(budget="latency", latency_cache=str(tmp_path))
    plain = gp.fit_latency(model, x, backend="eager", threads=1, round_to=settings.round_to, cache_dir=tmp_path)
    refined = latency_for_target(model, x, settings, 0.5)
    assert 1 <= refined.refined <= REFINE_PLANS and refined.measured[:len(plain.measured)] == plain.measured
    assert refined.measured[-1][1] / refined.dense_ms == pytest.approx(0.5, rel=0.1)
    timed.clear()
    assert latency_for_target(model, x, settings, 0.5) == refined and timed == []
    other = latency_for_target(model, x, settings, 0.8)
    assert other.refined >= 1 and other.measured[-1][1] / other.dense_ms == pytest.approx(0.8, rel=0.1)
    # on a coarser grid (round_to=6: the 24-channel groups in steps of 6, the 12-channel one channel
    # by channel, graph_passes.grid_step), 0.14 lies below the smallest plan (1, 6, 6 channels: x0.156)
    # and above the floors: that plan is measured once, not again for nothing
    low = latency_for_target(model, x, dataclasses.replace(settings, round_to=6), 0.14)
    assert low.refined == 1 and low.measured[-1][0] == {0: 1 / 12, 1: 6 / 24, 2: 6 / 24}
    assert low.measured[-1][1] / low.dense_ms > 0.15
    # a target below what the backend allows is left to the caller to refuse: nothing is measured for it
    timed.clear()
    assert latency_for_target(model, x, settings, 0.01).refined == 0 and timed == []


class Backend:
    """'Time' = 0.2 ms + ``per_flop`` ms per FLOP + ``per_activation`` ms per activation element +
    ``per_param`` ms per parameter of the pruned model; the rates can change after the latency
    model was fitted."""

    per_flop, per_activation, per_param = 1e-5, 1e-4, 0.0

    def __init__(self, model: nn.Module, inputs: tuple[torch.Tensor, ...]) -> None:
        cost, law = gp.cost(copy.deepcopy(model), inputs), type(self)
        self.ms = (0.2 + law.per_flop * cost.total_flops + law.per_activation * cost.total_activations
                   + law.per_param * cost.total_params)


def _measured(model: nn.Module, x: torch.Tensor, masks: dict) -> float:
    """The pruned model's time (:class:`Backend`) as a fraction of the dense one's."""
    analysis = gp.analysis_for(model, x)
    pruned = analysis.copy()
    keep = {g: k for g, k in gp.keep_from_masks(analysis.groups, masks).items()
            if any(g == group.id and group.prunable for group in analysis.groups)}
    return Backend(gp.apply_keep(pruned.gm, pruned, keep), (x,)).ms / Backend(model, (x,)).ms


def test_the_final_plan_is_measured_and_counted_again(pretrained: Callable[[], nn.Sequential], digits: Digits,
                                                       monkeypatch: pytest.MonkeyPatch, tmp_path) -> None:
    """The fitted model is wrong about where the learned plan's time goes (simulated: once it is
    fitted and refined, activations cost 8x as much): unchecked, the final plan measures more
    than 10 % over its prediction; checked (the default), it is measured when the masks are fixed,
    counted again under the model refitted on it, and ends within 10 % of the target, predicted as
    measured. A run resumed after the check measures nothing again and ends with the same masks.
    A plan measured under the target (activations free after the fit) is kept as it is."""
    timed: list[float] = []
    monkeypatch.setattr(Backend, "per_activation", 1e-4)
    monkeypatch.setattr(lat, "latency_runner", lambda m, xs, backend, threads, work: Backend(m, (xs,)))
    monkeypatch.setattr(lat, "measure_ms", lambda run, reps=20, warmup=3: timed.append(run.ms) or run.ms)
    x = digits.x_train[:1]
    holder: dict[str, Any] = {}

    def evaluator(model: nn.Module) -> TorchEvaluator:
        def training_func(model, optimizers, training_step, lr_schedulers=None, max_steps=None, max_epochs=None):
            pruner = holder["pruner"]
            if len(pruner.history) == 2 and holder.pop("save", False):  # the settle epoch starts: the check has run
                buffer = io.BytesIO()
                torch.save(pruner.state_dict(), buffer)
                holder["state"] = buffer.getvalue()
            model.train()
            for batch in digits.batches(seed=len(pruner.history)):
                optimizers.zero_grad()
                training_step(batch, model).backward()
                optimizers.step()

        optimizer = nni.trace(torch.optim.SGD)(model.parameters(), lr=0.01, momentum=0.9)
        return TorchEvaluator(training_func, optimizer, ce_step, dummy_input=x)

    def law(per_flop: float, per_activation: float, per_param: float) -> None:
        for name, value in (("per_flop", per_flop), ("per_activation", per_activation), ("per_param", per_param)):
            monkeypatch.setattr(Backend, name, value)

    def prune(checks: int | None, state: bytes | None = None,
              after_fit: tuple[float, float, float] = (1e-5, 8e-4, 0.0)) -> tuple[HARPPruner, dict]:
        torch.manual_seed(0)
        model = pretrained()
        options = {} if checks is None else {"latency_checks": checks}
        law(1e-5, 1e-4, 0.0)  # as when the model was fitted (or read from the cache)
        pruner = holder["pruner"] = HARPPruner(model, CONFIG, evaluator(model), dummy_input=x, budget="latency",
                                               latency_cache=str(tmp_path), **options)
        law(*after_fit)
        if state is not None:
            pruner.load_state_dict(torch.load(io.BytesIO(state), weights_only=True))
        return pruner, pruner.compress(max_epochs=3)[1]

    unchecked, masks = prune(0)
    predicted, measured = unchecked.kept_fraction(), _measured(pretrained(), x, masks)
    assert predicted == pytest.approx(0.5, abs=0.02) and measured / predicted - 1 > 0.1
    assert unchecked.latency_checks == []

    assert HARPSettings().latency_checks == 2
    holder["save"] = True
    checked, masks = prune(None)
    records = checked.latency_checks
    assert 1 <= len(records) <= 2
    assert records[0]["predicted"] == pytest.approx(predicted, abs=0.02)
    assert records[0]["measured"] / records[0]["predicted"] - 1 > 0.1  # the plan HARP learned, measured
    assert records[0]["within_limit"] is False  # counted again
    measured = _measured(pretrained(), x, masks)
    assert measured == pytest.approx(0.5, rel=0.1)
    assert checked.kept_fraction() == pytest.approx(measured, rel=0.01)  # the refitted model knows the plan

    timed.clear()
    resumed, resumed_masks = prune(None, holder.pop("state"))
    assert timed == []  # the fit and its refinement came from the cache, the check from the state
    assert resumed.latency_checks == records
    assert all(torch.equal(resumed_masks[m][t], masks[m][t]) for m in masks for t in masks[m])

    # far faster than predicted (only the parameters cost time): measured once, kept as it is (the
    # masks of the unchecked run), the target being a limit
    _, unchecked_masks = prune(0, after_fit=(0.0, 0.0, 1e-3))
    faster, masks = prune(None, after_fit=(0.0, 0.0, 1e-3))
    assert [(r["measured"] < 0.5 * 0.9, r["within_limit"]) for r in faster.latency_checks] == [(True, True)]
    assert all(torch.equal(unchecked_masks[m][t], masks[m][t]) for m in masks for t in masks[m])


def test_latency_budget_misuse_is_refused(pretrained: Callable[[], nn.Sequential], digits: Digits) -> None:
    model = pretrained()
    with pytest.raises(SettingsError, match="budget.*unstructured"):
        HARPPruner(model, [{"op_types": ["Conv2d"], "sparse_ratio": 0.5}], make_evaluator(model, digits), budget="latency")
    with pytest.raises(SettingsError, match="latency_backend.*'eager', 'onnxruntime', 'cuda'"):
        HARPSettings(budget="latency", latency_backend="tensorrt")
    with pytest.raises(SettingsError, match="latency_threads"):
        HARPSettings(latency_threads=0)
