"""Export a (pruned) model to ONNX and run it in ONNX Runtime: the project's one exporter
(``nni_harp``'s pipeline calls it too).

On torch 2.15 the TorchScript exporter (``dynamo=False``) handles the ``fx.GraphModule`` that
``ModelSpeedup`` returns for every timm family we test, and is several times faster than the
dynamo exporter; ``export_onnx`` uses it first and falls back to ``dynamo=True`` when it fails.
One opset (:data:`DEFAULT_OPSET`), inputs named ``input`` (``input0``, ``input1``, ... for
several), the output ``output``; the file is written atomically.
"""
from __future__ import annotations

import logging
import os
import warnings
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

from ._atomic import temp_file_beside
from .errors import GraphPassError

__all__ = ["OnnxExportError", "export_onnx", "onnx_runner", "run_onnx"]

logger = logging.getLogger(__name__)

DEFAULT_OPSET = 18


class OnnxExportError(GraphPassError):
    """Neither ONNX exporter could export the model; carries both causes."""


def _as_tuple(x: Any) -> tuple:
    return tuple(x) if isinstance(x, (tuple, list)) else (x,)


def _input_names(count: int) -> list[str]:
    return ["input"] if count == 1 else [f"input{i}" for i in range(count)]


def _export_torchscript(model: nn.Module, args: tuple, path: str, opset: int, dynamic_batch: bool) -> None:
    names = _input_names(len(args))
    axes = {n: {0: "batch"} for n in names} if dynamic_batch else None
    if axes is not None:
        axes["output"] = {0: "batch"}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(model, args, path, input_names=names, output_names=["output"], opset_version=opset,
                          dynamic_axes=axes, dynamo=False)


def _export_dynamo(model: nn.Module, args: tuple, path: str, opset: int, dynamic_batch: bool) -> None:
    dyn = None
    if dynamic_batch:
        # torch.export specialises a size-1 dimension to a constant: trace a batch of two
        args = tuple(a.expand(2, *a.shape[1:]).contiguous() if isinstance(a, torch.Tensor) and a.shape[:1] == (1,)
                     else a for a in args)
        dyn = ({0: torch.export.Dim("batch", min=1, max=4096)},) * len(args)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        prog = torch.onnx.export(model, args, dynamo=True, opset_version=opset, dynamic_shapes=dyn, verbose=False,
                                 optimize=True, input_names=_input_names(len(args)), output_names=["output"])
    prog.save(path, external_data=False)


def _export_atomically(fn, model: nn.Module, args: tuple, target: Path, opset: int, dynamic_batch: bool) -> None:
    """Export into a temporary file beside ``target``, fsync it, rename it over ``target``."""
    fd, tmp = temp_file_beside(target)
    os.close(fd)
    try:
        with torch.no_grad():
            fn(model, args, tmp, opset, dynamic_batch)
        with open(tmp, "rb") as handle:
            os.fsync(handle.fileno())
        os.replace(tmp, target)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def export_onnx(model: nn.Module, example_inputs: Any, path: str | os.PathLike, *, opset: int = DEFAULT_OPSET,
                dynamic_batch: bool = False, exporter: str = "auto") -> Path:
    """Export ``model`` (in its current train/eval mode) to ``path`` atomically (a reader never
    sees a partial file, and a failed export leaves an existing file as it was); returns the path.

    ``exporter``: ``"torchscript"`` (``dynamo=False``), ``"dynamo"`` (``dynamo=True``) or ``"auto"``
    (TorchScript first, dynamo if that fails). ``dynamic_batch``: the first dimension of every
    input and of the output is left free. Raises ``OnnxExportError`` naming every cause.
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
            _export_atomically(fn, model, args, path, opset, dynamic_batch)
            logger.info("exported ONNX (%s exporter) to %s", kind, path)
            return path
        except Exception as exc:  # noqa: BLE001 - every exporter failure is reported together below
            logger.info("ONNX export with %s exporter failed: %r", kind, exc)
            errors.append(f"{kind}: {type(exc).__name__}: {str(exc)[:500]}")
    raise OnnxExportError("ONNX export failed; " + " | ".join(errors))


def onnx_runner(path: str | os.PathLike, example_inputs: Any, *, threads: int | None = None) -> Callable[[], list]:
    """A callable that runs the ONNX file ``path`` once on ``example_inputs`` in ONNX Runtime's CPU
    execution provider and returns the outputs as numpy arrays; the session is built once.
    ``threads``: intra-op threads (one inter-op thread); None leaves onnxruntime's default."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    if threads is not None:
        opts.intra_op_num_threads = threads
        opts.inter_op_num_threads = 1
    sess = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
    feeds = {i.name: t.detach().cpu().numpy() for i, t in zip(sess.get_inputs(), _as_tuple(example_inputs))}
    return lambda: sess.run(None, feeds)


def run_onnx(path: str | os.PathLike, example_inputs: Any, *, threads: int | None = None) -> list:
    """Run an exported model in ONNX Runtime (CPU) once and return its outputs as numpy arrays."""
    return onnx_runner(path, example_inputs, threads=threads)()
