"""`nni-harp prune` / `evaluate` end to end on timm's tiny test_resnet, with tiny epoch counts."""
from __future__ import annotations

import contextlib
import io
import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from nni_harp import load_pruned
from nni_harp.cli import main

FAST = ["--batch-size", "32", "--max-train-batches", "2", "--attack-steps", "1", "--eval-samples", "16",
        "--eval-attack-steps", "2", "--autoattack", "apgd-ce", "--latency-runs", "2", "--quiet"]


def _table_rows(stdout: str) -> list[list[str]]:
    lines = stdout.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("metric"))
    rows = []
    for line in lines[start + 2:]:
        if not line.strip():
            break
        rows.append(re.split(r"\s{2,}", line.strip()))
    return rows


def _check_png(path: Path) -> None:
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with Image.open(path) as img:
        assert img.format == "PNG" and img.size[0] >= 200 and img.size[1] >= 150


@pytest.fixture(scope="module")
def unstructured_run(tmp_path_factory):
    """One unstructured run, shared by the tests below: whichever of them runs first (alone or in
    any order) makes it, and each fails, never skips, when it did not succeed."""
    out = tmp_path_factory.mktemp("unstructured") / "run"
    argv = ["prune", "test_resnet", "--output-dir", str(out), "--sparsity", "0.8", "--pretrain-epochs", "1",
            "--prune-epochs", "2", "--finetune-epochs", "1", *FAST]
    stdout, stderr = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr):
        code = main(argv)
    assert code == 0, f"the shared prune run failed: {stderr.getvalue()[-2000:]}"
    return out, stdout.getvalue()


def test_unstructured_prune_end_to_end(unstructured_run):
    out, stdout = unstructured_run
    for name in ("model.pt", "model_meta.json", "model.onnx", "dense_model.pt", "report.json", "report.md",
                 "kept_fraction.png", "pruning_history.png"):
        assert (out / name).is_file(), name
    assert not (out / "plan.json").exists()

    report = json.loads((out / "report.json").read_text())
    printed = _table_rows(stdout)
    assert printed == report["table_rows"]  # the files hold the numbers the table printed
    md = (out / "report.md").read_text()
    assert all("| " + " | ".join(row) + " |" in md for row in printed)
    dense, pruned = report["dense"], report["pruned"]
    assert dense["params"] == pruned["params"]
    assert pruned["nonzero_params"] < 0.35 * dense["nonzero_params"]  # 80 % of conv/linear weights gone
    assert pruned["effective_flops"] < dense["effective_flops"]
    assert pruned["compressed_bytes"] < dense["compressed_bytes"]
    assert pruned["latency_ms_torch"] > 0 and pruned["latency_ms_onnx"] > 0
    assert report["checks"]["pruned_onnx_max_abs_diff"] < 1e-3
    assert len(report["history"]) == 2 and report["layer_rates"]
    assert 0 < min(report["layer_rates"].values()) <= max(report["layer_rates"].values()) <= 1
    _check_png(out / "kept_fraction.png")
    _check_png(out / "pruning_history.png")

    model = load_pruned("test_resnet", out)
    x = torch.rand(4, 3, 32, 32)
    import onnxruntime as ort

    session = ort.InferenceSession(str(out / "model.onnx"), providers=["CPUExecutionProvider"])
    onnx_out = session.run(None, {session.get_inputs()[0].name: x.numpy()})[0]
    with torch.no_grad():
        np.testing.assert_allclose(onnx_out, model(x).numpy(), atol=1e-4, rtol=1e-3)
    weights = [m.weight for m in model.modules() if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear))]
    zeros = sum(int((w == 0).sum()) for w in weights) / sum(w.numel() for w in weights)
    assert zeros == pytest.approx(0.8, abs=0.02)


def test_evaluate_a_pruned_output_folder(unstructured_run, capsys, tmp_path):
    out, _ = unstructured_run
    report = json.loads((out / "report.json").read_text())
    assert main(["evaluate", "test_resnet", "--checkpoint", str(out), "--eval-samples", "16",
                 "--eval-attack-steps", "2", "--autoattack", "off", "--latency-runs", "2", "--no-onnx",
                 "--output-dir", str(tmp_path), "--quiet"]) == 0
    rows = dict((r[0], r[1:]) for r in _table_rows(capsys.readouterr().out))
    expected = dict((r[0], r[1:]) for r in report["table_rows"])
    assert rows["clean accuracy"][0] == expected["clean accuracy"][1]  # same images, same pruned model
    assert rows["non-zero parameters"][0] == expected["non-zero parameters"][1]
    assert rows["AutoAttack accuracy"][0] == "n/a"
    assert json.loads((tmp_path / "evaluate_report.json").read_text())["pruned"]["eval_samples"] == 16


def test_evaluate_a_dense_checkpoint(unstructured_run, capsys):
    out, _ = unstructured_run
    assert main(["evaluate", "test_resnet", "--checkpoint", str(out / "dense_model.pt"), "--eval-samples", "8",
                 "--eval-attack-steps", "1", "--autoattack", "off", "--latency-runs", "1", "--no-onnx", "--quiet"]) == 0
    stdout = capsys.readouterr().out
    assert "dense" in stdout.splitlines()[1] and "clean accuracy" in stdout


