"""Pruners by name: HARP, the HYDRA baseline and NNI 3.0's own pruners, behind one interface.

    spec = get_pruner("l1norm")
    pruner = spec.build(PruneRequest(model, config_list, evaluator, dummy_input, steps_per_epoch=50, epochs=2))
    model, masks = spec.compress(pruner, epochs=2, steps_per_epoch=50)

``config_list(name, mode, sparsity)`` gives the NNI config list every pruner is compared with:
all Conv2d/Linear weights; per weight (``mode='unstructured'``) or per output channel
(``'structured'``). HARP and HYDRA share one global budget (``global_group_id``: HARP learns how to
spread it over the layers); NNI's pruners prune every layer by the same ratio.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Callable

from torch import nn

__all__ = [
    "PruneRequest", "PrunerSpec", "PRUNERS", "register_pruner", "get_pruner", "pruner_names", "pruners_for",
    "check_mode", "config_list",
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
    name: str
    build: Callable[[PruneRequest], Any]
    compress: Callable[[Any, int, int], tuple[nn.Module, dict]]
    modes: tuple[str, ...] = ("unstructured", "structured")
    global_budget: bool = False
    training: bool = True
    description: str = ""


PRUNERS: dict[str, PrunerSpec] = {}


def register_pruner(
    name: str, modes: tuple[str, ...] = ("unstructured", "structured"), global_budget: bool = False,
    training: bool = True, by_steps: bool = False, self_timed: bool = False, description: str = "",
) -> Callable[[Callable[[PruneRequest], Any]], Callable[[PruneRequest], Any]]:
    """Decorator: register a builder ``(PruneRequest) -> pruner`` under ``name``.

    ``training``: the pruner needs the evaluator; ``by_steps``: ``compress`` counts optimizer steps
    (epochs x steps per epoch) instead of epochs; ``self_timed``: the pruner got its training length
    in its constructor and ``compress()`` takes no arguments (TaylorPruner).
    """

    def wrap(build: Callable[[PruneRequest], Any]) -> Callable[[PruneRequest], Any]:
        if name in PRUNERS:
            raise ValueError(f"pruner {name!r} is already registered")
        if self_timed or not training:
            compress = _compress_oneshot
        else:
            compress = _compress_steps if by_steps else _compress_epochs
        PRUNERS[name] = PrunerSpec(name, build, compress, modes, global_budget, training, description)
        return build

    return wrap


def pruner_names() -> tuple[str, ...]:
    return tuple(PRUNERS)


def get_pruner(name: str) -> PrunerSpec:
    key = name.lower().replace("-", "").replace("_", "")
    key = {"l1normpruner": "l1norm", "l2normpruner": "l2norm", "fpgmpruner": "fpgm", "taylorpruner": "taylor",
           "movementpruner": "movement", "harppruner": "harp", "hydrapruner": "hydra", "l1": "l1norm",
           "l2": "l2norm"}.get(key, key)
    if key not in PRUNERS:
        raise KeyError(f"pruner: unknown name {name!r}; known: {', '.join(PRUNERS)}")
    return PRUNERS[key]


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


@register_pruner("harp", global_budget=True, description="HARP: learned scores and per-layer rates (nni_harp)")
def _harp(req: PruneRequest) -> Any:
    from .pruning import HARPPruner

    return HARPPruner(req.model, req.config_list, req.evaluator, dummy_input=req.dummy_input, **req.options)


@register_pruner("hydra", global_budget=True, description="HYDRA: learned scores, uniform rates at the target")
def _hydra(req: PruneRequest) -> Any:
    from .pruning import HydraPruner

    options = {k: v for k, v in req.options.items() if k != "gamma_0"}  # no rates, no hardware loss
    return HydraPruner(req.model, req.config_list, req.evaluator, dummy_input=req.dummy_input, **options)


@register_pruner("l1norm", training=False, description="NNI L1NormPruner (magnitude), one shot")
def _l1(req: PruneRequest) -> Any:
    from nni.compression.pruning import L1NormPruner

    return L1NormPruner(req.model, req.config_list)


@register_pruner("l2norm", training=False, description="NNI L2NormPruner, one shot")
def _l2(req: PruneRequest) -> Any:
    from nni.compression.pruning import L2NormPruner

    return L2NormPruner(req.model, req.config_list)


@register_pruner("fpgm", modes=("structured",), training=False, description="NNI FPGMPruner (filters), one shot")
def _fpgm(req: PruneRequest) -> Any:
    from nni.compression.pruning import FPGMPruner

    return FPGMPruner(req.model, req.config_list)


@register_pruner("taylor", self_timed=True, description="NNI TaylorPruner: first-order Taylor importance over the pruning epochs")
def _taylor(req: PruneRequest) -> Any:
    from nni.compression.pruning import TaylorPruner

    return TaylorPruner(req.model, req.config_list, req.evaluator, training_steps=max(1, req.epochs * req.steps_per_epoch))


@register_pruner("movement", modes=("unstructured",), by_steps=True, description="NNI MovementPruner: learned movement scores")
def _movement(req: PruneRequest) -> Any:
    from nni.compression.pruning import MovementPruner

    total = max(2, req.epochs * req.steps_per_epoch)
    cooldown = max(1, math.ceil(0.75 * total))
    return MovementPruner(req.model, req.config_list, req.evaluator, warmup_step=0, cooldown_begin_step=cooldown)

