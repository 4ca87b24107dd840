"""Concrete tracing: symbolic tracing that also runs every op on the example inputs.

Used by :func:`graph_passes.trace` only when plain symbolic tracing fails. Each proxy carries the
value its op computes for the example inputs, so Python control flow on tensors (``if x.ndim !=
4``, ``if mask.any()``), ``len()``, unpacking and ``int(t.item())`` take the value of the example
and the graph records the branch taken: the result is specialised to inputs of the example's
shapes. Decisions on the *values* of the inputs (``if x.sum() > 0``) would not hold for other
inputs and are refused: values are followed from the inputs, and only shapes, parameters,
buffers and what is computed from them alone may decide. Ops that stay tensor-valued are still recorded as graph nodes, so the traced module
computes on new inputs like the model does along that branch.
"""
from __future__ import annotations

import contextlib
import inspect
from typing import Any, ContextManager, Iterator

import torch
from torch import fx, nn

__all__ = ["ConcreteProxy", "concrete_tracer"]


_METADATA = ("shape", "ndim", "dtype", "device", "is_cuda", "layout", "size", "dim", "numel", "nelement", "get_device")
_FACTORIES = ("arange", "zeros", "ones", "empty", "full", "eye", "rand", "randn", "randint", "linspace", "tensor")


class ConcreteProxy(fx.Proxy):
    """A proxy whose Python-level uses (truth, length, iteration, numbers) read its example value."""

    @property
    def value(self) -> Any:
        return self.tracer.concrete_values[self.node]  # type: ignore[attr-defined]

    def _decided(self, what: str) -> Any:
        """The example value, for a Python-level decision; refused when it depends on the values
        (not just the shapes) of the inputs, where the branch taken would not hold for others."""
        if self.node in self.tracer.input_dependent:  # type: ignore[attr-defined]
            raise fx.proxy.TraceError(f"{what} of {self.node.name} depends on the values of the inputs")
        return self.value

    def __bool__(self) -> bool:
        return bool(self._decided("truth value"))

    def __len__(self) -> int:
        return len(self.value)  # a length is a shape: it holds for every input of this shape

    def __int__(self) -> int:
        return int(self._decided("int()"))

    def __index__(self) -> int:
        return int(self._decided("index"))

    def __float__(self) -> float:
        return float(self._decided("float()"))

    def __contains__(self, item: Any) -> bool:
        return item in self._decided("membership")

    def __iter__(self) -> Iterator[Any]:
        return iter([self[i] for i in range(len(self.value))])

    def __getattr__(self, k: str) -> Any:
        if k.startswith("__"):
            raise AttributeError(k)
        attr = getattr(self.value, k)
        if callable(attr):  # a method: recorded as call_method when it is called
            return fx.proxy.Attribute(self, k)
        return self.tracer.create_proxy("call_function", getattr, (self, k), {})


