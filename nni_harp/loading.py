"""Build timm models the way the pipeline does, and rebuild a pruned model from its output folder.

A run's output folder holds ``model_meta.json`` (how the model was created), ``model.pt`` (the
pruned state dict) and, for structured pruning, ``plan.json`` (a ``graph_passes.PruningPlan``).
:func:`load_pruned` recreates the timm model from its name, shrinks it with the plan, and loads
the weights: no pickled modules are ever read.
"""
from __future__ import annotations

import copy
import json
import logging
import os
from pathlib import Path
from typing import Any, Mapping, Sequence

import torch
from torch import nn

from ._io import atomic_write_text, safe_load
from ._shrink import shrink

__all__ = [
    "META_FILE",
    "MODEL_FILE",
    "PLAN_FILE",
    "PRUNED_FORMS",
    "LoadError",
    "create_model",
    "load_pruned",
    "load_weights",
    "read_meta",
    "read_state",
    "write_meta",
]

logger = logging.getLogger(__name__)

META_FILE = "model_meta.json"
MODEL_FILE = "model.pt"
PLAN_FILE = "plan.json"
META_FORMAT = 1
#: what ``timm.create_model`` may be given from a saved ``model_meta.json``: what :func:`create_model`
#: itself passes, none of which can name a file (``checkpoint_path``, ``pretrained_cfg_overlay``, ...
#: would make timm read one a tampered folder points at)
CREATE_KWARGS = ("pretrained", "num_classes", "in_chans", "img_size")
#: the fields of ``model_meta.json`` (what :func:`write_meta` writes) and the type of each value
_META_FIELDS: dict[str, tuple[type, ...]] = {
    "format": (int,), "model": (str,), "num_classes": (int,), "in_chans": (int,), "image_size": (int,),
    "mean": (list,), "std": (list,), "dataset": (str, type(None)), "create_kwargs": (dict, type(None)),
    "mode": (str,), "pruner": (str,), "state_dict": (str,), "plan": (str, type(None)), "norm_stats": (str,),
    "pruned_form": (str,),
}
#: ``pruned_form`` of a structured run: ``module``, the timm model pruned in place (its own class and
#: forward); ``graph``, the pruned ``torch.fx.GraphModule`` (where the model's own forward cannot
#: follow the pruning). A folder without the field (older runs) holds the graph form.
PRUNED_FORMS = ("module", "graph")
_META_REQUIRED = ("model", "num_classes", "in_chans", "image_size", "mean", "std")


class LoadError(ValueError):
    """A saved model cannot be rebuilt; the message names the file and what is wrong."""


def create_model(
    name: str,
    num_classes: int,
    in_chans: int,
    image_size: int,
    mean: Sequence[float],
    std: Sequence[float],
    create_kwargs: Mapping[str, Any] | None = None,
) -> tuple[nn.Module, dict[str, Any]]:
    """A randomly initialised timm model wrapped with input normalisation (inputs in [0, 1]).

    Models with a fixed input size (ViTs and the like) get ``img_size=image_size``; others refuse
    that argument and are built without it. Returns the model and the keyword arguments used, so
    that the exact same model can be built again (see :func:`load_pruned`).
    """
    import timm

    from .adversarial import with_normalization

    base: dict[str, Any] = {"pretrained": False, "num_classes": int(num_classes), "in_chans": int(in_chans)}
    if create_kwargs is not None:
        kwargs = {**base, **dict(create_kwargs)}
        net = timm.create_model(name, **kwargs)
    else:
        try:
            kwargs = {**base, "img_size": int(image_size)}
            net = timm.create_model(name, **kwargs)
        except TypeError:
            kwargs = dict(base)
            net = timm.create_model(name, **kwargs)
    return with_normalization(net, mean, std), kwargs


def write_meta(out_dir: str | os.PathLike[str], meta: Mapping[str, Any]) -> Path:
    data = {"format": META_FORMAT, **dict(meta)}
    return atomic_write_text(Path(out_dir) / META_FILE, json.dumps(data, indent=2, sort_keys=True))


def read_state(path: str | os.PathLike[str]) -> Mapping[str, Any]:
    """A state dict (or stage checkpoint) read with ``weights_only=True``, checked: names to
    tensors (a stage checkpoint: its ``model`` entry so). Errors name the file."""
    try:
        state = safe_load(path)
    except FileNotFoundError:
        raise
    except Exception as exc:  # noqa: BLE001 - unpickling errors of every kind
        raise LoadError(f"cannot read {path} as a PyTorch state dict (weights_only): {exc}") from exc
    if not isinstance(state, Mapping):
        raise LoadError(f"{path} does not hold a state dict (found {type(state).__name__})")
    weights = state["model"] if isinstance(state.get("model"), Mapping) else state
    bad = next(((k, v) for k, v in weights.items() if not isinstance(k, str) or not isinstance(v, torch.Tensor)), None)
    if bad is not None:
        raise LoadError(f"{path} does not hold a state dict: its entry {str(bad[0])[:60]!r} is a "
                        f"{type(bad[1]).__name__}, not a tensor")
    return state


