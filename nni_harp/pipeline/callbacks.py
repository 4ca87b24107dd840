"""Hooks through which the pipeline reports progress; the command line draws tqdm bars with them.

The library itself never prints: it calls these methods (all optional, all no-ops here) and logs.
"""
from __future__ import annotations

from typing import Any, Iterable, Mapping, Sequence

__all__ = ["PipelineCallback", "CallbackList"]


class PipelineCallback:
    """Subclass and override what you need. ``stage`` is one of ``pretrain``, ``evaluate-dense``,
    ``prune``, ``finetune``, ``speedup``, ``export``, ``evaluate-pruned`` (``evaluate`` for the
    evaluate command), and ``measure-latency`` then ``refine-latency`` before ``prune`` with
    ``--budget latency`` (one step per model timed for the latency model, and for each of its
    refinements at the target, one epoch each; not sent when the cache had it). Epochs count from 0;
    ``total`` is the number of steps in one epoch."""

    def on_stage_start(self, stage: str, epochs: int, start_epoch: int, total: int | None) -> None:
        """A stage begins (``start_epoch > 0`` when resumed)."""

    def on_epoch_start(self, stage: str, epoch: int, total: int | None) -> None:
        """An epoch (or, for one-shot stages, the only pass) begins with ``total`` steps."""

    def on_step(self, stage: str, epoch: int, step: int, metrics: Mapping[str, float]) -> None:
        """A step finished; ``metrics`` holds running values (``loss``, ``acc``) when known."""

    def on_epoch_end(self, stage: str, epoch: int, metrics: Mapping[str, float]) -> None:
        """An epoch finished (and its checkpoint was written)."""

    def on_stage_end(self, stage: str, result: Mapping[str, Any]) -> None:
        """A stage finished (or was skipped: then ``result`` has ``skipped``)."""

    def on_message(self, text: str) -> None:
        """A short human-readable note (e.g. a stage reused from a checkpoint)."""


class CallbackList(PipelineCallback):
    """Fan one call out to several callbacks, in order."""

    def __init__(self, callbacks: Iterable[PipelineCallback] | PipelineCallback | None = None) -> None:
        if callbacks is None:
            self.callbacks: Sequence[PipelineCallback] = ()
        elif isinstance(callbacks, PipelineCallback):
            self.callbacks = (callbacks,)
        else:
            self.callbacks = tuple(callbacks)
        for cb in self.callbacks:
            if not isinstance(cb, PipelineCallback):
                raise TypeError(f"callbacks must be PipelineCallback instances, got {type(cb).__name__}")

    def on_stage_start(self, stage: str, epochs: int, start_epoch: int, total: int | None) -> None:
        for cb in self.callbacks:
            cb.on_stage_start(stage, epochs, start_epoch, total)

    def on_epoch_start(self, stage: str, epoch: int, total: int | None) -> None:
        for cb in self.callbacks:
            cb.on_epoch_start(stage, epoch, total)

    def on_step(self, stage: str, epoch: int, step: int, metrics: Mapping[str, float]) -> None:
        for cb in self.callbacks:
            cb.on_step(stage, epoch, step, metrics)

    def on_epoch_end(self, stage: str, epoch: int, metrics: Mapping[str, float]) -> None:
        for cb in self.callbacks:
            cb.on_epoch_end(stage, epoch, metrics)

    def on_stage_end(self, stage: str, result: Mapping[str, Any]) -> None:
        for cb in self.callbacks:
            cb.on_stage_end(stage, result)

    def on_message(self, text: str) -> None:
        for cb in self.callbacks:
            cb.on_message(text)