def concrete_tracer(base: type[fx.Tracer]) -> type[fx.Tracer]:
    """A subclass of the tracer class ``base`` that runs every recorded op on example inputs;
    construct it with ``example_inputs=(...)`` besides ``base``'s own arguments."""

    class ConcreteTracer(base):  # type: ignore[misc, valid-type]
        def __init__(self, *args: Any, example_inputs: tuple[Any, ...] = (), **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            self.example_inputs = example_inputs
            self.concrete_values: dict[fx.Node, Any] = {}
            self.input_dependent: set[fx.Node] = set()  # nodes whose values follow the inputs' values
            self._placeholders: dict[str, Any] = {}

        def trace(self, root: nn.Module, concrete_args: dict[str, Any] | None = None) -> fx.Graph:
            names = [p.name for p in inspect.signature(root.forward).parameters.values()]
            self._placeholders = {n: _clone(v) for n, v in zip(names, self.example_inputs)}
            saved = {n: getattr(torch, n) for n in _FACTORIES}
            try:
                for n, fn in saved.items():  # sizes given as proxies: record the call
                    setattr(torch, n, self._factory(fn))
                with torch.no_grad():
                    return super().trace(root, concrete_args)
            finally:
                for n, fn in saved.items():
                    setattr(torch, n, fn)

        def _factory(self, fn: Any) -> Any:
            def wrapper(*args: Any, **kwargs: Any) -> Any:
                found: list[bool] = []
                fx.node.map_aggregate((args, kwargs), lambda v: found.append(isinstance(v, fx.Proxy)))
                if any(found):
                    return self.create_proxy("call_function", fn, args, kwargs)
                return fn(*args, **kwargs)
            return wrapper

        def getattr(self, attr: str, attr_val: Any, parameter_proxy_cache: dict[str, Any]) -> Any:
            """Buffers become proxies too, so that methods called on them with proxy sizes
            (``inv_freq.expand(B, -1, 1)``) are recorded rather than run on the real tensor."""
            if isinstance(attr_val, torch.Tensor) and not isinstance(attr_val, nn.Parameter):
                for name, buf in self.root.named_buffers():
                    if buf is attr_val:
                        if name not in parameter_proxy_cache:
                            parameter_proxy_cache[name] = self.create_proxy("get_attr", name, (), {})
                        return parameter_proxy_cache[name]
            return super().getattr(attr, attr_val, parameter_proxy_cache)

        def proxy(self, node: fx.Node) -> fx.Proxy:
            return ConcreteProxy(node, self)

        def create_proxy(self, kind: str, target: Any, args: tuple[Any, ...], kwargs: dict[str, Any],
                         name: str | None = None, type_expr: Any | None = None, proxy_factory_fn: Any = None) -> fx.Proxy:
            value = self._run(kind, target, args, kwargs)
            proxy = super().create_proxy(kind, target, args, kwargs, name, type_expr, proxy_factory_fn)
            self.concrete_values[proxy.node] = value
            if self._input_dependent(kind, target, proxy.node, value):
                self.input_dependent.add(proxy.node)
            return proxy

        def _input_dependent(self, kind: str, target: Any, node: fx.Node, value: Any) -> bool:
            if kind == "placeholder":
                return isinstance(value, torch.Tensor)
            if kind == "call_function" and target is getattr and node.args[1] in _METADATA:
                return False
            if kind == "call_method" and target in _METADATA:
                return False
            return any(n in self.input_dependent for n in node.all_input_nodes)

        def _run(self, kind: str, target: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
            if kind == "placeholder":
                return self._placeholders.get(str(target), args[0] if args else None)
            if kind == "get_attr":
                value: Any = self.root
                for part in str(target).split("."):
                    value = _plain_getattr(value, part)
                return value
            if kind == "output":
                return None
            a, kw = self._concrete(args), self._concrete(kwargs)
            with _unpatched():  # fx patches Module.__call__/__getattr__ while tracing
                if kind == "call_function":
                    return target(*a, **kw)
                if kind == "call_method":
                    return getattr(a[0], target)(*a[1:], **kw)
                if kind == "call_module":
                    return self.root.get_submodule(target)(*a, **kw)
            raise ValueError(f"unknown node kind {kind}")

        def _concrete(self, value: Any) -> Any:
            if isinstance(value, fx.Proxy):
                return self.concrete_values[value.node]
            if isinstance(value, torch.Size):
                return value
            if isinstance(value, tuple) and hasattr(value, "_fields"):  # named tuple
                return type(value)(*(self._concrete(v) for v in value))
            if isinstance(value, (list, tuple)):
                return type(value)(self._concrete(v) for v in value)
            if isinstance(value, dict):
                return {k: self._concrete(v) for k, v in value.items()}
            if isinstance(value, slice):
                return slice(self._concrete(value.start), self._concrete(value.stop), self._concrete(value.step))
            return value

    return ConcreteTracer


def _unpatched() -> ContextManager[None]:
    revert = getattr(fx._symbolic_trace, "_maybe_revert_all_patches", None)
    return revert() if revert is not None else contextlib.nullcontext()


def _plain_getattr(obj: Any, name: str) -> Any:
    """``getattr`` past fx's patched ``nn.Module.__getattr__`` (which would record a node)."""
    if isinstance(obj, nn.Module):
        for table in (obj._parameters, obj._buffers, obj._modules):
            if name in table:
                return table[name]
    return object.__getattribute__(obj, name)


def _clone(value: Any) -> Any:
    return value.clone() if isinstance(value, torch.Tensor) else value
