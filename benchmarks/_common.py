"""Helpers shared by the benchmark scripts (not a package API)."""
from __future__ import annotations

from pathlib import Path

import torch

import graph_passes as gp
from graph_passes._atomic import atomic_write_text

RESULTS = Path(__file__).resolve().parent / "results"


def n_params(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def n_flops(model: torch.nn.Module, x: torch.Tensor) -> int:
    """FlopCounterMode's count, with the attention formulas older torch releases lack."""
    return gp.count_flops(model, x)


def apply_masks(model: torch.nn.Module, masks: dict[str, dict[str, torch.Tensor]]) -> torch.nn.Module:
    return gp.masked_copy(model, masks)


def calibrate_norms(model: torch.nn.Module, x: torch.Tensor) -> torch.nn.Module:
    """Give BatchNorm layers the running statistics of one forward pass on ``x`` (returns the model
    in eval mode). Random weights with the default (0, 1) running statistics make some families
    (MobileOne, ...) grow activations to 1e13+, where float32 rounding alone exceeds any fixed
    tolerance; calibrated statistics keep activations at a realistic scale."""
    bns = [m for m in model.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm) and m.track_running_stats]
    if bns:
        saved = [m.momentum for m in bns]
        for m in bns:
            m.reset_running_stats()
            m.momentum = None  # cumulative average: one pass sets the statistics
        model.train()
        try:
            with torch.no_grad():
                model(x)
        except Exception:  # noqa: BLE001 - a model that cannot run in train mode keeps default statistics
            for m in bns:
                m.reset_running_stats()
        for m, mom in zip(bns, saved):
            m.momentum = mom
    return model.eval()


def write_atomic(path: Path, text: str) -> None:
    atomic_write_text(path, text)
