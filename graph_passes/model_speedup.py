"""``ModelSpeedup``: NNI 3.0's speedup call, on graph_passes' channel analysis."""
from __future__ import annotations

import copy
import logging
import warnings
from typing import Any, Mapping

import torch
from torch import fx, nn

from ._inplace import apply_ops, check_eager, eager_ops, transfer_ops
from ._masks import Masks, bake, combine_masks, leftover_zeros, load_masks, normalize_masks
from .dependency import Analysis, analyze
from .errors import SpeedupError
from .groups import ChannelGroup, group_masks, keep_from_masks
from .plan import PruningPlan
from .speedup import prune_graph
from .tracing import as_tuple, trace

__all__ = ["ModelSpeedup", "SpeedupWarning"]

_logger = logging.getLogger(__name__)


class SpeedupWarning(UserWarning):
    """Masked weights the speedup cannot remove (element-wise sparsity): they stay, as zeros."""


def _normalize_input(dummy_input: Any) -> tuple[Any, ...]:
    """NNI's convention: a tensor, a tuple or list of positional inputs, or a dict whose values
    are the positional inputs in order."""
    if isinstance(dummy_input, Mapping):
        return tuple(dummy_input.values())
    return as_tuple(dummy_input)


def _reject(name: str, value: Any, why: str) -> None:
    if value:
        raise SpeedupError(f"ModelSpeedup({name}=...) is not supported: {why}; leave it None")


