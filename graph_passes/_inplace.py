"""The in-place speedup: what changed in the pruned graph put into the user's own model.

The pruned ``GraphModule`` holds the smaller leaf modules (sliced by their registry ``shrink``
rules, or replaced, e.g. by exact-statistics norms) and the sliced tensors of modules it traces
through (class tokens, layer scales). :func:`transfer_ops` lists them as attribute assignments
by module path, so the same list can be applied to a scratch copy of the model (to check it) and
then to the model itself; :func:`eager_ops` adds the sizes that traced-through modules keep in
Python attributes (registry ``eager`` rules); :func:`check_eager` runs the model's own forward
and names the module whose code cannot follow.
"""
from __future__ import annotations

import math
from collections import Counter, defaultdict
from dataclasses import dataclass
from typing import Any, Iterable, Mapping

import torch
from torch import fx, nn

from ._registry import eager_rule
from .errors import SpeedupError
from .tracing import as_tuple, flatten_outputs

__all__ = ["SetAttr", "transfer_ops", "eager_ops", "apply_ops", "check_eager", "outputs_close"]


@dataclass(frozen=True)
class SetAttr:
    """``setattr(root.get_submodule(path), name, value)``: a submodule replaced through its parent,
    a tensor or a size attribute set."""

    path: str
    name: str
    value: Any


def _owner(root: nn.Module, path: str) -> nn.Module:
    return root.get_submodule(path) if path else root


def apply_ops(root: nn.Module, ops: Iterable[SetAttr]) -> None:
    for op in ops:
        setattr(_owner(root, op.path), op.name, op.value)


def transfer_ops(gm: fx.GraphModule, changed: Mapping[str, Iterable[str]]) -> list[SetAttr]:
    """What the eager model needs from the pruned ``gm``: every leaf module the graph calls that
    was sliced, masked or replaced (``changed``: module path -> names of the tensors sliced or
    masked), and the changed tensors of the modules it traces through (those the graph reads)."""
    ops: list[SetAttr] = []
    leaves = dict.fromkeys(str(n.target) for n in gm.graph.nodes if n.op == "call_module")
    for target in leaves:
        if target in changed:
            parent, _, name = target.rpartition(".")
            ops.append(SetAttr(parent, name, gm.get_submodule(target)))
    for path, names in changed.items():
        if path in leaves or any(path.startswith(leaf + ".") for leaf in leaves) or not _has(gm, path):
            continue
        owner = _owner(gm, path)
        ops += [SetAttr(path, name, getattr(owner, name)) for name in sorted(names) if hasattr(owner, name)]
    return ops


def eager_ops(root: nn.Module) -> list[SetAttr]:
    """What the registry's ``eager`` rules change in ``root``'s traced-through modules (tensors
    and submodules already pruned): size attributes, or the module replaced through its parent.
    Applied to ``root`` as they are listed."""
    ops: list[SetAttr] = []
    for path, module in list(root.named_modules()):
        rule = eager_rule(module)
        if rule is None or not path:
            continue
        fix = rule(module)
        if isinstance(fix, nn.Module):
            parent, _, name = path.rpartition(".")
            ops.append(SetAttr(parent, name, fix))
            setattr(_owner(root, parent), name, fix)
            continue
        for name, value in fix.items():
            if getattr(module, name, None) != value:
                ops.append(SetAttr(path, name, value))
                setattr(module, name, value)
    return ops


def outputs_close(got: Any, expected: Any) -> tuple[bool, str]:
    """Same structure and shapes, and every tensor within 1e-4 of the expected one's scale."""
    a, b = flatten_outputs(got), flatten_outputs(expected)
    if len(a) != len(b):
        return False, f"it returns {len(a)} tensors instead of {len(b)}"
    for i, (x, y) in enumerate(zip(a, b)):
        if x.shape != y.shape:
            return False, f"output {i} has shape {tuple(x.shape)} instead of {tuple(y.shape)}"
        err = float((x.float() - y.float()).abs().max()) if x.numel() else 0.0
        scale = float(y.float().abs().max()) if y.numel() else 0.0
        if not err <= 1e-4 * (1.0 + scale) or math.isnan(err):
            return False, f"output {i} differs from the masked model's by up to {err:.3g} (scale {scale:.3g})"
    return True, ""


