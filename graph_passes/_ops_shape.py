"""Handlers for ops that move, split or join axes: reshape family, permutes, indexing, cat/split."""
from __future__ import annotations

import operator
from typing import Any

import numpy as np
import torch
from torch import fx, nn

from ._ops_common import arg, combine_elementwise, norm_axis, out_shape, untracked_like, zero_axes
from ._registry import register_function, register_method, register_module
from ._rewrite import rewrite_getitem, rewrite_shape_args, rewrite_split
from ._tracking import AnalysisState, ParamOrigin, TensorInfo

__all__ = ["reshape_groups"]


def reshape_groups(src: tuple[int, ...], dst: tuple[int, ...]) -> list[tuple[list[int], list[int]]]:
    """Pair runs of source axes with runs of destination axes that hold the same elements."""
    groups: list[tuple[list[int], list[int]]] = []
    i = j = 0
    while i < len(src) or j < len(dst):
        a: list[int] = []
        b: list[int] = []
        pa = pb = 1
        if i < len(src):
            a.append(i)
            pa *= src[i]
            i += 1
        if j < len(dst):
            b.append(j)
            pb *= dst[j]
            j += 1
        while pa != pb:
            if pa < pb and i < len(src):
                a.append(i)
                pa *= src[i]
                i += 1
            elif pb < pa and j < len(dst):
                b.append(j)
                pb *= dst[j]
                j += 1
            else:
                raise ValueError(f"shapes {src} and {dst} do not reshape into each other")
        groups.append((a, b))
    return groups


def _size_args(node: fx.Node) -> list[Any]:
    """The per-axis size arguments of a view/reshape call (empty when it takes none)."""
    if node.op == "call_method" and node.target in ("view", "reshape"):
        sizes = list(node.args[1:])
    elif node.op == "call_function" and node.target is torch.reshape:
        sizes = [arg(node, 1, "shape", ())]
    else:
        return []
    if len(sizes) == 1 and isinstance(sizes[0], (list, tuple)):
        sizes = list(sizes[0])
    return sizes


@register_module(nn.Flatten, nn.Unflatten, view=True)
@register_method("view", "reshape", rewrite=rewrite_shape_args, view=True)
@register_method("flatten", "unflatten", "squeeze", "unsqueeze", "view_as", "reshape_as", view=True)
@register_function(torch.reshape, rewrite=rewrite_shape_args, view=True)
@register_function(torch.flatten, torch.squeeze, torch.unsqueeze, torch.unflatten, view=True)
def reshape(state: AnalysisState, node: fx.Node) -> Any:
    """Follow channels through a reshape. A channel axis split into several axes keeps its channels
    on the largest of them; the others become structure (heads, groups) shared by every channel,
    so the channels along them are united (e.g. the same head dimension in every head)."""
    info = state.info(node.args[0])
    shape = out_shape(node)
    if not isinstance(info, TensorInfo) or not isinstance(shape, tuple):
        return untracked_like(node)
    if info.origin is not None and not info.track:
        # a parameter seen through a view that only adds or drops size-1 axes keeps its origin
        if [s for s in info.shape if s != 1] == [s for s in shape if s != 1]:
            it = iter([ax for ax, s in zip(info.origin.axes, info.shape) if s != 1])
            axes = tuple(next(it) if s != 1 else None for s in shape)
            return TensorInfo(shape, {}, ParamOrigin(info.origin.module, info.origin.param, axes), info.all_axes_if_zero(len(shape)))
        return TensorInfo(shape)
    out = TensorInfo(shape)
    zero = set()
    size_args = _size_args(node)
    for src_axes, dst_axes in reshape_groups(info.shape, shape):
        tracked = [a for a in src_axes if a in info.track]
        if len(tracked) > 1 and sum(info.shape[a] != 1 for a in tracked) <= 1:
            # a size-1 channel axis (one channel: never removed) folds into its neighbour
            for a in [a for a in tracked if info.shape[a] == 1][: len(tracked) - 1]:
                state.pin(info.track[a], f"{node.name} folds a single-channel axis into another")
                tracked.remove(a)
        if not tracked or not dst_axes:
            continue
        if len(tracked) > 1:
            for a in tracked:
                state.pin(info.track[a], f"{node.name} merges two channel axes")
            continue
        axis = tracked[0]
        sizes = [info.shape[a] for a in src_axes]
        view = [1] * len(src_axes)
        view[src_axes.index(axis)] = info.shape[axis]
        arr = np.broadcast_to(info.track[axis].reshape(view), sizes).reshape([shape[d] for d in dst_axes])
        if axis in info.zero:  # the positions of a removed channel, wherever they land, hold zero
            zero.update(dst_axes)
        if len(dst_axes) == 1:
            out.track[dst_axes[0]] = np.ascontiguousarray(arr).reshape(-1)
            continue
        sizes_out = [shape[d] for d in dst_axes]
        keep_local = max(range(len(dst_axes)), key=lambda k: (sizes_out[k], k))
        runtime = [k for k, d in enumerate(dst_axes) if d < len(size_args) and isinstance(size_args[d], fx.Node)]
        if len(runtime) == 1:
            # the one size computed at run time (``C // groups``) absorbs the pruned channels; the
            # literal sizes (the group count) stay true in the pruned graph
            keep_local = runtime[0]
        moved = np.moveaxis(arr, keep_local, -1).reshape(-1, sizes_out[keep_local])
        for row in moved[1:]:
            state.unite(moved[0], row)
        out.track[dst_axes[keep_local]] = np.ascontiguousarray(moved[0])
    out.zero = frozenset(zero)
    return out


