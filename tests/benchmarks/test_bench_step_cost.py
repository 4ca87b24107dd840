"""benchmarks/step_cost.py runs end to end: a step row times both sides, and the analysis rows run
on their own (empty ``--models``), as the README's rerun of that section does."""
from __future__ import annotations

import json

from _bench_loader import benchmark_module


def test_one_step_row_times_both_sides(tmp_path):
    out = tmp_path / "step_cost.md"
    with benchmark_module("step_cost.py") as bench:
        assert bench.main(["--models", "test_resnet", "--rows", "harp:structured", "--batch", "4", "--reps", "2",
                           "--threads", "1", "--dg-models", "", "--output", str(out)]) == 0
    text = out.read_text()
    assert "Goal met in" in text and "Channel analysis" not in text
    (row,) = json.loads(out.with_suffix(".json").read_text())["steps"]
    assert (row["model"], row["pruner"], row["mode"], row["batch"]) == ("test_resnet", "harp", "structured", 4)
    assert len(row["times"]["a"]) == len(row["times"]["b"]) == 2
    assert row["plain"] > 0 and row["pruned"] > 0 and row["ratio"] == row["pruned"] / row["plain"]


def test_the_analysis_section_runs_alone(tmp_path):
    out = tmp_path / "step_cost.md"
    with benchmark_module("step_cost.py") as bench:
        assert bench.main(["--models", "", "--dg-models", "test_resnet", "--dg-reps", "1", "--threads", "1",
                           "--output", str(out)]) == 0
    text = out.read_text()
    assert "No step rows" in text and "Channel analysis against Torch-Pruning" in text
    (row,) = json.loads(out.with_suffix(".json").read_text())["analysis"]
    assert row["model"] == "test_resnet" and row["ours"] > 0 and row["dg"] > 0 and row["ratio"] > 0
