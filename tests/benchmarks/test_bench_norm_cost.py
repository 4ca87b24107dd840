"""benchmarks/norm_cost.py runs end to end and times what it says: the ExactStatsNorm it exports
is the norm of the kept channels with the original count (its outputs match the module's); the kept
route's norm is the plain LayerNorm of the kept width the speedup emits for a KeptStatsNorm, one
LayerNormalization node in ONNX."""
from __future__ import annotations

import numpy as np
import onnx
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
        assert float(cells[5].rstrip("x")) > 0 and float(cells[7].rstrip("x")) > 0
        plain, exact, route = (int(n) for n in cells[8].split(" / "))
        assert route == plain < exact  # the kept route exports as a LayerNorm does


def test_the_exported_exact_norm_computes_the_module(tmp_path):
    with benchmark_module("norm_cost.py") as bench:
        module = bench._exact(16, 40)
    x = torch.randn(1, 7, 16)
    path = gp.export_onnx(module, (x,), tmp_path / "exact.onnx")
    (got,) = gp.run_onnx(path, (x,))
    padded = torch.nn.functional.pad(x, (0, 24))  # the 24 removed channels, as zeros
    ref = torch.nn.functional.layer_norm(padded, (40,), eps=1e-6)[..., :16] * module.weight + module.bias
    np.testing.assert_allclose(got, ref.detach().numpy(), rtol=1e-4, atol=1e-5)


def test_the_kept_route_is_a_layer_norm_of_the_kept_width_over_the_kept_channels(tmp_path):
    with benchmark_module("norm_cost.py") as bench:
        module = bench._kept_route(16, 40)
    assert type(module) is torch.nn.LayerNorm and module.normalized_shape == (16,)
    x = torch.randn(1, 7, 16)
    path = gp.export_onnx(module, (x,), tmp_path / "route.onnx")
    assert [n.op_type for n in onnx.load(str(path)).graph.node] == ["LayerNormalization"]
    (got,) = gp.run_onnx(path, (x,))
    ref = torch.nn.functional.layer_norm(x, (16,), module.weight, module.bias, module.eps)
    np.testing.assert_allclose(got, ref.detach().numpy(), rtol=1e-4, atol=1e-5)
