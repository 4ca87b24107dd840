"""Trace a model into a ``torch.fx.GraphModule`` with timm's no-trace leaves honoured.

The result carries ``tensor_meta`` (shape and dtype of every value) from ``ShapeProp`` so that
analysis passes can read shapes without running the model again; the check against the eager
model reuses that one run's layer outputs.
"""
from __future__ import annotations

import contextlib
import contextvars
import inspect
import logging
import os
import traceback
from typing import Any, Callable, Hashable, Iterable, Iterator, Sequence

import torch
from torch import fx, nn
from torch.fx.passes.shape_prop import ShapeProp

from ._concrete_tracing import concrete_tracer
from ._leaf_replay import LeafCalls
from ._tracer_lookups import LookupsOnce
from .errors import TraceError

__all__ = ["HarpTracer", "trace", "trace_once", "is_traced", "as_tuple", "flatten_outputs", "extra_leaf_types",
           "register_leaf_function", "register_leaf_type"]

logger = logging.getLogger(__name__)

# Module types we treat as leaves in addition to torch.nn's and timm's: types the channel
# analysis has a handler for, so their parameters can be sliced as a whole.
_EXTRA_LEAF_TYPES: set[type[nn.Module]] = set()
# Functions traced as one ``call_function`` node (autowrapped), for the same reason: the ones our
# own passes put into graphs (the speedup's ``exact_stats_norm``), so a pruned model traces again.
_EXTRA_LEAF_FUNCTIONS: set[Callable[..., Any]] = set()


def register_leaf_type(cls: type[nn.Module]) -> type[nn.Module]:
    """Trace ``cls`` as one ``call_module`` node (its exact type, not subclasses)."""
    _EXTRA_LEAF_TYPES.add(cls)
    return cls


def register_leaf_function(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Trace calls of ``fn`` (a module-level function) as one ``call_function`` node."""
    _EXTRA_LEAF_FUNCTIONS.add(fn)
    return fn


def extra_leaf_types() -> frozenset[type[nn.Module]]:
    return frozenset(_EXTRA_LEAF_TYPES)


def _timm_leaves() -> tuple[list[type[nn.Module]], list[Callable[..., Any]]]:
    try:
        import timm.models  # noqa: F401  (registers every model's no-trace modules/functions)
        from timm.layers import get_notrace_functions, get_notrace_modules
    except ImportError:  # timm is optional for graph_passes
        return [], []
    functions = [f for f in get_notrace_functions() if callable(f)]
    return list(get_notrace_modules()), functions


class HarpTracer(LookupsOnce):
    """``fx.Tracer`` whose leaves are torch.nn modules, timm's no-trace modules (but the types in
    ``through``) and the module types registered with :func:`register_leaf_type`; timm's no-trace
    functions and those registered with :func:`register_leaf_function` are autowrapped. fx's
    per-use look-ups of parameter names and of unpacking bytecode are made once per trace
    (``graph_passes._tracer_lookups``)."""

    def __init__(self, leaf_types: Iterable[type[nn.Module]] = (), autowrap_functions: Sequence[Callable[..., Any]] = (),
                 through: Iterable[type[nn.Module]] = ()) -> None:
        timm_modules, timm_functions = _timm_leaves()
        functions = tuple(timm_functions) + tuple(_EXTRA_LEAF_FUNCTIONS) + tuple(autowrap_functions)
        super().__init__(autowrap_functions=functions, param_shapes_constant=True)
        self._leaf_types = (set(timm_modules) - set(through)) | set(_EXTRA_LEAF_TYPES) | set(leaf_types)

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        if type(m) in self._leaf_types:
            return True
        return super().is_leaf_module(m, module_qualified_name)


def as_tuple(example_inputs: Any) -> tuple[Any, ...]:
    if isinstance(example_inputs, tuple):
        return example_inputs
    if isinstance(example_inputs, list):
        return tuple(example_inputs)
    return (example_inputs,)


_LIBRARY_DIRS = tuple(os.path.dirname(os.path.abspath(f)) + os.sep for f in (torch.__file__, __file__))


def _culprit(exc: BaseException) -> str:
    """Name the innermost frame of the model's code that broke tracing."""
    frames = traceback.extract_tb(exc.__traceback__)
    for frame in reversed(frames):
        name = frame.filename.replace("\\", "/")
        if os.path.abspath(frame.filename).startswith(_LIBRARY_DIRS):  # by location, not by a substring of the path
            continue
        return f"{frame.name} ({name.rsplit('/', 2)[-2:][-1]}:{frame.lineno}: {frame.line})"
    return "unknown location"


