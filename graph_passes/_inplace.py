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
from collections import defaultdict
from dataclasses import dataclass
from typing import Any, Iterable, Mapping

import torch
from torch import fx, nn

from ._registry import eager_rule
from ._tracking import SCALE_KEPT
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


def apply_ops(root: nn.Module, ops: Iterable[SetAttr], missing_ok: bool = False) -> None:
    """Carry out ``ops`` on ``root``; with ``missing_ok``, skip paths ``root`` does not have (a
    GraphModule holds only the modules its graph uses)."""
    for op in ops:
        if missing_ok and not _has(root, op.path):
            continue
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
    """Same structure and shapes, and every tensor within 1e-4 of the expected one's scale (an
    attention scaled for the wrong head width, whose near-uniform softmax on random weights hides
    it, is off by 6e-4 on iFormer)."""
    a, b = flatten_outputs(got), flatten_outputs(expected)
    if len(a) != len(b):
        return False, f"{len(a)} tensors instead of {len(b)}"
    for i, (x, y) in enumerate(zip(a, b)):
        if x.shape != y.shape:
            return False, f"output {i} has shape {tuple(x.shape)} instead of {tuple(y.shape)}"
        err = float((x.float() - y.float()).abs().max()) if x.numel() else 0.0
        scale = float(y.float().abs().max()) if y.numel() else 0.0
        if not err <= 1e-4 * (1.0 + scale) or math.isnan(err):
            return False, f"output {i} differs by up to {err:.3g} (scale {scale:.3g})"
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


def _module_ends(gm: fx.GraphModule) -> dict[str, fx.Node]:
    """For each module path the graph records (``nn_module_stack``): the one node of its scope
    that is used outside it, i.e. the module's output in the graph (where there is one)."""
    scope: dict[fx.Node, set[str]] = {}
    members: dict[str, list[fx.Node]] = defaultdict(list)
    for node in gm.graph.nodes:
        stack = node.meta.get("nn_module_stack") or {}
        scope[node] = {str(v[0]) if isinstance(v, tuple) else str(k) for k, v in stack.items()}
        for path in scope[node]:
            members[path].append(node)
    ends = {}
    for path, nodes in members.items():
        outside = [n for n in nodes if any(path not in scope[u] for u in n.users)]
        if len(outside) == 1:
            ends[path] = outside[0]
    return ends


def _first_wrong_module(work: nn.Module, gm: fx.GraphModule, inputs: tuple[Any, ...]) -> tuple[str | None, str]:
    """The first module whose call in the model's own forward returns what the pruned graph does
    not (children return before their parents: the innermost such module), and how it differs."""
    ends = _module_ends(gm)
    values: dict[fx.Node, Any] = {}

    class Recorder(fx.Interpreter):
        def run_node(self, n: fx.Node) -> Any:
            values[n] = super().run_node(n)
            return values[n]

    with torch.no_grad():
        Recorder(gm).run(*inputs)
    returned: list[tuple[str, Any, Any]] = []  # (path, first input, output)
    hooks = [m.register_forward_hook(lambda mod, i, o, p=p: returned.append((p, i[0] if i else None, o)))
             for p, m in work.named_modules() if p in ends]
    try:
        with torch.no_grad():
            work(*inputs)
    except Exception:  # noqa: BLE001 - the modules that returned before it are what we look at
        pass
    finally:
        for h in hooks:
            h.remove()
    seen: set[str] = set()
    for path, first, out in returned:
        if path in seen:  # a module called twice: its graph node is the last call's
            continue
        seen.add(path)
        ok, why = outputs_close(out, values.get(ends[path]))
        if ok:
            continue
        node = ends[path]
        if node.op == "call_module" and node.target == path and node.args and isinstance(node.args[0], fx.Node):
            fed, how = outputs_close(first, values.get(node.args[0]))
            if not fed:  # the layer got a different input: the code before the call went wrong
                return path.rpartition(".")[0] or None, f"{how} in what it passes to {path!r}"
        return path, why
    return None, ""


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


def _check_attention_scales(work: nn.Module, gm: fx.GraphModule) -> None:
    """Where the speedup passed an attention its original scale (its heads got narrower), the
    module's own forward must not call the fused kernel with the default scale: its eager rule
    switches it to its own path (``fused_attn`` off), or it cannot be pruned in place."""
    for node in gm.graph.nodes:
        if not node.meta.get(SCALE_KEPT):
            continue
        stack = node.meta.get("nn_module_stack") or {}
        path = next((str(v[0]) if isinstance(v, tuple) else str(k) for k, v in reversed(stack.items())), "")
        if getattr(_owner(work, path) if _has(work, path) else None, "fused_attn", None) is not False:
            raise SpeedupError(
                f"cannot prune {type(work).__name__} in place: {_describe(work, path or None)} calls "
                "scaled_dot_product_attention with its default scale, which would follow the narrower heads (the pruned "
                "graph keeps the original scale). Use speedup_model(inplace=False): it returns the pruned "
                "torch.fx.GraphModule. The model is left unchanged.")


def check_eager(work: nn.Module, gm: fx.GraphModule, dummy_input: Any, expected: Any) -> None:
    """Run ``work`` (the model with the pruned modules put in) on ``dummy_input`` and compare with
    ``expected`` (the masked model's output); a :class:`SpeedupError` naming the module whose own
    forward cannot follow the pruning otherwise."""
    _check_attention_scales(work, gm)
    inputs = as_tuple(dummy_input)
    failure: Exception | None = None
    try:
        with torch.no_grad():
            got = work(*inputs)
    except Exception as exc:  # noqa: BLE001 - reported below, with the module that caused it
        failure = exc
    if failure is None:
        ok, why = outputs_close(got, expected)
        if ok:
            return
    try:
        culprit, differs = _first_wrong_module(work, gm, inputs)
    except Exception:  # noqa: BLE001 - naming the culprit is best effort; the problem is reported anyway
        culprit, differs = None, ""
    parts = [f"{_describe(work, culprit)} computes differently from the pruned graph ({differs})"] if culprit else []
    if failure is not None:
        names = {id(m): n for n, m in work.named_modules()}
        first = str(failure).splitlines()[0] if str(failure) else ""
        parts.append(f"{_describe(work, _innermost_module(failure, names))} fails ({type(failure).__name__}: {first})")
    elif not culprit:
        parts.append(f"{_describe(work, None)} computes differently from the masked model ({why})")
    raise SpeedupError(
        f"cannot prune {type(work).__name__} in place: {'; then '.join(parts)}. Its Python code keeps a size the "
        "pruning changed. Use speedup_model(inplace=False): it returns the pruned torch.fx.GraphModule, which runs "
        "the rewritten graph instead of this forward. The model is left unchanged.") from failure
