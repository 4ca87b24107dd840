"""graph_passes.export_onnx, the project's one ONNX exporter (the pipeline's export goes through it):
one naming (``input`` / ``output``), a free batch dimension on request, and atomic writes."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import timm
import torch
from torch import nn

import graph_passes as gp
from nni_harp.pipeline import export as pipeline_export


def _session(path: Path) -> ort.InferenceSession:
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])


@pytest.mark.parametrize("exporter", ["torchscript", "dynamo"])
def test_names_and_dynamic_batch(tmp_path: Path, exporter: str) -> None:
    torch.manual_seed(0)
    model = timm.create_model("test_resnet", num_classes=10).eval()
    path = gp.export_onnx(model, torch.randn(1, 3, 32, 32), tmp_path / "m.onnx", dynamic_batch=True, exporter=exporter)
    session = _session(path)
    assert [i.name for i in session.get_inputs()] == ["input"] and [o.name for o in session.get_outputs()] == ["output"]
    x = torch.randn(5, 3, 32, 32)
    with torch.no_grad():
        expected = model(x).numpy()
    np.testing.assert_allclose(session.run(None, {"input": x.numpy()})[0], expected, atol=1e-4, rtol=1e-3)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.onnx"]  # no temporary file left


def test_the_pipeline_exports_through_graph_passes(tmp_path: Path) -> None:
    model = timm.create_model("test_resnet", num_classes=10).train()
    path = pipeline_export.export_onnx(model, torch.randn(4, 3, 32, 32), tmp_path / "p.onnx")
    assert model.training  # its mode is given back
    session = _session(path)
    assert [i.name for i in session.get_inputs()] == ["input"] and [o.name for o in session.get_outputs()] == ["output"]
    assert session.run(None, {"input": np.zeros((3, 3, 32, 32), np.float32)})[0].shape == (3, 10)
    assert pipeline_export.ExportError is gp.OnnxExportError


class _Fails(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        raise RuntimeError("this model cannot be traced")


def test_a_failed_export_leaves_the_old_file_and_names_both_exporters(tmp_path: Path) -> None:
    target = tmp_path / "m.onnx"
    target.write_bytes(b"the previous export")
    with pytest.raises(gp.OnnxExportError) as info:
        gp.export_onnx(_Fails(), torch.randn(1, 3, 8, 8), target)
    assert "torchscript:" in str(info.value) and "dynamo:" in str(info.value)
    assert target.read_bytes() == b"the previous export"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.onnx"]
