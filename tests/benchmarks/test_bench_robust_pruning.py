"""benchmarks/robust_pruning.py on a tiny slice: its machinery end to end (dense models per seed,
HARP and the allocation ablation through the job scheduler, the cache, the table), and its
pruning helpers on their own."""
from __future__ import annotations

import json
import re
import sys
from pathlib import Path

import pytest
import torch
from _bench_loader import benchmark_module
from torch import nn

_CELL = r"\d+\.\d ± \d+\.\d"


@pytest.fixture(scope="module")
def bench():
    with benchmark_module("robust_pruning.py") as module:
        yield module


@pytest.fixture(scope="module")
def methods(bench):
    return sys.modules["_robust_methods"]


TINY = ["--seeds", "2", "--large-model", "none", "--unstructured", "0.9", "--structured", "", "--short-prune-epochs", "0",
        "--methods", "harp,harp-alloc-mag", "--pretrain-epochs", "1", "--prune-epochs", "1", "--finetune-epochs", "1",
        "--train-attack-steps", "1", "--batch-size", "128", "--eval-samples", "24", "--aa-samples", "8",
        "--autoattack", "apgd-ce", "--jobs", "1"]


def test_tiny_slice_table_has_mean_std_cells_and_harp_columns(bench, tmp_path: Path) -> None:
    out = tmp_path / "res_0.9"  # a dot in the stem is kept
    args = [*TINY, "--cache-dir", str(tmp_path / "cache"), "--out", str(out)]
    assert bench.main(args) == 0
    text = (tmp_path / "res_0.9.md").read_text()
    rows = {line.split(" | ")[1]: line for line in text.splitlines()
            if line.startswith("| 90 % sparse") and line.count("|") == 15}  # the main table's 14 columns
    assert set(rows) == {"HARP", "HARP's allocation + magnitude scores"}, text
    for line in rows.values():
        cells = line.split(" | ")
        assert all(re.fullmatch(r"\**" + _CELL + r"\**", c) for c in cells[2:6] + cells[8:10]), line  # accuracies, kept
        assert re.fullmatch(r"\d+\.\d / \d+\.\d", cells[6]), line  # before fine-tuning: clean / PGD-20
        assert re.fullmatch(r"[01], [01]", cells[7]), line  # the kept fine-tuning epoch per seed (0: none, 1 epoch)
        assert cells[12] == "2"  # seeds
    assert "gamma frozen at (per seed)" in text and "spread" in text
    harp_alloc = [line for line in text.splitlines() if line.startswith("| 90 % sparse") and line.count("|") == 9]
    assert len(harp_alloc) == 1 and len(re.findall(_CELL, harp_alloc[0])) == 4, text  # min, max, spread, start
    payload = json.loads((tmp_path / "res_0.9.json").read_text())
    assert payload["partial"] is False
    by = {(r["method"], r["seed"]): r for r in payload["rows"]}
    for seed in (0, 1):
        harp, ablation = by[("harp", seed)], by[("harp-alloc-mag", seed)]
        assert harp["rates"] and harp["history"] and harp["alloc"]
        assert "target_met" in harp["history"][0]
        assert ablation["kept_params"] == pytest.approx(harp["kept_params"], abs=1e-9)  # the same counts per layer
        assert 0 <= harp["robust"] == min(harp["pgd20"], harp["autoattack"])
        assert 0 <= harp["pre_clean"] <= 1 and 0 <= harp["pre_pgd20"] <= 1 and harp["ft_epoch"] in (0, 1)
    assert by[("dense", 0)]["eval_n"] == 24 and by[("dense", 0)]["aa_n"] == 8

    # a second run with the same options reuses every finished cell instead of recomputing it
    def boom(*_: object) -> None:
        raise AssertionError("a cached cell was recomputed")

    saved = bench.run_cell
    bench.run_cell = boom
    try:
        assert bench.main(args) == 0
    finally:
        bench.run_cell = saved
    assert json.loads((tmp_path / "res_0.9.json").read_text())["rows"] == payload["rows"]


def test_lamp_scores_follow_the_definition(methods) -> None:
    w = torch.tensor([[0.5, -2.0], [1.0, 0.1]])
    # squared ascending: 0.01, 0.25, 1, 4; score = w^2 / (sum of the squares >= it)
    expected = torch.tensor([[0.25 / 5.25, 1.0], [1.0 / 5.0, 0.01 / 5.26]])
    torch.testing.assert_close(methods.lamp_scores(w), expected)