def _innermost_module(exc: BaseException, names: Mapping[int, str]) -> str | None:
    """The deepest frame of the traceback that runs a method of one of the model's modules."""
    found = None
    tb = exc.__traceback__
    while tb is not None:
        owner = tb.tb_frame.f_locals.get("self")
        if isinstance(owner, nn.Module) and id(owner) in names:
            found = names[id(owner)]
        tb = tb.tb_next
    return found


def _calls(root: nn.Module, targets: Iterable[str], inputs: tuple[Any, ...]) -> list[tuple[str, Any]]:
    """The outputs of the modules ``targets`` in the order ``root``'s forward calls them."""
    calls: list[tuple[str, Any]] = []
    hooks = [root.get_submodule(t).register_forward_hook(lambda m, i, o, t=t: calls.append((t, o)))
             for t in targets if _has(root, t)]
    try:
        with torch.no_grad():
            root(*inputs)
    finally:
        for h in hooks:
            h.remove()
    return calls


def _first_divergence(work: nn.Module, gm: fx.GraphModule, inputs: tuple[Any, ...]) -> str | None:
    """The first module (in call order) whose output in the model's own forward differs from the
    pruned graph's: the code that went wrong runs before it, in its parent."""
    targets = list(dict.fromkeys(str(n.target) for n in gm.graph.nodes if n.op == "call_module"))
    graph: dict[str, list[Any]] = defaultdict(list)
    for t, out in _calls(gm, targets, inputs):
        graph[t].append(out)
    count: Counter[str] = Counter()
    for t, out in _calls(work, targets, inputs):
        k = count[t]
        count[t] += 1
        if k >= len(graph[t]) or not outputs_close(out, graph[t][k])[0]:
            return t
    return None


def _has(root: nn.Module, path: str) -> bool:
    try:
        root.get_submodule(path)
        return True
    except AttributeError:
        return False


def _describe(root: nn.Module, path: str | None) -> str:
    if not path:
        return f"the model's own forward ({type(root).__name__})"
    return f"module {path!r} ({type(root.get_submodule(path)).__name__})"


def check_eager(work: nn.Module, gm: fx.GraphModule, dummy_input: Any, expected: Any) -> None:
    """Run ``work`` (the model with the pruned modules put in) on ``dummy_input`` and compare with
    ``expected`` (the masked model's output); a :class:`SpeedupError` naming the module whose own
    forward cannot follow the pruning otherwise."""
    inputs = as_tuple(dummy_input)
    names = {id(m): n for n, m in work.named_modules()}
    hint = ("Its Python code keeps a size the pruning changed. Use speedup_model(inplace=False): it returns the pruned "
            "torch.fx.GraphModule, which runs the rewritten graph instead of this forward. The model is left unchanged.")
    try:
        with torch.no_grad():
            got = work(*inputs)
    except Exception as exc:
        where = _innermost_module(exc, names)
        raise SpeedupError(f"cannot prune {type(work).__name__} in place: {_describe(work, where)} fails on the pruned "
                           f"layers ({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}). {hint}") from exc
    ok, why = outputs_close(got, expected)
    if not ok:
        try:
            culprit = _first_divergence(work, gm, inputs)
        except Exception:  # noqa: BLE001 - naming the culprit is best effort; the mismatch is reported anyway
            culprit = None
        where = _describe(work, culprit.rpartition(".")[0] if culprit else None)
        before = f", before it calls {culprit!r}" if culprit else ""
        raise SpeedupError(f"cannot prune {type(work).__name__} in place: {where} computes differently from the pruned "
                           f"graph{before}: {why}. {hint}")
