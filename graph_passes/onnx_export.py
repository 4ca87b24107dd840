"""Export a (pruned) model to ONNX and run it in ONNX Runtime.

On torch 2.15 the TorchScript exporter (``dynamo=False``) handles the ``fx.GraphModule`` that
``ModelSpeedup`` returns for every timm family we test, and is several times faster than the
dynamo exporter; ``export_onnx`` uses it first and falls back to ``dynamo=True`` when it fails.
"""
from __future__ import annotations

import io
import logging
import os
import tempfile
import warnings
from pathlib import Path
from typing import Any, Sequence

import torch
from torch import nn

from .errors import GraphPassError

__all__ = ["OnnxExportError", "export_onnx", "run_onnx"]

logger = logging.getLogger(__name__)

DEFAULT_OPSET = 18


class OnnxExportError(GraphPassError):
    """Neither ONNX exporter could export the model; carries both causes."""


def _as_tuple(x: Any) -> tuple:
    return tuple(x) if isinstance(x, (tuple, list)) else (x,)


def _export_torchscript(model: nn.Module, args: tuple, path: str, opset: int, dynamic_batch: bool) -> None:
    names = [f"input{i}" for i in range(len(args))]
    axes = {n: {0: "batch"} for n in names} if dynamic_batch else None
    if axes is not None:
        axes["output"] = {0: "batch"}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(model, args, path, input_names=names, output_names=["output"], opset_version=opset,
                          dynamic_axes=axes, dynamo=False)


def _export_dynamo(model: nn.Module, args: tuple, path: str, opset: int, dynamic_batch: bool) -> None:
    dyn = ({0: torch.export.Dim("batch")},) * len(args) if dynamic_batch else None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        prog = torch.onnx.export(model, args, dynamo=True, opset_version=opset, dynamic_shapes=dyn,
                                 verbose=False, optimize=True)
    prog.save(path)


def export_onnx(model: nn.Module, example_inputs: Any, path: str | os.PathLike, *, opset: int = DEFAULT_OPSET,
                dynamic_batch: bool = False, exporter: str = "auto") -> Path:
    """Export ``model`` (in its current train/eval mode) to ``path``; returns the path.

    ``exporter``: ``"torchscript"`` (``dynamo=False``), ``"dynamo"`` (``dynamo=True``) or ``"auto"``
    (TorchScript first, dynamo if that fails). Raises ``OnnxExportError`` naming every cause.
    """
    if exporter not in ("auto", "torchscript", "dynamo"):
        raise ValueError(f"exporter must be 'auto', 'torchscript' or 'dynamo', got {exporter!r}")
    args = _as_tuple(example_inputs)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    order = {"auto": ("torchscript", "dynamo"), "torchscript": ("torchscript",), "dynamo": ("dynamo",)}[exporter]
    errors: list[str] = []
    for kind in order:
        fn = _export_torchscript if kind == "torchscript" else _export_dynamo
        try:
            with torch.no_grad():
                fn(model, args, str(path), opset, dynamic_batch)
            return path
        except Exception as exc:  # noqa: BLE001 - every exporter failure is reported together below
            logger.info("ONNX export with %s exporter failed: %r", kind, exc)
            errors.append(f"{kind}: {type(exc).__name__}: {str(exc)[:500]}")
    raise OnnxExportError("ONNX export failed; " + " | ".join(errors))


def run_onnx(path: str | os.PathLike, example_inputs: Any, *, threads: int | None = None) -> list:
    """Run an exported model in ONNX Runtime (CPU) and return its outputs as numpy arrays."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    if threads is not None:
        opts.intra_op_num_threads = threads
        opts.inter_op_num_threads = 1
    sess = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
    feeds = {i.name: t.detach().cpu().numpy() for i, t in zip(sess.get_inputs(), _as_tuple(example_inputs))}
    return sess.run(None, feeds)
