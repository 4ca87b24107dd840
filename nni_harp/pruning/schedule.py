"""HARP's stagewise dynamic regulariser: gamma grows stage by stage until the target is first met.

``gamma_t = (stage(t) + 1) * gamma_0``, where ``stage(t)`` is the epoch ``t`` itself (the paper's
per-epoch growth) or the number of stage boundaries ``<= t``. At the end of the first epoch whose
kept fraction meets the target, gamma is frozen at the value that epoch used, for good: robustness
first, then robustness and compactness held in balance.

Every pruning epoch is labelled with the phase it belongs to (:func:`epoch_phase`, recorded in
``HARPPruner.history``): ``'robustness'`` (gamma growing, the kept fraction not falling: the task
loss has the upper hand), ``'descent'`` (gamma growing, the kept fraction falling towards the
target) and ``'balance'`` (every epoch after the one that first met the target: gamma frozen).
"""
from __future__ import annotations

import bisect
from typing import Any, Mapping, Sequence

__all__ = ["GammaSchedule", "PHASES", "epoch_phase"]

#: The phases of a HARP run, in the order they normally come.
PHASES: tuple[str, ...] = ("robustness", "descent", "balance")
#: A fall of the kept fraction over an epoch smaller than this counts as no fall.
DESCENT_TOLERANCE = 1e-3


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

    def state_dict(self) -> dict[str, Any]:
        """The schedule's settings and where it froze (plain values, safe for ``weights_only`` loading)."""
        return {
            "gamma_0": self.gamma_0,
            "stage_boundaries": None if self.stage_boundaries is None else list(self.stage_boundaries),
            "frozen_at": self.frozen_at,
            "frozen_gamma": self._frozen_gamma,
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore :meth:`state_dict`'s freezing; the settings must be the ones this schedule has."""
        bounds = state.get("stage_boundaries")
        saved = (float(state.get("gamma_0", float("nan"))), None if bounds is None else tuple(int(b) for b in bounds))
        if saved != (self.gamma_0, self.stage_boundaries):
            raise ValueError(
                f"schedule state is for gamma_0={saved[0]}, stage_boundaries={saved[1]}; this schedule has "
                f"gamma_0={self.gamma_0}, stage_boundaries={self.stage_boundaries}"
            )
        frozen_at, frozen_gamma = state.get("frozen_at"), state.get("frozen_gamma")
        if (frozen_at is None) != (frozen_gamma is None):
            raise ValueError(f"schedule state is inconsistent: frozen_at={frozen_at!r}, frozen_gamma={frozen_gamma!r}")
        self.frozen_at = None if frozen_at is None else int(frozen_at)
        self._frozen_gamma = None if frozen_gamma is None else float(frozen_gamma)

    def __repr__(self) -> str:
        state = f"frozen at epoch {self.frozen_at}" if self.frozen else "growing"
        return f"GammaSchedule(gamma_0={self.gamma_0}, stage_boundaries={self.stage_boundaries}, {state})"


def epoch_phase(schedule: GammaSchedule, epoch: int, kept_start: float, kept_end: float) -> str:
    """The phase of ``epoch`` (see the module docstring), once :meth:`GammaSchedule.observe` saw it."""
    if schedule.frozen_at is not None and epoch > schedule.frozen_at:
        return "balance"
    return "descent" if kept_end < kept_start - DESCENT_TOLERANCE else "robustness"
