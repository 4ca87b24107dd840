"""Per-epoch stage checkpoints and the run's progress record, for ``--resume``.

Layout under ``<output_dir>/checkpoints/``:

- ``<stage>.pt``: written (atomically) at the end of every epoch of a training stage; holds the
  stage name, the finished epoch, model/optimizer/scheduler state, the stage's own extra state
  (the pruner's scores, rates and gamma) and the RNG states (under torchrun, every rank's: each
  rank resumes its own streams, e.g. its PGD random starts). Only plain tensors, dicts, lists and
  numbers, so that it loads with ``weights_only=True``.
- ``progress.json``: the run's config and the stages already finished, with their small results.

A stage is resumed from ``<stage>.pt`` when it is not marked finished in ``progress.json``;
a finished stage is skipped and its saved artefacts are reused.

Under ``torchrun`` only rank 0's store writes (``writer=True``); the other ranks keep the same
progress record in memory (:meth:`RunStore.adopt` takes rank 0's) and read checkpoints only when
resuming, which needs the output folder on a file system every node sees.
"""
from __future__ import annotations

import json
import logging
import random
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

import numpy as np
import torch

from .. import distributed as hd
from .._io import atomic_save, atomic_write_text, safe_load

__all__ = ["RunStore", "StageCheckpoint", "capture_rng", "restore_rng", "restore_rank_rng", "ResumeError"]

logger = logging.getLogger(__name__)

FORMAT_VERSION = 1


class ResumeError(RuntimeError):
    """A run cannot be resumed (or a new one cannot start) in the given output directory."""


def capture_rng() -> dict[str, Any]:
    """The Python, NumPy and torch RNG states as plain values (loadable with weights_only)."""
    version, internal, gauss = random.getstate()
    np_state = np.random.get_state()
    return {
        "python": {"version": version, "state": list(internal), "gauss": gauss},
        "numpy": {
            "kind": str(np_state[0]),
            "key": torch.from_numpy(np.asarray(np_state[1], dtype=np.int64)),
            "pos": int(np_state[2]),
            "has_gauss": int(np_state[3]),
            "cached_gauss": float(np_state[4]),
        },
        "torch": torch.get_rng_state(),
        "cuda": [s for s in torch.cuda.get_rng_state_all()] if torch.cuda.is_available() else [],
    }


def restore_rng(state: Mapping[str, Any]) -> None:
    py = state["python"]
    random.setstate((py["version"], tuple(py["state"]), py["gauss"]))
    npst = state["numpy"]
    np.random.set_state(
        (npst["kind"], npst["key"].numpy().astype(np.uint32), npst["pos"], npst["has_gauss"], npst["cached_gauss"])
    )
    torch.set_rng_state(state["torch"])
    cuda = state.get("cuda") or []
    if cuda and torch.cuda.is_available() and len(cuda) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(cuda)


def _gather_rng() -> list[dict[str, Any]] | None:
    """Every rank's RNG states, in rank order, on rank 0 (the checkpoint writer); a collective:
    every rank must call it. None on the other ranks and in a single process."""
    if not hd.is_distributed():
        return None
    states: list[Any] | None = [None] * hd.world_size() if hd.rank() == 0 else None
    torch.distributed.gather_object(capture_rng(), states, dst=0)
    return states


def restore_rank_rng(payload: Mapping[str, Any]) -> None:
    """Restore this process's RNG states from a checkpoint ``payload``: its own rank's when the
    checkpoint has one per rank of a run of the same size, otherwise the writer's (``rng``)."""
    per_rank = payload.get("rng_ranks")
    if hd.is_distributed() or per_rank:
        if per_rank and len(per_rank) == hd.world_size():
            restore_rng(per_rank[hd.rank()])
            return
        logger.warning("the checkpoint holds RNG states for %s processes and this run has %d: every process "
                       "restores rank 0's, so random draws (PGD starts, dropout) differ from an uninterrupted run",
                       len(per_rank) if per_rank else 1, hd.world_size())
    restore_rng(payload["rng"])


@dataclass(frozen=True)
class StageCheckpoint:
    """One stage's state at the end of a finished epoch (``epoch`` counts from 0)."""

    stage: str
    epoch: int
    state: dict[str, Any]

    @property
    def next_epoch(self) -> int:
        return self.epoch + 1


