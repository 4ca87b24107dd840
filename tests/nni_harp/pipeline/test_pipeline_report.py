"""Report formatting/persistence and the PNG plots."""
from __future__ import annotations

import json

import pytest
from PIL import Image

from nni_harp.pipeline.plots import plot_history, plot_layer_rates
from nni_harp.pipeline.report import ModelMetrics, Report

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def _metrics(scale: float) -> ModelMetrics:
    return ModelMetrics(
        clean_acc=0.9 * scale, pgd_acc=0.5 * scale, autoattack_acc=0.45 * scale, eval_samples=200,
        params=int(1_000_000 * scale), nonzero_params=int(900_000 * scale), flops=int(3e9 * scale),
        effective_flops=int(2e9 * scale), file_bytes=int(4e6 * scale), compressed_bytes=int(3e6 * scale),
        latency_ms_torch=2.0 * scale, latency_ms_onnx=None,
    )


def _report() -> Report:
    return Report(
        model="test_resnet", mode="structured", dataset="digits", target={"flops_kept": 0.5},
        dense=_metrics(1.0), pruned=_metrics(0.5), layer_rates={"model.conv1": 0.7, "model.fc": 0.4},
        history=[{"epoch": 0, "gamma": 0.01, "kept_fraction": 0.8, "adv_loss": 2.0, "hw_loss": 0.6}],
        stage_seconds={"prune": 1.5}, files={"model": "model.pt"}, checks={"speedup_max_abs_diff": 1e-6},
    )


def test_table_has_dense_pruned_and_ratio():
    text = _report().table()
    lines = text.splitlines()
    assert "flops_kept 0.5" in lines[0] and "200 test images" in lines[0]
    assert lines[1].split() == ["metric", "dense", "pruned", "pruned/dense"]
    clean = next(line for line in lines if line.startswith("clean accuracy"))
    assert "90.00 %" in clean and "45.00 %" in clean and "-45.00 pt" in clean
    params = next(line for line in lines if line.startswith("parameters"))
    assert "1.000 M" in params and "500.000 k" in params and "x0.500" in params
    assert "n/a" in next(line for line in lines if "onnxruntime" in line)


def test_latency_rows_name_the_threads_they_were_measured_with():
    import dataclasses

    one = _report()
    assert "thread" not in next(line for line in one.table().splitlines() if "PyTorch" in line)  # older reports
    two = dataclasses.replace(one, dense=dataclasses.replace(one.dense, latency_threads=2),
                              pruned=dataclasses.replace(one.pruned, latency_threads=2))
    row = next(line for line in two.table().splitlines() if "PyTorch" in line)
    assert row.startswith("CPU latency, PyTorch (ms, 2 threads)") and "x0.500" in row
    assert Report.from_dict(json.loads(json.dumps(two.to_dict()))) == two


def test_latency_measurement_uses_the_threads_asked_for_and_leaves_torch_as_it_was(tmp_path, monkeypatch):
    import torch

    from nni_harp.pipeline import export

    seen = []
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.ReLU())
    model.register_forward_pre_hook(lambda m, a: seen.append(torch.get_num_threads()))
    before = torch.get_num_threads()
    ms = export.torch_latency_ms(model.train(), torch.rand(2, 3, 8, 8), runs=3, warmup=1, threads=1)
    assert ms > 0 and seen == [1] * 4 and torch.get_num_threads() == before and model.training
    path = export.export_onnx(model, torch.rand(1, 3, 8, 8), tmp_path / "m.onnx")
    ms, out = export.onnx_latency_ms(path, torch.rand(2, 3, 8, 8), runs=3, warmup=1, threads=1)
    assert ms > 0 and out.shape == (1, 4, 6, 6)