class ModelSpeedup:
    """Physically remove masked channels; NNI 3.0's ``ModelSpeedup`` call.

    ``ModelSpeedup(model, dummy_input, masks_or_file).speedup_model()`` changes ``model`` in
    place, as NNI's does, and returns it: its submodules are replaced by smaller ones through their
    parents, its other tensors sliced, and the size attributes its forward reads
    (``in_channels``, ``num_features``, an attention's ``head_dim``, ...) updated. The model's own
    forward is then checked against the masked model on ``dummy_input``; where it cannot follow
    (a size written into its Python code), a :class:`SpeedupError` names the module, the model is
    left unchanged, and ``speedup_model(inplace=False)`` gives the pruned ``torch.fx.GraphModule``
    instead (``model`` untouched); ``speedup_model(fallback_to_graph=True)`` returns that
    GraphModule itself in that case, with the reason in :attr:`inplace_error`.

    ``masks_or_file``: NNI's ``{module_name: {'weight': mask, 'bias': mask or None}}`` (any
    parameter or buffer name), or the path of one saved with ``torch.save``. ``None`` masks are
    skipped; float, int and bool masks are accepted. A channel of a group of coupled channels is
    removed when the masks remove it from every layer that produces it (or from every layer that
    reads it); see :func:`graph_passes.keep_from_masks`. All masks are multiplied into the
    weights first, and every tensor of a removed channel goes with it (a following norm's shift
    too: NNI's speedup drops such constant channels as well): :attr:`applied_masks`, set by
    :meth:`speedup_model`, are the masks under which the masked model equals the pruned one.
    Masked weights inside channels that stay (element-wise sparsity) are kept as zeros, with a
    :class:`SpeedupWarning`. What was removed is kept too: :attr:`keep` (per channel group, which
    channels stay), :attr:`groups` (the groups of the model's channel analysis) and :attr:`plan`
    (the :class:`~graph_passes.PruningPlan` applied, to save or to re-apply to a fresh model), so
    a caller need not trace the model again to learn them.

    NNI's other arguments: ``map_location`` (for a masks file) is used; ``batch_dim``,
    ``batch_size`` (NNI 2's ``confidence``) and ``garbage_collect_values`` only tune NNI's
    statistical sparsity inference, which graph_passes does not need (its channel rules are
    exact), and are accepted without effect; ``logger`` receives this object's messages;
    ``graph_module`` (a ``torch.fx`` trace of ``model`` with its module names, e.g. from
    :func:`graph_passes.trace`, or its :class:`~graph_passes.Analysis`) is used instead of tracing
    ``model``, and is pruned too; custom mask updaters and replacers are
    NNI objects with no counterpart here and are refused.
    """

    def __init__(
        self,
        model: nn.Module,
        dummy_input: Any,
        masks_or_file: Any,
        map_location: Any = None,
        batch_dim: int = 0,
        batch_size: int = 8,
        customized_mask_updaters: list[Any] | None = None,
        customized_replacers: list[Any] | None = None,
        graph_module: fx.GraphModule | Analysis | None = None,
        garbage_collect_values: bool = True,
        logger: logging.Logger | None = None,
        *,
        confidence: int | None = None,
        customized_replace_func: Mapping[str, Any] | None = None,
    ) -> None:
        _reject("customized_mask_updaters", customized_mask_updaters,
                "graph_passes infers channels from the rules of its op registry, not by propagating masks")
        _reject("customized_replacers", customized_replacers,
                "graph_passes builds the smaller modules by the rules of its op registry (graph_passes._registry)")
        _reject("customized_replace_func", customized_replace_func,
                "graph_passes builds the smaller modules by the rules of its op registry (graph_passes._registry)")
        if isinstance(graph_module, Analysis):
            graph_module = graph_module.gm
        if graph_module is not None and not isinstance(graph_module, fx.GraphModule):
            raise SpeedupError(f"graph_module must be a torch.fx.GraphModule traced from the model, got {type(graph_module).__name__}")
        for name, value in (("batch_dim", batch_dim), ("batch_size", batch_size), ("confidence", confidence)):
            if value is not None and (isinstance(value, bool) or not isinstance(value, int)):
                raise SpeedupError(f"{name} must be an int, got {value!r}")
        self.model = self.bound_model = model
        self.dummy_input = _normalize_input(dummy_input)
        self.masks = normalize_masks(model, load_masks(masks_or_file, map_location))
        self.graph_module = graph_module
        self.logger = logger or _logger
        self.keep: dict[int, torch.Tensor] | None = None
        self.groups: list[ChannelGroup] | None = None
        self.plan: PruningPlan | None = None
        self.applied_masks: Masks | None = None
        self.inplace_error: str | None = None

    def speedup_model(self, inplace: bool = True, fallback_to_graph: bool = False) -> nn.Module:
        """Remove the masked channels. ``inplace`` (NNI's behaviour): ``model`` is pruned and
        returned; otherwise a pruned ``torch.fx.GraphModule`` is returned and ``model`` is left
        alone (nor is ``graph_module`` changed). ``fallback_to_graph`` (with ``inplace``): where
        the model's own forward cannot follow the pruning, the model is left alone and the pruned
        GraphModule returned instead of raising the :class:`SpeedupError`, whose message is kept
        in :attr:`inplace_error` (None after an in-place speedup)."""
        model, inputs = self.model, self.dummy_input
        was_training = model.training
        source = copy.deepcopy(self.graph_module if self.graph_module is not None else model).eval()
        bake(source, _present(source, self.masks))
        gm = trace(source, inputs)  # a GraphModule that already carries shapes comes back as it is
        analysis = analyze(gm)
        self.keep = keep_from_masks(analysis.groups, self.masks)
        self.groups = list(analysis.groups)
        self.plan = PruningPlan.from_keep(self.groups, self.keep, inputs)
        removed = group_masks(gm, analysis.groups, {g: k for g, k in self.keep.items() if not bool(k.all())})
        self.applied_masks = combine_masks(self.masks, removed)
        self._report(self.masks, removed)
        bake(gm, removed)
        with torch.no_grad():
            expected = gm(*inputs)
        changed = prune_graph(gm, analysis, self.keep)
        with torch.no_grad():
            gm(*inputs)  # fail here, naming the error, rather than later
        if not inplace:
            gm.train(was_training)
            return gm
        for module, targets in self.masks.items():
            changed.setdefault(module, set()).update(targets)
        ops = transfer_ops(gm, changed)
        work = source if self.graph_module is None else copy.deepcopy(model).eval()
        try:
            apply_ops(work, ops)
            ops += eager_ops(work)
            check_eager(work, gm, inputs, expected)
        except SpeedupError as exc:
            if not fallback_to_graph:
                raise
            self.inplace_error = str(exc)
            self.logger.info("%s; the pruned GraphModule is returned instead", exc)
            gm.train(was_training)
            return gm
        self.inplace_error = None
        if self.graph_module is not None:
            apply_ops(self.graph_module, ops, missing_ok=True)
            self.graph_module.graph = gm.graph
            self.graph_module.recompile()
        apply_ops(model, ops)
        model.train(was_training)
        self.logger.info("pruned %s in place: %d modules replaced or resized", type(model).__name__, len(ops))
        return model

    def _report(self, masks: Masks, removed: Masks) -> None:
        left, total = leftover_zeros(masks, removed)
        if not left:
            return
        what = "nothing to remove" if left == total else f"{total - left} of the {total} masked weights removed with their channels"
        message = (f"ModelSpeedup: {what}; {left} masked weights lie in channels that stay and are kept as zeros "
                   "(element-wise sparsity, or a channel some coupled layer still uses: "
                   "graph_passes.auto_set_dependency_group_ids makes coupled layers agree); the speedup removes whole channels only")
        self.logger.info(message)
        warnings.warn(message, SpeedupWarning, stacklevel=3)


def _present(root: nn.Module, masks: Masks) -> Masks:
    """The masks of tensors ``root`` has (a given graph_module holds only those its graph uses)."""
    out: Masks = {}
    for path, targets in masks.items():
        try:
            owner = root.get_submodule(path) if path else root
        except AttributeError:
            continue
        kept = {name: mask for name, mask in targets.items() if isinstance(getattr(owner, name, None), torch.Tensor)}
        if kept:
            out[path] = kept
    return out
