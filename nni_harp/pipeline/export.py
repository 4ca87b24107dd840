"""ONNX export and the static / timed measurements of a model: parameters, FLOPs, size, latency."""
from __future__ import annotations

import contextlib
import io
import logging
import zlib
from pathlib import Path
from typing import Any

import torch
from torch import nn

from graph_passes.latency import measure_ms, time_ms
from graph_passes.onnx_export import OnnxExportError, onnx_runner
from graph_passes.onnx_export import export_onnx as gp_export_onnx

from .._io import atomic_save

__all__ = [
    "ExportError",
    "count_params",
    "measure_flops",
    "state_dict_sizes",
    "torch_latency_ms",
    "export_onnx",
    "onnx_latency_ms",
]

logger = logging.getLogger(__name__)


#: The model could not be exported to ONNX by either exporter (graph_passes' error, which names both causes).
ExportError = OnnxExportError


def count_params(model: nn.Module) -> tuple[int, int]:
    """(all parameters, non-zero parameters)."""
    total = nonzero = 0
    for p in model.parameters():
        total += p.numel()
        nonzero += int(torch.count_nonzero(p.detach()))
    return total, nonzero


def _density(module: nn.Module | None) -> float:
    weight = getattr(module, "weight", None) if module is not None else None
    if not isinstance(weight, torch.Tensor) or weight.numel() == 0:
        return 1.0
    return float(torch.count_nonzero(weight.detach())) / weight.numel()


def measure_flops(model: nn.Module, example: torch.Tensor) -> tuple[int, int]:
    """(FLOPs of one forward pass, FLOPs counting only the non-zero weights of each layer).

    FLOPs are 2 x MACs per image, counted by ``torch.utils.flop_counter.FlopCounterMode`` on a real
    forward pass (so a physically pruned model is counted as it runs; ``graph_passes.cost`` uses the
    same convention). The effective count scales each leaf layer's FLOPs by the fraction of its
    weight entries that are non-zero: what unstructured sparsity could save with sparse kernels.
    """
    from graph_passes import flop_counter  # FlopCounterMode that counts CPU attention on torch < 2.15 too

    first = next(iter(model.parameters()), None)
    x = example[:1].detach().to(first.device if first is not None else "cpu")
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad(), flop_counter() as counter:
            model(x)
    finally:
        model.train(was_training)
    total = int(counter.get_total_flops())
    per_module = counter.get_flop_counts()
    roots = [k for k in per_module if k != "Global" and "." not in k]
    root = roots[0] if roots else type(model).__name__
    saved = 0.0
    for name, module in model.named_modules():
        if not name or next(module.children(), None) is not None:
            continue
        counts = per_module.get(f"{root}.{name}")
        if counts:
            saved += sum(counts.values()) * (1.0 - _density(module))
    return total, int(round(total - saved))


def state_dict_sizes(model: nn.Module, path: str | Path) -> tuple[int, int]:
    """Save ``model.state_dict()`` to ``path``; return (file bytes, zlib-compressed bytes)."""
    target = atomic_save(model.state_dict(), path)
    data = target.read_bytes()
    return len(data), len(zlib.compress(data, 6))


def torch_latency_ms(model: nn.Module, example: torch.Tensor, runs: int = 20, warmup: int = 5, threads: int = 1) -> float:
    """Median wall time of one eager forward pass on CPU with ``threads`` threads, batch 1, in ms
    (``graph_passes``' eager latency runner and timer, as the latency budget measures)."""
    x = example[:1].detach().to("cpu")
    model = model.to("cpu")
    was_training = model.training
    try:
        return time_ms(model, x, "eager", threads, reps=runs, warmup=warmup)
    finally:
        model.train(was_training)


def export_onnx(model: nn.Module, example: torch.Tensor, path: str | Path) -> Path:
    """Export the model in eval mode on the CPU with a dynamic batch dimension, through
    :func:`graph_passes.export_onnx` (atomic; input ``input``, output ``output``)."""
    was_training = model.training
    model = model.to("cpu").eval()
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            return gp_export_onnx(model, example[:1].detach().to("cpu"), path, dynamic_batch=True)
    finally:
        model.train(was_training)


def onnx_latency_ms(path: str | Path, example: torch.Tensor, runs: int = 20, warmup: int = 5,
                    threads: int = 1) -> tuple[float, Any]:
    """(median latency in ms of one onnxruntime CPU run at batch 1 with ``threads`` intra-op
    threads, the last output as numpy)."""
    run = onnx_runner(path, example[:1].detach().cpu(), threads=threads)
    return measure_ms(run, reps=runs, warmup=warmup), run()[-1]
