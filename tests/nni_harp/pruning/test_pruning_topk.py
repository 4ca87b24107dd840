"""Cut masks of large units (``nni_harp.pruning._topk``): whatever band a tracker guesses, the mask
is the set one ``torch.topk`` selects, and where no cut exists (a tie across the boundary) the
selection is the one made without cuts."""
from __future__ import annotations

import torch

from nni_harp.pruning._topk import BAND_MIN_SIZE, CutTracker, _select, fill_topk


def _plain_topk(values: torch.Tensor, count: int) -> torch.Tensor:
    mask = torch.zeros(values.numel())
    mask[torch.topk(values.reshape(-1), count, sorted=False).indices] = 1.0
    return mask.view_as(values)


def test_tracked_cuts_follow_drifting_scores_and_changing_counts() -> None:
    gen = torch.Generator().manual_seed(0)
    n = 3 * BAND_MIN_SIZE + 17  # rows of 64 entries and a shorter last row
    scores, velocity = torch.randn(n, generator=gen), torch.zeros(n)
    tracker, out = CutTracker(), torch.empty(n)
    count = n // 3
    for step in range(12):
        velocity = 0.9 * velocity + 0.01 * torch.randn(n, generator=gen)
        scores += velocity
        count = count - 40 * step if step != 7 else n // 20  # shrinking, then a jump (a projection)
        fill_topk(out, scores.abs(), count, tracker)
        assert torch.equal(out, _plain_topk(scores.abs(), count)), step
        assert tracker.value is not None and tracker.count == count  # the cut, not the fallback, chose
    assert tracker.move is not None


def test_a_band_edge_on_the_boundary_is_a_cut() -> None:
    n, m = BAND_MIN_SIZE, 1000
    values = torch.randperm(n, generator=torch.Generator().manual_seed(1)).float()  # m-th largest: n - m
    out = torch.empty(n)
    for center, edge in ((n - m + 32, n - m), (n - m - 33, n - m - 1)):  # lo, then hi, on the boundary
        tracker = CutTracker()
        tracker.value, tracker.count, tracker.density = float(center), m, 1.0
        fill_topk(out, values, m, tracker)
        assert torch.equal(out, _plain_topk(values, m))
        assert tracker.value == edge


def test_a_tie_across_the_boundary_keeps_the_selection_made_without_cuts() -> None:
    values = torch.randint(0, 50, (2 * BAND_MIN_SIZE,), generator=torch.Generator().manual_seed(2)).float()
    count = 5000  # many entries share the boundary's value: no cut keeps exactly count
    out, tracker = torch.empty_like(values), CutTracker()
    fill_topk(out, values, count, tracker)
    assert int(out.sum()) == count
    assert torch.equal(out.bool(), _select(values, count, largest=True))
    assert tracker.value is None
