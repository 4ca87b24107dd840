"""Pruners by name: HARP, the HYDRA baseline and NNI 3.0's own pruners, behind one interface.

    spec = get_pruner("l1norm")
    pruner = spec.build(PruneRequest(model, config_list, evaluator, dummy_input, steps_per_epoch=50, epochs=2))
    model, masks = spec.compress(pruner, epochs=2, steps_per_epoch=50)

Every pruner is known by a short name (``harp``, ``l1norm``, ...) and by its NNI-style class name
(``HARPPruner``, ``L1NormPruner``, ...); :func:`get_pruner` takes either, in any case, also as a
dotted path (``nni.compression.pruning.L1NormPruner``).

``config_list(name, mode, sparsity)`` gives the NNI config list every pruner is compared with:
all Conv2d/Linear weights; per weight (``mode='unstructured'``) or per output channel
(``'structured'``). HARP and HYDRA share one global budget (``global_group_id``: HARP learns how to
spread it over the layers); NNI's pruners prune every layer by the same ratio. Structured, NNI's
pruners get the list through ``graph_passes.auto_set_dependency_group_ids`` (with the request's
``dummy_input``): coupled layers then drop the same channels, which the speedup can remove.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Callable

from torch import nn

__all__ = [
    "PruneRequest", "PrunerSpec", "PRUNERS", "register_pruner", "get_pruner", "pruner_names", "pruner_class_names",
    "pruners_for", "check_mode", "config_list",
]

GRANULARITY = {"unstructured": "default", "structured": "out_channel"}


@dataclass(frozen=True)
class PruneRequest:
    """What a builder may need. ``steps_per_epoch`` and ``epochs`` size the training-aware pruners."""

    model: nn.Module
    config_list: list[dict[str, Any]]
    evaluator: Any  # nni.compression.TorchEvaluator
    dummy_input: Any = None
    steps_per_epoch: int = 1
    epochs: int = 1
    options: dict[str, Any] = field(default_factory=dict)  # e.g. gamma_0 for HARP


@dataclass(frozen=True)
class PrunerSpec:
    """A registered pruner: how to build and run it, and what it can do. The pipeline reads these
    flags, never the pruner's name (see :func:`register_pruner` for what each one means)."""

    name: str
    class_name: str  # the NNI-style class name, e.g. "L1NormPruner"
    build: Callable[[PruneRequest], Any]
    compress: Callable[[Any, int, int], tuple[nn.Module, dict]]
    modes: tuple[str, ...] = ("unstructured", "structured")
    global_budget: bool = False
    training: bool = True
    description: str = ""
    aliases: tuple[str, ...] = ()
    learns_scores: bool = False
    learns_rates: bool = False
    resumable: bool = False
    group_masks: bool = False


PRUNERS: dict[str, PrunerSpec] = {}


def register_pruner(
    name: str, class_name: str, modes: tuple[str, ...] = ("unstructured", "structured"), global_budget: bool = False,
    training: bool = True, by_steps: bool = False, self_timed: bool = False, description: str = "",
    aliases: tuple[str, ...] = (), learns_scores: bool = False, learns_rates: bool = False, resumable: bool = False,
    group_masks: bool = False,
) -> Callable[[Callable[[PruneRequest], Any]], Callable[[PruneRequest], Any]]:
    """Decorator: register a builder ``(PruneRequest) -> pruner`` under ``name`` and ``class_name``
    (and any ``aliases``).

    ``modes``: the modes it can prune in (``("structured",)``: channels only); ``global_budget``:
    one budget shared by all layers (``global_group_id``) rather than the same ratio per layer;
    ``training``: the pruner needs the evaluator; ``by_steps``: ``compress`` counts optimizer steps
    (epochs x steps per epoch) instead of epochs; ``self_timed``: the pruner got its training length
    in its constructor and ``compress()`` takes no arguments (TaylorPruner).

    What the pipeline's prune stage does with it: ``learns_scores``: it learns importance scores
    with HARP's settings (:class:`~nni_harp.pruning.HARPSettings`, options ``score_lr`` and those of
    a latency budget) while the weights stay frozen, so the evaluator's optimizer gets the pruning
    rate and no weight decay (else the weights train at the fine-tuning rate, as NNI's
    training-aware pruners expect); ``learns_rates``: it also learns per-layer rates under HARP's
    hardware loss (options ``gamma_0``, ``init_allocation``, ``init_keep``); ``resumable``: it runs
    one epoch per call of the training function, keeps a per-epoch ``history`` and its whole state
    in ``state_dict()``, so the stage reports and checkpoints every epoch and resumes mid-stage (else
    an interrupted stage starts again); ``group_masks``: its structured masks already cover every
    layer of each coupled channel group (else its per-layer masks are spread over the groups).
    """

    def wrap(build: Callable[[PruneRequest], Any]) -> Callable[[PruneRequest], Any]:
        taken = {_key(n): spec.name for spec in PRUNERS.values() for n in (spec.name, spec.class_name, *spec.aliases)}
        clash = next((n for n in (name, class_name, *aliases) if _key(n) in taken), None)
        if clash is not None:
            raise ValueError(f"pruner name {clash!r} is already registered (by {taken[_key(clash)]!r})")
        if self_timed or not training:
            compress = _compress_oneshot
        else:
            compress = _compress_steps if by_steps else _compress_epochs
        PRUNERS[name] = PrunerSpec(name, class_name, build, compress, modes, global_budget, training, description, aliases,
                                   learns_scores, learns_rates, resumable, group_masks)
        return build

    return wrap


def _key(name: str) -> str:
    return name.rpartition(".")[2].lower().replace("-", "").replace("_", "")


def pruner_names() -> tuple[str, ...]:
    return tuple(PRUNERS)