def trace(
    model: nn.Module,
    example_inputs: Any,
    *,
    leaf_types: Iterable[type[nn.Module]] = (),
    autowrap_functions: Sequence[Callable[..., Any]] = (),
    check: bool = True,
) -> fx.GraphModule:
    """Symbolically trace ``model`` and propagate shapes with ``example_inputs``.

    timm's no-trace functions are wrapped, and its no-trace modules that have a channel rule are
    kept as leaves, so every timm model that timm's own FX feature extraction handles can be
    traced. Its no-trace modules without a channel rule (``NormFreeBlock``, ``GPSA``, ...) are
    traced through first, as leaves only where that fails. With ``check``, the traced module's
    outputs are compared to eager outputs (eval mode, same inputs). The model's layers run once:
    the eager run is given the leaf modules' outputs of the shape propagation wherever their
    inputs are the same (see ``graph_passes._leaf_replay``).

    A ``GraphModule`` that already carries shapes (one this function returned) comes back as it
    is; inside a :func:`trace_once` block, so does the trace of a model traced there before.

    Raises :class:`TraceError` naming the function or module that broke tracing, with the fix
    (register it as a leaf with ``leaf_types=`` / ``autowrap_functions=``).
    """
    if is_traced(model):
        return model
    traces = _TRACES.get()
    if traces is None:
        return _trace_model(model, example_inputs, leaf_types, autowrap_functions, check)
    key = _trace_key(model, example_inputs, leaf_types, autowrap_functions)
    if key not in traces:
        traces[key] = (model, _trace_model(model, example_inputs, leaf_types, autowrap_functions, check))
    return traces[key][1]


def is_traced(model: nn.Module) -> bool:
    """``model`` is a ``GraphModule`` that carries shapes (as :func:`trace` returns them)."""
    return isinstance(model, fx.GraphModule) and any(n.op != "placeholder" and "tensor_meta" in n.meta for n in model.graph.nodes)


# The traces of the innermost trace_once() block: key -> (model, GraphModule); None outside one.
_TRACES: contextvars.ContextVar[dict[Hashable, tuple[nn.Module, fx.GraphModule]] | None] = contextvars.ContextVar(
    "graph_passes_traces", default=None)


@contextlib.contextmanager
def trace_once() -> Iterator[None]:
    """Within the block, :func:`trace` of a model it traced before returns the same
    ``GraphModule`` (with its channel analysis, once run) instead of tracing and checking it again.

    For callers that hand the model on to code that traces it itself (a pruner's constructor, a
    latency fit): every pass in the block then works on one trace. "The same model" is the same
    object with the same module tree (module objects), parameter and buffer shapes, traced on
    inputs of the same shapes and dtypes with the same options: a model wrapped, changed in place
    or pruned is traced anew. A nested block shares the outer one's traces. The traces hold the
    models (and share their modules) until the block ends.
    """
    if _TRACES.get() is not None:
        yield
        return
    token = _TRACES.set({})
    try:
        yield
    finally:
        _TRACES.reset(token)


