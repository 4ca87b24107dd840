"""One computation of the leaf modules for both runs of :func:`graph_passes.trace`'s check.

``trace`` runs the traced module once (shape propagation) and compares its outputs with the
model's own (eager) outputs on the same inputs. Both runs call the same leaf modules (the traced
module holds the model's very conv, linear and norm objects), and those calls are nearly all of
the time, so the eager run does not compute them again: while the traced module runs,
:class:`LeafCalls` records every leaf call (inputs and output); while the eager model runs, each
call of a leaf module is matched with that module's next recorded call and, where its inputs are
the recorded ones, gets the recorded output. The eager outputs stay what the model computes, as
long as a leaf module computes the same output from the same inputs (both runs are in eval mode,
without gradients):

- inputs match when they are the recorded tensors unchanged since (version counters), views of
  the same elements, outputs of eager calls that were computed again on matching inputs (a norm
  whose recorded output an in-place activation changed since, that activation: they hold what the
  recorded outputs held), or tensors of the same type, shape, strides, dtype and device with
  equal values; every other argument must be an equal constant (``None``, a number, a dtype, ...);
- a recorded output is given only while it is unchanged (an in-place op after the call, such as
  ``x += shortcut`` or an in-place activation, changed it: the call is computed), never where it
  shares memory with the call's inputs (in-place modules), and only when it is a tensor or a
  tuple of tensors and constants. Anything else is computed, as are calls past the recorded ones
  and, past ``budget`` bytes of recorded outputs, the rest.
"""
from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch import fx, nn

from ._registry import node_module

__all__ = ["LeafCalls"]

_CONSTANTS = (type(None), bool, int, float, str, torch.dtype, torch.device, torch.layout, torch.memory_format)


def _flatten(value: Any, leaves: list[Any]) -> Any:
    """The container structure of ``value`` (types, dict keys); its leaves appended to ``leaves``."""
    if isinstance(value, (tuple, list)):
        return type(value), tuple(_flatten(v, leaves) for v in value)
    if isinstance(value, dict):
        return type(value), tuple(value), tuple(_flatten(v, leaves) for v in value.values())
    leaves.append(value)
    return None


def _storages(tensors: list[torch.Tensor]) -> set[int]:
    return {t.untyped_storage().data_ptr() for t in tensors}


class _Call:
    """One recorded call: its inputs (structure, leaves, the tensors' versions) and output, and
    whether the output may be given back (not where it shares memory with the inputs)."""

    __slots__ = ("structure", "inputs", "versions", "output", "outputs", "out_versions", "replayable")

    def __init__(self, structure: Any, inputs: list[Any], versions: list[int | None], output: Any,
                 outputs: list[torch.Tensor], replayable: bool) -> None:
        self.structure, self.inputs, self.versions = structure, inputs, versions
        self.output, self.outputs, self.replayable = output, outputs, replayable
        self.out_versions = [t._version for t in outputs]

    def matches(self, args: tuple[Any, ...], kwargs: dict[str, Any], same: _Same, read: bool) -> bool:
        """The inputs are the recorded ones (``read``: values may be compared, else only known)."""
        leaves: list[Any] = []
        if _flatten((args, kwargs), leaves) != self.structure:
            return False
        for value, recorded, version in zip(leaves, self.inputs, self.versions):
            if version is None:
                if type(value) is not type(recorded) or value != recorded:
                    return False
            elif type(value) is not type(recorded) or not _holds(value, recorded, version, same, read):
                return False
        return True

    def unchanged(self) -> bool:
        return all(t._version == v for t, v in zip(self.outputs, self.out_versions))


# Eager tensors known to hold what recorded ones held: id(eager) -> (eager, its version, recorded,
# the recorded one's version then). A call computed again on inputs that match its record gives
# the recorded outputs' values (a norm before an in-place activation, the activation itself).
_Same = dict[int, tuple[torch.Tensor, int, torch.Tensor, int]]


def _holds(value: torch.Tensor, recorded: torch.Tensor, version: int, same: _Same, read: bool) -> bool:
    """``value`` holds now what ``recorded`` held at ``version``."""
    known = same.get(id(value))
    if known is not None and known[0] is value and known[1] == value._version and known[2] is recorded and known[3] == version:
        return True
    if recorded._version != version:
        return False
    return value is recorded or _same_memory(value, recorded) or read and _equal(value, recorded)


