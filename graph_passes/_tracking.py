"""Channel tracking state shared by the analysis handlers.

Every channel position of every tracked tensor axis is an *element* (an integer id). Ops that tie
channels together unite elements (union-find); at the end each class of united elements is one
prunable unit. A tensor's tracking is ``Track``: ``{axis: 1-D int64 array of element ids}`` for
the axes whose positions are channels; other axes (batch, spatial, tokens, heads) never change
length. A parameter dimension whose positions carry elements is recorded as a member.

Channel removal is checked against the *masked* model (every member masked where its channel is
removed). There a removed channel is zero only as long as each op maps zero to zero: a producing
layer's masked rows and bias make it zero, ``sigmoid``, ``+ 1`` or a bias added along another axis
make it non-zero again. ``TensorInfo.zero`` records the tracked axes on which it is still zero;
ops that sum over channels (exact-statistics norms, ``sum``, the contraction of two computed
tensors) count on it, and pin the channels where it does not hold. Handlers set it (the default,
no axis, is the safe answer).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Iterable

import numpy as np
from torch import fx

__all__ = ["TRACK_KEY", "EXACT_STATS", "SCALE_KEPT", "Track", "TensorInfo", "ParamOrigin", "UnionFind", "LayerRecord", "AnalysisState", "tracked"]

TRACK_KEY = "graph_passes.track"  # node.meta: the node's TensorInfo (or list of them), written by the analysis
EXACT_STATS = "graph_passes.exact_stats"  # node.meta: (kind, axis) of a norm whose statistics span the channels
SCALE_KEPT = "graph_passes.attention_scale_kept"  # node.meta: the speedup gave this attention its original scale

Track = dict  # dict[int, np.ndarray]; a plain dict keeps handlers short


@dataclass(frozen=True)
class ParamOrigin:
    """A value that is a parameter (or buffer) seen through axis-preserving views.

    ``axes[i]`` is the parameter dimension that value axis ``i`` shows, or ``None`` for an axis
    the views added (size 1)."""

    module: str
    param: str
    axes: tuple[int | None, ...]


@dataclass
class TensorInfo:
    """A traced tensor: its shape, its channel ``track`` and, for a parameter, its ``origin``.

    ``zero``: the axes along which every position of a removed channel is zero in the masked model
    (see the module docstring). A parameter view (``origin``) holds zero at its masked entries:
    then ``zero`` is every axis, or none after an op that maps 0 to non-zero (``bias.exp()``)."""

    shape: tuple[int, ...]
    track: Track = field(default_factory=dict)
    origin: ParamOrigin | None = None
    zero: frozenset[int] = frozenset()

    @property
    def ndim(self) -> int:
        return len(self.shape)

    def all_axes_if_zero(self, ndim: int) -> frozenset[int]:
        """A parameter view's ``zero`` carried to a view of it with ``ndim`` axes."""
        return frozenset(range(ndim)) if self.zero else frozenset()