def _check_meta(meta: Any, path: Path) -> dict[str, Any]:
    """``model_meta.json`` as :func:`write_meta` writes it: its own fields only, each of its type,
    file names that stay in the folder, and ``create_kwargs`` from :data:`CREATE_KWARGS`."""
    if not isinstance(meta, dict):
        raise LoadError(f"{path} holds a {type(meta).__name__}, not an object of fields")
    unknown = sorted(set(meta) - set(_META_FIELDS))
    if unknown:
        raise LoadError(f"{path}: unknown field {unknown[0]!r} (known: {', '.join(_META_FIELDS)})")
    missing = [k for k in _META_REQUIRED if k not in meta]
    if missing:
        raise LoadError(f"{path} lacks {', '.join(missing)}")
    for key, types in _META_FIELDS.items():
        value = meta.get(key)
        if key in meta and (not isinstance(value, types) or (isinstance(value, bool) and bool not in types)):
            kinds = " or ".join("null" if t is type(None) else t.__name__ for t in types)
            raise LoadError(f"{path}: field {key!r} must be {kinds}, got {str(value)[:60]!r}")
    if meta.get("format", META_FORMAT) != META_FORMAT:
        raise LoadError(f"{path}: field 'format' is {meta['format']!r}, expected {META_FORMAT}")
    for key in ("num_classes", "in_chans", "image_size"):
        if meta[key] < 1:
            raise LoadError(f"{path}: field {key!r} must be positive, got {meta[key]}")
    for key in ("mean", "std"):
        if len(meta[key]) != meta["in_chans"] or not all(isinstance(v, (int, float)) and not isinstance(v, bool)
                                                         for v in meta[key]):
            raise LoadError(f"{path}: field {key!r} must hold {meta['in_chans']} numbers (one per input channel)")
    for key, allowed in (("state_dict", (MODEL_FILE,)), ("plan", (PLAN_FILE, None))):
        if key in meta and meta[key] not in allowed:
            raise LoadError(f"{path}: field {key!r} is {meta[key]!r}; a run folder names only "
                            f"{' or '.join(repr(a) for a in allowed)} there")
    from .pipeline._config_checks import NORM_STATS

    for key, allowed, default in (("norm_stats", NORM_STATS, "exact"), ("pruned_form", PRUNED_FORMS, "graph")):
        if meta.get(key, default) not in allowed:
            raise LoadError(f"{path}: field {key!r} is {meta[key]!r}, expected one of {', '.join(allowed)}")
    kwargs = meta.get("create_kwargs")
    if kwargs is not None:
        unknown = sorted(set(kwargs) - set(CREATE_KWARGS))
        if unknown:
            raise LoadError(f"{path}: field 'create_kwargs' holds {unknown[0]!r}, which nni-harp never writes (allowed: "
                            f"{', '.join(CREATE_KWARGS)}); refusing to pass it to timm.create_model")
        if kwargs.get("pretrained", False) is not False:
            raise LoadError(f"{path}: field 'create_kwargs': 'pretrained' must be false (nothing is downloaded)")
        for key, field in (("num_classes", "num_classes"), ("in_chans", "in_chans"), ("img_size", "image_size")):
            if key not in kwargs:
                continue
            value = kwargs[key]
            if not isinstance(value, int) or isinstance(value, bool) or value != meta[field]:
                raise LoadError(f"{path}: field 'create_kwargs': {key!r} is {value!r}, field {field!r} says {meta[field]}")
    return meta


def read_meta(out_dir: str | os.PathLike[str]) -> dict[str, Any]:
    """``model_meta.json`` of a run folder, checked field by field (:data:`CREATE_KWARGS`)."""
    path = Path(out_dir) / META_FILE
    if not path.is_file():
        raise LoadError(f"{path} not found: {out_dir} is not an nni-harp output folder")
    try:
        meta = json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, OSError) as exc:
        raise LoadError(f"{path} is not valid JSON: {exc}") from exc
    return _check_meta(meta, path)


def _non_persistent_keys(model: nn.Module) -> set[str]:
    return {f"{path}.{name}" if path else name
            for path, module in model.named_modules() for name in module._non_persistent_buffers_set}


