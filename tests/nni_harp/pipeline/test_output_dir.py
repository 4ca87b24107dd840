"""The output folder rules: a run never overwrites what a user saved, an unusable folder is refused
before any work with the path and the fix, one run per folder, and killed writes leave no debris."""
from __future__ import annotations

import errno
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from nni_harp.cli import main
from nni_harp.pipeline import CheckpointWriteError, ResumeError
from nni_harp.pipeline import outdir
from nni_harp.pipeline.checkpoint import RunStore

# the smallest real run: it is refused (or not) before any of this matters
FAST = ["--pretrain-epochs", "1", "--prune-epochs", "1", "--finetune-epochs", "1", "--batch-size", "32",
        "--max-train-batches", "1", "--attack-steps", "1", "--eval-samples", "8", "--eval-attack-steps", "1",
        "--autoattack", "off", "--latency-runs", "1", "--no-onnx", "--quiet"]


def _snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def _one_error_line(capsys) -> str:
    err = capsys.readouterr().err
    assert err.startswith("nni-harp: error: ") and err.count("\n") == 1, err
    assert "Traceback" not in err
    return err


def test_a_users_own_folder_is_refused_and_left_as_it_was(tmp_path, capsys):
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "model.pt").write_bytes(b"my own model")
    (mine / "report.md").write_text("my notes\n")
    before = _snapshot(mine)
    assert main(["prune", "test_resnet", *FAST, "--output-dir", str(mine)]) == 2
    err = _one_error_line(capsys)
    assert "is not empty and holds no nni-harp run" in err and "model.pt, report.md" in err and "--overwrite" in err
    assert _snapshot(mine) == before


@pytest.mark.parametrize("where", ["is_a_file", "below_a_file"])
def test_a_file_in_the_way_is_refused_with_the_path(tmp_path, capsys, where):
    blocker = tmp_path / "blocker"
    blocker.write_text("a file")
    out = blocker if where == "is_a_file" else blocker / "sub" / "run"
    assert main(["prune", "test_resnet", *FAST, "--output-dir", str(out)]) == 2
    err = _one_error_line(capsys)
    assert str(blocker) in err and "is a file, not a folder" in err
    assert blocker.read_text() == "a file"


def test_a_read_only_folder_is_refused_before_any_work(tmp_path, capsys, monkeypatch):
    # the tests may run as root, for whom chmod does not bite: the permission check is what is tested
    out = tmp_path / "ro"
    out.mkdir()
    real_access = os.access
    monkeypatch.setattr(outdir.os, "access", lambda p, mode, **kw: False if Path(p) == out else real_access(p, mode, **kw))
    assert main(["prune", "test_resnet", *FAST, "--output-dir", str(out)]) == 2
    err = _one_error_line(capsys)
    assert f"{out} is read-only" in err and "chmod u+w" in err
    assert list(out.iterdir()) == []


def test_an_image_size_the_model_cannot_take_names_sizes_that_work(tmp_path, capsys):
    out = tmp_path / "vit"
    assert main(["prune", "test_vit", *FAST, "--image-size", "24", "--output-dir", str(out)]) == 2
    err = _one_error_line(capsys)
    assert "image_size" in err and "test_vit cannot take 24x24 inputs" in err
    assert "sizes that work" in err and "--image-size" in err
    assert not out.exists()


def _fake_run(folder: Path) -> None:
    """A folder as a run leaves it (progress.json of format 1 and a few of its files)."""
    (folder / "checkpoints").mkdir(parents=True)
    (folder / "checkpoints" / "progress.json").write_text(json.dumps({"format": 1, "config": {"model": "x"}, "stages": {}}))
    (folder / "checkpoints" / "dense.pt").write_bytes(b"dense weights")
    (folder / "checkpoints" / "dense.onnx").write_bytes(b"dense onnx")
    (folder / "model.onnx").write_bytes(b"onnx")


def test_overwrite_replaces_only_the_files_a_run_writes_and_removes_debris(tmp_path):
    out = tmp_path / "run"
    _fake_run(out)
    (out / "report.md").write_text("old report")
    (out / "notes.txt").write_text("mine")
    (out / ".model.pt.ab12cd34.tmp").write_bytes(b"half a model")  # a write killed half way
    (out / ".notes.txt.ab12cd34.tmp").write_bytes(b"not a run file's")
    lock = outdir.open_output_dir(out, resume=False, overwrite=True)
    try:
        names = {p.name for p in out.iterdir()}  # (checkpoints/ is RunStore.start's to clear)
        assert "report.md" not in names and "model.onnx" not in names and ".model.pt.ab12cd34.tmp" not in names
        assert (out / "notes.txt").read_text() == "mine" and ".notes.txt.ab12cd34.tmp" in names
        with pytest.raises(ResumeError, match="in use by another nni-harp run"):  # one run per folder
            outdir.open_output_dir(out, resume=False, overwrite=True)
    finally:
        lock.release()
    outdir.open_output_dir(out, resume=False, overwrite=True).release()  # released: usable again