class UnionFind:
    """Classes of element ids, united in pairs; grows on demand.

    A class's root is its smallest element. Unions are only recorded; the classes are found when
    a root is first asked for (:meth:`find`, :meth:`table`), as the connected components of every
    pair recorded (whole arrays at once: the analysis unites some 10^4 pairs per model and asks
    for roots only when it is done), and kept until the next union or new element."""

    def __init__(self) -> None:
        self._size = 0
        self._table = np.zeros(0, dtype=np.int64)  # every element's root, as of the last resolution
        self._pending: list[tuple[np.ndarray, np.ndarray]] = []
        self._listed: list[int] | None = None  # the table as a list, for find()

    def __len__(self) -> int:
        return self._size

    def new(self, n: int) -> np.ndarray:
        start, self._size = self._size, self._size + n
        self._listed = None
        return np.arange(start, start + n, dtype=np.int64)

    def find(self, x: int) -> int:
        listed = self._listed
        if listed is None:
            listed = self._listed = self.table().tolist()
        return listed[x]

    def union(self, a: int, b: int) -> None:
        self.union_arrays(np.array([a]), np.array([b]))

    def union_arrays(self, a: np.ndarray, b: np.ndarray) -> None:
        """Unite ``a[i]`` with ``b[i]`` for every ``i`` (copies: later changes to the arrays do not count)."""
        self._pending.append((np.array(a, dtype=np.int64), np.array(b, dtype=np.int64)))
        self._listed = None

    def table(self) -> np.ndarray:
        """The root of every element (read-only)."""
        if self._pending or len(self._table) != self._size:
            self._table = self._resolve()
            self._table.flags.writeable = False
        return self._table

    def roots(self, ids: np.ndarray) -> np.ndarray:
        return self.table()[np.asarray(ids, dtype=np.int64)]

    def _resolve(self) -> np.ndarray:
        from scipy.sparse import coo_matrix
        from scipy.sparse.csgraph import connected_components

        n, known = self._size, len(self._table)
        merged = np.flatnonzero(self._table != np.arange(known))  # earlier unions: element -> its root
        a = np.concatenate([merged] + [pair[0] for pair in self._pending])
        b = np.concatenate([self._table[merged]] + [pair[1] for pair in self._pending])
        self._pending = []
        edges = coo_matrix((np.ones(len(a)), (a, b)), shape=(n, n))
        _, component = connected_components(edges, directed=False)
        smallest = np.full(component.max() + 1 if n else 0, n, dtype=np.int64)
        np.minimum.at(smallest, component, np.arange(n, dtype=np.int64))
        return smallest[component]


@dataclass
class LayerRecord:
    """A compute layer for the cost model: dense FLOPs/params and the tracked dims they scale with.

    Each entry of ``flops_dims``/``params_dims`` is an element-id array (or ``None`` with a size
    for a dimension that cannot shrink); the layer's cost scales with the kept fraction of each.
    """

    name: str
    kind: str
    flops: int
    params: int
    flops_dims: list[tuple[np.ndarray | None, int]]
    params_dims: list[tuple[np.ndarray | None, int]]
    module: str | None = None  # the called module's qualified name (a module call), else None


@dataclass
class MemberRecord:
    module: str
    param: str
    dim: int
    ids: np.ndarray
    role: str


class AnalysisState:
    """What the handlers read and write while walking the graph."""

    def __init__(self, gm: fx.GraphModule) -> None:
        self.gm = gm
        self.uf = UnionFind()
        self.values: dict[fx.Node, Any] = {}
        self.members: list[MemberRecord] = []
        self.pinned: dict[int, str] = {}  # element -> reason (resolved to roots at the end)
        self.layers: list[LayerRecord] = []

    # --- elements --------------------------------------------------------------------------
    def fresh(self, n: int) -> np.ndarray:
        return self.uf.new(n)

    def unite(self, a: np.ndarray, b: np.ndarray) -> None:
        if len(a) != len(b):
            raise ValueError(f"cannot unite channel arrays of lengths {len(a)} and {len(b)}")
        self.uf.union_arrays(a, b)

    def pin(self, ids: np.ndarray | Iterable[int], reason: str) -> None:
        for e in np.asarray(list(ids) if not isinstance(ids, np.ndarray) else ids).tolist():
            self.pinned.setdefault(int(e), reason)

    def pin_track(self, info: Any, reason: str) -> None:
        for value in _tensor_infos(info):
            for ids in value.track.values():
                self.pin(ids, reason)

    def member(self, module: str, param: str, dim: int, ids: np.ndarray, role: str) -> None:
        self.members.append(MemberRecord(module, param, dim, np.asarray(ids, dtype=np.int64), role))

    # --- values ----------------------------------------------------------------------------
    def info(self, arg: Any) -> Any:
        if isinstance(arg, fx.Node):
            return self.values.get(arg)
        if isinstance(arg, (list, tuple)):
            return type(arg)(self.info(a) for a in arg)
        return None


def _tensor_infos(info: Any) -> list[TensorInfo]:
    if isinstance(info, TensorInfo):
        return [info]
    if isinstance(info, (list, tuple)):
        return [t for v in info for t in _tensor_infos(v)]
    return []


def tracked(value: Any) -> Any:
    """The analysis' record (TensorInfo, list, None) of a node argument; None for constants."""
    return value.meta.get(TRACK_KEY) if isinstance(value, fx.Node) else None
