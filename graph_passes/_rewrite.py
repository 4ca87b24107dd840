"""Rewrite rules of the shape-taking ops (view/reshape/expand sizes, slice bounds, split sizes):
their arguments rewritten to fit the pruned tensors. The ops register them in their registry
entries (``_ops_shape``)."""
from __future__ import annotations

import operator
from typing import Any

import torch
from torch import fx

from ._registry import Keeper
from ._tracking import TRACK_KEY, TensorInfo, tracked
from .errors import SpeedupError

__all__ = ["rewrite_shape_args", "rewrite_getitem", "rewrite_split"]

def _reads_channels(size: Any, seen: set[fx.Node] | None = None) -> bool:
    """Whether a size computed at run time reads the length of a channel axis (``x.shape[-1]``,
    ``x.size(2)``, or arithmetic on them): after pruning it holds the pruned width, which may not
    be the length the receiving axis keeps (CaiT's ``reshape(B, N, C)`` of pinned heads)."""
    if not isinstance(size, fx.Node):
        return False
    seen = set() if seen is None else seen
    if size in seen:
        return False
    seen.add(size)
    if size.op == "call_function" and size.target is operator.getitem and isinstance(size.args[0], fx.Node):
        src = size.args[0]
        if src.op == "call_function" and src.target is getattr and src.args[1:] == ("shape",):
            return _axis_tracked(src.args[0], size.args[1])
        if src.op == "call_method" and src.target == "size" and len(src.args) == 1:
            return _axis_tracked(src.args[0], size.args[1])
    if size.op == "call_method" and size.target == "size" and len(size.args) > 1:
        return _axis_tracked(size.args[0], size.args[1])
    return any(_reads_channels(a, seen) for a in size.all_input_nodes)


def _axis_tracked(tensor: Any, axis: Any) -> bool:
    info = tracked(tensor)
    if not isinstance(info, TensorInfo) or not isinstance(axis, int):
        return isinstance(info, TensorInfo) and bool(info.track)  # a slice of the shape: be safe
    return axis % info.ndim in info.track


def _rewrite_sizes(node: fx.Node, old: tuple[int, ...], new: tuple[int, ...], channel_axes: frozenset[int] = frozenset()) -> None:
    """Replace integer size arguments that named an axis whose length changed, and sizes computed
    at run time on channel axes or from a channel axis' length (they may read another group's
    width, e.g. ``C // heads``)."""
    if old == new and not channel_axes and not any(_reads_channels(a) for a in node.all_input_nodes[1:]):
        return
    args = list(node.args)
    sizes = args[1:]
    packed = len(sizes) == 1 and isinstance(sizes[0], (list, tuple))
    if packed:
        sizes = list(sizes[0])
    if node.target in ("new_zeros", "new_ones", "new_empty", "new_full"):
        sizes = sizes[: len(new)]
    if len(sizes) != len(new):
        if any(isinstance(s, int) and s != -1 for s in sizes):
            raise SpeedupError(f"cannot map the size arguments of {node.name} onto its output", node=node.name)
        return
    lead = 0
    # a size computed at run time (``x.shape[-1]`` of another tensor) may read a different group's
    # width: every changed axis gets its new, static length
    fixed = [new[i + lead] if isinstance(s, fx.Node) and (i + lead in channel_axes or old[i + lead] != new[i + lead] or _reads_channels(s))
             or isinstance(s, int) and s != -1 and s == old[i + lead] and old[i + lead] != new[i + lead]
             else s for i, s in enumerate(sizes)]
    node.args = (args[0], tuple(fixed)) if packed else (args[0], *fixed, *args[1 + len(fixed):])


def rewrite_shape_args(gm: fx.GraphModule, node: fx.Node, keeper: Keeper) -> None:
    """view/reshape/expand/new_zeros...: every size argument fits the pruned output."""
    info = tracked(node)
    if not isinstance(info, TensorInfo):
        return
    new = _origin_shape(gm, info) if info.origin is not None and not info.track else keeper.new_shape(info)
    _rewrite_sizes(node, info.shape, new, frozenset(info.track))


def rewrite_getitem(gm: fx.GraphModule, node: fx.Node, keeper: Keeper) -> None:
    """``x[..., a:b]`` on a channel axis: the bounds count the kept channels before them."""
    info = tracked(node.args[0])
    if not isinstance(info, TensorInfo):
        return
    index = node.args[1]
    items = list(index) if isinstance(index, tuple) else [index]
    if Ellipsis in items:
        k = items.index(Ellipsis)
        fill = info.ndim - sum(1 for it in items if it is not None and it is not Ellipsis)
        items = items[:k] + [slice(None)] * fill + items[k + 1:]
    src = 0
    changed = False
    for i, it in enumerate(items):
        if it is None:
            continue
        if isinstance(it, slice) and src in info.track and (it.start is not None or it.stop is not None) \
                and not any(isinstance(b, fx.Node) for b in (it.start, it.stop)):
            kept = keeper.kept(info.track[src])
            start = None if it.start is None else int(kept[: it.start].sum())
            stop = None if it.stop is None else int(kept[: it.stop].sum())
            items[i] = slice(start, stop, it.step)
            changed = True
        src += 1
    if changed:
        node.args = (node.args[0], tuple(items) if isinstance(index, tuple) else items[0])


def rewrite_split(gm: fx.GraphModule, node: fx.Node, keeper: Keeper) -> None:
    """split/split_with_sizes on a channel axis: the pieces' pruned sizes."""
    info, outs = tracked(node.args[0]), node.meta.get(TRACK_KEY)
    if not isinstance(info, TensorInfo) or not isinstance(outs, list):
        return
    dim = node.args[2] if len(node.args) > 2 else node.kwargs.get("dim", 0)
    axis = dim % info.ndim
    if axis not in info.track:
        return
    sizes = [keeper.new_shape(o)[axis] for o in outs]
    args = list(node.args)
    if len(args) > 1:
        args[1] = sizes
        node.args = tuple(args)
    else:
        node.kwargs = {**node.kwargs, "split_size_or_sections": sizes}


def _origin_shape(gm: fx.GraphModule, info: TensorInfo) -> tuple[int, ...]:
    """The shape of a view of a (sliced) parameter: each axis that shows a parameter dimension
    takes that dimension's new length (poolformer's ``scale.view(C, 1, 1)``)."""
    origin = info.origin
    owner = gm.get_submodule(origin.module) if origin.module else gm
    param = getattr(owner, origin.param, None)
    if not isinstance(param, torch.Tensor) or len(origin.axes) != len(info.shape):
        return info.shape
    return tuple(int(param.shape[ax]) if ax is not None and ax < param.dim() else old
                 for old, ax in zip(info.shape, origin.axes))
