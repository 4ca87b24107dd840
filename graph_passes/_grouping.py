"""Channel groups from the finished channel tracking: the last step of the dependency analysis.

Every channel class (a union-find root) held by parameter dimensions (members) is a channel of
one group: the roots held by the same member dimensions, alike pinned or not, form one group.
Groups are numbered, and a group's channels ordered, by where their roots first occur in the
members taken in the order the analysis recorded them; a group lists its members in that order.

The work is done on whole arrays (the members of a large model hold some 10^5 positions): every
element's root comes from one table (``UnionFind.table``), and the roots held by the same member
dimensions are found by labelling each root's sequence of member dimensions (:func:`_labels`).
"""
from __future__ import annotations

from collections import defaultdict
from collections.abc import ItemsView, Iterator, KeysView, Mapping, ValuesView
from typing import Any

import numpy as np

from ._tracking import AnalysisState
from .groups import ChannelGroup, Member

__all__ = ["ChannelMap", "form_groups"]

_SINGLE = "a single channel: removing it would empty the tensor"


def form_groups(state: AnalysisState) -> tuple[list[ChannelGroup], Mapping[int, tuple[int, int]], np.ndarray]:
    """The groups, the map root element -> (group id, channel), and every element's group (-1:
    in none). Unites the positions that several records of one parameter dimension hold first."""
    by_key: dict[tuple[str, str, int], list] = defaultdict(list)
    for rec in state.members:
        by_key[(rec.module, rec.param, rec.dim)].append(rec)
    for recs in by_key.values():  # a parameter dimension is sliced one way, whatever its call sites
        for other in recs[1:]:
            state.unite(recs[0].ids, other.ids)
    table = state.uf.table()
    by_root = np.full(len(table), -1, dtype=np.int64)
    if not by_key:
        return [], ChannelMap(*(np.zeros(0, dtype=np.int64),) * 3), by_root
    pinned: dict[int, str] = {}  # root -> the reason of its first pinned element
    if state.pinned:
        elements = np.fromiter(state.pinned, dtype=np.int64, count=len(state.pinned))
        for root, reason in zip(table[elements].tolist(), state.pinned.values()):
            pinned.setdefault(root, reason)
    keys = list(by_key)
    key_roots = [table[by_key[key][0].ids] for key in keys]
    roots, at, group, channel, group_keys = _classes(key_roots, pinned, len(table))
    members: dict[tuple[int, int], Member] = {}
    parts_of: dict[int, tuple[np.ndarray, list[tuple[int, tuple[int, ...], tuple[int, ...]]]]] = {}
    offset = 0
    for k, key in enumerate(keys):
        ids = by_key[key][0].ids
        of_key = at[offset:offset + len(ids)]
        offset += len(ids)
        hit = parts_of.get(id(ids))  # records of one array (a conv's weight and bias rows) split alike
        if hit is None or hit[0] is not ids:
            hit = parts_of[id(ids)] = (ids, _parts(of_key, group, channel))
        for gid, index, chan in hit[1]:
            members[(gid, k)] = Member(*key, index, chan, by_key[key][0].role)
    sizes = np.bincount(group).tolist()
    first_root = np.empty(len(sizes), dtype=np.int64)
    first_root[group[channel == 0]] = roots[channel == 0]
    groups = []
    for gid, size in enumerate(sizes):
        reason = pinned.get(int(first_root[gid]))
        if reason is None and size < 2:
            reason = _SINGLE
        group_members = tuple(members[(gid, k)] for k in group_keys[gid])
        groups.append(ChannelGroup(gid, size, group_members, prunable=reason is None, reason=reason))
    by_root[roots] = group
    return groups, ChannelMap(roots, group, channel), by_root


class ChannelMap(Mapping[int, tuple[int, int]]):
    """Root element -> (group id, channel): :attr:`~graph_passes.Analysis.channel_of`. Kept as
    arrays and made a dict when first read: the analysis and the cost model look elements up
    through whole arrays (``Analysis.group_of``), and some 10^4 pairs built for nothing cost more
    than the rest of the grouping (and bring on the garbage collector)."""

    def __init__(self, roots: np.ndarray, group: np.ndarray, channel: np.ndarray) -> None:
        self._roots, self._group, self._channel = roots, group, channel
        self._dict: dict[int, tuple[int, int]] | None = None

    def _pairs(self) -> dict[int, tuple[int, int]]:
        if self._dict is None:  # by group, then channel
            order = np.lexsort((self._channel, self._group))
            pairs = zip(self._group[order].tolist(), self._channel[order].tolist())
            self._dict = dict(zip(self._roots[order].tolist(), pairs))
            self.get = self._dict.get  # type: ignore[method-assign]  # speedup asks once per element
        return self._dict

    def __getitem__(self, root: int) -> tuple[int, int]:
        return self._pairs()[root]

    def get(self, root: int, default: Any = None) -> Any:
        return self._pairs().get(root, default)

    def __contains__(self, root: object) -> bool:
        return root in self._pairs()

    def __iter__(self) -> Iterator[int]:
        return iter(self._pairs())

    def __len__(self) -> int:
        return len(self._roots)

    def keys(self) -> KeysView[int]:
        return self._pairs().keys()

    def values(self) -> ValuesView[tuple[int, int]]:
        return self._pairs().values()

    def items(self) -> ItemsView[int, tuple[int, int]]:
        return self._pairs().items()

    def __eq__(self, other: object) -> bool:
        return self._pairs() == (other._pairs() if isinstance(other, ChannelMap) else other)

    def __repr__(self) -> str:
        return repr(self._pairs())


