"""Trace once (#14): the public passes take a traced GraphModule or its Analysis in place of
(model, example_inputs) and then trace nothing; ``trace_once`` shares one trace of a model between
callers that only hold the model; ``ModelSpeedup`` exposes the plan it applied."""
from __future__ import annotations

import copy

import pytest
import timm
import torch

import graph_passes as gp
from graph_passes import latency as lat
from graph_passes import tracing
from _gp_helpers import apply_masks, assert_same, outputs, random_keep


@pytest.fixture
def traces(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """The models traced (every tracing attempt goes through ``tracing._trace``), by class name."""
    seen: list[str] = []
    real = tracing._trace

    def counting(model, *args, **kwargs):
        seen.append(type(model).__name__)
        return real(model, *args, **kwargs)

    monkeypatch.setattr(tracing, "_trace", counting)
    return seen


@pytest.fixture(scope="module")
def model() -> torch.nn.Module:
    torch.manual_seed(0)
    return timm.create_model("test_resnet", num_classes=10).eval()


X = torch.rand(1, 3, 32, 32)


def test_passes_take_a_graph_module_or_its_analysis_and_trace_nothing(model, traces):
    groups = gp.channel_groups(model, X)
    dense = gp.cost(model, X)
    assert len(traces) == 2  # a plain module is traced by every call, as before
    gm = gp.trace(model, X)
    analysis = gp.analysis_for(gm)
    assert analysis.gm is gm and gp.analysis_for(model, X) is not analysis
    del traces[:]
    for source in (gm, analysis):
        assert gp.analysis_for(source) is analysis
        assert [(g.id, g.size, g.members) for g in gp.channel_groups(source)] == [(g.id, g.size, g.members) for g in groups]
        again = gp.cost(source, groups=groups)
        assert again.total_flops == dense.total_flops and again.total_params == dense.total_params
    assert traces == []
    with pytest.raises(gp.GraphPassError, match="example_inputs"):
        gp.analysis_for(model)  # a plain module needs inputs to be traced with


def test_trace_once_shares_one_trace_of_an_unchanged_model(model, traces):
    with gp.trace_once():
        gm = gp.trace(model, X)
        assert gp.trace(model, X.clone()) is gm  # same model, inputs of the same shape
        assert gp.channel_groups(model, X) == gp.channel_groups(gm)
        gp.cost(model, X)
        assert len(traces) == 1
        gp.trace(model, torch.rand(2, 3, 32, 32))  # another input shape
        other = copy.deepcopy(model)
        gp.trace(other, X)  # another model object
        other.fc = torch.nn.Linear(other.fc.in_features, 3)  # changed in place: traced anew
        gp.trace(other, X)
        assert len(traces) == 4
        with gp.trace_once():  # nested: the outer block's traces
            assert gp.trace(model, X) is gm
    assert gp.trace(model, X) is not gm  # outside a block every call traces
    assert len(traces) == 5


def test_model_speedup_exposes_the_plan_it_applied_and_takes_an_analysis(model, traces):
    analysis = gp.analysis_for(model, X)
    keep = random_keep(analysis.groups, seed=1)
    masks = gp.group_masks(model, analysis.groups, keep)
    del traces[:]
    speedup = gp.ModelSpeedup(model, X, masks, graph_module=analysis)
    pruned = speedup.speedup_model(inplace=False)
    assert traces == []  # the given trace was used
    assert_same(outputs(pruned, X), outputs(apply_masks(model, masks), X))
    assert speedup.plan == gp.PruningPlan.from_masks(model, X, masks)
    assert speedup.plan.input_shapes == [list(X.shape)]
    assert [g.id for g in speedup.groups] == [g.id for g in analysis.groups]
    assert all(torch.equal(speedup.keep[g], keep[g]) for g in keep)
    again = speedup.plan.apply(model, X, masks)  # the plan re-applied to the dense model: the same model
    assert_same(outputs(again, X), outputs(pruned, X))


def test_pruning_plan_takes_a_graph_module_or_its_analysis_and_traces_nothing(model, traces):
    analysis = gp.analysis_for(model, X)
    keep = random_keep(analysis.groups, seed=2)
    masks = gp.group_masks(model, analysis.groups, keep)
    plan = gp.PruningPlan.from_masks(model, X, masks)  # a plain module: traced (on a copy)
    expected = outputs(plan.apply(model, X, masks), X)
    del traces[:]
    for source in (analysis.gm, analysis):
        assert gp.PruningPlan.from_masks(source, X, masks) == plan
        pruned = plan.apply(source, masks=masks)
        assert_same(outputs(pruned, X), expected)
        assert pruned is not analysis.gm
    assert traces == []
    # the given trace is left as it was: dense, its weights unmasked
    assert_same(outputs(analysis.gm, X), outputs(model, X))


def test_fit_latency_traces_the_model_once(model, traces, monkeypatch, tmp_path):
    monkeypatch.setattr(lat, "measure_ms", lambda run, reps=20, warmup=3: 1.0)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    model.train()
    try:
        fitted = gp.fit_latency(model, X, samples=4, reps=1, cache_dir=tmp_path)
        assert len(traces) == 1 and len(fitted.measured) == 4
        assert model.training  # pruned and timed copies only: the model is left as it was
    finally:
        model.eval()
    assert all(torch.equal(state[k], v) for k, v in model.state_dict().items())
    del traces[:]
    monkeypatch.setattr(lat, "measure_ms", lambda run, reps=20, warmup=3: pytest.fail("measured again"))
    # (the same reps: they are part of the cache key; with the default 20 this fit was measured anew)
    assert gp.fit_latency(gp.analysis_for(gp.trace(model, X)), X, samples=4, reps=1, cache_dir=tmp_path) == fitted
    assert len(traces) == 1  # the trace handed in; the fit came from the cache


def test_a_large_graph_and_its_analysis_are_copied_without_deep_recursion(traces, monkeypatch, tmp_path):
    """A trace of a few hundred nodes (resnet50, convnext_tiny, vit_small have that many): copying
    the traced module with its stored analysis walked the graph's linked nodes one recursion level
    each and raised RecursionError in ModelSpeedup(graph_module=analysis), PruningPlan.apply and
    fit_latency. A copy now carries no analysis and is analysed anew."""
    import sys

    layers = []
    for _ in range(sys.getrecursionlimit() // 4):
        layers += [torch.nn.Conv2d(4, 4, 1), torch.nn.ReLU()]
    deep = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 1), *layers).eval()
    x = torch.rand(1, 3, 4, 4)
    analysis = gp.analysis_for(deep, x)
    assert len(analysis.gm.graph.nodes) > sys.getrecursionlimit() // 2
    copied = copy.deepcopy(analysis.gm)
    assert gp.dependency.stored_analysis(copied) is None and gp.dependency.stored_analysis(analysis.gm) is analysis
    keep = random_keep(analysis.groups, seed=0)
    masks = gp.group_masks(deep, analysis.groups, keep)
    del traces[:]
    speedup = gp.ModelSpeedup(deep, x, masks, graph_module=analysis)
    pruned = speedup.speedup_model(inplace=False)
    assert_same(outputs(pruned, x), outputs(apply_masks(deep, masks), x))
    assert_same(outputs(speedup.plan.apply(analysis, masks=masks), x), outputs(pruned, x))
    monkeypatch.setattr(lat, "measure_ms", lambda run, reps=20, warmup=3: 1.0)
    assert len(gp.fit_latency(analysis, x, samples=3, reps=1, cache_dir=tmp_path).measured) == 3
    assert traces == []
