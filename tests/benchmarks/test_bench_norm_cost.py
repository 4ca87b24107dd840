"""benchmarks/norm_cost.py runs end to end and times what it says: the ExactStatsNorm it exports
is the norm of the kept channels with the original count (its outputs match the module's)."""
from __future__ import annotations

import numpy as np
import torch
from _bench_loader import benchmark_module

import graph_passes as gp


def test_norm_cost_writes_one_row_per_shape(tmp_path):
    out = tmp_path / "norm_cost.md"
    with benchmark_module("norm_cost.py") as bench:
        assert bench.main(["--reps", "2", "--output", str(out)]) == 0
        shapes = bench.SHAPES
    text = out.read_text()
    rows = [line for line in text.splitlines() if line.startswith("| ") and "tokens" not in line]
    assert len(rows) == len(shapes)
    assert "Goal met in" in text
    for line, (label, tokens, channels) in zip(rows, shapes):
        cells = [c.strip() for c in line.strip("|").split("|")]
        assert cells[0] == label and int(cells[1]) == tokens and cells[2].endswith(f"/ {channels}")
        assert float(cells[5].rstrip("x")) > 0


def test_the_exported_exact_norm_computes_the_module(tmp_path):
    with benchmark_module("norm_cost.py") as bench:
        module = bench._exact(16, 40)
    x = torch.randn(1, 7, 16)
    path = gp.export_onnx(module, (x,), tmp_path / "exact.onnx")
    (got,) = gp.run_onnx(path, (x,))
    padded = torch.nn.functional.pad(x, (0, 24))  # the 24 removed channels, as zeros
    ref = torch.nn.functional.layer_norm(padded, (40,), eps=1e-6)[..., :16] * module.weight + module.bias
    np.testing.assert_allclose(got, ref.detach().numpy(), rtol=1e-4, atol=1e-5)