@register_method("permute", "transpose", "movedim", "swapaxes", "t", view=True)
@register_function(torch.permute, torch.transpose, torch.movedim, torch.swapaxes, torch.t, view=True)
def permute(state: AnalysisState, node: fx.Node) -> Any:
    info = state.info(node.args[0])
    shape = out_shape(node)
    if not isinstance(info, TensorInfo):
        return untracked_like(node)
    n = info.ndim
    order = list(range(n))
    name = node.target if isinstance(node.target, str) else node.target.__name__
    rest = [a for a in node.args[1:]]
    if name == "permute":
        dims = rest[0] if len(rest) == 1 and isinstance(rest[0], (list, tuple)) else rest or node.kwargs.get("dims")
        order = [norm_axis(int(d), n) for d in dims]
    elif name in ("transpose", "swapaxes"):
        d0 = norm_axis(int(arg(node, 1, "dim0")), n)
        d1 = norm_axis(int(arg(node, 2, "dim1")), n)
        order[d0], order[d1] = order[d1], order[d0]
    elif name == "t":
        order = order[::-1]
    elif name == "movedim":
        src, dst = arg(node, 1, "source"), arg(node, 2, "destination")
        src = [src] if isinstance(src, int) else list(src)
        dst = [dst] if isinstance(dst, int) else list(dst)
        order = [int(a) for a in np.moveaxis(np.arange(n), [norm_axis(s, n) for s in src], [norm_axis(d, n) for d in dst])]
    out = TensorInfo(shape, zero=frozenset(new for new, old in enumerate(order) if old in info.zero))
    for new_axis, old_axis in enumerate(order):
        if old_axis in info.track:
            out.track[new_axis] = info.track[old_axis]
    if info.origin is not None and not info.track:
        out.origin = ParamOrigin(info.origin.module, info.origin.param, tuple(info.origin.axes[o] for o in order))
    return out


