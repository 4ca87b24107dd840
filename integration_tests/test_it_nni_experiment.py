"""A real local NNI experiment (NNI manager on loopback, node.js from the nni wheel) running two
trials of ``python -m nni_harp.trial`` on timm's ``test_resnet`` and the digits data."""
from __future__ import annotations

import importlib.util
import socket
import sys
import time
from pathlib import Path

import pytest

pytestmark = [pytest.mark.nni_experiment, pytest.mark.slow, pytest.mark.timeout(1500)]

REPO = Path(__file__).resolve().parents[1]
PRUNERS = ["harp", "l1norm"]
TARGET = 0.9
TINY = ("--param max_train_batches=2 --param pretrain_epochs=1 --param prune_epochs=2 --param finetune_epochs=1 "
        "--param eval_batches=1 --param eval_attack_steps=2 --param attack_steps=1 --param batch_size=32")
FINISHED = {"DONE", "STOPPED", "ERROR", "NO_MORE_TRIAL"}
ENDED = {"SUCCEEDED", "FAILED", "USER_CANCELED", "SYS_CANCELED", "EARLY_STOPPED"}


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _port_is_free(port: int) -> bool:
    """Nobody listens on ``port`` and a new server could bind it (connections the stopped manager
    closed may linger in TIME_WAIT; SO_REUSEADDR, which servers such as NNI's set, ignores them)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        if probe.connect_ex(("127.0.0.1", port)) == 0:
            return False
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
        return True


def _finished(exp, n_trials: int) -> bool:
    """DONE, or every trial submitted (NO_MORE_TRIAL) and ended; NO_MORE_TRIAL alone still has
    the last trial running."""
    status = exp.get_status()
    if status in FINISHED - {"NO_MORE_TRIAL"}:
        return True
    if status != "NO_MORE_TRIAL":
        return False
    jobs = exp.list_trial_jobs()
    return len(jobs) >= n_trials and all(j.status in ENDED for j in jobs)


def _load_launcher():
    spec = importlib.util.spec_from_file_location("nni_launch", REPO / "examples" / "nni_experiment" / "launch.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_local_experiment_runs_trials_and_reports_metrics(tmp_path):
    launch = _load_launcher()
    space = {"pruner": {"_type": "choice", "_value": PRUNERS}, "sparsity": {"_type": "choice", "_value": [TARGET]}}
    exp = launch.build(trials=len(PRUNERS), trial_args=TINY, search_space=space)
    exp.config.tuner.name = "GridSearch"
    exp.config.tuner.class_args = {}
    exp.config.nni_manager_ip = "127.0.0.1"
    exp.config.experiment_working_directory = str(tmp_path / "nni-experiments")
    exp.config.max_experiment_duration = "20m"
    port = _free_port()
    try:
        exp.start(port)
        deadline = time.monotonic() + 1200
        while not _finished(exp, len(PRUNERS)) and time.monotonic() < deadline:
            time.sleep(5)
        status = exp.get_status()
        jobs = exp.list_trial_jobs()
        data = exp.export_data()
        metrics = exp.get_job_metrics()
    finally:
        exp.stop()
    for _ in range(30):  # the manager process may take a moment to release its socket
        if _port_is_free(port):
            break
        time.sleep(1)
    assert _port_is_free(port), f"port {port} still in use after Experiment.stop()"

    assert status in {"DONE", "NO_MORE_TRIAL"}, f"experiment ended as {status}; trials: {[(j.trialJobId, j.status) for j in jobs]}"
    assert len(jobs) == len(PRUNERS)
    assert all(j.status == "SUCCEEDED" for j in jobs), [(j.trialJobId, j.status) for j in jobs]
    assert len(data) == len(PRUNERS)
    seen = set()
    for row in data:
        value = row.value
        assert isinstance(value, dict), value
        seen.add(value["pruner"])
        for key in ("default", "robust_acc", "clean_acc", "sparsity", "flops_kept"):
            assert 0.0 <= value[key] <= 1.0, (key, value)
        assert value["default"] == value["robust_acc"]
        assert abs(value["sparsity"] - TARGET) <= 0.1, value
        assert value["flops_kept"] < 0.5, value
    assert seen == set(PRUNERS)
    # per-epoch intermediate results: 2 pruning epochs (one for the one-shot pruner) + 1 fine-tuning epoch
    for trial_id, rows in metrics.items():
        periodical = [m for m in rows if m.type == "PERIODICAL"]
        assert len(periodical) >= 2, (trial_id, rows)
