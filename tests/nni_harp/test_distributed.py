"""HARP pruning + fine-tuning under torchrun with 2 CPU processes (gloo, localhost)."""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytestmark = [pytest.mark.distributed, pytest.mark.timeout(900)]

WORKER = Path(__file__).with_name("_ddp_worker.py")
# Tolerance against the single-process run with the same global batch: the only differences are
# the order of float additions in the gradient all-reduce, so rates agree to 1e-4 and at most 1 %
# of the mask entries may flip (top-k ties decided by float noise).
RATE_TOL, MASK_FLIP_TOL, WEIGHT_TOL = 1e-4, 0.01, 1e-3


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run(args: list[str], out: Path) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(WORKER.parents[2])}
    proc = subprocess.run([sys.executable, *args, "--out", str(out)], env=env, capture_output=True, text=True, timeout=800)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    return {"diffs": json.loads((out / "diffs.json").read_text()), **torch.load(out / "result.pt", weights_only=True)}


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    base = tmp_path_factory.mktemp("ddp")
    ddp = _run(["-m", "torch.distributed.run", "--nproc_per_node=2", "--master_addr=127.0.0.1",
                f"--master_port={_free_port()}", str(WORKER)], base / "ddp")
    single = _run([str(WORKER)], base / "single")
    return ddp, single


def test_ranks_end_with_identical_masks_rates_and_weights(runs):
    ddp, _ = runs
    assert ddp["diffs"]["world_size"] == 2 and ddp["diffs"]["backend"] == "gloo"
    assert ddp["diffs"]["masks"] == 0.0
    assert ddp["diffs"]["rates"] == 0.0
    assert ddp["diffs"]["weights"] == 0.0


def test_two_processes_match_one_process_with_the_same_global_batch(runs):
    ddp, single = runs
    assert single["diffs"]["world_size"] == 1
    assert ddp["rates"].keys() == single["rates"].keys() and ddp["rates"]
    for name in ddp["rates"]:
        assert abs(ddp["rates"][name] - single["rates"][name]) <= RATE_TOL, name
    flips = sum(int((ddp["masks"][k] != single["masks"][k]).sum()) for k in ddp["masks"])
    total = sum(v.numel() for v in ddp["masks"].values())
    assert flips / total <= MASK_FLIP_TOL, (flips, total)
    for k, v in ddp["state"].items():
        assert torch.allclose(v, single["state"][k], atol=WEIGHT_TOL), k