class RunStore:
    """The checkpoints and the progress record of one run in ``<output_dir>/checkpoints``."""

    def __init__(self, output_dir: str | Path, writer: bool = True) -> None:
        self.root = Path(output_dir)
        self.dir = self.root / "checkpoints"
        self.progress_path = self.dir / "progress.json"
        self.writer = writer
        self._progress: dict[str, Any] = {"format": FORMAT_VERSION, "config": {}, "stages": {}}

    @property
    def progress(self) -> dict[str, Any]:
        """The progress record (config and finished stages) as plain data."""
        return json.loads(json.dumps(self._progress, default=str))

    def adopt(self, progress: Mapping[str, Any]) -> None:
        """Take another store's progress record (rank 0's, on the other ranks); writes nothing."""
        self._progress = json.loads(json.dumps(progress, default=str))

    # -- run lifecycle --------------------------------------------------------------------
    def start(self, config: Mapping[str, Any], resume: bool, overwrite: bool, keys: tuple[str, ...]) -> bool:
        """Open the store for a new or resumed run; returns True when resuming earlier progress.

        Without ``resume``, an output directory that already holds a run is refused unless
        ``overwrite`` (then its checkpoints are removed). With ``resume``, the stored config must
        agree with ``config`` on ``keys``.
        """
        if not self.writer:
            raise ResumeError("a read-only RunStore (not rank 0) cannot start a run; adopt rank 0's progress")
        exists = self.progress_path.is_file()
        if exists and not resume:
            if not overwrite:
                raise ResumeError(
                    f"{self.root} already holds a run; pass --resume to continue it or --overwrite "
                    "to start again (or choose another --output-dir)"
                )
            shutil.rmtree(self.dir, ignore_errors=True)
            exists = False
        if resume and not exists:
            logger.warning("nothing to resume in %s: starting a new run", self.root)
        if exists:
            try:
                stored = json.loads(self.progress_path.read_text(encoding="utf-8"))
            except (OSError, ValueError) as exc:
                raise ResumeError(f"cannot read {self.progress_path}: {exc}") from exc
            if stored.get("format") != FORMAT_VERSION:
                raise ResumeError(f"{self.progress_path} has format {stored.get('format')}, expected {FORMAT_VERSION}")
            old = stored.get("config", {})
            diff = [k for k in keys if old.get(k) != config.get(k)]
            if diff:
                details = ", ".join(f"{k}: {old.get(k)!r} -> {config.get(k)!r}" for k in diff)
                raise ResumeError(
                    f"cannot resume the run in {self.root}: its settings differ ({details}); "
                    "use the same settings or another --output-dir"
                )
            self._progress = stored
            self._progress["config"] = dict(config)
            self._write()
            return True
        self._progress = {"format": FORMAT_VERSION, "config": dict(config), "stages": {}}
        self._write()
        return False

    def _write(self) -> None:
        if not self.writer:
            return
        atomic_write_text(self.progress_path, json.dumps(self._progress, indent=2, sort_keys=True, default=str))

    # -- stage records --------------------------------------------------------------------
    def is_done(self, stage: str) -> bool:
        return stage in self._progress["stages"]

    def result(self, stage: str) -> dict[str, Any]:
        return dict(self._progress["stages"][stage])

    def mark_done(self, stage: str, result: Mapping[str, Any] | None = None) -> None:
        self._progress["stages"][stage] = dict(result or {})
        self._write()

    @property
    def finished_stages(self) -> list[str]:
        return list(self._progress["stages"])

    # -- epoch checkpoints ----------------------------------------------------------------
    def stage_path(self, stage: str) -> Path:
        return self.dir / f"{stage}.pt"

    def save_epoch(self, stage: str, epoch: int, state: Mapping[str, Any]) -> Path:
        """Write ``<stage>.pt``. Under torchrun every rank calls this (it gathers their RNG
        states); only the writer's ``state`` is used."""
        ranks_rng = _gather_rng()
        if not self.writer:
            return self.stage_path(stage)
        payload = {"format": FORMAT_VERSION, "stage": stage, "epoch": int(epoch), "rng": capture_rng()}
        if ranks_rng is not None:
            payload["rng_ranks"] = ranks_rng
        payload.update(state)
        path = atomic_save(payload, self.stage_path(stage))
        logger.debug("saved %s checkpoint, epoch %d, to %s", stage, epoch, path)
        return path

    def load_epoch(self, stage: str) -> StageCheckpoint | None:
        path = self.stage_path(stage)
        if not path.is_file():
            return None
        try:
            payload = safe_load(path)
        except Exception as exc:  # a truncated file cannot happen with atomic_save, but say so if it does
            raise ResumeError(f"cannot load checkpoint {path}: {exc}") from exc
        if payload.get("stage") != stage:
            raise ResumeError(f"{path} holds stage {payload.get('stage')!r}, expected {stage!r}")
        return StageCheckpoint(stage=stage, epoch=int(payload["epoch"]), state=payload)

    # -- artefacts kept between stages -----------------------------------------------------
    def artefact(self, name: str) -> Path:
        return self.dir / name
