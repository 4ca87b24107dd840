"""The prune stage resumed from its per-epoch checkpoint continues HARP exactly: a run of 3 prune
epochs stopped after its first or second and resumed gives the masks, layer rates and pruning history (gamma, kept
fraction, losses per epoch) of the same run left alone. A prune checkpoint written before the
pruner's full state was saved is refused with a clear message instead of resumed wrongly."""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import torch

from nni_harp._io import atomic_save, safe_load
from nni_harp.pipeline import PipelineCallback, PipelineConfig, ResumeError, run



class Interrupted(RuntimeError):
    """Raised from a callback to stop the run, as a kill would."""


class StopBeforePruneEpoch(PipelineCallback):
    """Stops the run when prune epoch ``stop_at`` (0-based) starts: the checkpoint of the epoch
    before it has been written by then."""

    def __init__(self, stop_at: int) -> None:
        self.stop_at = stop_at

    def on_epoch_start(self, stage: str, epoch: int, total: int | None) -> None:
        if stage == "prune" and epoch == self.stop_at:
            raise Interrupted(f"stopped before prune epoch {epoch}")


def _config(out: Path, **changes) -> PipelineConfig:
    # started at the target (init_keep), the target is met after epoch 0 and gamma freezes at
    # gamma_0: a resumed pruner that forgot the freeze would grow gamma to 2 * gamma_0 in epoch 1
    # (stop 1) and would not settle on the same final masks (stop 2), so the schedule's state
    # matters on either side of a stop
    base = PipelineConfig(
        model="test_resnet", output_dir=str(out), sparsity=0.9, pretrain_epochs=1, prune_epochs=3,
        finetune_epochs=1, batch_size=16, max_train_batches=2, attack_steps=1, gamma_0=0.01, init_keep=0.1,
        eval_samples=4, eval_attack_steps=1, autoattack="off", latency_runs=1, export_onnx=False, seed=2,
    )
    return dataclasses.replace(base, **changes)


def _outcome(out: Path) -> tuple[dict, dict, list]:
    masks = safe_load(out / "checkpoints" / "masks.pt")
    report = json.loads((out / "report.json").read_text())
    return masks, report["layer_rates"], report["history"]


@pytest.fixture(scope="module")
def whole(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("whole") / "run"
    run(_config(out))
    return out


def _interrupted(out: Path, stop_at: int) -> Path:
    with pytest.raises(Interrupted):
        run(_config(out), callbacks=[StopBeforePruneEpoch(stop_at)])
    return out


@pytest.mark.parametrize("stop_at", [1, 2])
def test_resumed_pruning_matches_uninterrupted_run(tmp_path, whole, stop_at):
    out = _interrupted(tmp_path / "run", stop_at)
    saved = safe_load(out / "checkpoints" / "prune.pt")
    assert saved["epoch"] == stop_at - 1
    assert [h["epoch"] for h in saved["pruner"]["history"]] == list(range(stop_at))
    run(_config(out, resume=True))

    masks_r, rates_r, history_r = _outcome(out)
    masks_w, rates_w, history_w = _outcome(whole)
    # Same seed, same batches, same RNG state at every epoch and the pruner's full state restored:
    # the CPU computation is the same sequence of operations, so the results are bit-identical.
    # the scenario: the target met in epoch 0 (gamma frozen there), the final masks fixed at the end
    # of epoch 1 from the rates; epoch 2 settles on them (a run resumed there fixes them again from
    # the restored rates)
    assert history_w[0]["target_met"] and history_w[1]["target_met"]
    assert [h["settled"] for h in history_w] == [False, False, True]
    assert [h["gamma"] for h in history_w] == [0.01, 0.01, 0.01]
    assert history_r == history_w  # gamma, kept fraction, losses and target_met of every epoch
    assert rates_r == rates_w
    assert masks_r.keys() == masks_w.keys()
    for module, targets in masks_w.items():
        assert targets.keys() == masks_r[module].keys()
        for name, mask in targets.items():
            assert torch.equal(masks_r[module][name], mask), f"{module}.{name}"
    # the run really pruned (an all-ones result would match trivially)
    removed = sum(int((m == 0).sum()) for t in masks_w.values() for m in t.values())
    assert removed > 0


def test_old_prune_checkpoint_without_pruner_state_is_refused(tmp_path):
    out = _interrupted(tmp_path / "run", 1)
    path = out / "checkpoints" / "prune.pt"
    saved = safe_load(path)
    # the layout written before the pruner's state was saved: history and the epoch gamma froze at
    saved["pruner"] = {"history": saved["pruner"]["history"], "gamma_frozen_at": None}
    saved.pop("pruner_format", None)
    atomic_save(saved, path)
    with pytest.raises(ResumeError) as info:
        run(_config(out, resume=True))
    message = str(info.value)
    assert str(path) in message and "--overwrite" in message
    assert not (out / "report.json").exists()
