"""Handlers for element-wise ops of several tensors (sums, maxima, products, quotients, powers,
``where``, ``masked_fill``, ``addcmul``, ``lerp``) and where their removed channels stay zero."""
from __future__ import annotations

import operator
from collections.abc import Callable
from typing import Any

import torch
from torch import fx

from ._ops_common import arg, combine_elementwise, is_number, out_shape, zero_axes
from ._registry import register_function, register_method
from ._tracking import AnalysisState, TensorInfo

ZeroRule = Callable[[tuple[int, ...]], frozenset[int]]


def _combine(state: AnalysisState, node: fx.Node, zero: ZeroRule) -> TensorInfo | None:
    """Unite the operands' channels; ``zero(shape)``: the result's axes on which removed channels
    stay zero (``TensorInfo.zero``)."""
    shape = out_shape(node)
    if not isinstance(shape, tuple):
        return None  # arithmetic on Python numbers (shapes)
    operands = [state.info(a) for a in node.args] + [state.info(v) for v in node.kwargs.values()]
    out = combine_elementwise(state, node, operands, shape)
    out.zero = zero(out.shape)
    return out


@register_function(operator.add, operator.sub, operator.iadd, torch.add, torch.sub, torch.maximum, torch.minimum)
@register_method("add", "add_", "sub", "sub_", "maximum", "minimum")
def additive(state: AnalysisState, node: fx.Node) -> Any:
    """Sums, differences, maxima: removed channels stay zero where both operands are zero there
    (``y + 1.0`` or a bias broadcast along the channels makes them non-zero)."""
    return _combine(state, node, lambda shape: zero_axes(state, [arg(node, 0, "input"), arg(node, 1, "other")], shape))


@register_function(operator.mul, operator.imul, torch.mul)
@register_method("mul", "mul_")
def multiplicative(state: AnalysisState, node: fx.Node) -> Any:
    """Products: zero where either operand is zero (gating, layer scales)."""
    return _combine(state, node, lambda shape: zero_axes(state, [arg(node, 0, "input"), arg(node, 1, "other")], shape, every=False))


@register_function(operator.truediv, operator.floordiv, torch.div)
@register_method("div", "div_")
def dividing(state: AnalysisState, node: fx.Node) -> Any:
    """Quotients: zero where the dividend is zero."""
    return _combine(state, node, lambda shape: zero_axes(state, [arg(node, 0, "input")], shape))


@register_function(operator.pow)
def power(state: AnalysisState, node: fx.Node) -> Any:
    """``x ** e``: zero where ``x`` is, for a literal exponent above zero."""

    def zero(shape: tuple[int, ...]) -> frozenset[int]:
        exponent = node.args[1]
        return zero_axes(state, [node.args[0]], shape) if is_number(exponent) and exponent > 0 else frozenset()

    return _combine(state, node, zero)


@register_function(torch.where)
@register_method("where")
def select(state: AnalysisState, node: fx.Node) -> Any:
    """``torch.where(condition, input, other)`` (``input.where(condition, other)``): zero where
    both choices are."""
    chosen = node.args[0] if node.op == "call_method" else arg(node, 1, "input")
    return _combine(state, node, lambda shape: zero_axes(state, [chosen, arg(node, 2, "other")], shape))


@register_method("masked_fill")
def masked_fill(state: AnalysisState, node: fx.Node) -> Any:
    """``x.masked_fill(mask, value)``: zero where ``x`` is, when ``value`` is zero."""
    return _combine(state, node, lambda shape: zero_axes(state, [node.args[0], arg(node, 2, "value")], shape))


@register_function(torch.addcmul)
@register_method("addcmul")
def addcmul(state: AnalysisState, node: fx.Node) -> Any:
    """``input + value * tensor1 * tensor2``: zero where ``input`` is and either factor is."""

    def zero(shape: tuple[int, ...]) -> frozenset[int]:
        product = zero_axes(state, [arg(node, 1, "tensor1"), arg(node, 2, "tensor2")], shape, every=False)
        return zero_axes(state, [arg(node, 0, "input")], shape) & product

    return _combine(state, node, zero)


@register_function(torch.lerp)
def lerp(state: AnalysisState, node: fx.Node) -> Any:
    """``input + weight * (end - input)``: zero where ``input`` and ``end`` are."""
    return _combine(state, node, lambda shape: zero_axes(state, [arg(node, 0, "input"), arg(node, 1, "end")], shape))