def test_resume_removes_the_temporary_files_of_killed_writes(tmp_path):
    out = tmp_path / "run"
    _fake_run(out)
    debris = out / "checkpoints" / ".prune.pt.x1y2z3w4.tmp"
    debris.write_bytes(b"half a checkpoint")
    outdir.open_output_dir(out, resume=True, overwrite=False).release()
    assert not debris.exists()
    assert (out / "checkpoints" / "dense.pt").read_bytes() == b"dense weights"


def _trial(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith("NNI_")}
    return subprocess.run([sys.executable, "-m", "nni_harp.trial", *args], capture_output=True, text=True,
                          timeout=300, cwd=cwd, env=env)


@pytest.mark.parametrize(("param", "fragment"), [
    ("sparsty=0.9", "sparsty: unknown trial parameter"),
    ("sparsity=1.5", "sparsity: must be in (0, 1), got 1.5"),
    ("pruner=LevelPruner", "pruner: unknown name 'LevelPruner'"),
])
def test_trial_bad_parameters_are_one_line_and_exit_2(tmp_path, param, fragment):
    proc = _trial("--param", param, "--output-dir", str(tmp_path / "t"), cwd=tmp_path)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert proc.stderr.startswith("nni_harp.trial: error: ") and fragment in proc.stderr
    assert "Traceback" not in proc.stderr


def test_a_rejected_trial_leaves_no_temp_folder(tmp_path):
    """Without --output-dir (and outside an experiment) a trial makes a fresh temp folder; a trial
    whose parameters are rejected removes it again (it was empty: nothing of the user's)."""
    temp = tmp_path / "temp"
    temp.mkdir()
    env = {k: v for k, v in os.environ.items() if not k.startswith("NNI_")} | {"TMPDIR": str(temp)}
    proc = subprocess.run([sys.executable, "-m", "nni_harp.trial", "--param", "sparsity=1.5"], capture_output=True,
                          text=True, timeout=300, cwd=tmp_path, env=env)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "sparsity: must be in (0, 1)" in proc.stderr
    assert list(temp.iterdir()) == []


def test_trial_refuses_a_folder_that_holds_a_run_and_changes_nothing(tmp_path):
    out = tmp_path / "trial"
    _fake_run(out)
    before = _snapshot(out)
    proc = _trial("--output-dir", str(out), cwd=tmp_path)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "already holds a run" in proc.stderr and "--resume" in proc.stderr and "Traceback" not in proc.stderr
    after = _snapshot(out)
    after.pop(outdir.LOCK_FILE)  # the run's lock (the kernel released it when the trial exited)
    assert after == before


def test_checkpoints_read_back_are_checked_and_named(tmp_path):
    store = RunStore(tmp_path)
    store.start({"model": "m"}, resume=False, overwrite=False, keys=("model",))
    path = store.stage_path("prune")
    path.write_bytes(b"\x80\x02 truncated")
    with pytest.raises(ResumeError, match=r"prune\.pt is damaged .*delete it to redo the prune stage"):
        store.load_epoch("prune")
    torch.save({"format": 1, "stage": "prune", "epoch": 0, "rng": {"python": 1, "numpy": 1, "torch": 1}}, path)
    with pytest.raises(ResumeError, match="field 'model' is missing"):
        store.load_epoch("prune", required=("model",))
    torch.save({"weight": [1, 2, 3]}, store.artefact("dense.pt"))
    with pytest.raises(ResumeError, match=r"dense\.pt does not hold a state dict"):
        store.load_artefact("dense.pt")


def test_a_full_disk_names_the_checkpoint_and_keeps_the_previous_one(tmp_path, monkeypatch):
    store = RunStore(tmp_path)
    store.start({"model": "m"}, resume=False, overwrite=False, keys=("model",))
    store.save_epoch("prune", 0, {"model": {"w": torch.ones(2)}})
    before = store.stage_path("prune").read_bytes()

    def full(*_args, **_kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr("nni_harp.pipeline.checkpoint.atomic_save", full)
    with pytest.raises(CheckpointWriteError, match=r"epoch 2 .*No space left on device; the previous checkpoint \(epoch 1\) is intact"):
        store.save_epoch("prune", 1, {"model": {"w": torch.zeros(2)}})
    assert store.stage_path("prune").read_bytes() == before


def test_a_second_run_on_the_same_folder_is_refused_and_a_killed_holder_leaves_no_stale_lock(tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time; from nni_harp.pipeline.outdir import RunLock; "
         "RunLock(sys.argv[1]).acquire(); print('locked', flush=True); time.sleep(600)", str(out)],
        stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(ResumeError, match=rf"{out} is in use by another nni-harp run \(pid {holder.pid} "):
            outdir.open_output_dir(out, resume=False, overwrite=False)
    finally:
        holder.kill()  # SIGKILL: no chance to clean up
        holder.wait(timeout=60)
        holder.stdout.close()
    outdir.open_output_dir(out, resume=False, overwrite=False).release()