@register_method("expand", "broadcast_to", rewrite=rewrite_shape_args, view=True)
@register_method("expand_as", view=True)
@register_method("repeat")
@register_function(torch.broadcast_to, rewrite=rewrite_shape_args, view=True)
def expand(state: AnalysisState, node: fx.Node) -> Any:
    info = state.info(node.args[0])
    shape = out_shape(node)
    if not isinstance(info, TensorInfo) or not isinstance(shape, tuple):
        return untracked_like(node)
    lead = len(shape) - info.ndim
    out = TensorInfo(shape, zero=frozenset(a + lead for a in info.zero))  # copies of zero positions
    for axis, ids in info.track.items():
        reps = shape[axis + lead] // info.shape[axis]
        out.track[axis + lead] = np.tile(ids, reps) if reps > 1 else ids
    if info.origin is not None and not info.track and node.target != "repeat":
        # An axis broadcast from size 1 (a class token expanded over the batch) no longer shows
        # the parameter's dimension: its length comes from the expand, not from the parameter.
        axes = tuple(None if size != shape[i + lead] else ax for i, (size, ax) in enumerate(zip(info.shape, info.origin.axes)))
        out.origin = ParamOrigin(info.origin.module, info.origin.param, (None,) * lead + axes)
        out.zero = info.all_axes_if_zero(len(shape))
    return out


@register_function(torch.cat, torch.concat, torch.concatenate, torch.stack)
def concat(state: AnalysisState, node: fx.Node) -> Any:
    tensors = arg(node, 0, "tensors")
    infos = [state.info(t) for t in tensors]
    shape = out_shape(node)
    dim = int(arg(node, 1, "dim", 0))
    is_stack = node.target is torch.stack
    parts = []
    for t, info in zip(tensors, infos):
        if not isinstance(info, TensorInfo):
            info = TensorInfo(out_shape(t)) if isinstance(t, fx.Node) else None
        parts.append(info)
    if any(p is None for p in parts):
        return untracked_like(node)
    ndim = parts[0].ndim
    axis = norm_axis(dim, ndim + (1 if is_stack else 0))
    if is_stack:
        parts = [TensorInfo(p.shape[:axis] + (1,) + p.shape[axis:], {(a + (a >= axis)): ids for a, ids in p.track.items()},
                            zero=frozenset(a + (a >= axis) for a in p.zero)) for p in parts]
    # every other axis behaves element-wise (zero where every part is); the concat axis is joined
    sliced = []
    for p in parts:
        others = {a: ids for a, ids in p.track.items() if a != axis}
        sliced.append(TensorInfo(p.shape[:axis] + (1,) + p.shape[axis + 1:], others, p.origin if not is_stack else None,
                                 p.zero - {axis}))
    out = combine_elementwise(state, node, sliced, shape[:axis] + (1,) + shape[axis + 1:])
    out.zero = zero_axes(state, sliced, out.shape) - {axis}
    out.shape = shape
    if not is_stack and any(axis in p.track for p in parts):
        pieces = []
        for p in parts:
            if axis in p.track:
                pieces.append(p.track[axis])
            else:
                fresh = state.fresh(p.shape[axis])
                state.pin(fresh, f"{node.name} joins channels with an input whose channels are fixed")
                pieces.append(fresh)
        out.track[axis] = np.concatenate(pieces)
        if all(axis in p.zero for p in parts if axis in p.track):  # (the fixed parts' channels stay)
            out.zero = out.zero | {axis}
    return out


def _split_sizes(total: int, spec: Any) -> list[int]:
    if isinstance(spec, int):
        return [min(spec, total - s) for s in range(0, total, spec)]
    return [int(s) for s in spec]