def test_json_and_markdown_hold_the_table_numbers(tmp_path):
    report = _report()
    js, md = report.save(tmp_path)
    data = json.loads(js.read_text())
    assert data["pruned"]["params"] == 500_000
    assert [tuple(r) for r in data["table_rows"]] == report.rows()
    text = md.read_text()
    for row in report.rows():
        assert "| " + " | ".join(row) + " |" in text
    assert "| model.conv1 | 0.7000 |" in text and "speedup_max_abs_diff" in text
    assert Report.from_dict(data) == report


def test_single_model_report_has_one_value_column():
    report = Report(model="test_resnet", mode="dense", dataset="digits", target={}, dense=_metrics(1.0), pruned=None)
    assert report.headers() == ("metric", "dense")
    assert all(len(r) == 2 for r in report.rows())
    assert "90.00 %" in report.table()


def _check_png(path, min_width=200):
    data = path.read_bytes()
    assert data[:8] == PNG_SIGNATURE
    with Image.open(path) as img:
        img.verify()
    with Image.open(path) as img:
        assert img.format == "PNG" and img.size[0] >= min_width and img.size[1] >= 150


@pytest.mark.parametrize("n_layers", [0, 3, 60])
def test_layer_rate_plot_is_png(tmp_path, n_layers):
    rates = {f"model.layer{i}.conv": 0.05 + 0.9 * i / max(n_layers, 1) for i in range(n_layers)}
    path = plot_layer_rates(rates, 0.1, tmp_path / "rates.png")
    _check_png(path, min_width=300 if n_layers > 20 else 200)


def test_history_plot_is_png(tmp_path):
    history = [{"epoch": e, "gamma": 0.01 * (e + 1), "kept_fraction": 1 - 0.2 * e} for e in range(4)]
    _check_png(plot_history(history, 0.3, tmp_path / "h.png"))
    _check_png(plot_history([], None, tmp_path / "empty.png"))


def _three_phase_history() -> list[dict]:
    kept = [0.71, 0.75, 0.68, 0.60, 0.53, 0.49, 0.50, 0.50]
    phases = ["robustness", "descent", "descent", "descent", "descent", "balance", "balance"]
    return [{"epoch": e, "gamma": 0.01 * min(e + 1, 5), "kept_start": kept[e], "kept_fraction": kept[e + 1],
             "adv_loss": 0.1, "hw_loss": 0.01, "target_met": e >= 4, "phase": phases[e]} for e in range(7)]


def test_history_plot_draws_the_phases_and_the_start(tmp_path):
    with_phases = plot_history(_three_phase_history(), 0.5, tmp_path / "phases.png")
    _check_png(with_phases)
    # the phases are drawn as coloured bands: the picture differs from the same history without them
    plain = [{k: v for k, v in h.items() if k != "phase"} for h in _three_phase_history()]
    assert with_phases.read_bytes() != plot_history(plain, 0.5, tmp_path / "plain.png").read_bytes()
    _check_png(plot_layer_rates({"a": 0.3, "b": 0.9}, 0.5, tmp_path / "r.png", start={"a": 0.7, "b": 0.7}))


def test_history_plot_and_markdown_show_the_glide_path_holds(tmp_path):
    held = [{**h, "held": h["phase"] == "descent"} for h in _three_phase_history()]
    picture = plot_history(held, 0.5, tmp_path / "held.png")
    _check_png(picture)
    assert picture.read_bytes() != plot_history(_three_phase_history(), 0.5, tmp_path / "free.png").read_bytes()
    text = Report(**{**_report().__dict__, "history": held}).to_markdown()
    assert text.count("descent (held to the glide path)") == 4


def test_markdown_names_each_epoch_phase_and_when_gamma_froze():
    report = _report()
    text = Report(**{**report.__dict__, "history": _three_phase_history()}).to_markdown()
    assert "first met at the end of epoch 5" in text
    rows = [line for line in text.splitlines() if line.startswith("| ") and ("balance" in line or "descent" in line)]
    assert len(rows) == 6 and rows[0].startswith("| 2 | descent |")