def _net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Conv2d(8, 8, 3), nn.ReLU(), nn.Flatten(),
                         nn.Linear(8 * 4 * 4, 10))


class _Ctx:
    def __init__(self, model: nn.Module, methods) -> None:
        self.example = torch.rand(2, 3, 8, 8)
        self.structure = methods.Structure(model, self.example)


def test_allocation_ablation_keeps_the_given_counts_by_magnitude(methods) -> None:
    model = _net()
    ctx = _Ctx(model, methods)
    counts = {"0": 5, "2": 40, "5": 600}
    pruned = methods.METHODS["harp-alloc-mag"].prune(ctx, model, "unstructured", 0.9, 1, counts)
    assert methods.allocation(pruned.masks, "unstructured", ctx.structure) == counts
    w = model[2].weight.detach().abs().flatten()
    kept = pruned.masks["2"]["weight"].flatten().bool()
    assert float(w[kept].min()) >= float(w[~kept].max())  # the largest magnitudes


def test_structured_allocation_round_trips_through_group_masks(methods) -> None:
    model = _net()
    ctx = _Ctx(model, methods)
    groups = ctx.structure.prunable
    assert groups
    counts = {str(g.id): max(1, g.size // 2 - i) for i, g in enumerate(groups)}
    pruned = methods.METHODS["harp-alloc-mag"].prune(ctx, model, "structured", 0.5, 1, counts)
    assert methods.allocation(pruned.masks, "structured", ctx.structure) == counts


def test_global_lamp_never_empties_a_layer(methods) -> None:
    model = _net()
    with torch.no_grad():
        model[2].weight.mul_(1e-3)  # a layer of tiny weights: global magnitude would empty it
    ctx = _Ctx(model, methods)
    lamp = methods.METHODS["lamp"].prune(ctx, model, "unstructured", 0.99, 1, None).masks
    glob = methods.METHODS["global-mag"].prune(ctx, model, "unstructured", 0.99, 1, None).masks
    assert int(lamp["2"]["weight"].sum()) >= 1 and int(glob["2"]["weight"].sum()) == 0
    total = sum(m.weight.numel() for m in model if isinstance(m, (nn.Conv2d, nn.Linear)))
    assert sum(int(v["weight"].sum()) for v in lamp.values()) == round(0.01 * total)


def test_finetune_repeats_average_fine_tunings_whose_first_is_the_single_run(bench, tmp_path: Path) -> None:
    base = [*TINY, "--seeds", "1", "--methods", "layer-mag", "--cache-dir", str(tmp_path / "cache")]
    assert bench.main([*base, "--out", str(tmp_path / "once")]) == 0
    assert bench.main([*base, "--finetune-repeats", "2", "--out", str(tmp_path / "twice")]) == 0
    once = {r["method"]: r for r in json.loads((tmp_path / "once.json").read_text())["rows"]}["layer-mag"]
    twice = {r["method"]: r for r in json.loads((tmp_path / "twice.json").read_text())["rows"]}["layer-mag"]
    assert once["repeats"] == [] and len(twice["repeats"]) == 2
    first = twice["repeats"][0]
    assert {k: first[k] for k in ("clean", "pgd20", "autoattack", "robust")} == {
        k: once[k] for k in ("clean", "pgd20", "autoattack", "robust")}  # repeat 0 is the cell without repeats
    for key in ("clean", "pgd20", "autoattack", "robust"):
        assert twice[key] == pytest.approx(sum(r[key] for r in twice["repeats"]) / 2)
    assert all(r["robust"] == min(r["pgd20"], r["autoattack"]) for r in twice["repeats"])
    text = (tmp_path / "twice.md").read_text()
    assert "fine-tuned 2 times" in text
    spread = [line for line in text.splitlines() if line.startswith("| 90 % sparse") and line.count("|") == 5]
    runs = [100 * r["robust"] for r in twice["repeats"]]
    assert spread == [f"| 90 % sparse (unstructured) | layer-wise magnitude | {runs[0]:.1f} {runs[1]:.1f} | "
                      f"{abs(runs[0] - runs[1]) / 2 ** 0.5:.1f} |"], text  # two values: std = |a - b| / sqrt 2
