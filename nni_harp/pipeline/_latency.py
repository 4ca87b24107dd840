"""The latency budget in the pipeline (``--budget latency``): measuring the latency model before
pruning (with a progress bar through the callbacks), what it predicts for the learned plan, and
the pruned model's latency measured on the same backend.

The latency model is fitted here, with the settings the pruner will use, before anything trains
(so a target the model cannot reach on the backend is refused at once, naming
``--latency-target``): the pruner's own fit (:class:`~nni_harp.pruning.HARPPruner`,
``budget='latency'``) then reads it from the cache and measures nothing, and the measuring shows
as the ``measure-latency`` stage. Under torchrun rank 0 measures; the other ranks read its fit
from the cache.
"""
from __future__ import annotations

import copy
import time
from typing import Any, Callable, Iterable, Iterator, Mapping

import torch
from torch import nn

from .. import distributed as hd
from ..pruning._plan import channel_structure
from ..pruning.budget import lowest_latency, uniform_keep

__all__ = ["LATENCY_STAGE", "REFINE_STAGE", "harp_options", "fit_for_run", "prepare_latency", "lowest_fraction",
           "plan_latency", "measure_budget"]

#: The callbacks' stage names of the latency measuring and of its refinement for the target (one
#: step per model timed; each refinement one epoch).
LATENCY_STAGE = "measure-latency"
REFINE_STAGE = "refine-latency"


def harp_options(config: Any) -> dict[str, Any]:
    """The :class:`~nni_harp.pruning.HARPSettings` of a latency-budget run (empty for other budgets)."""
    if config.budget_kind != "latency":
        return {}
    return {"budget": "latency", "latency_backend": config.latency_backend, "latency_threads": config.latency_threads,
            "latency_checks": config.latency_checks, "latency_cache": str(_default_settings().latency_cache_dir()),
            # the pruned model's norms: plain ones of the kept width where fine-tuning swaps them
            "latency_norms": "kept" if config.kept_norm_stats else "exact"}


def _default_settings(**options: Any) -> Any:
    from ..pruning import HARPSettings

    return HARPSettings(**options)


def _settings(config: Any) -> Any:
    return _default_settings(**harp_options(config))


def fit_for_run(ctx: Any, model: nn.Module, example: torch.Tensor) -> Any:
    """The :class:`graph_passes.LatencyModel` of ``model`` on the run's backend, refined for
    ``--latency-target`` (:func:`nni_harp.pruning._latency.latency_for_target`, with the settings
    the pruner uses, so that its own call reads the cache), its progress sent to the callbacks as
    the ``measure-latency`` and ``refine-latency`` stages (or a message when the cache had it)."""
    from graph_passes.latency import LatencyModel

    from ..pruning._latency import REFINE_PLANS, latency_for_target

    cfg, cb = ctx.config, ctx.cb
    settings = _settings(cfg)
    measured: list[str] = []  # the stages that timed something, in order
    started: dict[str, float] = {}  # the stage not ended yet: when it started

    def end_stages() -> None:  # a stage ends when the next one starts, or with the fit
        while started:
            stage, start = started.popitem()
            cb.on_stage_end(stage, {"seconds": time.perf_counter() - start, "backend": settings.latency_backend})

    def progress(stage: str) -> Callable[[Iterable[Any]], Iterator[Any]]:
        epochs = [0]  # the fit is one epoch of its stage; each refinement one of the other

        def wrap(items: Iterable[Any]) -> Iterator[Any]:
            items, epoch = list(items), epochs[0]
            if stage not in measured:
                end_stages()
                measured.append(stage)
                started[stage] = time.perf_counter()
                cb.on_stage_start(stage, REFINE_PLANS if stage == REFINE_STAGE else 1, 0, len(items))
            cb.on_epoch_start(stage, epoch, len(items))
            for step, item in enumerate(items):
                yield item  # the configuration is timed before the next one is asked for
                cb.on_step(stage, epoch, step, {})
            cb.on_epoch_end(stage, epoch, {})
            epochs[0] += 1
        return wrap

    def fit() -> str:
        fitted = latency_for_target(model, example, settings, cfg.latency_target, progress=progress(LATENCY_STAGE),
                                    refine_progress=progress(REFINE_STAGE))
        end_stages()
        if not measured:
            cb.on_message(f"{LATENCY_STAGE}: the {fitted.backend} latency model of this model was measured before "
                          f"(cache in {settings.latency_cache})")
        return fitted.to_json()

    return LatencyModel.from_json(hd.broadcast_object(hd.on_main(fit)))


def lowest_fraction(model: nn.Module, example: torch.Tensor, latency: Any, config: Any) -> float:
    """The smallest latency fraction ``config.pruner`` can reach per ``latency``'s prediction: every
    prunable group at HARP's (HYDRA's) floor, ``alpha * target`` of its channels, or at one
    channel for NNI's pruners. What stays is the latency no channel removal touches (a backend's
    fixed cost per run and per op, unprunable layers)."""
    from ..registry import get_pruner

    groups, cost = channel_structure(model, (example,))
    floor = _settings(config).alpha * config.latency_target if get_pruner(config.pruner).learns_scores else 0.0
    return lowest_latency(cost, groups, latency, floor)


