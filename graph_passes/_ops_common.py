"""Helpers shared by the op handlers: argument access, shapes, element-wise alignment."""
from __future__ import annotations

from typing import Any, Sequence

import numpy as np
from torch import fx

from ._tracking import AnalysisState, ParamOrigin, TensorInfo
from .errors import MissingAnalysisError

__all__ = ["arg", "out_shape", "untracked_like", "combine_elementwise", "zero_axes", "norm_axis", "axes_of", "is_number"]


def arg(node: fx.Node, index: int, name: str, default: Any = None) -> Any:
    """Argument ``name`` of a call, given by keyword or at position ``index``."""
    if name in node.kwargs:
        return node.kwargs[name]
    if index < len(node.args):
        return node.args[index]
    return default


def out_shape(node: fx.Node) -> Any:
    """Shape (tuple) of a node's tensor output, or a list of shapes for tuple outputs."""
    meta = node.meta.get("tensor_meta")
    if meta is None:
        if node.op == "output":
            return None
        raise MissingAnalysisError(f"node {node.name} has no tensor_meta: run graph_passes.trace (ShapeProp) first")
    return _shape_of(meta)


def _shape_of(meta: Any) -> Any:
    if hasattr(meta, "shape"):
        return tuple(int(s) for s in meta.shape)
    if isinstance(meta, (list, tuple)):
        return [_shape_of(m) for m in meta]
    if isinstance(meta, dict):
        return {k: _shape_of(v) for k, v in meta.items()}
    return None


def untracked_like(node: fx.Node) -> Any:
    """A value with the node's output shapes and no tracked channels."""
    meta = node.meta.get("tensor_meta")
    if meta is None:
        return None
    return _untracked(_shape_of(meta))


def _untracked(shape: Any) -> Any:
    if isinstance(shape, tuple):
        return TensorInfo(shape)
    if isinstance(shape, list):
        return [_untracked(s) for s in shape]
    return None


def is_number(value: Any) -> bool:
    """A literal int or float (not a bool)."""
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def norm_axis(axis: int, ndim: int) -> int:
    return axis + ndim if axis < 0 else axis


def axes_of(dims: Any, ndim: int) -> list[int]:
    if dims is None:
        return list(range(ndim))
    if isinstance(dims, int):
        return [norm_axis(dims, ndim)]
    return [norm_axis(int(d), ndim) for d in dims]


def combine_elementwise(state: AnalysisState, node: fx.Node, operands: Sequence[Any], shape: tuple[int, ...]) -> TensorInfo:
    """Broadcast ``operands`` (TensorInfo or scalars) to ``shape``: channels on the same axis are
    united; a parameter operand becomes a member along that axis; a full-size operand whose
    channels cannot follow pins the tracked channels of that axis."""
    ndim = len(shape)
    result = TensorInfo(shape)
    infos = [op for op in operands if isinstance(op, TensorInfo)]
    for axis in range(ndim):
        tracked: list[np.ndarray] = []
        params: list[tuple[ParamOrigin, int]] = []
        blockers = 0
        for info in infos:
            local = axis - (ndim - info.ndim)
            if local < 0:
                continue
            if info.shape[local] == 1:
                if local in info.track and shape[axis] != 1:  # one channel broadcast over many positions
                    state.pin(info.track[local], f"{node.name} broadcasts a single channel along axis {axis}")
                continue
            if local in info.track:
                tracked.append(info.track[local])
            elif info.origin is not None and info.origin.axes[local] is not None:
                params.append((info.origin, info.origin.axes[local]))
            else:
                blockers += 1
        if not tracked:
            continue
        first = tracked[0]
        for other in tracked[1:]:
            state.unite(first, other)
        for origin, param_dim in params:
            state.member(origin.module, origin.param, param_dim, first, "norm")
        if blockers:
            state.pin(first, f"combined at {node.name} with a tensor whose channels on axis {axis} cannot follow")
        result.track[axis] = first
    return result


def _zero_along(value: Any, axis: int, shape: tuple[int, ...]) -> bool:
    """Whether an operand broadcast to ``shape`` is zero at the removed positions of ``axis``: a
    literal zero; a tensor holding zero there (not one broadcast along the axis: that adds the same
    value to kept and removed channels)."""
    if isinstance(value, (bool, int, float)):
        return value == 0
    if not isinstance(value, TensorInfo):
        return False
    local = axis - (len(shape) - value.ndim)
    if local < 0 or (value.shape[local] == 1 and shape[axis] != 1):
        return False
    return local in value.zero


def zero_axes(state: AnalysisState, operands: Sequence[Any], shape: tuple[int, ...], every: bool = True) -> frozenset[int]:
    """Axes of an element-wise result of ``shape`` on which removed channels stay zero (see
    ``TensorInfo.zero``), given its operands (nodes or literals): where ``every`` operand is zero
    (a sum, a maximum), or otherwise where one of them is (a product)."""
    values = [state.info(v) if isinstance(v, fx.Node) else v for v in operands]
    test = all if every else any
    return frozenset(a for a in range(len(shape)) if values and test(_zero_along(v, a, shape) for v in values))
