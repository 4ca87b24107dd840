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

__all__ = [
    "RunStore", "StageCheckpoint", "capture_rng", "restore_rng", "restore_rank_rng", "ResumeError",
    "CheckpointWriteError", "RunInterrupted",
]

logger = logging.getLogger(__name__)

FORMAT_VERSION = 1
CHECKPOINT_DIR = "checkpoints"
PROGRESS_FILE = "progress.json"
# what a stage checkpoint holds besides the stage's own state (see save_epoch)
_PAYLOAD_KEYS = {"format": int, "stage": str, "epoch": int, "rng": Mapping}
_RNG_KEYS = ("python", "numpy", "torch")


class ResumeError(RuntimeError):
    """A run cannot be resumed (or a new one cannot start) in the given output directory."""


class CheckpointWriteError(RuntimeError):
    """A checkpoint could not be written (disk full, permissions); the message says which, and
    that the previous checkpoint of the stage is intact (atomic writes never damage it)."""


class RunInterrupted(KeyboardInterrupt):
    """Ctrl-C or SIGTERM stopped a run; ``saved`` says what is on disk for ``--resume``."""

    def __init__(self, saved: str, resumable: bool) -> None:
        super().__init__(saved)
        self.saved, self.resumable = saved, resumable


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
        self.dir = self.root / CHECKPOINT_DIR
        self.progress_path = self.dir / PROGRESS_FILE
        self.writer = writer
        self._progress: dict[str, Any] = {"format": FORMAT_VERSION, "config": {}, "stages": {}}
        self._saved: dict[str, int] = {}  # stage -> last epoch written or read in this process
        self.started = False

    @property
    def progress(self) -> dict[str, Any]:
        """The progress record (config and finished stages) as plain data."""
        return json.loads(json.dumps(self._progress, default=str))

    def adopt(self, progress: Mapping[str, Any]) -> None:
        """Take another store's progress record (rank 0's, on the other ranks); writes nothing."""
        self._progress = json.loads(json.dumps(progress, default=str))

    # -- run lifecycle --------------------------------------------------------------------
    def start(self, config: Mapping[str, Any], resume: bool, overwrite: bool, keys: tuple[str, ...],
              defaults: Mapping[str, Any] | None = None) -> bool:
        """Open the store for a new or resumed run; returns True when resuming earlier progress.

        Without ``resume``, an output directory that already holds a run is refused unless
        ``overwrite`` (then its checkpoints, and whatever else ``checkpoints/`` holds, are
        removed). With ``resume``, the stored config must agree with ``config`` on ``keys``; a key
        the stored config lacks (a run of an older nni-harp) counts as its value in ``defaults``.
        """
        if not self.writer:
            raise ResumeError("a read-only RunStore (not rank 0) cannot start a run; adopt rank 0's progress")
        exists = self.progress_path.is_file()
        if exists and not resume and not overwrite:
            raise ResumeError(
                f"{self.root} already holds a run; pass --resume to continue it or --overwrite "
                "to start again (or choose another --output-dir)"
            )
        if overwrite:
            shutil.rmtree(self.dir, ignore_errors=True)
            exists = False
        if resume and not exists:
            logger.warning("nothing to resume in %s: starting a new run", self.root)
        if exists:
            stored = self._read_progress()
            old = stored["config"]
            before = {k: old.get(k, (defaults or {}).get(k)) for k in keys}
            diff = [k for k in keys if before[k] != config.get(k)]
            if diff:
                details = ", ".join(f"{k}: {before[k]!r} -> {config.get(k)!r}" for k in diff)
                raise ResumeError(
                    f"cannot resume the run in {self.root}: its settings differ ({details}); "
                    "use the same settings or another --output-dir"
                )
            self._progress = stored
            self._progress["config"] = dict(config)
            self._write()
            self.started = True
            return True
        self._progress = {"format": FORMAT_VERSION, "config": dict(config), "stages": {}}
        self._write()
        self.started = True
        return False

    def _read_progress(self) -> dict[str, Any]:
        """``progress.json``, checked: its format and a ``config`` and a ``stages`` object."""
        path = self.progress_path
        try:
            stored = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            raise ResumeError(f"cannot read {path}: {exc}; start this run again with --overwrite") from exc
        if not isinstance(stored, dict) or stored.get("format") != FORMAT_VERSION:
            found = stored.get("format") if isinstance(stored, dict) else type(stored).__name__
            raise ResumeError(f"{path}: field 'format' is {found!r}, expected {FORMAT_VERSION}")
        for key in ("config", "stages"):
            if not isinstance(stored.get(key), dict):
                raise ResumeError(f"{path}: field {key!r} must be an object, found {stored.get(key)!r}; start this "
                                  "run again with --overwrite")
        if not all(isinstance(v, dict) for v in stored["stages"].values()):
            raise ResumeError(f"{path}: field 'stages' must map stage names to objects; start this run again with "
                              "--overwrite")
        return stored

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
        path = self.stage_path(stage)
        try:
            atomic_save(payload, path)
        except OSError as exc:  # disk full, quota, permissions: the temporary file is gone, the old one intact
            previous = self._saved.get(stage)
            if path.is_file():
                kept = f"the previous checkpoint{f' (epoch {previous + 1})' if previous is not None else ''} is intact"
            else:
                kept = "no earlier checkpoint of this stage exists"
            raise CheckpointWriteError(
                f"cannot write the {stage} checkpoint of epoch {epoch + 1} to {path}: {exc.strerror or exc}; {kept}. "
                "Free space (or fix the folder), then run the same command with --resume"
            ) from exc
        self._saved[stage] = int(epoch)
        logger.debug("saved %s checkpoint, epoch %d, to %s", stage, epoch, path)
        return path

    def load_epoch(self, stage: str, required: tuple[str, ...] = ()) -> StageCheckpoint | None:
        """The checkpoint of ``stage`` (None when there is none), checked: a dict with the fields
        :meth:`save_epoch` writes, and ``required`` (the stage's own state). A damaged or
        truncated file is refused with what to do."""
        path = self.stage_path(stage)
        if not path.is_file():
            return None
        redo = (f"delete it to redo the {stage} stage from its first epoch (finished stages are kept), or start "
                "this run again with --overwrite")
        try:
            payload = safe_load(path)
        except Exception as exc:  # noqa: BLE001 - atomic writes never truncate; a copied or damaged file can be
            raise ResumeError(f"checkpoint {path} is damaged (truncated or corrupt: {first_line(exc)}); {redo}") from exc
        if not isinstance(payload, dict):
            raise ResumeError(f"checkpoint {path} holds a {type(payload).__name__}, not a checkpoint; {redo}")
        for key, kind in {**_PAYLOAD_KEYS, **{k: object for k in required}}.items():
            value = payload.get(key)
            if value is None or not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
                raise ResumeError(f"checkpoint {path}: field {key!r} is missing or not a {kind.__name__}; {redo}")
        if payload["format"] != FORMAT_VERSION or payload["stage"] != stage or payload["epoch"] < 0:
            raise ResumeError(f"checkpoint {path} is not a format-{FORMAT_VERSION} {stage!r} checkpoint (format "
                              f"{payload['format']}, stage {payload['stage']!r}, epoch {payload['epoch']}); {redo}")
        missing = [k for k in _RNG_KEYS if k not in payload["rng"]]
        if missing:
            raise ResumeError(f"checkpoint {path}: field 'rng' lacks {', '.join(missing)}; {redo}")
        self._saved[stage] = payload["epoch"]
        return StageCheckpoint(stage=stage, epoch=payload["epoch"], state=payload)

    # -- artefacts kept between stages -----------------------------------------------------
    def artefact(self, name: str) -> Path:
        return self.dir / name

    def load_artefact(self, name: str, map_location: str | torch.device = "cpu", nested: bool = False) -> dict[str, Any]:
        """A finished stage's saved tensors (``dense.pt``, ``masks.pt``, ...), checked: a dict of
        tensors (``nested``: of dicts of tensors, as masks are). Refused with the file named."""
        path = self.artefact(name)
        try:
            data = safe_load(path, map_location=map_location)
        except Exception as exc:  # noqa: BLE001 - missing, truncated, not a weights-only file
            raise ResumeError(f"{path} cannot be read ({first_line(exc)}), so this run cannot continue from it; "
                              "start it again with --overwrite") from exc
        inner = (lambda v: isinstance(v, Mapping) and all(isinstance(t, torch.Tensor) for t in v.values())) if nested \
            else (lambda v: isinstance(v, torch.Tensor))
        if not isinstance(data, dict) or not all(isinstance(k, str) and inner(v) for k, v in data.items()):
            raise ResumeError(f"{path} does not hold {'masks' if nested else 'a state dict'} (names to tensors); "
                              "start this run again with --overwrite")
        return data

    def saved_summary(self) -> tuple[str, bool]:
        """What this run has on disk for ``--resume``, in words, and whether there is anything."""
        if not self.started:
            return "nothing was saved yet", False
        parts = []
        finished = [s for s in self.finished_stages if s != "report"]
        if finished:
            parts.append(f"finished stages {', '.join(finished)}")
        for stage, epoch in self._saved.items():
            if stage not in finished:
                parts.append(f"{stage} up to epoch {epoch + 1} ({self.stage_path(stage)})")
        return ("saved: " + "; ".join(parts)) if parts else f"no epoch had finished (the run's settings are in "\
            f"{self.progress_path})", True


def first_line(exc: BaseException) -> str:
    """The first line of ``exc``'s message (at most 200 characters), or its type's name when it
    has none: the cause quoted in a one-line error."""
    text = str(exc).strip()
    return text.splitlines()[0][:200] if text else type(exc).__name__
