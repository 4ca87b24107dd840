"""The two channel plans of benchmarks/speedup.py reach the FLOPs target; the 'memory' plan
removes more activation traffic than the uniform one at the same FLOPs."""
from __future__ import annotations

import pytest
import torch
from _bench_loader import benchmark_module

import graph_passes as gp


@pytest.fixture(scope="module")
def bench():
    with benchmark_module("speedup.py") as module:
        yield module


@pytest.fixture(scope="module")
def model_and_input():
    import timm  # a hard dependency: a missing timm must fail, not skip
    torch.manual_seed(0)
    model = timm.create_model("test_efficientnet", pretrained=False).eval()
    return model, torch.randn(1, *model.pretrained_cfg["input_size"])


def test_uniform_plan_has_unit_weights(bench, model_and_input):
    model, x = model_and_input
    groups = [g for g in gp.channel_groups(model, x) if g.prunable]
    weights = bench.memory_weights(gp.cost(model, x), groups, gamma=0.0)
    assert set(weights) == {g.id for g in groups}
    assert set(weights.values()) == {1.0}


@pytest.mark.parametrize("gamma", [0.0, 0.5])
def test_plans_reach_the_flops_target_on_the_pruned_model(bench, model_and_input, gamma):
    model, x = model_and_input
    groups, keep, frac, acts = bench.keep_for_target(model, x, 0.5, round_to=1, gamma=gamma)
    pruned = gp.ModelSpeedup(model, x, gp.group_masks(model, groups, keep)).speedup_model(inplace=False).eval()
    ratio = gp.count_flops(pruned, x) / gp.count_flops(model, x)
    assert ratio == pytest.approx(0.5, abs=0.02)
    assert acts == pytest.approx(gp.cost(pruned, x).total_activations / gp.cost(model, x).total_activations, rel=1e-6)


def test_memory_plan_prunes_memory_heavy_groups_harder(bench, model_and_input):
    model, x = model_and_input
    cm = gp.cost(model, x)
    prunable = [g for g in gp.channel_groups(model, x) if g.prunable]
    weights = bench.memory_weights(cm, prunable, gamma=0.5)
    # activation elements per FLOP of one channel, as the plan defines it
    rho = {}
    for g in prunable:
        df = float(cm.total_flops - cm.flops({g.id: 0.0}))
        if df > 0:
            rho[g.id] = float(cm.total_activations - cm.activations({g.id: 0.0})) / df
    ordered = sorted(rho, key=rho.get)
    assert len(ordered) > 2 and rho[ordered[0]] < rho[ordered[-1]]
    assert all(weights[a] >= weights[b] for a, b in zip(ordered, ordered[1:]))
    _, _, _, uniform_acts = bench.keep_for_target(model, x, 0.5, round_to=1, gamma=0.0)
    _, _, _, memory_acts = bench.keep_for_target(model, x, 0.5, round_to=1, gamma=0.5)
    assert memory_acts < uniform_acts


def _latency_model(intercept: float, **coefficients: float) -> gp.LatencyModel:
    return gp.LatencyModel(backend="eager", threads=1, batch=1, intercept=intercept, coefficients=coefficients,
                           dense_ms=1.0, measured=[])


def test_latency_plan_on_activation_time_alone_is_the_memory_plan(bench, model_and_input):
    """A latency model whose time is all activation traffic ranks groups as the memory plan does."""
    model, x = model_and_input
    cm = gp.cost(model, x)
    prunable = [g for g in gp.channel_groups(model, x) if g.prunable]
    by_latency = bench.latency_weights(_latency_model(0.3, activations=1e-5), cm, prunable, gamma=0.5)
    by_memory = bench.memory_weights(cm, prunable, gamma=0.5)
    assert by_latency.keys() == by_memory.keys()
    assert all(by_latency[g] == pytest.approx(by_memory[g], rel=1e-9) for g in by_memory)
    assert len(set(round(w, 6) for w in by_latency.values())) > 1


def test_latency_plan_meets_its_predicted_target(bench, model_and_input):
    model, x = model_and_input
    groups = gp.channel_groups(model, x)
    cm = gp.cost(model, x, groups)
    prunable = [g for g in groups if g.prunable]
    latency = _latency_model(0.05, conv=2e-7, linear=1e-7, activations=4e-6)
    norms = {g.id: gp.channel_norms(model, g) for g in prunable}
    weight = bench.latency_weights(latency, cm, prunable, gamma=0.5)
    for target in (0.5, 0.7):
        keep, _ = bench.plan_keep(prunable, norms, weight, lambda f: float(latency.fraction(cm, f)), target, 1)
        assert float(latency.fraction(cm, bench.fractions(keep))) == pytest.approx(target, abs=0.02)
        # the plan is not uniform: the reweighting moved the groups apart
        assert len({round(float(v.float().mean()), 2) for v in keep.values()}) > 2


