"""`nni-harp prune` under torchrun (2 gloo processes), SIGKILLed in the middle of pruning and
resumed, ends with exactly the weights and masks of an uninterrupted torchrun run: every rank
restores its own RNG streams (PGD random starts), and every prune epoch starts from rank 0's
BatchNorm statistics, which is what the checkpoint holds."""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
import torch

pytestmark = [pytest.mark.distributed, pytest.mark.timeout(900)]

REPO = Path(__file__).resolve().parents[2]
ARGS = ["test_resnet", "--sparsity", "0.8", "--batch-size", "32", "--max-train-batches", "3", "--attack-steps", "3",
        "--prune-epochs", "4", "--finetune-epochs", "1", "--eval-samples", "16", "--eval-attack-steps", "2",
        "--autoattack", "off", "--latency-runs", "1", "--no-onnx"]


def _torchrun(out: Path, checkpoint: Path, *extra: str) -> list[str]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_addr=127.0.0.1",
            f"--master_port={port}", "-m", "nni_harp", "prune", *ARGS, "--checkpoint", str(checkpoint),
            "--output-dir", str(out), *extra]


def _env() -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}


def _finish(cmd: list[str]) -> str:
    proc = subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=600, cwd=REPO)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    return proc.stdout + proc.stderr


def test_killed_and_resumed_torchrun_equals_an_uninterrupted_one(tmp_path):
    from nni_harp import load_pruned
    from nni_harp._io import safe_load
    from nni_harp.data import build_datasets
    from nni_harp.loading import create_model

    _, _, info = build_datasets("digits", None, 32, 0)
    torch.manual_seed(0)
    model, _ = create_model("test_resnet", info.num_classes, info.in_chans, 32, info.mean, info.std)
    dense = tmp_path / "dense.pt"
    torch.save(model.state_dict(), dense)

    _finish(_torchrun(tmp_path / "full", dense))

    out = tmp_path / "killed"
    ckpt = out / "checkpoints" / "prune.pt"
    proc = subprocess.Popen(_torchrun(out, dense), env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            cwd=REPO)
    deadline = time.monotonic() + 600
    try:
        while not ckpt.is_file():
            assert proc.poll() is None, "the run ended before pruning checkpointed"
            assert time.monotonic() < deadline, "no pruning checkpoint within 10 minutes"
            time.sleep(0.02)
        # torchrun starts its workers in sessions of their own: kill the whole tree, or the
        # workers would finish the run behind our back
        tree = [psutil.Process(proc.pid), *psutil.Process(proc.pid).children(recursive=True)]
        assert len(tree) == 3
        for p in tree:
            p.kill()
    finally:
        proc.wait(timeout=60)
    psutil.wait_procs(tree[1:], timeout=60)  # the workers (torchrun itself is reaped by wait())
    assert proc.returncode == -signal.SIGKILL
    saved = safe_load(ckpt)
    assert saved["epoch"] < 3 and len(saved["rng_ranks"]) == 2
    assert not torch.equal(saved["rng_ranks"][0]["torch"], saved["rng_ranks"][1]["torch"])
    assert not (out / "report.json").exists()
    progress = json.loads((out / "checkpoints" / "progress.json").read_text())
    assert "prune" not in progress["stages"]  # really killed in the middle of pruning

    resumed_log = _finish(_torchrun(out, dense, "--resume"))
    assert f"prune: resuming after epoch {saved['epoch'] + 1}/4" in resumed_log
    full, resumed = load_pruned("test_resnet", tmp_path / "full").state_dict(), load_pruned("test_resnet", out).state_dict()
    assert full.keys() == resumed.keys()
    for name, tensor in full.items():
        assert torch.equal(tensor, resumed[name]), name
