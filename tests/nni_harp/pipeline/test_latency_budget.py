"""`--budget latency` without training: the flags reach HARPSettings (command line and NNI trial,
derived from the one declaration in PipelineConfig), bad requests are refused in one line before
anything runs, the latency measuring reports its progress, the report and the plot show it."""
from __future__ import annotations

import copy
import json
import sys
from types import SimpleNamespace

import pytest
import torch
from PIL import Image

import graph_passes as gp
from graph_passes import latency as lat
from nni_harp.cli import build_parser, main
from nni_harp.pipeline import PipelineConfig
from nni_harp.pipeline._latency import LATENCY_STAGE, REFINE_STAGE, fit_for_run, harp_options, plan_latency
from nni_harp.pipeline.callbacks import CallbackList, PipelineCallback
from nni_harp.pipeline.checkpoint import ResumeError, RunStore
from nni_harp.pipeline.config import ConfigError, declared_settings, resume_defaults
from nni_harp.pipeline.plots import plot_layer_rates
from nni_harp.pipeline.report import Report
from nni_harp.pruning import HARPSettings
from nni_harp.pruning._latency import latency_for_target
from nni_harp.trial import DEFAULTS, config_for, resolve_params

LATENCY = ["--mode", "structured", "--budget", "latency"]


def _config(tmp_path, **kw) -> PipelineConfig:
    kw = {"model": "test_resnet", "mode": "structured", "budget": "latency", "output_dir": str(tmp_path / "out"), **kw}
    return PipelineConfig(**kw)


def test_command_line_flags_reach_the_pruners_settings(monkeypatch, tmp_path):
    seen = []
    monkeypatch.setattr("nni_harp.pipeline.run", lambda config, callbacks=None: seen.append(config) or _stop())
    with pytest.raises(_Stop):
        main(["prune", "test_resnet", *LATENCY, "--latency-target", "0.4", "--latency-backend", "onnxruntime",
              "--latency-threads", "2", "--latency-checks", "0", "--output-dir", str(tmp_path / "out")])
    (config,) = seen
    assert (config.budget_kind, config.latency_target, config.latency_backend, config.latency_threads,
            config.latency_checks) == ("latency", 0.4, "onnxruntime", 2, 0)
    assert config.target_keep == 0.4 and config.target == {"latency_kept": 0.4}
    settings = HARPSettings(**harp_options(config))
    assert (settings.budget, settings.latency_backend, settings.latency_threads, settings.latency_checks) == (
        "latency", "onnxruntime", 2, 0)
    assert HARPSettings(**harp_options(_config(tmp_path))).latency_checks == HARPSettings().latency_checks == 2
    # the latency model times the norms the pruned model will have: plain ones of the kept width
    # where fine-tuning swaps them (--norm-stats kept, the default), exact ones otherwise
    assert settings.latency_norms == "kept"
    for changed in ({"norm_stats": "exact"}, {"finetune_epochs": 0}):
        assert HARPSettings(**harp_options(_config(tmp_path, **changed))).latency_norms == "exact"
    assert "latency_target" in PipelineConfig.RESUME_KEYS and "latency_backend" in PipelineConfig.RESUME_KEYS


class _Stop(Exception):
    pass


def _stop() -> None:
    raise _Stop


def test_every_declared_setting_is_an_option_and_a_trial_parameter():
    parser = build_parser()
    args = parser.parse_args(["prune", "test_resnet"])
    names = [f.name for f in declared_settings()]
    assert {"budget", "latency_target", "latency_backend", "latency_threads"} <= set(names)
    # the latency settings (every declared setting: tests/nni_harp/pipeline/test_declared_settings.py)
    latency = {"budget", "latency_target", "latency_backend", "latency_threads"}
    for f in (f for f in declared_settings() if f.name in latency):
        assert getattr(args, f.name) == f.default  # the option exists, with the declared default
        assert DEFAULTS[f.name] == f.default
    # the defaults are HARPSettings' own where it declares the setting
    assert args.latency_backend == HARPSettings().latency_backend
    assert args.latency_threads == HARPSettings().latency_threads


def test_the_flags_are_documented_in_help(capsys):
    with pytest.raises(SystemExit):
        main(["prune", "--help"])
    out = capsys.readouterr().out
    for text in ("--budget", "--latency-target", "--latency-backend {eager,onnxruntime,cuda}", "--latency-threads"):
        assert text in out