def pruner_class_names() -> tuple[str, ...]:
    return tuple(spec.class_name for spec in PRUNERS.values())


def get_pruner(name: str) -> PrunerSpec:
    """The spec of a short name, an NNI-style class name or an alias (case, '-' and '_' ignored;
    a dotted path is read by its last part)."""
    key = _key(str(name))
    for spec in PRUNERS.values():
        if key in {_key(n) for n in (spec.name, spec.class_name, *spec.aliases)}:
            return spec
    known = ", ".join(f"{spec.name} ({spec.class_name})" for spec in PRUNERS.values())
    raise KeyError(f"pruner: unknown name {name!r}; known: {known}")


def pruners_for(mode: str) -> tuple[str, ...]:
    """The registered pruners that can prune in ``mode``."""
    return tuple(name for name, spec in PRUNERS.items() if mode in spec.modes)


def check_mode(name: str, mode: str) -> PrunerSpec:
    """The spec of ``name``; ``ValueError`` naming the pruner, the mode and what works otherwise."""
    spec = get_pruner(name)
    if mode not in GRANULARITY:
        raise ValueError(f"mode: must be one of {', '.join(GRANULARITY)}, got {mode!r}")
    if mode not in spec.modes:
        raise ValueError(
            f"pruner {spec.name!r} cannot prune in mode {mode!r}: it supports {', '.join(spec.modes)} only; "
            f"pruners for {mode}: {', '.join(pruners_for(mode))}"
        )
    return spec


def config_list(name: str, mode: str, sparsity: float) -> list[dict[str, Any]]:
    """The NNI config list for pruner ``name`` at ``sparsity`` (fraction of weights removed)."""
    spec = check_mode(name, mode)
    if not 0.0 < sparsity < 1.0:
        raise ValueError(f"sparsity: must be in (0, 1), got {sparsity}")
    entry: dict[str, Any] = {"op_types": ["Conv2d", "Linear"], "sparse_ratio": float(sparsity),
                             "granularity": GRANULARITY[mode]}
    if spec.global_budget:
        entry["global_group_id"] = 0
    return [entry]


def _compress_epochs(pruner: Any, epochs: int, steps_per_epoch: int) -> tuple[nn.Module, dict]:
    return pruner.compress(max_steps=None, max_epochs=epochs)


def _compress_oneshot(pruner: Any, epochs: int, steps_per_epoch: int) -> tuple[nn.Module, dict]:
    return pruner.compress()


def _compress_steps(pruner: Any, epochs: int, steps_per_epoch: int) -> tuple[nn.Module, dict]:
    return pruner.compress(max_steps=max(1, epochs * steps_per_epoch), max_epochs=None)


def _channel_config(req: PruneRequest) -> list[dict[str, Any]]:
    """NNI's pruners, structured: the config list with dependency groups (coupled layers drop the
    same channels; layers whose outputs cannot be removed are left out). Unstructured, or without
    an example input to trace with: the list as it is."""
    structured = any(c.get("granularity") == GRANULARITY["structured"] for c in req.config_list)
    if not structured or req.dummy_input is None:
        return req.config_list
    import graph_passes

    return graph_passes.auto_set_dependency_group_ids(req.model, req.dummy_input, req.config_list)


@register_pruner("harp", "HARPPruner", global_budget=True, learns_scores=True, learns_rates=True, resumable=True,
                 group_masks=True, description="HARP: learned scores and per-layer rates (nni_harp)")
def _harp(req: PruneRequest) -> Any:
    from .pruning import HARPPruner

    return HARPPruner(req.model, req.config_list, req.evaluator, dummy_input=req.dummy_input, **req.options)


@register_pruner("hydra", "HydraPruner", global_budget=True, learns_scores=True, resumable=True, group_masks=True,
                 description="HYDRA: learned scores, uniform rates at the target")
def _hydra(req: PruneRequest) -> Any:
    from .pruning import HydraPruner

    return HydraPruner(req.model, req.config_list, req.evaluator, dummy_input=req.dummy_input, **req.options)


@register_pruner("l1norm", "L1NormPruner", aliases=("l1",), training=False, description="NNI L1NormPruner (magnitude), one shot")
def _l1(req: PruneRequest) -> Any:
    from nni.compression.pruning import L1NormPruner

    return L1NormPruner(req.model, _channel_config(req))


@register_pruner("l2norm", "L2NormPruner", aliases=("l2",), training=False, description="NNI L2NormPruner, one shot")
def _l2(req: PruneRequest) -> Any:
    from nni.compression.pruning import L2NormPruner

    return L2NormPruner(req.model, _channel_config(req))


@register_pruner("fpgm", "FPGMPruner", modes=("structured",), training=False, description="NNI FPGMPruner (filters), one shot")
def _fpgm(req: PruneRequest) -> Any:
    from nni.compression.pruning import FPGMPruner

    return FPGMPruner(req.model, _channel_config(req))


@register_pruner("taylor", "TaylorPruner", self_timed=True, description="NNI TaylorPruner: first-order Taylor importance over the pruning epochs")
def _taylor(req: PruneRequest) -> Any:
    from nni.compression.pruning import TaylorPruner

    return TaylorPruner(req.model, _channel_config(req), req.evaluator, training_steps=max(1, req.epochs * req.steps_per_epoch))


@register_pruner("movement", "MovementPruner", modes=("unstructured",), by_steps=True, description="NNI MovementPruner: learned movement scores")
def _movement(req: PruneRequest) -> Any:
    from nni.compression.pruning import MovementPruner

    total = max(2, req.epochs * req.steps_per_epoch)
    cooldown = max(1, math.ceil(0.75 * total))
    return MovementPruner(req.model, req.config_list, req.evaluator, warmup_step=0, cooldown_begin_step=cooldown)

