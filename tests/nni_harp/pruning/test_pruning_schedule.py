"""The stagewise dynamic regulariser: gamma grows until the target is first met, then is frozen."""
from __future__ import annotations

import pytest

from nni_harp.pruning import GammaSchedule


def _run(schedule: GammaSchedule, met: list[bool]) -> list[float]:
    used = []
    for epoch, ok in enumerate(met):
        used.append(schedule.gamma_for(epoch))
        schedule.observe(epoch, ok)
    return used


def test_gamma_grows_per_epoch_then_freezes_when_first_met() -> None:
    schedule = GammaSchedule(0.01)
    used = _run(schedule, [False, False, True, False, False, True])
    assert used == pytest.approx([0.01, 0.02, 0.03, 0.03, 0.03, 0.03])
    assert schedule.frozen and schedule.frozen_at == 2


def test_gamma_keeps_growing_while_never_met() -> None:
    used = _run(GammaSchedule(0.1), [False] * 5)
    assert used == pytest.approx([0.1, 0.2, 0.3, 0.4, 0.5])


def test_met_in_the_first_epoch_keeps_gamma_0() -> None:
    used = _run(GammaSchedule(0.5), [True, False, False])
    assert used == pytest.approx([0.5, 0.5, 0.5])


def test_stage_boundaries_grow_gamma_only_at_boundaries() -> None:
    schedule = GammaSchedule(0.01, stage_boundaries=(2, 5))
    assert [schedule.stage(e) for e in range(7)] == [0, 0, 1, 1, 1, 2, 2]
    used = _run(schedule, [False, False, False, True, False, False, False])
    assert used == pytest.approx([0.01, 0.01, 0.02, 0.02, 0.02, 0.02, 0.02])
    assert schedule.frozen_at == 3


def test_schedule_rejects_bad_arguments() -> None:
    with pytest.raises(ValueError, match="gamma_0"):
        GammaSchedule(0.0)
    with pytest.raises(ValueError, match="strictly increasing"):
        GammaSchedule(0.1, stage_boundaries=(3, 3))


def test_schedule_state_round_trip_keeps_the_frozen_gamma() -> None:
    schedule = GammaSchedule(0.01, stage_boundaries=(2, 5))
    _run(schedule, [False, False, False, True])
    restored = GammaSchedule(0.01, stage_boundaries=(2, 5))
    restored.load_state_dict(schedule.state_dict())
    assert restored.frozen_at == 3
    assert [restored.gamma_for(e) for e in range(4, 8)] == pytest.approx([0.02] * 4)
    growing = GammaSchedule(0.01, stage_boundaries=(2, 5))
    growing.load_state_dict(GammaSchedule(0.01, stage_boundaries=(2, 5)).state_dict())
    assert not growing.frozen and growing.gamma_for(6) == pytest.approx(0.03)
    with pytest.raises(ValueError, match="gamma_0=0.01"):
        GammaSchedule(0.02, stage_boundaries=(2, 5)).load_state_dict(schedule.state_dict())
