"""Op registry: node target (module type, function, method name) -> handler.

A handler has ``analyze(state, node) -> info`` (channel tracking, members, costs) and may have
``rewrite(ctx, node)`` (speedup: fix constants that depend on channel counts) and, for module
types, ``shrink(module, keep) -> module`` (build the smaller module). Ops without a handler are
never treated as element-wise: the analysis pins their channels and records why.
"""
from __future__ import annotations

import operator
from dataclasses import dataclass
from typing import Any, Callable, Optional

import torch
from torch import fx, nn

__all__ = ["OpHandler", "register_module", "register_function", "register_method", "lookup", "describe_target"]


@dataclass(frozen=True)
class OpHandler:
    analyze: Callable[..., Any]
    rewrite: Optional[Callable[..., None]] = None
    shrink: Optional[Callable[..., nn.Module]] = None


_MODULES: dict[type, OpHandler] = {}
_FUNCTIONS: dict[Any, OpHandler] = {}
_METHODS: dict[str, OpHandler] = {}


def _register(table: dict, keys: tuple, analyze: Callable, rewrite: Optional[Callable], shrink: Optional[Callable]) -> None:
    handler = OpHandler(analyze, rewrite, shrink)
    for key in keys:
        table[key] = handler


def register_module(*types: type, rewrite: Optional[Callable] = None, shrink: Optional[Callable] = None) -> Callable:
    """Decorator: ``analyze`` handler for modules of exactly these types (not subclasses)."""

    def deco(fn: Callable) -> Callable:
        _register(_MODULES, types, fn, rewrite, shrink)
        return fn

    return deco


def register_function(*functions: Any, rewrite: Optional[Callable] = None) -> Callable:
    def deco(fn: Callable) -> Callable:
        _register(_FUNCTIONS, functions, fn, rewrite, None)
        return fn

    return deco


def register_method(*names: str, rewrite: Optional[Callable] = None) -> Callable:
    def deco(fn: Callable) -> Callable:
        _register(_METHODS, names, fn, rewrite, None)
        return fn

    return deco


def lookup(gm: fx.GraphModule, node: fx.Node) -> Optional[OpHandler]:
    if node.op == "call_module":
        return _MODULES.get(type(gm.get_submodule(str(node.target))))
    if node.op == "call_function":
        return _FUNCTIONS.get(node.target)
    if node.op == "call_method":
        return _METHODS.get(str(node.target))
    return None


def module_types() -> frozenset[type]:
    return frozenset(_MODULES)


def describe_target(gm: fx.GraphModule, node: fx.Node) -> str:
    if node.op == "call_module":
        return f"module {node.target} ({type(gm.get_submodule(str(node.target))).__qualname__})"
    if node.op == "call_function":
        target = node.target
        return f"function {getattr(target, '__module__', '?')}.{getattr(target, '__qualname__', target)}"
    if node.op == "call_method":
        return f"method Tensor.{node.target}"
    return f"{node.op} {node.target}"


# operator module functions fx records for Python operators on proxies
BINARY_OPERATORS = (operator.add, operator.sub, operator.mul, operator.truediv, operator.floordiv, operator.pow, operator.iadd, operator.imul)
TORCH_BINARY = (torch.add, torch.sub, torch.mul, torch.div, torch.maximum, torch.minimum, torch.where)