def test_nni_trial_parameters_reach_the_config(tmp_path):
    params = resolve_params({"mode": "structured", "budget": "latency", "latency_target": "0.4",
                             "latency_backend": "eager", "latency_threads": 2.0})
    config = config_for(params, tmp_path / "trial")
    assert (config.budget_kind, config.latency_target, config.latency_threads) == ("latency", 0.4, 2)
    with pytest.raises(ConfigError, match="latency_backend.*'tpu'"):
        config_for({**params, "latency_backend": "tpu"}, tmp_path / "trial")
    with pytest.raises(ConfigError, match="latency_threads"):
        config_for({**params, "latency_threads": 1.5}, tmp_path / "trial")


@pytest.mark.parametrize(
    ("args", "fragments"),
    [
        (["--budget", "latency"], ["budget: --budget latency needs --mode structured"]),
        (["--mode", "structured", "--budget", "params"], ["--budget must be one of flops, latency"]),
        ([*LATENCY, "--latency-backend", "tpu"], ["latency_backend", "--latency-backend 'tpu'", "eager, onnxruntime, cuda"]),
        ([*LATENCY, "--latency-target", "1.5"], ["--latency-target must be in (0, 1), got 1.5", "e.g. 0.5"]),
        ([*LATENCY, "--latency-target", "0"], ["--latency-target must be in (0, 1), got 0"]),
        ([*LATENCY, "--latency-threads", "0"], ["--latency-threads must be an integer in [1, 1024], got 0"]),
        ([*LATENCY, "--latency-checks", "-1"], ["--latency-checks must be an integer in [0, 100], got -1",
                                                "0 turns the check off"]),
    ],
)
def test_bad_latency_requests_exit_2_in_one_line_before_any_work(tmp_path, capsys, args, fragments):
    out = tmp_path / "out"
    assert main(["prune", "test_resnet", *args, "--output-dir", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("nni-harp: error: ") and err.count("\n") == 1 and "Traceback" not in err
    for fragment in fragments:
        assert fragment in err
    assert not out.exists()


def test_a_backend_that_is_not_installed_is_named_with_the_fix(tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # `import onnxruntime` raises ImportError
    out = tmp_path / "out"
    assert main(["prune", "test_resnet", *LATENCY, "--latency-backend", "onnxruntime", "--output-dir", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1
    assert "--latency-backend onnxruntime" in err and "pip install onnxruntime" in err and "eager" in err
    assert not out.exists()
    # without the latency budget the backend is never used, so nothing is refused
    PipelineConfig(model="test_resnet", mode="structured", latency_backend="onnxruntime", output_dir=str(out))


def test_a_missing_gpu_is_named_for_the_cuda_backend(tmp_path, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ConfigError, match="--latency-backend cuda: .*CUDA GPU.*eager"):
        _config(tmp_path, latency_backend="cuda")


def test_runs_of_an_older_version_resume_when_the_new_settings_keep_their_defaults(tmp_path):
    # norm_stats: what older runs did (exact statistics), which is not its default
    config = _config(tmp_path, budget=None, norm_stats=resume_defaults()["norm_stats"]).to_dict()
    older = {k: v for k, v in config.items() if k not in resume_defaults()}  # the settings that came later
    store = RunStore(tmp_path / "run")
    store.start(older, False, False, PipelineConfig.RESUME_KEYS)
    defaults = resume_defaults()
    assert RunStore(tmp_path / "run").start(config, True, False, PipelineConfig.RESUME_KEYS, defaults)
    with pytest.raises(ResumeError, match="latency_target: 0.5 -> 0.3"):
        RunStore(tmp_path / "run").start({**config, "latency_target": 0.3}, True, False, PipelineConfig.RESUME_KEYS, defaults)


# ---------------------------------------------------------------------------------------------
class _Recorder(PipelineCallback):
    def __init__(self) -> None:
        self.calls: list[tuple] = []

    def on_stage_start(self, stage, epochs, start_epoch, total):
        self.calls.append(("start", stage, total))

    def on_step(self, stage, epoch, step, metrics):
        self.calls.append(("step", stage, step))

    def on_stage_end(self, stage, result):
        self.calls.append(("end", stage))

    def on_message(self, text):
        self.calls.append(("message", text))


@pytest.fixture
def known_timer(monkeypatch):
    """Time = a known function of the FLOPs, so nothing is really timed."""
    count = [0]

    def runner(model, example_inputs, backend, threads, work):
        ms = 0.2 + 1e-6 * gp.cost(copy.deepcopy(model), (example_inputs,)).total_flops
        return SimpleNamespace(ms=ms)

    def measure(run, reps=20, warmup=3):
        count[0] += 1
        return run.ms

    monkeypatch.setattr(lat, "latency_runner", runner)
    monkeypatch.setattr(lat, "measure_ms", measure)
    return count


def test_measuring_reports_its_progress_and_a_second_run_reads_the_cache(tmp_path, monkeypatch, known_timer):
    import timm

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    model = timm.create_model("test_resnet", num_classes=10).eval()
    x = torch.rand(1, 3, 32, 32)
    rec = _Recorder()
    ctx = SimpleNamespace(config=_config(tmp_path, latency_backend="eager"), cb=CallbackList([rec]))
    fitted = fit_for_run(ctx, model, x)
    steps = [c for c in rec.calls if c[0] == "step"]
    sampled = len(fitted.measured) - fitted.refined
    # one step per timing: two passes (fit_latency's rounds) over the configurations; then the
    # uniform plan at the target, timed beside the dense model in two passes. This 'backend' is
    # exact in the model's terms, so the first refinement lands on the target.
    assert rec.calls[0] == ("start", LATENCY_STAGE, 2 * sampled)
    assert ("start", REFINE_STAGE, 2 * 2) in rec.calls and fitted.refined == 1
    assert fitted.measured[-1][1] / fitted.dense_ms == pytest.approx(ctx.config.latency_target, rel=0.1)
    assert len(steps) == 2 * sampled + 2 * 2 == known_timer[0] and sampled > 2
    # each stage ends when the next starts (its seconds its own), the last with the fit
    stages = [c[:2] for c in rec.calls if c[0] != "step"]
    assert stages == [("start", LATENCY_STAGE), ("end", LATENCY_STAGE), ("start", REFINE_STAGE), ("end", REFINE_STAGE)]
    # the pruner's own call, with its settings: read from the cache, nothing measured
    settings = HARPSettings(**harp_options(ctx.config))
    again = latency_for_target(model, x, settings, ctx.config.latency_target)
    assert again == fitted and known_timer[0] == len(steps)
    rec.calls.clear()
    fit_for_run(ctx, model, x)
    assert [c[0] for c in rec.calls] == ["message"] and "measured before" in rec.calls[0][1]

    # what the report and the plot get for a plan that halves every group
    groups = gp.channel_groups(model, x)
    keep = {g.id: torch.arange(g.size) < g.size // 2 for g in groups if g.prunable}
    masks = gp.group_masks(model, groups, keep)
    rates = {"conv1.0": 0.5, "layer1.0.conv1": 0.5, "not.a.group": 1.0}
    planned = plan_latency(model, x, masks, fitted, rates, ctx.config)
    assert 0.1 < planned["predicted"] < 0.6 and planned["flops_kept"] == pytest.approx(0.25, abs=0.05)
    assert set(planned["groups"]) == {"conv1.0", "layer1.0.conv1"}
    for share in planned["groups"].values():
        assert 0 < share["latency_share"] < 1 and 0 < share["flops_share"] < 1
    assert 0 < planned["uniform"] < 1 and planned["backend"] == "eager"


def test_report_and_plot_show_the_latency_budget(tmp_path):
    budget = {"target": 0.5, "predicted": 0.49, "measured": 0.53, "backend": "onnxruntime", "threads": 1,
              "dense_ms": 2.0, "pruned_ms": 1.06, "flops_kept": 0.41, "uniform": 0.6, "fit_error": 0.05}
    report = Report(model="test_resnet", mode="structured", dataset="digits", target={"latency_kept": 0.5},
                    dense=None, pruned=None, latency_budget=budget)
    assert json.loads(json.dumps(report.to_dict()))["latency_budget"] == budget
    assert Report.from_dict(report.to_dict()).latency_budget == budget
    assert "predicted 0.49, measured 0.53 of the dense latency" in report.to_markdown()
    rates = {"a": 0.4, "b": 0.7, "c": 0.55}
    groups = {"a": {"latency_share": 0.6, "flops_share": 0.4}, "b": {"latency_share": 0.1, "flops_share": 0.3},
              "c": {"latency_share": 0.3, "flops_share": 0.3}}
    plain = plot_layer_rates(rates, 0.6, tmp_path / "flops.png")
    latency = plot_layer_rates(rates, 0.6, tmp_path / "latency.png", latency=budget, groups=groups)
    with Image.open(plain) as a, Image.open(latency) as b:
        assert b.size[1] > 1.5 * a.size[1]  # a second panel: latency vs FLOPs share per group
