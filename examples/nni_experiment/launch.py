"""The experiment of config.yml, launched from Python (nni.experiment.Experiment('local')).

    python examples/nni_experiment/launch.py --port 8080 --trials 6

Runs on this machine, web UI on 127.0.0.1:PORT, and prints each trial's final result when done.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from nni.experiment import Experiment

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]


def check_filelock() -> None:
    """NNI 3.0's experiment registry lock (nni.tools.nnictl.common_utils.SimplePreemptiveLock)
    subclasses filelock internals that changed in filelock 3.12: with a newer filelock,
    Experiment.start() never returns (it spins on the lock). nni 3.0 declares filelock<3.12;
    installing tox into the same environment upgrades it."""
    from importlib.metadata import version

    major, minor = (int(x) for x in version("filelock").split(".")[:2])
    if (major, minor) >= (3, 12):
        raise RuntimeError(
            f"filelock {version('filelock')} is installed; NNI 3.0 experiments need filelock<3.12 "
            "(pip install 'filelock<3.12'; keep tox in its own environment)"
        )


def build(trials: int, trial_args: str = "--param max_train_batches=10 --param pretrain_epochs=2",
          search_space: dict | None = None) -> Experiment:
    check_filelock()
    exp = Experiment("local")
    exp.config.experiment_name = "nni-harp-pruners"
    exp.config.trial_command = f"{sys.executable} -m nni_harp.trial {trial_args}"
    exp.config.trial_code_directory = str(REPO)
    exp.config.search_space = search_space or json.loads((HERE / "search_space.json").read_text())
    exp.config.tuner.name = "TPE"
    exp.config.tuner.class_args = {"optimize_mode": "maximize"}
    exp.config.trial_concurrency = 1
    exp.config.max_trial_number = trials
    exp.config.max_experiment_duration = "2h"
    exp.config.training_service.use_active_gpu = False
    return exp


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, default=8080)
    parser.add_argument("--trials", type=int, default=6)
    args = parser.parse_args()
    exp = build(args.trials)
    exp.start(args.port)
    try:
        # NO_MORE_TRIAL only means every trial was submitted; DONE means they all ended
        while exp.get_status() not in ("DONE", "STOPPED", "ERROR"):
            time.sleep(10)
        for row in exp.export_data():
            print(row.parameter, row.value)
    finally:
        exp.stop()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
