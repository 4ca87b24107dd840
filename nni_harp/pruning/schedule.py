"""HARP's stagewise dynamic regulariser: gamma grows stage by stage until the target is first met.

``gamma_t = (stage(t) + 1) * gamma_0``, where ``stage(t)`` is the epoch ``t`` itself (the paper's
per-epoch growth) or the number of stage boundaries ``<= t``. At the end of the first epoch whose
kept fraction meets the target, gamma is frozen at the value that epoch used, for good: robustness
first, then robustness and compactness held in balance.
"""
from __future__ import annotations

import bisect
from typing import Sequence

__all__ = ["GammaSchedule"]


class GammaSchedule:
    """Per-epoch gamma values: call :meth:`gamma_for` at an epoch's start, :meth:`observe` at its end."""

    def __init__(self, gamma_0: float, stage_boundaries: Sequence[int] | None = None) -> None:
        if not gamma_0 > 0:
            raise ValueError(f"gamma_0 must be > 0, got {gamma_0!r}")
        bounds = tuple(stage_boundaries) if stage_boundaries is not None else None
        if bounds is not None and any(b >= c for b, c in zip(bounds, bounds[1:])):
            raise ValueError(f"stage_boundaries must be strictly increasing, got {bounds}")
        self.gamma_0 = float(gamma_0)
        self.stage_boundaries = bounds
        self.frozen_at: int | None = None  # epoch whose end first met the target
        self._frozen_gamma: float | None = None

    @property
    def frozen(self) -> bool:
        return self.frozen_at is not None

    def stage(self, epoch: int) -> int:
        """The growth stage of ``epoch`` (0-based), ignoring freezing."""
        if epoch < 0:
            raise ValueError(f"epoch must be >= 0, got {epoch}")
        if self.stage_boundaries is None:
            return epoch
        return bisect.bisect_right(self.stage_boundaries, epoch)

    def gamma_for(self, epoch: int) -> float:
        """The gamma to use during ``epoch``: the stage's value, or the frozen one."""
        if self._frozen_gamma is not None:
            return self._frozen_gamma
        return (self.stage(epoch) + 1) * self.gamma_0

    def observe(self, epoch: int, target_met: bool) -> None:
        """Record the end of ``epoch``; the first epoch that meets the target freezes gamma."""
        if target_met and self._frozen_gamma is None:
            self._frozen_gamma = self.gamma_for(epoch)
            self.frozen_at = epoch

    def __repr__(self) -> str:
        state = f"frozen at epoch {self.frozen_at}" if self.frozen else "growing"
        return f"GammaSchedule(gamma_0={self.gamma_0}, stage_boundaries={self.stage_boundaries}, {state})"