def prepare_latency(ctx: Any, model: nn.Module) -> Any:
    """Before anything trains: the run's latency model (:func:`fit_for_run`), and a
    :class:`~nni_harp.pipeline.ConfigError` naming ``--latency-target`` when the target is below
    what the pruner can reach (:func:`lowest_fraction`); the model is traced once for both."""
    import graph_passes

    from .config import ConfigError

    cfg = ctx.config
    example = ctx.example.to(ctx.device)
    with graph_passes.trace_once():
        latency = fit_for_run(ctx, model, example)
        lowest = lowest_fraction(model, example, latency, cfg)
    if lowest > cfg.latency_target:
        raise ConfigError("latency_target", (
            f"--latency-target {cfg.latency_target:g} cannot be met on {cfg.latency_backend} with "
            f"{cfg.latency_threads} thread(s): the latency model predicts x{lowest:.3f} of the dense latency with every "
            f"prunable channel group at its floor (the rest is time no channel removal saves: fixed cost per run and "
            f"per op, unprunable layers); choose a --latency-target above {lowest:.2f}, a larger --image-size, or "
            "another --latency-backend"))
    return latency


def _group_names(groups: Iterable[Any], names: Iterable[str]) -> dict[int, str]:
    """The key of ``names`` (the pruner's per-group rates) each prunable group goes by: its first
    producing module, or that with ``[group ID]`` (how HARP names a group whose producer is taken)."""
    wanted, out = set(names), {}
    for g in groups:
        if not g.prunable:
            continue
        producers = [m.module for m in g.members if m.role == "out"] or [m.module for m in g.members]
        base = producers[0] if producers and producers[0] else f"group{g.id}"
        for name in (base, f"{base}[group {g.id}]"):
            if name in wanted and name not in out.values():
                out[g.id] = name
                break
    return out


def _shares(value: Any, keep: Mapping[int, torch.Tensor]) -> dict[int, float]:
    """``d value / d keep[g]``, normalised to sum 1 over the groups."""
    if not isinstance(value, torch.Tensor) or not value.requires_grad:  # no group of ``keep`` changes it
        return {g: 0.0 for g in keep}
    grads = torch.autograd.grad(value, list(keep.values()), allow_unused=True)
    raw = {g: float(d) if d is not None else 0.0 for g, d in zip(keep, grads)}
    total = sum(raw.values()) or 1.0
    return {g: v / total for g, v in raw.items()}


def plan_latency(model: nn.Module, example: torch.Tensor, masks: Mapping[str, Mapping[str, torch.Tensor]],
                 latency: Any, rates: Mapping[str, float], config: Any) -> dict[str, Any]:
    """What the latency model says about the final masks, for the report and the plot:
    ``predicted`` (latency fraction of the pruned model), ``flops_kept`` (its FLOPs fraction by
    the same cost model), ``uniform`` (the one channel fraction that meets the target), and per
    group named in ``rates``: the group's share of the latency and of the FLOPs that depend on
    its channels (``d cost / d kept fraction`` at the dense model, normalised over the groups:
    how hard a latency budget, and a FLOPs budget, pull on that group)."""
    import graph_passes

    groups, cost = channel_structure(model, (example,))
    keep = graph_passes.keep_from_masks(groups, masks)
    fractions = {g.id: float(keep[g.id].float().mean()) for g in groups if g.prunable}
    names = _group_names(groups, rates)
    ones = {g: torch.ones((), dtype=torch.float64, requires_grad=True) for g in names}
    latency_share = _shares(latency.latency(cost, ones), ones)
    ones = {g: torch.ones((), dtype=torch.float64, requires_grad=True) for g in names}
    flops_share = _shares(cost.flops(ones), ones)
    return {
        "target": float(config.latency_target),
        "predicted": float(latency.fraction(cost, fractions)),
        "flops_kept": float(cost.flops(fractions)) / float(cost.total_flops),
        "uniform": uniform_keep(cost, [g.id for g in groups if g.prunable], config.latency_target, latency),
        "backend": latency.backend,
        "threads": latency.threads,
        "fit_error": float(latency.fit_error(cost)),
        "groups": {names[g]: {"latency_share": latency_share[g], "flops_share": flops_share[g]} for g in names},
    }


def measure_budget(dense: nn.Module, pruned: nn.Module, example: torch.Tensor, backend: str, threads: int,
                   reps: int, rounds: int = 2) -> dict[str, float]:
    """The pruned model's latency as a fraction of the dense one's, measured now on ``backend``
    with ``threads`` on ``example``'s shape (``graph_passes.latency``'s runner and timer, as the
    latency model was fitted): ``rounds`` alternating medians of ``reps`` runs each, the lowest of
    each model's kept (the least disturbed by other work on the machine)."""
    from graph_passes.latency import time_ms

    dense, pruned = copy.deepcopy(dense).cpu().eval(), copy.deepcopy(pruned).cpu().eval()
    example = example.cpu()
    times: dict[str, list[float]] = {"dense": [], "pruned": []}
    for _ in range(rounds):
        for name, model in (("dense", dense), ("pruned", pruned)):
            times[name].append(time_ms(model, example, backend, threads, reps))
    dense_ms, pruned_ms = min(times["dense"]), min(times["pruned"])
    return {"measured": pruned_ms / dense_ms, "dense_ms": dense_ms, "pruned_ms": pruned_ms}
