"""Remove a pipeline-built model's masked channels, keeping the timm model where its forward allows.

:func:`shrink` runs ``graph_passes.ModelSpeedup`` in place (or, with ``fallback_to_graph``, gives the
pruned ``torch.fx.GraphModule`` where the model's own forward cannot follow). An in-place speedup
updates what the model's ops read; a timm model also keeps widths in attributes that only its
users read (``reset_classifier``, ``forward_head``). Those follow the pruning here, each by what it
measures:

- the width of ``forward_features``' output: the model's ``num_features`` and ``embed_dim``, its
  head module's ``in_features``;
- the classifier's input width: the model's ``head_hidden_size``, its head module's
  ``num_features`` and ``hidden_size`` (timm's ``ClassifierHead`` / ``NormMlpClassifierHead``).

An attribute is changed only where it named that width before the speedup, so a model that keeps
other numbers under these names is left alone.
"""
from __future__ import annotations

from typing import Any, Mapping

import torch
from torch import nn

__all__ = ["shrink"]

#: (holder path relative to the timm model, attribute names) per width measured
_FEATURE_WIDTHS = (("", ("num_features", "embed_dim")), ("head", ("in_features",)))
_CLASSIFIER_WIDTHS = (("", ("head_hidden_size",)), ("head", ("num_features", "hidden_size")))


def shrink(model: nn.Module, example: Any, masks: Mapping[str, Mapping[str, torch.Tensor]], *,
           fallback_to_graph: bool = False) -> tuple[nn.Module, Any]:
    """The pruned model (``model`` itself, pruned in place, or the pruned GraphModule) and the
    ``graph_passes.ModelSpeedup`` that made it (its ``plan``, ``inplace_error``). ``model``: a
    timm model or the pipeline's wrapper of one (``.model``); ``example``: its input."""
    import graph_passes

    net = getattr(model, "model", model)
    before = _widths(net, example) if hasattr(net, "get_classifier") else None
    speedup = graph_passes.ModelSpeedup(model, example, masks)
    pruned = speedup.speedup_model(fallback_to_graph=fallback_to_graph)
    if speedup.inplace_error is None and before is not None:
        after = _widths(net, example)
        for holders, key in ((_FEATURE_WIDTHS, "features"), (_CLASSIFIER_WIDTHS, "classifier")):
            if before[key] is not None and after[key] is not None:
                _follow(net, holders, before["attrs"], before[key], after[key])
    return pruned, speedup


def _widths(net: nn.Module, example: Any) -> dict[str, Any]:
    """The widths of ``forward_features``' output and of the classifier's input, and what the width
    attributes say (``{(holder, attr): value}``)."""
    classifier = net.get_classifier()
    attrs = {}
    for path, names in (*_FEATURE_WIDTHS, *_CLASSIFIER_WIDTHS):
        holder = _holder(net, path)
        for name in names:
            value = getattr(holder, name, None) if holder is not None else None
            if isinstance(value, int) and not isinstance(value, bool):
                attrs[(path, name)] = value
    return {"features": _feature_dims(net, example, attrs.get(("", "num_features"))),
            "classifier": getattr(classifier, "in_features", None) if isinstance(classifier, nn.Linear) else None,
            "attrs": attrs}


def _feature_dims(net: nn.Module, example: Any, width: int | None) -> tuple[int, ...] | None:
    """The shape of ``forward_features``' output (eval mode, no gradient), or None where it is not one
    tensor or cannot be computed on ``example`` (the widths are then left as they are: the speedup
    itself does not depend on them)."""
    if not hasattr(net, "forward_features") or width is None:
        return None
    was_training = net.training
    net.eval()
    try:
        with torch.no_grad():
            out = net.forward_features(*(example if isinstance(example, tuple) else (example,)))
    except Exception:  # noqa: BLE001 - a forward_features that needs other inputs: no feature width to follow
        return None
    finally:
        net.train(was_training)
    return tuple(out.shape) if isinstance(out, torch.Tensor) else None


def _holder(net: nn.Module, path: str) -> nn.Module | None:
    if not path:
        return net
    holder = getattr(net, path, None)
    return holder if isinstance(holder, nn.Module) and holder is not net.get_classifier() else None


def _follow(net: nn.Module, holders: tuple[tuple[str, tuple[str, ...]], ...], old_attrs: dict[tuple[str, str], int],
            old: Any, new: Any) -> None:
    """Set the ``holders``' attributes that named the old width to the new one. A feature width is
    read off the output shape at the dimension that held the old ``num_features`` (channels first
    or last) and changed (tokens and pixels do not)."""
    if isinstance(old, tuple):
        width = old_attrs.get(("", "num_features"))
        dims = [d for d in (1, len(old) - 1) if len(new) == len(old) and old[d] == width and new[d] != width]
        if not dims:
            return
        old, new = old[dims[0]], new[dims[0]]
    for path, names in holders:
        holder = _holder(net, path)
        for name in names:
            if holder is not None and old_attrs.get((path, name)) == old:
                setattr(holder, name, new)
