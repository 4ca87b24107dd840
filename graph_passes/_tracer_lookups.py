"""Look-ups that ``torch.fx.Tracer`` repeats at every use, made once per trace for
:class:`~graph_passes.HarpTracer` (the graph is the same: fx's own names, nodes and proxies).

- A parameter read in a traced forward (ConvNeXt's layer scale ``self.gamma``, ViT's position
  embedding) is named by walking the model's parameters until it turns up, at every read
  (``Tracer.getattr``); here the names are indexed once.
- Unpacking a proxy (``q, k, v = qkv.unbind(0)``, ``B, N, C = x.shape``) disassembles the whole
  calling function to learn how many values are unpacked, at every unpacking
  (``Proxy.__iter__``); here each function is disassembled once.
"""
from __future__ import annotations

import dis
import inspect
import sys
from bisect import bisect_left
from collections.abc import Iterator
from types import CodeType
from typing import Any

from torch import fx, nn
from torch.fx.proxy import Attribute, ParameterProxy

__all__ = ["LookupsOnce"]


class _Proxy(fx.Proxy):
    """``fx.Proxy`` whose unpacking reads the caller's instructions from the tracer's cache."""

    def __iter__(self) -> Iterator[fx.Proxy]:
        frame = inspect.currentframe()
        caller = frame.f_back if frame is not None else None
        if caller is None:
            return super().__iter__()
        instruction = self.tracer.instruction_at(caller.f_code, caller.f_lasti)  # type: ignore[attr-defined]
        if instruction.opname == "UNPACK_SEQUENCE":  # as many items as the unpacking takes
            return (self[i] for i in range(instruction.argval))  # type: ignore[index]
        return self.tracer.iter(self)  # anything else: fx's refusal

    def __getattr__(self, k: str) -> Attribute:
        return _Attribute(self, k)


class _Attribute(Attribute, _Proxy):
    """fx's lazily recorded attribute of a proxy (``x.shape``), unpacked like :class:`_Proxy`."""


class LookupsOnce(fx.Tracer):
    """Mixin for ``fx.Tracer`` subclasses; see the module docstring."""

    def trace(self, root: Any, concrete_args: dict[str, Any] | None = None) -> fx.Graph:
        self._parameter_names: dict[int, str] | None = None
        self._instructions: dict[CodeType, tuple[list[dis.Instruction], list[int]]] = {}
        return super().trace(root, concrete_args)

    def proxy(self, node: fx.Node) -> fx.Proxy:
        return _Proxy(node, self)

    def instruction_at(self, code: CodeType, offset: int) -> dis.Instruction:
        """The instruction of ``code`` that runs at ``offset`` (a frame's ``f_lasti``), as fx finds it."""
        cached = self._instructions.get(code)
        if cached is None:
            listed = list(dis.get_instructions(code))
            cached = self._instructions[code] = (listed, [i.offset for i in listed])
        listed, offsets = cached
        return listed[bisect_left(offsets, offset) if sys.version_info >= (3, 11) else offset // 2]

    def getattr(self, attr: str, attr_val: Any, parameter_proxy_cache: dict[str, Any]) -> Any:
        if isinstance(attr_val, nn.Parameter):
            if self._parameter_names is None:  # the first name of each, in named_parameters' order
                self._parameter_names = {}
                for name, p in self.root.named_parameters():
                    self._parameter_names.setdefault(id(p), name)
            name = self._parameter_names.get(id(attr_val))
            if name is not None:
                if name not in parameter_proxy_cache:
                    factory = (lambda node: ParameterProxy(self, node, name, attr_val)) if self.param_shapes_constant else None
                    parameter_proxy_cache[name] = self.create_proxy("get_attr", name, (), {}, proxy_factory_fn=factory)
                return parameter_proxy_cache[name]
        return super().getattr(attr, attr_val, parameter_proxy_cache)
