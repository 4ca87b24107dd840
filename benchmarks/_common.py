"""Helpers shared by the benchmark scripts (not a package API)."""
from __future__ import annotations

import time
from collections.abc import Callable
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


def prune_kept_norms(model: torch.nn.Module, x: torch.Tensor, groups, keep) -> torch.nn.Module:
    """A pruned copy of ``model`` (``keep``: keep vectors by channel-group id), built as a fine-tuned
    structured run of the pipeline builds it (``--norm-stats kept``): layer norms over the kept
    channels (``graph_passes.kept_stats_norms``), so the speedup emits plain norms of the kept width."""
    import copy

    masks = gp.group_masks(model, groups, keep)
    masked = copy.deepcopy(model)
    gp.kept_stats_norms(masked, masks, x)
    return gp.ModelSpeedup(masked, x, masks).speedup_model().eval()


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


def alternate_timings(a: Callable[[], object], b: Callable[[], object], reps: int,
                      warmup: int = 2, block: int = 1) -> dict[str, list[float]]:
    """Wall and process CPU seconds of ``a`` and ``b`` (keys ``a``, ``b``, ``a_cpu``, ``b_cpu``),
    run alternately after ``warmup`` runs each, so that a slow phase of a shared machine hits both
    alike: in blocks of ``block`` timed runs in a row, each block after one untimed run (``a``
    first on even blocks, ``b`` on odd ones). Blocks (rather than run by run) time each callable
    as it runs when it runs on its own: run by run, two ONNX Runtime sessions' thread pools spin
    against each other (resnet50 batch 1, 2 threads: 34-37 ms dense against 20-21 ms in blocks of
    5) and a small model's weights are evicted from the CPU caches by the other model's."""
    for _ in range(warmup):
        a()
        b()
    out: dict[str, list[float]] = {"a": [], "b": [], "a_cpu": [], "b_cpu": []}
    blocks = -(-reps // block)
    for i in range(blocks):
        for fn, key in ((a, "a"), (b, "b")) if i % 2 == 0 else ((b, "b"), (a, "a")):
            if block > 1:
                fn()  # the switch from the other callable is not timed
            for _ in range(min(block, reps - i * block)):
                w, c = time.perf_counter(), time.process_time()
                fn()
                out[key].append(time.perf_counter() - w)
                out[f"{key}_cpu"].append(time.process_time() - c)
    return out