@register_method("split", "split_with_sizes", rewrite=rewrite_split, view=True)
@register_method("chunk", "unbind", "tensor_split", view=True)
@register_function(torch.split, rewrite=rewrite_split, view=True)
@register_function(torch.chunk, torch.unbind, torch.tensor_split, view=True)
def split(state: AnalysisState, node: fx.Node) -> Any:
    info = state.info(node.args[0])
    shapes = out_shape(node)
    if not isinstance(info, TensorInfo) or not isinstance(shapes, list):
        return untracked_like(node)
    name = node.target if isinstance(node.target, str) else node.target.__name__
    dim = norm_axis(int(arg(node, 2 if name != "unbind" else 1, "dim", 0)), info.ndim)
    outs = []
    if name == "unbind":
        for s in shapes:
            outs.append(TensorInfo(s, {a - (a > dim): ids for a, ids in info.track.items() if a != dim},
                                   zero=frozenset(a - (a > dim) for a in info.zero if a != dim)))
        if dim in info.track:
            state.pin(info.track[dim], f"{node.name} unbinds a channel axis")
        return outs
    sizes = [s[dim] for s in shapes]
    if dim in info.track and name in ("chunk", "tensor_split"):
        base = sizes[0]
        ids = info.track[dim]
        if all(s == base for s in sizes):
            for k in range(1, len(sizes)):  # equal chunks must stay equal: same offset in each
                state.unite(ids[:base], ids[k * base:(k + 1) * base])
        else:
            state.pin(ids, f"{node.name} cuts channels into unequal chunks")
    offset = 0
    for s, size in zip(shapes, sizes):
        track = {a: ids for a, ids in info.track.items() if a != dim}
        if dim in info.track:
            track[dim] = info.track[dim][offset:offset + size]
        outs.append(TensorInfo(s, track, zero=info.zero))
        offset += size
    return outs


@register_function(operator.getitem, rewrite=rewrite_getitem, view=True)
def getitem(state: AnalysisState, node: fx.Node) -> Any:
    container, index = node.args[0], node.args[1]
    info = state.info(container)
    if isinstance(info, (list, tuple)):
        return info[index] if isinstance(index, int) else untracked_like(node)
    if not isinstance(info, TensorInfo):
        return untracked_like(node)
    shape = out_shape(node)
    items = list(index) if isinstance(index, tuple) else [index]
    if sum(1 for it in items if isinstance(it, fx.Node)) > 1 or any(isinstance(it, (list, torch.Tensor)) for it in items):
        state.pin_track(info, f"{node.name} uses advanced indexing")
        return untracked_like(node)
    if Ellipsis in items:
        k = items.index(Ellipsis)
        fill = info.ndim - sum(1 for it in items if it is not None and it is not Ellipsis)
        items = items[:k] + [slice(None)] * fill + items[k + 1:]
    items += [slice(None)] * (info.ndim - sum(1 for it in items if it is not None))
    out = TensorInfo(shape)
    zero = set()
    src = dst = 0
    for it in items:
        if it is None:
            dst += 1
            continue
        ids = info.track.get(src)
        if isinstance(it, int):
            if ids is not None:
                state.pin(ids, f"{node.name} picks one channel")
            src += 1
            continue
        if isinstance(it, fx.Node):  # one index tensor on this axis: its shape replaces the axis
            if ids is not None:
                state.pin(ids, f"{node.name} gathers channels with an index tensor")
            index_meta = out_shape(it)
            src += 1
            dst += len(index_meta) if isinstance(index_meta, tuple) else 1
            continue
        if ids is not None:
            if any(isinstance(b, fx.Node) for b in (it.start, it.stop, it.step)):
                state.pin(ids, f"{node.name} slices channels at bounds known only at run time")
            elif it.step not in (None, 1):
                state.pin(ids, f"{node.name} slices channels with a step")
            else:
                out.track[dst] = ids[slice(it.start, it.stop)]
                if src in info.zero:
                    zero.add(dst)
        src += 1
        dst += 1
    out.zero = frozenset(zero)
    return out


@register_method("size", "dim", "numel", "nelement", "data_ptr", "stride", "is_contiguous", "element_size", "get_device")
@register_function(getattr, len, torch.numel)
def metadata(state: AnalysisState, node: fx.Node) -> Any:
    """Shape and dtype queries: no tensor flows out, no channel is constrained."""
    return None


@register_method("new_zeros", "new_ones", "new_empty", "new_full", rewrite=rewrite_shape_args)
def new_tensor(state: AnalysisState, node: fx.Node) -> Any:
    """``x.new_zeros(sizes)``: a new tensor of the given sizes; only the dtype and device come
    from ``x``, so its channels are not constrained. A size read from a channel axis is rewritten
    by the speedup; a tensor made this way and then combined with channels pins them there."""
    return untracked_like(node)
