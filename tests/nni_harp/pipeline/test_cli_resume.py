"""A prune run SIGKILLed in the middle of HARP pruning continues with --resume and finishes."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import torch

from nni_harp import load_pruned
from nni_harp._io import safe_load
from nni_harp.cli import main

ARGS = ["prune", "test_resnet", "--pretrain-epochs", "1", "--prune-epochs", "3", "--finetune-epochs", "1",
        "--batch-size", "32", "--max-train-batches", "3", "--attack-steps", "1", "--eval-samples", "8",
        "--eval-attack-steps", "1", "--autoattack", "off", "--latency-runs", "1", "--no-onnx", "--quiet"]


def _signal_once_pruning_checkpointed(out, signum: int) -> tuple[subprocess.Popen, str]:
    """Start the run in ``out``, send ``signum`` once its first pruning checkpoint exists; the
    ended process and its stderr."""
    ckpt = out / "checkpoints" / "prune.pt"
    proc = subprocess.Popen([sys.executable, "-m", "nni_harp", *ARGS, "--output-dir", str(out)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 600
    try:
        while not ckpt.is_file():
            assert proc.poll() is None, f"the run ended before pruning checkpointed: {proc.stderr.read()[-2000:]}"
            assert time.monotonic() < deadline, "no pruning checkpoint within 10 minutes"
            time.sleep(0.05)
        os.kill(proc.pid, signum)
        _, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    return proc, err


def test_sigkill_mid_pruning_then_resume(tmp_path, capsys):
    out = tmp_path / "run"
    ckpt = out / "checkpoints" / "prune.pt"
    proc, _ = _signal_once_pruning_checkpointed(out, signal.SIGKILL)
    assert proc.returncode == -signal.SIGKILL

    progress = json.loads((out / "checkpoints" / "progress.json").read_text())
    assert "pretrain" in progress["stages"] and "prune" not in progress["stages"]
    saved = safe_load(ckpt)  # weights_only: plain tensors and dicts
    assert saved["stage"] == "prune" and saved["epoch"] in (0, 1)
    saved_history = saved["pruner"]["history"]
    assert [h["epoch"] for h in saved_history] == list(range(saved["epoch"] + 1))
    assert any(k.endswith("_score") for k in saved["model"]) and any(k.endswith("_rate") for k in saved["model"])
    assert not (out / "report.json").exists()

    assert main([*ARGS, "--output-dir", str(out), "--resume"]) == 0
    captured = capsys.readouterr()
    report = json.loads((out / "report.json").read_text())
    assert [h["epoch"] for h in report["history"]] == [0, 1, 2]
    for before, after in zip(saved_history, report["history"]):
        assert after == before  # the epochs done before the kill are kept, not redone
    assert all(h["steps"] == 3 for h in report["history"])  # every epoch really trained
    assert report["pruned"]["nonzero_params"] < 0.2 * report["dense"]["nonzero_params"]
    assert "test_resnet on digits" in captured.out
    progress = json.loads((out / "checkpoints" / "progress.json").read_text())
    assert {"pretrain", "evaluate-dense", "prune", "finetune", "evaluate-pruned", "report"} <= set(progress["stages"])
    model = load_pruned("test_resnet", out)
    assert model(torch.rand(2, 3, 32, 32)).shape == (2, 10)


def test_sigterm_mid_pruning_says_what_was_saved_and_how_to_continue(tmp_path):
    out = tmp_path / "run"
    proc, err = _signal_once_pruning_checkpointed(out, signal.SIGTERM)
    assert proc.returncode == 128 + signal.SIGTERM, err[-2000:]
    last = err.strip().splitlines()[-1]
    assert last.startswith("nni-harp: error: stopped by SIGTERM; saved: finished stages pretrain"), last
    assert "prune up to epoch" in last and last.endswith(f"to continue: nni-harp {' '.join(ARGS)} --output-dir {out} --resume")
    assert "Traceback" not in err
