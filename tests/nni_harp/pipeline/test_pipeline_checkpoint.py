"""Stage checkpoints, the progress record, RNG capture and the epoch loop's NaN guard / resume."""
from __future__ import annotations

import json
import random

import numpy as np
import pytest
import torch
from torch import nn
from torch.utils.data import TensorDataset

from nni_harp.pipeline._loop import EpochLoop, NonFiniteLossError
from nni_harp.pipeline.callbacks import CallbackList, PipelineCallback
from nni_harp.pipeline.checkpoint import ResumeError, RunStore, capture_rng, restore_rng

KEYS = ("model", "sparsity")


def test_rng_round_trip_through_weights_only_file(tmp_path):
    random.seed(1), np.random.seed(2), torch.manual_seed(3)
    store = RunStore(tmp_path)
    store.start({"model": "m"}, resume=False, overwrite=False, keys=KEYS)
    store.save_epoch("pretrain", 0, {"x": torch.ones(2)})
    expected = (random.random(), float(np.random.rand()), float(torch.rand(1)))
    ck = store.load_epoch("pretrain")  # loaded with weights_only=True
    assert ck is not None and ck.epoch == 0 and ck.next_epoch == 1
    restore_rng(ck.state["rng"])
    assert (random.random(), float(np.random.rand()), float(torch.rand(1))) == expected
    assert torch.equal(ck.state["x"], torch.ones(2))


def test_capture_rng_is_plain_data():
    state = capture_rng()
    assert isinstance(state["torch"], torch.Tensor)
    assert isinstance(state["numpy"]["key"], torch.Tensor)
    assert isinstance(state["python"]["state"], list)


def test_existing_run_needs_resume_or_overwrite(tmp_path):
    cfg = {"model": "m", "sparsity": 0.9}
    assert RunStore(tmp_path).start(cfg, resume=False, overwrite=False, keys=KEYS) is False
    with pytest.raises(ResumeError, match="--resume"):
        RunStore(tmp_path).start(cfg, resume=False, overwrite=False, keys=KEYS)
    store = RunStore(tmp_path)
    assert store.start(cfg, resume=True, overwrite=False, keys=KEYS) is True
    store.mark_done("pretrain", {"epochs": 2})
    assert RunStore(tmp_path).start(cfg, resume=True, overwrite=False, keys=KEYS)
    again = RunStore(tmp_path)
    again.start(cfg, resume=True, overwrite=False, keys=KEYS)
    assert again.is_done("pretrain") and again.result("pretrain") == {"epochs": 2}
    fresh = RunStore(tmp_path)
    fresh.start(cfg, resume=False, overwrite=True, keys=KEYS)
    assert not fresh.is_done("pretrain")


def test_resume_refuses_changed_settings(tmp_path):
    RunStore(tmp_path).start({"model": "m", "sparsity": 0.9}, resume=False, overwrite=False, keys=KEYS)
    with pytest.raises(ResumeError, match="sparsity: 0.9 -> 0.5"):
        RunStore(tmp_path).start({"model": "m", "sparsity": 0.5}, resume=True, overwrite=False, keys=KEYS)
    progress = json.loads((tmp_path / "checkpoints" / "progress.json").read_text())
    assert progress["config"]["sparsity"] == 0.9


class Recorder(PipelineCallback):
    def __init__(self) -> None:
        self.events: list[tuple] = []

    def on_stage_start(self, stage, epochs, start_epoch, total):
        self.events.append(("start", stage, epochs, start_epoch, total))

    def on_step(self, stage, epoch, step, metrics):
        self.events.append(("step", epoch, step, dict(metrics)))

    def on_epoch_end(self, stage, epoch, metrics):
        self.events.append(("epoch", epoch, dict(metrics)))


def _setup(tmp_path, n=48):  # three full batches of 16 (an epoch leaves out a partial last batch)
    torch.manual_seed(0)
    x = torch.randn(n, 4)
    y = (x[:, 0] > 0).long()
    store = RunStore(tmp_path)
    store.start({"model": "m"}, resume=False, overwrite=False, keys=KEYS)
    return TensorDataset(x, y), store


def _step(batch, model):
    x, y = batch
    return nn.functional.cross_entropy(model(x), y)


