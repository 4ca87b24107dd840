"""Cut masks of large units (``nni_harp.pruning._topk``): whatever band a tracker guesses, the mask
is the set one ``torch.topk`` selects, and where no cut exists (a tie across the boundary) the
selection is the one made without cuts."""
from __future__ import annotations

import pytest
import torch

from nni_harp.pruning._topk import BAND_MIN_SIZE, CUT_MIN_SIZE, CutTracker, _select, fill_topk


def _plain_topk(values: torch.Tensor, count: int) -> torch.Tensor:
    mask = torch.zeros(values.numel())
    mask[torch.topk(values.reshape(-1), count, sorted=False).indices] = 1.0
    return mask.view_as(values)


@pytest.mark.parametrize("n", [CUT_MIN_SIZE + 17, 3 * BAND_MIN_SIZE + 17])  # rows of 64 entries and a shorter one
def test_tracked_cuts_follow_drifting_scores_and_changing_counts(n: int) -> None:
    gen = torch.Generator().manual_seed(0)
    scores, velocity = torch.randn(n, generator=gen), torch.zeros(n)
    tracker, out, tracked = CutTracker(), torch.empty(n), 0
    count = n // 3
    for step in range(12):
        velocity = 0.9 * velocity + 0.01 * torch.randn(n, generator=gen)
        scores += velocity
        count = count - n // 2500 * step if step != 7 else n // 20  # shrinking, then a jump (a projection)
        fill_topk(out, scores.abs(), count, tracker)
        assert torch.equal(out, _plain_topk(scores.abs(), count)), step
        assert tracker.value is not None and tracker.count == count  # the cut, not the fallback, chose
        tracked += tracker.move is not None  # cut in the tracker's band
    assert tracked >= 8  # all but the first step and the one after the jump


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


def test_a_tie_in_a_unit_too_small_for_band_selection_keeps_torch_topk_selection() -> None:
    values = torch.randint(0, 50, (CUT_MIN_SIZE + 100,), generator=torch.Generator().manual_seed(3)).float()
    out = torch.empty_like(values)
    fill_topk(out, values, 1000, CutTracker())
    assert torch.equal(out, _plain_topk(values, 1000))
