"""Measuring a model as the report shows it: clean, PGD and AutoAttack accuracy on the first test
images, parameter and FLOP counts, file sizes and latencies (PyTorch, and onnxruntime when an
ONNX file is given). Used by the ``evaluate-dense`` and ``evaluate-pruned`` stages and by
``nni-harp evaluate``.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Iterator

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset, Subset

from .callbacks import CallbackList
from .export import count_params, measure_flops, onnx_latency_ms, state_dict_sizes, torch_latency_ms
from .report import ModelMetrics

__all__ = ["eval_attack", "eval_loader", "measure_model"]


def eval_attack(eps: float, steps: int) -> Any:
    """The PGD attack of an evaluation: ``steps`` steps of ``2.5 * eps / steps``."""
    from ..adversarial import AttackConfig

    return AttackConfig(eps=eps, step_size=2.5 * eps / steps, steps=steps)


def eval_loader(dataset: Dataset, samples: int, batch_size: int) -> DataLoader:
    """The first ``samples`` images of ``dataset``, in order."""
    n = min(samples, len(dataset))  # type: ignore[arg-type]
    return DataLoader(Subset(dataset, range(n)), batch_size=batch_size, shuffle=False)


class _ProgressLoader:
    """A loader that reports each batch to the callbacks (for evaluation progress bars)."""

    def __init__(self, loader: DataLoader, cb: CallbackList, stage: str) -> None:
        self.loader, self.cb, self.stage = loader, cb, stage

    def __len__(self) -> int:
        return len(self.loader)

    def __iter__(self) -> Iterator[Any]:
        for step, batch in enumerate(self.loader):
            yield batch
            self.cb.on_step(self.stage, 0, step, {})


def measure_model(
    model: nn.Module,
    stage: str,
    cb: CallbackList,
    test_ds: Dataset,
    example: torch.Tensor,
    *,
    eps: float,
    attack_steps: int,
    samples: int,
    batch_size: int,
    autoattack: str,
    seed: int,
    latency_runs: int,
    latency_threads: int,
    state_file: Path,
    onnx_file: Path | None,
    device: torch.device,
) -> tuple[ModelMetrics, dict[str, float]]:
    """Accuracies (clean / PGD / AutoAttack), counts, sizes and latencies of ``model``; the
    evaluation shows as one epoch of stage ``stage`` (one step per batch)."""
    from ..adversarial import evaluate_robustness

    loader = eval_loader(test_ds, samples, batch_size)
    cb.on_stage_start(stage, 1, 0, len(loader))
    cb.on_epoch_start(stage, 0, len(loader))
    model.eval()
    rob = evaluate_robustness(
        model, _ProgressLoader(loader, cb, stage), eval_attack(eps, attack_steps),
        autoattack=autoattack != "off", device=device,
        autoattack_version=autoattack if autoattack != "off" else "standard", seed=seed,
    )
    model.cpu()
    params, nonzero = count_params(model)
    flops, effective = measure_flops(model, example)
    file_bytes, compressed = state_dict_sizes(model, state_file)
    lat_torch = torch_latency_ms(model, example, runs=latency_runs, threads=latency_threads)
    lat_onnx = None
    checks: dict[str, float] = {}
    if onnx_file is not None and onnx_file.is_file():
        lat_onnx, out = onnx_latency_ms(onnx_file, example, runs=latency_runs, threads=latency_threads)
        with torch.no_grad():
            ref = model(example[:1])
        checks["onnx_max_abs_diff"] = float((torch.as_tensor(out) - ref).abs().max())
    model.to(device)
    metrics = ModelMetrics(
        clean_acc=rob.clean, pgd_acc=rob.pgd, autoattack_acc=rob.autoattack, eval_samples=rob.n,
        params=params, nonzero_params=nonzero, flops=flops, effective_flops=effective,
        file_bytes=file_bytes, compressed_bytes=compressed,
        latency_ms_torch=lat_torch, latency_ms_onnx=lat_onnx, latency_threads=latency_threads,
    )
    summary = {"clean": rob.clean, "pgd": rob.pgd}
    if rob.autoattack is not None:
        summary["autoattack"] = rob.autoattack
    cb.on_epoch_end(stage, 0, summary)
    return metrics, checks