def _trace_key(model: nn.Module, example_inputs: Any, leaf_types: Iterable[type[nn.Module]],
               autowrap_functions: Sequence[Callable[..., Any]]) -> Hashable:
    def signature(value: Any) -> Hashable:
        if isinstance(value, torch.Tensor):
            return ("tensor", tuple(value.shape), value.dtype, value.device)
        return ("value", type(value).__name__, repr(value))

    modules = tuple((name, id(m)) for name, m in model.named_modules())
    tensors = tuple((name, tuple(t.shape), t.dtype) for name, t in (*model.named_parameters(), *model.named_buffers()))
    inputs = tuple(signature(v) for v in as_tuple(example_inputs))
    return id(model), modules, tensors, inputs, tuple(leaf_types), tuple(autowrap_functions)


def _trace_model(model: nn.Module, example_inputs: Any, leaf_types: Iterable[type[nn.Module]],
                 autowrap_functions: Sequence[Callable[..., Any]], check: bool) -> fx.GraphModule:
    through = _through_types(model, leaf_types)
    if through:
        try:
            return _trace(model, example_inputs, leaf_types, autowrap_functions, check, through)
        except TraceError as exc:
            logger.info("%s: tracing through %s failed (%s); they stay leaves, their channels kept", type(model).__name__,
                        ", ".join(sorted(t.__qualname__ for t in through)), exc)
    return _trace(model, example_inputs, leaf_types, autowrap_functions, check, frozenset())


def _through_types(model: nn.Module, leaf_types: Iterable[type[nn.Module]]) -> frozenset[type[nn.Module]]:
    """timm's no-trace module types in ``model`` that have no channel rule: as leaves their
    channels could only be pinned (``NormFreeBlock``: no channel of nf_resnet could go), so they
    are traced through first (symbolically, or concretely where their control flow needs it)."""
    from ._registry import module_types

    timm_modules, _ = _timm_leaves()
    candidates = set(timm_modules) - module_types() - set(leaf_types) - _EXTRA_LEAF_TYPES
    return frozenset(type(m) for m in model.modules() if type(m) in candidates)


def _trace(model: nn.Module, example_inputs: Any, leaf_types: Iterable[type[nn.Module]],
           autowrap_functions: Sequence[Callable[..., Any]], check: bool, through: frozenset[type[nn.Module]]) -> fx.GraphModule:
    inputs = as_tuple(example_inputs)
    concrete_args = _constant_default_args(model, len(inputs))
    tracer = HarpTracer(leaf_types, autowrap_functions, through)
    try:
        graph = tracer.trace(model, concrete_args=concrete_args)
    except Exception as exc:  # fx raises many kinds; re-raise as one that names the culprit
        try:
            tracer, graph = _trace_concretely(model, inputs, leaf_types, autowrap_functions, concrete_args, through)
            logger.info("%s: symbolic tracing failed (%s: %s); traced concretely, specialised to the example "
                        "inputs", type(model).__name__, type(exc).__name__, exc)
        except Exception as concrete_exc:
            where = _culprit(exc)
            raise TraceError(
                f"torch.fx could not trace {type(model).__name__}: {type(exc).__name__}: {exc} -- at {where}. "
                "Data-dependent control flow or a non-traceable call is the usual cause: register the "
                "module that contains it as a leaf (trace(..., leaf_types=[ThatModule])) or the function "
                "(trace(..., autowrap_functions=[that_function])). Concrete tracing failed too: "
                f"{type(concrete_exc).__name__}: {concrete_exc}",
            ) from exc
    name = type(model).__name__
    gm = fx.GraphModule(tracer.root, graph, name)
    _keep_non_persistent_buffers(tracer.root, gm)
    was_training = model.training
    gm.eval()
    calls = LeafCalls(gm) if check else None  # the eager check reuses the leaf calls of this one run
    try:
        with torch.no_grad(), calls.recording() if calls is not None else contextlib.nullcontext():
            got = ShapeProp(gm).propagate(*inputs)
    except Exception as exc:
        raise TraceError(f"shape propagation through the traced {name} failed: {type(exc).__name__}: {exc}") from exc
    if calls is not None:
        got = [t.clone() for t in flatten_outputs(got)]  # the eager run may change the recorded tensors in place
        model.eval()
        with torch.no_grad(), calls.replaying():
            expected = model(*inputs)
        model.train(was_training)
        _assert_same(expected, got, name)
    gm.train(was_training)
    return gm