def _same_memory(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Views of the same elements (two ``permute``s of one tensor): equal without reading them."""
    return (a.untyped_storage().data_ptr() == b.untyped_storage().data_ptr() and a.storage_offset() == b.storage_offset()
            and a.shape == b.shape and a.stride() == b.stride() and a.dtype == b.dtype and a.device == b.device)


def _equal(a: torch.Tensor, b: torch.Tensor) -> bool:
    return (a.shape == b.shape and a.stride() == b.stride() and a.dtype == b.dtype and a.device == b.device
            and a.layout == torch.strided and b.layout == torch.strided and torch.equal(a, b))


def _tensors(output: Any) -> list[torch.Tensor]:
    return [p for p in (output if type(output) is tuple else (output,)) if isinstance(p, torch.Tensor)]


class LeafCalls:
    """The calls of the leaf modules of ``gm`` (its ``call_module`` targets): recorded while
    :meth:`recording`, given back while :meth:`replaying` (see the module docstring)."""

    def __init__(self, gm: fx.GraphModule, budget: int = 1 << 30) -> None:
        modules = {id(m): m for m in (node_module(gm, n) for n in gm.graph.nodes if n.op == "call_module")}
        self.modules = [m for m in modules.values() if not isinstance(m, torch.jit.ScriptModule)]
        self.calls: dict[int, list[_Call | None]] = {id(m): [] for m in self.modules}
        self.budget = budget
        self.same: _Same = {}

    def recording(self) -> contextlib.AbstractContextManager[None]:
        return _patched(self.modules, self._recorder)

    def replaying(self) -> contextlib.AbstractContextManager[None]:
        return _patched(self.modules, self._replayer)

    def _recorder(self, module: nn.Module, forward: Callable[..., Any]) -> Callable[..., Any]:
        calls = self.calls[id(module)]

        def record(*args: Any, **kwargs: Any) -> Any:
            inputs: list[Any] = []
            structure = _flatten((args, kwargs), inputs)
            versions = [t._version if isinstance(t, torch.Tensor) else None for t in inputs]
            output = forward(*args, **kwargs)
            calls.append(self._entry(structure, inputs, versions, output))
            return output

        return record

    def _entry(self, structure: Any, inputs: list[Any], versions: list[int | None], output: Any) -> _Call | None:
        """The record of a call, or None where nothing can be learnt from it."""
        if not all(isinstance(v, torch.Tensor) or type(v) in _CONSTANTS for v in inputs):
            return None
        parts = output if type(output) is tuple else (output,)
        outputs = _tensors(output)
        if not outputs or any(not isinstance(p, torch.Tensor) and type(p) not in _CONSTANTS for p in parts):
            return None
        tensors = [t for t in inputs if isinstance(t, torch.Tensor)]
        if any(t.layout != torch.strided for t in tensors + outputs):
            return None
        try:
            if _storages(tensors) & _storages(outputs):  # in place: never given back, but it tells what it computes
                return _Call(structure, inputs, versions, output, outputs, replayable=False)
        except (RuntimeError, NotImplementedError):  # a tensor without storage (a subclass)
            return None
        self.budget -= sum(t.nbytes for t in outputs)
        return _Call(structure, inputs, versions, output, outputs, replayable=True) if self.budget >= 0 else None

    def _replayer(self, module: nn.Module, forward: Callable[..., Any]) -> Callable[..., Any]:
        calls = iter(self.calls[id(module)])

        def replay(*args: Any, **kwargs: Any) -> Any:
            call = next(calls, None)
            if call is None:
                return forward(*args, **kwargs)
            replayable = call.replayable and call.unchanged()
            if not call.matches(args, kwargs, self.same, read=replayable):  # values read only to save the call
                return forward(*args, **kwargs)
            if replayable:
                return call.output
            output = forward(*args, **kwargs)  # what the record computed, changed since or in place
            computed = _tensors(output)
            if len(computed) == len(call.outputs):
                for mine, theirs, version in zip(computed, call.outputs, call.out_versions):
                    if mine.shape == theirs.shape:
                        self.same[id(mine)] = (mine, mine._version, theirs, version)
            return output

        return replay


@contextlib.contextmanager
def _patched(modules: list[nn.Module], wrap: Callable[[nn.Module, Callable[..., Any]], Callable[..., Any]]) -> Iterator[None]:
    """Each module's ``forward`` replaced by ``wrap(module, forward)`` (an instance attribute,
    which ``nn.Module.__call__`` calls, hooks and all), restored on exit."""
    saved: list[tuple[nn.Module, bool, Any]] = []
    try:
        for m in modules:
            own = m.__dict__.get("forward")
            saved.append((m, "forward" in m.__dict__, own))
            m.__dict__["forward"] = wrap(m, m.forward)
        yield
    finally:
        for m, had, own in saved:
            if had:
                m.__dict__["forward"] = own
            else:
                m.__dict__.pop("forward", None)
