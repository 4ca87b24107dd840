"""Op registry: node target (module type, function, method name) -> everything known about the op.

An :class:`OpHandler` holds, for one op, the channel rule (``analyze``), what the speedup does
to it (``rewrite``: constants in the graph; ``shrink``: a module's size attributes), and whether
it moves data (``view``, for the cost model). Module types that are traced *through* (their
forward is inlined) but keep sizes in Python attributes their forward reads register an
``eager`` rule instead: it is what the in-place speedup needs for the model's own forward.
Ops without a handler are never treated as element-wise: the analysis pins their channels and
records why.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Mapping, Optional, Protocol

import numpy as np
from torch import fx, nn

from ._tracking import AnalysisState, TensorInfo

__all__ = [
    "OpHandler", "Keeper", "register_module", "register_function", "register_method", "register_eager", "lookup",
    "module_handler", "eager_rule", "describe_target", "module_types", "node_module",
]


class Keeper(Protocol):
    """What a rewrite rule asks the speedup: which elements stay, and a tensor's pruned shape."""

    def kept(self, ids: np.ndarray) -> np.ndarray: ...

    def new_shape(self, info: TensorInfo) -> tuple[int, ...]: ...


Analyze = Callable[[AnalysisState, fx.Node], Any]
Rewrite = Callable[[fx.GraphModule, fx.Node, Keeper], None]
Shrink = Callable[[nn.Module, nn.Module], None]
Freeze = Callable[[nn.Module, Mapping[str, Mapping[int, Any]]], Optional[nn.Module]]
Eager = Callable[[nn.Module], "dict[str, Any] | nn.Module"]


@dataclass(frozen=True)
class OpHandler:
    """``analyze(state, node) -> info``: channel tracking, members, costs.
    ``rewrite(gm, node, keeper)``: after the parameters were sliced, make the node fit the pruned
    tensors (size arguments, slice bounds, split sizes, attention scale, norms whose statistics
    span removed channels); ``None`` when nothing in the node depends on channel counts.
    ``shrink(module, old)``: module types only; set the size attributes (``in_channels``,
    ``num_features``, ...) of ``module`` after its tensors were sliced, ``old`` being a shallow
    copy from before. ``freeze(module, slices) -> module or None``: module types whose layer
    weight is computed from their parameters (weight standardisation); given the slices about to
    be taken (``{tensor: {dim: index}}``), a plain layer computing the same to slice instead, where
    slicing the parameters would change the computed weight. ``view``: the op's result is a view
    of its input (moves no data)."""

    analyze: Analyze
    rewrite: Optional[Rewrite] = None
    shrink: Optional[Shrink] = None
    view: bool = False
    freeze: Optional[Freeze] = None


_MODULES: dict[type, OpHandler] = {}
_FUNCTIONS: dict[Any, OpHandler] = {}
_METHODS: dict[str, OpHandler] = {}
_EAGER: dict[type, Eager] = {}


def _register(table: dict, keys: tuple, handler: OpHandler) -> None:
    for key in keys:
        table[key] = handler


def register_module(*types: type, rewrite: Optional[Rewrite] = None, shrink: Optional[Shrink] = None,
                    view: bool = False, freeze: Optional[Freeze] = None) -> Callable[[Analyze], Analyze]:
    """Decorator: the handler of modules of exactly these types (not subclasses)."""

    def deco(fn: Analyze) -> Analyze:
        _register(_MODULES, types, OpHandler(fn, rewrite, shrink, view, freeze))
        return fn

    return deco


def register_function(*functions: Any, rewrite: Optional[Rewrite] = None, view: bool = False) -> Callable[[Analyze], Analyze]:
    def deco(fn: Analyze) -> Analyze:
        _register(_FUNCTIONS, functions, OpHandler(fn, rewrite, None, view))
        return fn

    return deco


def register_method(*names: str, rewrite: Optional[Rewrite] = None, view: bool = False) -> Callable[[Analyze], Analyze]:
    def deco(fn: Analyze) -> Analyze:
        _register(_METHODS, names, OpHandler(fn, rewrite, None, view))
        return fn

    return deco


def register_eager(*types: type) -> Callable[[Eager], Eager]:
    """Decorator: ``fix(module) -> {attribute: value}`` for module types that are traced through
    and whose forward reads sizes from Python attributes (an attention's ``head_dim``), or
    ``fix(module) -> replacement module`` where the forward itself cannot follow (a layer norm
    whose statistics must count removed channels). Called on the pruned model (its tensors and
    submodules already smaller) by the in-place speedup."""

    def deco(fn: Eager) -> Eager:
        for t in types:
            _EAGER[t] = fn
        return fn

    return deco


def node_module(gm: fx.GraphModule, node: fx.Node) -> nn.Module:
    """The module a ``call_module`` node calls: ``gm.get_submodule(node.target)`` read straight
    from the module dicts (the analysis asks some thousand times per model), torch's own walk,
    with its messages, where that fails."""
    target = str(node.target)
    module: Any = gm
    try:
        for name in target.split("."):
            module = module._modules[name]
    except (AttributeError, KeyError):
        return gm.get_submodule(target)
    return module if isinstance(module, nn.Module) else gm.get_submodule(target)


def lookup(gm: fx.GraphModule, node: fx.Node) -> Optional[OpHandler]:
    if node.op == "call_module":
        return _MODULES.get(type(node_module(gm, node)))
    if node.op == "call_function":
        return _FUNCTIONS.get(node.target)
    if node.op == "call_method":
        return _METHODS.get(str(node.target))
    return None


def module_handler(module: nn.Module | type) -> Optional[OpHandler]:
    """The entry of a module (or module type), exact type."""
    return _MODULES.get(module if isinstance(module, type) else type(module))


def eager_rule(module: nn.Module) -> Optional[Eager]:
    return _EAGER.get(type(module))


def module_types() -> frozenset[type]:
    return frozenset(_MODULES)


def describe_target(gm: fx.GraphModule, node: fx.Node) -> str:
    if node.op == "call_module":
        return f"module {node.target} ({type(node_module(gm, node)).__qualname__})"
    if node.op == "call_function":
        target = node.target
        return f"function {getattr(target, '__module__', '?')}.{getattr(target, '__qualname__', target)}"
    if node.op == "call_method":
        return f"method Tensor.{node.target}"
    return f"{node.op} {node.target}"