def _trace_concretely(model: nn.Module, inputs: tuple[Any, ...], leaf_types: Iterable[type[nn.Module]],
                      autowrap_functions: Sequence[Callable[..., Any]], concrete_args: dict[str, Any] | None,
                      through: frozenset[type[nn.Module]]) -> tuple[fx.Tracer, fx.Graph]:
    """Fallback for models with data-dependent Python control flow: trace while running every op
    on the example inputs (eval mode), so branches follow the example (see ``_concrete_tracing``)."""
    tracer = concrete_tracer(HarpTracer)(leaf_types, autowrap_functions, through, example_inputs=inputs)
    was_training = model.training
    model.eval()
    try:
        graph = tracer.trace(model, concrete_args=concrete_args)
    finally:
        model.train(was_training)
    return tracer, graph


def _constant_default_args(model: nn.Module, n_inputs: int) -> dict[str, Any] | None:
    """``forward`` parameters past the example inputs whose default is a constant (None, a bool,
    a number, a string), fixed to it: traced as placeholders, ``if mask is not None`` would take
    the branch the call never takes (Hiera's ``forward(x, mask=None)``), and ``if is_causal``
    could not be traced at all."""
    try:
        params = list(inspect.signature(model.forward).parameters.values())
    except (TypeError, ValueError):
        return None
    positional = [p for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    if len(positional) < len(params) and any(p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD) for p in params):
        return None  # *args/**kwargs: leave the signature to fx
    fixed = {p.name: p.default for p in positional[n_inputs:]
             if p.default is None or isinstance(p.default, (bool, int, float, str))}
    return fixed or None


def _keep_non_persistent_buffers(root: nn.Module, gm: fx.GraphModule) -> None:
    """Keep non-persistent buffers out of the traced module's state dict, as in ``root``.

    ``fx.GraphModule`` copies the buffers the graph reads onto new container modules; older torch
    releases (2.12 and before; 2.15 keeps the flag) register every one as persistent, so the
    traced (and sped-up) model's state dict held keys the eager model's does not, and the model
    rebuilt from a pruning plan refused to load it.
    """
    for path, module in root.named_modules():
        names = module._non_persistent_buffers_set
        if not names:
            continue
        try:
            owner = gm.get_submodule(path) if path else gm
        except AttributeError:  # not used by the graph, so not copied
            continue
        owner._non_persistent_buffers_set.update(n for n in names if n in owner._buffers)


def _assert_same(expected: Any, got: Any, name: str) -> None:
    flat_e, flat_g = flatten_outputs(expected), flatten_outputs(got)
    if len(flat_e) != len(flat_g):
        raise TraceError(f"traced {name} returns {len(flat_g)} tensors, eager returns {len(flat_e)}")
    for i, (e, g) in enumerate(zip(flat_e, flat_g)):
        if e.shape != g.shape or not torch.allclose(e, g, rtol=1e-4, atol=1e-5):
            raise TraceError(
                f"traced {name} differs from eager at output {i} (shapes {tuple(g.shape)} vs {tuple(e.shape)}); "
                "a module with data-dependent behaviour should be registered as a leaf"
            )


def flatten_outputs(value: Any) -> list[torch.Tensor]:
    """The tensors of a model's output (nested tuples, lists, dicts), in a fixed order."""
    if isinstance(value, torch.Tensor):
        return [value]
    if isinstance(value, (list, tuple)):
        return [t for v in value for t in flatten_outputs(v)]
    if isinstance(value, dict):
        return [t for k in sorted(value) for t in flatten_outputs(value[k])]
    return []