def _parts(of_key: np.ndarray, group: np.ndarray, channel: np.ndarray) -> list[tuple[int, tuple[int, ...], tuple[int, ...]]]:
    """A key's positions (their roots' indices ``of_key``) split by group: (group, positions
    ascending, their channels)."""
    if not len(of_key):
        return []
    gids = group[of_key]
    if gids[0] == gids[-1] and (gids == gids[0]).all():
        return [(int(gids[0]), tuple(range(len(gids))), tuple(channel[of_key].tolist()))]
    order = np.argsort(gids, kind="stable")
    return [(int(gids[idx[0]]), tuple(idx.tolist()), tuple(channel[of_key[idx]].tolist()))
            for idx in np.split(order, np.flatnonzero(np.diff(gids[order])) + 1)]


def _unique(values: np.ndarray) -> np.ndarray:
    """Sorted distinct values (a sort and a comparison: much faster than ``np.unique`` here)."""
    ordered = np.sort(values)
    return ordered[np.r_[True, ordered[1:] != ordered[:-1]]] if len(ordered) else ordered


def _classes(key_roots: list[np.ndarray], pinned: dict[int, str], n_elements: int) -> tuple:
    """``roots`` (the roots the keys hold, ascending); ``at`` (for each position of the keys,
    concatenated, its root's index in ``roots``); each root's ``group`` and ``channel``; each
    group's key indices, ascending (see the module docstring for the numbering)."""
    flat = np.concatenate(key_roots)
    n_keys = len(key_roots)
    key_of = np.repeat(np.arange(n_keys, dtype=np.int64), [len(r) for r in key_roots])
    first = np.full(n_elements, len(flat), dtype=np.int64)
    np.minimum.at(first, flat, np.arange(len(flat), dtype=np.int64))  # each root's first position
    roots = np.flatnonzero(first < len(flat))
    index = np.zeros(n_elements, dtype=np.int64)
    index[roots] = np.arange(len(roots))
    at = index[flat]
    pairs = _unique(at * n_keys + key_of)  # (root, key) held: by root, then by key
    pair_root, pair_key = np.divmod(pairs, n_keys)
    is_pinned = np.zeros(n_elements, dtype=np.int64)
    is_pinned[np.fromiter(pinned, dtype=np.int64, count=len(pinned))] = 1
    label = 2 * _labels(pair_root, pair_key, len(roots), n_keys) + is_pinned[roots]
    order = np.argsort(first[roots])  # the roots by first position (all distinct)
    labels = _unique(label)
    cls = np.searchsorted(labels, label[order])  # the class of each root, in that order
    class_first = np.full(len(labels), len(roots), dtype=np.int64)
    np.minimum.at(class_first, cls, np.arange(len(roots), dtype=np.int64))
    number = np.empty(len(labels), dtype=np.int64)
    number[np.argsort(class_first)] = np.arange(len(labels))
    ordered_group = number[cls]
    within = np.argsort(ordered_group, kind="stable")  # by group; each group's roots in order
    sizes = np.bincount(ordered_group)
    ordered_channel = np.empty(len(roots), dtype=np.int64)
    ordered_channel[within] = np.arange(len(roots)) - np.repeat(np.cumsum(sizes) - sizes, sizes)
    group = np.empty(len(roots), dtype=np.int64)
    channel = np.empty(len(roots), dtype=np.int64)
    group[order], channel[order] = ordered_group, ordered_channel
    group_pairs = _unique(group[pair_root] * n_keys + pair_key)
    pair_group, keys_of_group = np.divmod(group_pairs, n_keys)
    group_keys = np.split(keys_of_group, np.flatnonzero(np.diff(pair_group)) + 1)
    return roots, at, group, channel, [k.tolist() for k in group_keys]


def _labels(run: np.ndarray, item: np.ndarray, n_runs: int, n_items: int) -> np.ndarray:
    """A label for each of ``n_runs`` sequences, equal exactly where the sequences are: run ``r``
    is ``item[run == r]`` (``run`` ascending). The sequences are walked one position at a time as
    paths in a trie: a label is a trie node, a (node, next item) pair the child it leads to, and
    children get numbers no node had before, so a sequence that ends keeps a label of its own."""
    label = np.zeros(n_runs, dtype=np.int64)
    starts = np.flatnonzero(np.r_[True, run[1:] != run[:-1]]) if len(run) else run
    lengths = np.diff(np.r_[starts, len(run)])
    owner = run[starts]
    fresh, depth = 1, 0
    while len(starts):  # the sequences still going at this depth
        step = label[owner] * n_items + item[starts + depth]
        children = _unique(step)
        label[owner] = fresh + np.searchsorted(children, step)
        fresh += len(children)
        depth += 1
        going = lengths > depth
        starts, lengths, owner = starts[going], lengths[going], owner[going]
    return label