def test_loop_checkpoints_every_epoch_and_reports_progress(tmp_path):
    ds, store = _setup(tmp_path)
    model = nn.Linear(4, 2)
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    rec = Recorder()
    loop = EpochLoop("pretrain", ds, 16, 0, store, CallbackList([rec]))
    metrics = loop.run(model, [opt], [], _step, 3, 0, lambda: {"model": model.state_dict()})
    assert len(metrics) == 3 and metrics[-1]["loss"] < metrics[0]["loss"]
    assert 0.0 <= metrics[-1]["acc"] <= 1.0  # from the training-mode forward, no extra pass
    assert rec.events[0] == ("start", "pretrain", 3, 0, 3)
    assert sum(1 for e in rec.events if e[0] == "step") == 9
    ck = store.load_epoch("pretrain")
    assert ck.epoch == 2
    assert torch.equal(ck.state["model"]["weight"], model.weight)


def test_loop_respects_max_batches(tmp_path):
    ds, store = _setup(tmp_path)
    model = nn.Linear(4, 2)
    rec = Recorder()
    loop = EpochLoop("finetune", ds, 8, 0, store, CallbackList([rec]), max_batches=2)
    loop.run(model, [torch.optim.SGD(model.parameters(), lr=0.1)], [], _step, 2, 0, lambda: {})
    assert sum(1 for e in rec.events if e[0] == "step") == 4


def test_resumed_loop_matches_uninterrupted_run(tmp_path):
    ds, store = _setup(tmp_path / "a")
    torch.manual_seed(5)
    full = nn.Linear(4, 2)
    init = {k: v.clone() for k, v in full.state_dict().items()}
    opt = torch.optim.SGD(full.parameters(), lr=0.3, momentum=0.9)
    EpochLoop("prune", ds, 16, 7, store, CallbackList()).run(
        full, [opt], [], _step, 3, 0, lambda: {"model": full.state_dict(), "optimizer": opt.state_dict()}
    )

    ds, store = _setup(tmp_path / "b")
    part = nn.Linear(4, 2)
    part.load_state_dict(init)
    opt2 = torch.optim.SGD(part.parameters(), lr=0.3, momentum=0.9)
    state = lambda: {"model": part.state_dict(), "optimizer": opt2.state_dict()}  # noqa: E731
    EpochLoop("prune", ds, 16, 7, store, CallbackList()).run(part, [opt2], [], _step, 1, 0, state)
    ck = store.load_epoch("prune")
    resumed = nn.Linear(4, 2)
    resumed.load_state_dict(ck.state["model"])
    opt3 = torch.optim.SGD(resumed.parameters(), lr=0.3, momentum=0.9)
    opt3.load_state_dict(ck.state["optimizer"])
    EpochLoop("prune", ds, 16, 7, store, CallbackList()).run(
        resumed, [opt3], [], _step, 3, ck.next_epoch, lambda: {"model": resumed.state_dict()}
    )
    for a, b in zip(full.parameters(), resumed.parameters()):
        torch.testing.assert_close(a, b)


def test_nan_loss_stops_and_keeps_last_good_checkpoint(tmp_path):
    ds, store = _setup(tmp_path)
    model = nn.Linear(4, 2)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    calls = {"n": 0}

    def step(batch, m):
        calls["n"] += 1
        loss = _step(batch, m)
        return loss * float("nan") if calls["n"] == 5 else loss  # epoch 2 (3 steps/epoch), step 2

    loop = EpochLoop("finetune", ds, 16, 0, store, CallbackList())
    with pytest.raises(NonFiniteLossError) as info:
        loop.run(model, [opt], [], step, 3, 0, lambda: {"model": model.state_dict()})
    msg = str(info.value)
    assert "'finetune', epoch 2, step 2: loss is nan" in msg and "last good checkpoint" in msg
    ck = store.load_epoch("finetune")
    assert ck.epoch == 0
    assert all(torch.isfinite(p).all() for p in model.parameters())
    assert all(torch.isfinite(v).all() for v in ck.state["model"].values())


def test_nan_in_first_epoch_says_no_checkpoint(tmp_path):
    ds, store = _setup(tmp_path)
    model = nn.Linear(4, 2)
    loop = EpochLoop("pretrain", ds, 16, 0, store, CallbackList())
    with pytest.raises(NonFiniteLossError, match="no epoch of this stage had finished"):
        loop.run(model, [torch.optim.SGD(model.parameters(), lr=0.1)], [],
                 lambda b, m: torch.tensor(float("inf"), requires_grad=True), 2, 0, lambda: {})
    assert store.load_epoch("pretrain") is None
