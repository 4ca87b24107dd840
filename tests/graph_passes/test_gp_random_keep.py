"""graph_passes.random_keep: the seeded random pruning used by the coverage benchmark and the
timm integration tests."""
from __future__ import annotations

import torch

import graph_passes as gp


def _groups() -> list[gp.ChannelGroup]:
    return [gp.ChannelGroup(0, 10, (), True), gp.ChannelGroup(1, 3, (), True), gp.ChannelGroup(2, 8, (), False, "pinned")]


def test_removes_round_ratio_times_size_of_every_prunable_group_only():
    keep = gp.random_keep(_groups(), 0.3, seed=0)
    assert set(keep) == {0, 1}
    assert int((~keep[0]).sum()) == 3 and int((~keep[1]).sum()) == 1


def test_same_seed_same_channels_other_seed_other_channels():
    a, b = gp.random_keep(_groups(), 0.5, 1), gp.random_keep(_groups(), 0.5, 1)
    assert all(torch.equal(a[g], b[g]) for g in a)
    others = [gp.random_keep(_groups(), 0.5, s)[0] for s in range(2, 6)]
    assert any(not torch.equal(a[0], o) for o in others)
