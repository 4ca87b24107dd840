"""Latency backends: what runs one forward pass of a model on ``eager`` PyTorch (CPU), ONNX
Runtime (CPU) or ``cuda``, and the check that a backend can run here. Used through
:mod:`graph_passes.latency` (which re-exports these names)."""
from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

from .errors import GraphPassError

__all__ = ["BACKENDS", "LatencyError", "Runner", "check_backend"]


class LatencyError(GraphPassError):
    """A latency backend cannot run here, or a latency model does not fit the model it is used on."""


Runner = Callable[[], Any]


def _eager(model: nn.Module, inputs: tuple[torch.Tensor, ...], threads: int, work: Path) -> Runner:
    def run() -> Any:
        previous = torch.get_num_threads()
        torch.set_num_threads(threads)
        try:
            with torch.inference_mode():
                return model(*inputs)
        finally:
            torch.set_num_threads(previous)

    return run


def _require_onnxruntime() -> Any:
    try:
        import onnxruntime
    except ImportError as exc:
        raise LatencyError("latency backend 'onnxruntime' needs the onnxruntime package, which is not installed here: "
                           "pip install onnxruntime") from exc
    return onnxruntime


def _require_cuda() -> None:
    if not torch.cuda.is_available():
        raise LatencyError("latency backend 'cuda' needs a CUDA GPU, and torch sees none here; use 'eager' or "
                           "'onnxruntime' (CPU)")


def _onnxruntime(model: nn.Module, inputs: tuple[torch.Tensor, ...], threads: int, work: Path) -> Runner:
    _require_onnxruntime()
    from .onnx_export import export_onnx, onnx_runner

    return onnx_runner(export_onnx(model, inputs, work / "model.onnx"), inputs, threads=threads)


def _cuda(model: nn.Module, inputs: tuple[torch.Tensor, ...], threads: int, work: Path) -> Runner:
    _require_cuda()
    model = model.to("cuda")
    on_gpu = tuple(t.to("cuda") for t in inputs)

    def run() -> Any:
        with torch.inference_mode():
            out = model(*on_gpu)
        torch.cuda.synchronize()
        return out

    return run


#: Latency backends by name: ``(model, inputs, threads, work_dir) -> runner`` (one forward pass).
BACKENDS: dict[str, Callable[[nn.Module, tuple[torch.Tensor, ...], int, Path], Runner]] = {
    "eager": _eager, "onnxruntime": _onnxruntime, "cuda": _cuda,
}

#: What each backend needs that may be missing here (a package, a device): raises LatencyError.
_REQUIREMENTS: dict[str, Callable[[], Any]] = {"onnxruntime": _require_onnxruntime, "cuda": _require_cuda}


def check_backend(backend: str) -> None:
    """Raise :class:`LatencyError` unless ``backend`` is a name of :data:`BACKENDS` that can run
    here (its package installed, its device present); cheap: builds no model."""
    if backend not in BACKENDS:
        raise LatencyError(f"unknown latency backend {backend!r}; choose one of {', '.join(BACKENDS)}")
    _REQUIREMENTS.get(backend, lambda: None)()
