"""Build timm models the way the pipeline does, and rebuild a pruned model from its output folder.

A run's output folder holds ``model_meta.json`` (how the model was created), ``model.pt`` (the
pruned state dict) and, for structured pruning, ``plan.json`` (a ``graph_passes.PruningPlan``).
:func:`load_pruned` recreates the timm model from its name, shrinks it with the plan, and loads
the weights: no pickled modules are ever read.
"""
from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any, Mapping, Sequence

import torch
from torch import nn

from ._io import atomic_write_text, safe_load

__all__ = [
    "META_FILE",
    "MODEL_FILE",
    "PLAN_FILE",
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
    """A state dict (or stage checkpoint) read with ``weights_only=True``; errors name the file."""
    try:
        state = safe_load(path)
    except FileNotFoundError:
        raise
    except Exception as exc:  # noqa: BLE001 - unpickling errors of every kind
        raise LoadError(f"cannot read {path} as a PyTorch state dict (weights_only): {exc}") from exc
    if not isinstance(state, Mapping):
        raise LoadError(f"{path} does not hold a state dict (found {type(state).__name__})")
    return state


def read_meta(out_dir: str | os.PathLike[str]) -> dict[str, Any]:
    path = Path(out_dir) / META_FILE
    if not path.is_file():
        raise LoadError(f"{path} not found: {out_dir} is not an nni-harp output folder")
    try:
        meta = json.loads(path.read_text(encoding="utf-8"))
    except ValueError as exc:
        raise LoadError(f"{path} is not valid JSON: {exc}") from exc
    missing = [k for k in ("model", "num_classes", "in_chans", "image_size", "mean", "std") if k not in meta]
    if missing:
        raise LoadError(f"{path} lacks {', '.join(missing)}")
    return meta


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
    before the weights are loaded; unstructured runs store the zeros in the state dict itself.
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
        example = torch.zeros(1, meta["in_chans"], meta["image_size"], meta["image_size"])
        plan = graph_passes.PruningPlan.load(plan_path)
        model = plan.apply(model, (example,))
    weights = out / meta.get("state_dict", MODEL_FILE)
    load_weights(model, read_state(weights), source=str(weights))
    model.to(map_location)
    return model.eval()
