"""A NaN loss stops the run with a clear message (exit 3) and keeps the last good checkpoint."""
from __future__ import annotations

import json

import torch

import nni_harp.pipeline.stages.pretrain as pretrain_stage
import nni_harp.pipeline.stages.prune as prune_stage
import nni_harp.pipeline.training as training
from nni_harp._io import safe_load
from nni_harp.cli import main


def _poison_third_step(monkeypatch, module) -> None:
    """The training step ``module`` builds returns NaN on its third call (epoch 2, step 1 at two
    steps per epoch). Patched where the stage looks the factory up: each stage module imports
    ``make_training_step`` by name, so only the stage of ``module`` gets the poisoned step."""
    real = training.make_training_step
    calls = {"n": 0}

    def poisoned(ctx):
        step = real(ctx)

        def training_step(batch, model):
            calls["n"] += 1
            loss = step(batch, model)
            return loss * float("nan") if calls["n"] == 3 else loss  # epoch 2, step 1 (2 steps per epoch)

        return training_step

    monkeypatch.setattr(module, "make_training_step", poisoned)


def _argv(out, pretrain_epochs: int, prune_epochs: int) -> list[str]:
    """A tiny run, two training steps per epoch."""
    return ["prune", "test_resnet", "--output-dir", str(out), "--pretrain-epochs", str(pretrain_epochs),
            "--prune-epochs", str(prune_epochs), "--finetune-epochs", "1", "--batch-size", "16",
            "--max-train-batches", "2", "--attack-steps", "1", "--eval-samples", "8", "--eval-attack-steps", "1",
            "--autoattack", "off", "--latency-runs", "1", "--no-onnx", "--quiet"]


def test_nan_loss_in_pretraining_stops_the_run(tmp_path, capsys, monkeypatch):
    _poison_third_step(monkeypatch, pretrain_stage)
    out = tmp_path / "run"
    argv = _argv(out, pretrain_epochs=3, prune_epochs=1)
    code = main(argv)
    assert code == 3
    err = capsys.readouterr().err
    assert err.startswith("nni-harp: error: stage 'pretrain', epoch 2, step 1: loss is nan; stopped.")
    assert "last good checkpoint" in err and "--resume" in err and "Traceback" not in err
    saved = safe_load(out / "checkpoints" / "pretrain.pt")
    assert saved["epoch"] == 0
    assert all(torch.isfinite(v).all() for v in saved["model"].values() if v.is_floating_point())
    assert not (out / "report.json").exists()

    monkeypatch.undo()  # the cause is gone: --resume continues from the kept checkpoint
    assert main([*argv, "--resume"]) == 0
    report = json.loads((out / "report.json").read_text())
    assert report["pruned"]["eval_samples"] == 8
    progress = json.loads((out / "checkpoints" / "progress.json").read_text())
    assert progress["stages"]["pretrain"]["epochs"] == 3


def test_nan_loss_in_pruning_stops_the_run_and_keeps_the_last_pruning_epoch(tmp_path, capsys, monkeypatch):
    _poison_third_step(monkeypatch, prune_stage)
    out = tmp_path / "run"
    argv = _argv(out, pretrain_epochs=1, prune_epochs=3)
    assert main(argv) == 3
    err = capsys.readouterr().err
    assert err.startswith("nni-harp: error: stage 'prune', epoch 2, step 1: loss is nan; stopped."), err
    assert "--resume" in err and "Traceback" not in err
    saved = safe_load(out / "checkpoints" / "prune.pt")
    assert saved["epoch"] == 0 and [h["epoch"] for h in saved["pruner"]["history"]] == [0]
    assert all(torch.isfinite(v).all() for v in saved["model"].values() if v.is_floating_point())
    assert not (out / "report.json").exists()