def test_latency_plan_refines_the_model_on_each_plan_and_plans_on_the_last(bench, model_and_input, monkeypatch):
    """With --refine 2 the plan is measured twice (here: a stand-in that makes conv time dearer
    each time; the first time with the counts the target refers to), and the plan returned has the
    first model's shape (per-group weights) at the scale the last model puts at the target."""
    from types import SimpleNamespace

    model, x = model_and_input
    analysis = gp.analysis_for(model, x)
    cm = gp.cost(analysis)
    prunable = [g for g in analysis.groups if g.prunable]
    norms = {g.id: gp.channel_norms(model, g) for g in prunable}
    first = _latency_model(0.05, conv=2e-7, linear=1e-7, activations=4e-6)
    measured: list[list[dict[int, int]]] = []

    def refine(model_, example, latency, configs, reps=20, rounds=2, progress=None):
        assert model_ is analysis and latency.batch == example.shape[0]
        assert (reps, rounds) == (3, 3)  # --fit-rounds 5, at most one pass per run
        measured.append(list(configs))
        return _latency_model(latency.intercept, conv=latency.coefficients["conv"] * 4,
                              linear=latency.coefficients["linear"], activations=latency.coefficients["activations"])

    monkeypatch.setattr(bench.gp, "refine_latency", refine)
    args = SimpleNamespace(refine=2, gamma=0.5, round_to=1, fit_reps=3, fit_reps_b32=1, fit_rounds=5)
    uniform = {g.id: g.size // 2 for g in prunable}
    keep, _, last, target = bench.latency_plan((first, cm, analysis), prunable, norms, lambda lat: 0.6, args, uniform)
    assert [len(c) for c in measured] == [2, 1] and measured[0][0] == uniform and target == 0.6
    assert last.coefficients["conv"] == pytest.approx(2e-7 * 16)
    assert float(last.fraction(cm, bench.fractions(keep))) == pytest.approx(0.6, abs=0.02)
    weight = bench.latency_weights(first, cm, prunable, 0.5)
    plain, _ = bench.plan_keep(prunable, norms, weight, lambda f: float(first.fraction(cm, f)), 0.6, 1)
    assert measured[0][1] == {gid: int(v.sum()) for gid, v in plain.items()}  # the first plan measured: unrefined
    expected, _ = bench.plan_keep(prunable, norms, weight, lambda f: float(last.fraction(cm, f)), 0.6, 1)
    assert all(torch.equal(keep[g], expected[g]) for g in expected)  # first shape, last scale
    assert any(int(keep[g].sum()) != int(plain[g].sum()) for g in keep)  # which differs from the first plan


def test_pruned_models_have_plain_norms_of_the_kept_width(bench):
    """The benchmark prunes as a fine-tuned structured run does: no ExactStatsNorm is left in a
    LayerNorm model, and the pruned model runs."""
    import timm

    torch.manual_seed(0)
    model = timm.create_model("test_vit", pretrained=False).eval()
    x = torch.randn(1, *model.pretrained_cfg["input_size"])
    groups = gp.channel_groups(model, x)
    keep = {g.id: torch.arange(g.size) < max(1, g.size // 2) for g in groups if g.prunable}
    pruned = bench.prune_kept_norms(model, x, groups, keep)
    kinds = {type(m).__name__ for m in pruned.modules()}
    assert "LayerNorm" in kinds and "ExactStatsNorm" not in kinds
    assert pruned(x).shape == model(x).shape


def test_dense_and_pruned_alternate_in_blocks_of_runs(bench) -> None:
    """paired_latency times each model in blocks of runs in a row (each after one untimed run),
    the order of the two swapped block by block; reps too few for 4 blocks go run by run."""
    calls: list[str] = []
    bench.paired_latency(lambda: calls.append("d"), lambda: calls.append("p"), reps=10, warmup=1)
    # blocks of 10 // 4 = 2 timed runs, each after an untimed one: 5 blocks per model
    blocks = [[first] * 3 + [second] * 3 for first, second in [("d", "p"), ("p", "d")] * 2 + [("d", "p")]]
    assert calls == ["d", "p"] + [c for block in blocks for c in block]
    calls.clear()
    bench.paired_latency(lambda: calls.append("d"), lambda: calls.append("p"), reps=3, warmup=0)
    assert calls == ["d", "p", "p", "d", "d", "p"]