def _without_non_persistent(model: nn.Module, state: Mapping[str, torch.Tensor]) -> Mapping[str, torch.Tensor]:
    """``state`` without the model's non-persistent buffers (e.g. the input normalisation's
    ``mean``/``std``), which state dicts of traced models saved with torch <= 2.12 hold."""
    keys = _non_persistent_keys(model)
    inner = getattr(model, "model", None)
    if isinstance(inner, nn.Module):
        keys |= _non_persistent_keys(inner)
    dropped = [k for k in state if k in keys]
    if not dropped:
        return state
    logger.debug("ignoring non-persistent buffers in the state dict: %s", dropped)
    return {k: v for k, v in state.items() if k not in keys}


def load_weights(model: nn.Module, state: Mapping[str, torch.Tensor], source: str = "state dict") -> None:
    """Load ``state`` into a normalisation-wrapped model, accepting plain timm keys too.

    Keys may carry the wrapper's ``model.`` prefix (what the pipeline saves) or not (a state dict
    of the bare timm model); a pipeline stage checkpoint (a dict with a ``model`` entry) works too.
    """
    if isinstance(state.get("model"), Mapping):  # a stage checkpoint
        state = state["model"]  # type: ignore[assignment]
    state = _without_non_persistent(model, state)
    inner = getattr(model, "model", None)
    prefixed = all(k.startswith("model.") for k in state)
    target = model if prefixed or inner is None else inner
    try:
        result = target.load_state_dict(dict(state), strict=False)
    except RuntimeError as exc:  # shape mismatches: another architecture or number of classes
        first = str(exc).strip().splitlines()
        detail = " ".join(line.strip() for line in first[1:3]) if len(first) > 1 else str(exc)
        raise LoadError(f"{source} does not fit the model: {detail}") from exc
    if result.missing_keys or result.unexpected_keys:
        raise LoadError(
            f"{source} does not fit the model: missing {list(result.missing_keys)[:5]}"
            f"{'...' if len(result.missing_keys) > 5 else ''}, unexpected {list(result.unexpected_keys)[:5]}"
            f"{'...' if len(result.unexpected_keys) > 5 else ''} (was it saved for another model, "
            "dataset or number of classes?)"
        )


def load_pruned(model_name: str, out_dir: str | os.PathLike[str], map_location: str | torch.device = "cpu") -> nn.Module:
    """Rebuild the pruned model saved by ``nni-harp prune`` in ``out_dir``, in eval mode.

    ``model_name`` is the timm name the run used (checked against the folder's metadata). For
    structured runs the saved ``plan.json`` shrinks the freshly built model to the pruned shapes
    before the weights are loaded, in the form the run's speedup gave (``pruned_form`` in the
    metadata): the timm model itself, pruned in place, or a ``torch.fx.GraphModule`` where the
    model's own forward could not follow the pruning; unstructured runs store the zeros in the
    state dict itself. A run fine-tuned with kept-channel norm statistics (``norm_stats: kept``)
    has its pruned layer norms swapped for those first (``graph_passes.kept_stats_norms``, with the
    masks the plan gives), so the plan yields the plain norms the run's speedup gave.
    """
    out = Path(out_dir)
    meta = read_meta(out)
    if meta["model"] != model_name:
        raise LoadError(f"{out} holds a pruned {meta['model']!r}, not {model_name!r}")
    model, _ = create_model(
        model_name, meta["num_classes"], meta["in_chans"], meta["image_size"], meta["mean"], meta["std"],
        create_kwargs=meta.get("create_kwargs"),
    )
    plan_name = meta.get("plan")
    if plan_name:
        import graph_passes

        plan_path = out / plan_name
        if not plan_path.is_file():
            raise LoadError(f"{plan_path} not found (the metadata says the model was pruned structurally)")
        example = (torch.zeros(1, meta["in_chans"], meta["image_size"], meta["image_size"]),)
        plan = graph_passes.PruningPlan.load(plan_path)
        in_place, kept = meta.get("pruned_form", "graph") == "module", meta.get("norm_stats") == "kept"
        if in_place or kept:  # one trace serves the plan's masks and the norms' swap
            analysis = graph_passes.analysis_for(copy.deepcopy(model).eval(), example)
            masks = plan.masks(analysis)
            if kept:
                graph_passes.kept_stats_norms(model, masks, analysis=analysis)
        if not in_place:
            model = plan.apply(model, example)
        else:
            try:
                model = shrink(model, example, masks)[0]
            except graph_passes.SpeedupError as exc:
                raise LoadError(f"{plan_path} cannot be applied to {model_name} in place as the run did ({exc}); "
                                "was the folder written with another version of timm?") from exc
    weights = out / meta.get("state_dict", MODEL_FILE)
    load_weights(model, read_state(weights), source=str(weights))
    model.to(map_location)
    return model.eval()