def test_checkpoint_option_skips_pretraining_and_resume_reuses_finished_stages(unstructured_run, capsys, tmp_path):
    out, _ = unstructured_run
    run = tmp_path / "from-ckpt"
    argv = ["prune", "test_resnet", "--checkpoint", str(out), "--output-dir", str(run), "--prune-epochs", "1",
            "--finetune-epochs", "0", "--no-onnx", *FAST]
    assert main(argv) == 0
    first = json.loads((run / "report.json").read_text())
    progress = json.loads((run / "checkpoints" / "progress.json").read_text())
    assert progress["stages"]["pretrain"]["source"] == str(out)
    assert not (run / "checkpoints" / "pretrain.pt").exists()  # no pretraining epoch ran
    capsys.readouterr()
    assert main(argv) == 2  # the folder holds a run: refuse without --resume / --overwrite
    assert "--resume" in capsys.readouterr().err
    assert main([*argv, "--resume"]) == 0  # every stage finished: reused, same numbers
    again = json.loads((run / "report.json").read_text())
    assert again["stage_seconds"]["prune"] == first["stage_seconds"]["prune"]  # kept from the first run
    assert again["dense"] == first["dense"] and again["pruned"]["clean_acc"] == first["pruned"]["clean_acc"]
    assert again["layer_rates"] == first["layer_rates"]


def test_python_api_runs_the_same_pipeline(unstructured_run, tmp_path):
    from nni_harp.pipeline import PipelineCallback, PipelineConfig, Report, run

    out, _ = unstructured_run

    class Recorder(PipelineCallback):
        def __init__(self):
            self.stages, self.steps = [], 0

        def on_stage_end(self, stage, result):
            self.stages.append(stage)

        def on_step(self, stage, epoch, step, metrics):
            self.steps += 1

    rec = Recorder()
    config = PipelineConfig(model="test_resnet", checkpoint=str(out / "dense_model.pt"), output_dir=str(tmp_path),
                            sparsity=0.5, prune_epochs=1, finetune_epochs=1, batch_size=32, max_train_batches=1,
                            attack_steps=1, eval_samples=8, eval_attack_steps=1, autoattack="off", latency_runs=1,
                            export_onnx=False)
    report = run(config, callbacks=[rec])
    assert isinstance(report, Report) and report.pruned.latency_ms_onnx is None
    assert report.pruned.autoattack_acc is None and report.pruned.eval_samples == 8
    assert rec.stages == ["pretrain", "evaluate-dense", "prune", "finetune", "speedup", "export", "evaluate-pruned"]
    assert rec.steps >= 2
    assert json.loads((tmp_path / "report.json").read_text())["target"] == {"sparsity": 0.5}


def test_structured_prune_end_to_end(tmp_path, capsys):
    out = tmp_path / "run"
    loud = [a for a in FAST if a != "--quiet"]
    argv = ["prune", "test_resnet", "--mode", "structured", "--flops-target", "0.5", "--output-dir", str(out),
            "--pretrain-epochs", "1", "--prune-epochs", "2", "--finetune-epochs", "1", *loud]
    assert main(argv) == 0
    captured = capsys.readouterr()
    stdout = captured.out
    # progress bars (stderr): one per epoch, with running loss and accuracy
    err = captured.err.replace("\r", "\n")
    for bar in ("pretrain", "evaluate-dense", "prune 1/2", "prune 2/2", "finetune", "speedup", "export",
                "evaluate-pruned"):
        assert f"{bar}: 100%" in err, bar
    assert re.search(r"prune 2/2: 100%.*loss=[0-9.]+, acc=[0-9.]+%", err)
    assert "prune epoch 2/2: gamma" in err
    report = json.loads((out / "report.json").read_text())
    assert _table_rows(stdout) == report["table_rows"]
    dense, pruned = report["dense"], report["pruned"]
    assert pruned["params"] < dense["params"]  # channels physically removed
    assert pruned["flops"] / dense["flops"] == pytest.approx(0.5, abs=0.01)  # as the pruner's own tests hold it
    assert report["checks"]["speedup_max_abs_diff"] < 1e-3
    assert (out / "plan.json").is_file()
    _check_png(out / "kept_fraction.png")
    _check_png(out / "pruning_history.png")
    model = load_pruned("test_resnet", out)
    assert sum(p.numel() for p in model.parameters()) == pruned["params"]
    # pruned in place: the timm model itself (its class and methods), as the run's speedup left it
    assert json.loads((out / "model_meta.json").read_text())["pruned_form"] == "module"
    assert type(model.model).__name__ == "ResNet" and not isinstance(model, torch.fx.GraphModule)
    assert model.model.forward_features(torch.rand(1, 3, 32, 32)).shape[1] == model.model.fc.in_features \
        == model.model.num_features  # the width attribute reset_classifier reads follows the pruning
    x = torch.rand(2, 3, 32, 32)
    import onnxruntime as ort

    session = ort.InferenceSession(str(out / "model.onnx"), providers=["CPUExecutionProvider"])
    with torch.no_grad():
        np.testing.assert_allclose(session.run(None, {"input": x.numpy()})[0], model(x).numpy(), atol=1e-4, rtol=1e-3)
