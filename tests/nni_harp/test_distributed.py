"""`nni-harp prune` under torchrun with 2 CPU processes (gloo, loopback) against one process.

Both runs start from the same dense weights (``--checkpoint``) and take the same global batch of
32 (16 per rank under torchrun), so they see the same images at every step. They still differ a
little, for two reasons DDP has by design: BatchNorm normalises each rank's 16 images with their
own statistics (no SyncBatchNorm), and PGD's random start draws different noise for an image on
rank 1 than for the same image in the single process. Hence the stated tolerances:
"""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytestmark = [pytest.mark.distributed, pytest.mark.timeout(600)]

REPO = Path(__file__).resolve().parents[2]
RATE_TOL = 0.02  # per-layer kept fraction, absolute
MASK_FLIP_TOL = 0.01  # fraction of mask entries that may differ (top-k near-ties)
SPARSITY_TOL = 1e-4  # achieved sparsity: the pruner rounds to the target by construction

ARGS = ["test_resnet", "--sparsity", "0.8", "--batch-size", "32", "--max-train-batches", "3",
        "--attack-steps", "1", "--prune-epochs", "2", "--finetune-epochs", "1", "--eval-samples", "16",
        "--eval-attack-steps", "2", "--autoattack", "off", "--latency-runs", "1", "--no-onnx"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run(launcher: list[str], out: Path, checkpoint: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    cmd = [*launcher, "-m", "nni_harp", "prune", *ARGS, "--checkpoint", str(checkpoint), "--output-dir", str(out)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=500, cwd=REPO)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    return proc


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    from nni_harp.data import build_datasets
    from nni_harp.loading import create_model

    base = tmp_path_factory.mktemp("ddp")
    _, _, info = build_datasets("digits", None, 32, 0)
    torch.manual_seed(0)
    model, _ = create_model("test_resnet", info.num_classes, info.in_chans, 32, info.mean, info.std)
    dense = base / "dense.pt"
    torch.save(model.state_dict(), dense)
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_addr=127.0.0.1",
                f"--master_port={_free_port()}"]
    ddp = _run(torchrun, base / "ddp", dense)
    single = _run([sys.executable], base / "single", dense)
    return (base / "ddp", ddp), (base / "single", single)


def _report(out: Path) -> dict:
    return json.loads((out / "report.json").read_text())


def test_torchrun_writes_one_report_and_logs_from_rank_0_only(runs):
    (out, proc), _ = runs
    report = _report(out)
    for name in ("report.json", "report.md", "model.pt", "model_meta.json", "kept_fraction.png"):
        assert (out / name).is_file(), name
    assert report["checks"]["world_size"] == 2.0
    assert proc.stdout.count("metric ") == 1  # the table, printed by rank 0 only
    assert proc.stderr.count("prune epoch 1/2:") == 1  # progress messages from rank 0 only
    assert "[rank 1]" not in proc.stderr


def test_ranks_agree_on_masks_rates_and_weights(runs):
    (out, _), _ = runs
    checks = _report(out)["checks"]
    assert checks["ranks_masks_max_abs_diff"] == 0.0
    assert checks["ranks_rates_max_abs_diff"] == 0.0
    assert checks["ranks_weights_max_abs_diff"] == 0.0


def test_two_processes_match_one_process_with_the_same_global_batch(runs):
    (ddp_out, _), (single_out, _) = runs
    ddp, single = _report(ddp_out), _report(single_out)
    assert "world_size" not in single["checks"]
    assert ddp["achieved"]["sparsity"] == pytest.approx(single["achieved"]["sparsity"], abs=SPARSITY_TOL)
    assert ddp["layer_rates"].keys() == single["layer_rates"].keys() and ddp["layer_rates"]
    for name, rate in ddp["layer_rates"].items():
        assert abs(rate - single["layer_rates"][name]) <= RATE_TOL, name
    masks_ddp = torch.load(ddp_out / "checkpoints" / "masks.pt", weights_only=True)
    masks_single = torch.load(single_out / "checkpoints" / "masks.pt", weights_only=True)
    assert masks_ddp.keys() == masks_single.keys()
    flips = sum(int((masks_ddp[m][p] != masks_single[m][p]).sum()) for m in masks_ddp for p in masks_ddp[m])
    total = sum(t.numel() for d in masks_ddp.values() for t in d.values())
    assert flips / total <= MASK_FLIP_TOL, (flips, total)


def test_a_latency_budget_under_torchrun_is_checked_on_rank_0_and_the_ranks_keep_one_plan(tmp_path):
    """The final plan of a latency budget is measured by rank 0 (HARPSettings.latency_checks) and
    its refitted model broadcast: every rank fixes the same masks, and the run ends normally."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO), "XDG_CACHE_HOME": str(tmp_path / "cache")}
    out = tmp_path / "ddp-latency"
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_addr=127.0.0.1",
                f"--master_port={_free_port()}"]
    cmd = [*torchrun, "-m", "nni_harp", "prune", "test_resnet", "--mode", "structured", "--budget", "latency",
           "--latency-target", "0.8", "--latency-backend", "eager", "--image-size", "64", "--batch-size", "32",
           "--max-train-batches", "3", "--attack-steps", "1", "--pretrain-epochs", "1", "--prune-epochs", "2",
           "--finetune-epochs", "1", "--eval-samples", "16", "--eval-attack-steps", "2", "--autoattack", "off",
           "--latency-runs", "2", "--no-onnx", "--output-dir", str(out)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=500, cwd=REPO)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    report = _report(out)
    assert report["checks"]["world_size"] == 2.0
    assert 1 <= len(report["latency_budget"]["checks"]) <= 2
    assert report["checks"]["ranks_masks_max_abs_diff"] == 0.0
    assert report["checks"]["ranks_rates_max_abs_diff"] == 0.0
