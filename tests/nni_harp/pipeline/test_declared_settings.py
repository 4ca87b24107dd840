"""Settings declared once in PipelineConfig: every one is a command-line option and a trial
parameter (or set by the trial itself) with the declared default, the resume check is derived
from the same declarations, and names come from their registries (a loss added with
``register_loss`` can be chosen everywhere)."""
from __future__ import annotations

from dataclasses import MISSING, fields
from types import SimpleNamespace

import pytest

from nni_harp.adversarial import LOSSES, PGDATLoss, register_loss
from nni_harp.cli import build_parser, main
from nni_harp.data import DATASETS
from nni_harp.pipeline import EvaluateConfig, PipelineConfig
from nni_harp.pipeline.config import ConfigError, declared_settings, resume_defaults
from nni_harp.registry import pruner_names
from nni_harp.trial import DEFAULTS, SET_BY_TRIAL, TRIAL_DEFAULTS, config_for, resolve_params


class _Stop(Exception):
    pass


def _prune_config(monkeypatch, argv: list[str]) -> PipelineConfig:
    """The PipelineConfig `nni-harp prune ARGV` hands to the pipeline (which is not run)."""
    seen = []

    def fake_run(config, callbacks=None):
        seen.append(config)
        raise _Stop

    monkeypatch.setattr("nni_harp.pipeline.run", fake_run)
    with pytest.raises(_Stop):
        main(["prune", *argv, "--quiet"])
    return seen[0]


def test_every_pipeline_config_field_is_declared_once():
    assert [f.name for f in declared_settings()] == [f.name for f in fields(PipelineConfig)]
    assert PipelineConfig.RESUME_KEYS == tuple(f.name for f in declared_settings() if f.metadata["resume"])
    # evaluation settings, the output folder and the testing knobs may change on resume; the rest may not
    assert {"eval_samples", "autoattack", "output_dir", "resume", "num_workers"}.isdisjoint(PipelineConfig.RESUME_KEYS)
    assert {"model", "sparsity", "adv_loss", "prune_lr", "max_train_batches", "latency_target"} <= set(
        PipelineConfig.RESUME_KEYS)


def test_every_declared_setting_is_reachable_from_the_command_line(monkeypatch, tmp_path):
    parser = build_parser()
    args = parser.parse_args(["prune", "test_resnet"])
    prune = next(a for a in parser._actions if a.dest == "command").choices["prune"]
    options = {a.dest: a for a in prune._actions}
    for f in declared_settings():
        assert f.name in options, f"{f.name} is not an option of `nni-harp prune`"
        cli_default = f.metadata["cli_default"]
        if f.default is not MISSING:
            assert getattr(args, f.name) == (f.default if cli_default is MISSING else cli_default), f.name
        assert (options[f.name].help == "==SUPPRESS==") == f.metadata["hidden"], f.name
    # and what the command line parsed is what the pipeline gets, field by field
    out = str(tmp_path / "out")
    config = _prune_config(monkeypatch, ["test_resnet", "--output-dir", out, "--attack-steps", "2", "--gamma0", "0.2",
                                         "--no-onnx", "--max-train-batches", "3"])
    expected = {**{f.name: getattr(args, f.name) for f in declared_settings()}, "output_dir": out, "attack_steps": 2,
                "gamma_0": 0.2, "export_onnx": False, "max_train_batches": 3}
    assert config.to_dict() == expected


def test_the_default_output_folder_names_a_pruner_by_its_registry_name(monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)
    assert _prune_config(monkeypatch, ["test_resnet"]).output_dir == "runs/test_resnet-unstructured"
    config = _prune_config(monkeypatch, ["test_resnet", "--pruner", "L1NormPruner"])
    assert (config.pruner, config.output_dir) == ("l1norm", "runs/test_resnet-unstructured-l1norm")


def test_every_declared_setting_is_a_trial_parameter_or_set_by_the_trial(tmp_path):
    names = {f.name for f in declared_settings()}
    assert set(SET_BY_TRIAL) <= names and set(TRIAL_DEFAULTS) <= names
    assert set(DEFAULTS) == (names - set(SET_BY_TRIAL)) | {"eval_batches"}
    for f in declared_settings():
        if f.name not in SET_BY_TRIAL:
            assert DEFAULTS[f.name] == TRIAL_DEFAULTS.get(f.name, f.default), f.name
    # the defaults reach the config unchanged, and so does a parameter that only the declaration names
    config = config_for(resolve_params({"weight_decay": "0.001", "init_allocation": "erk"}), tmp_path / "trial")
    for name in set(DEFAULTS) - {"eval_batches", "weight_decay", "init_allocation"}:
        assert getattr(config, name) == DEFAULTS[name], name
    assert (config.weight_decay, config.init_allocation) == (0.001, "erk")
    assert (config.eval_samples, config.flops_target, config.autoattack) == (2 * 64, pytest.approx(0.1), "off")


@pytest.mark.parametrize(("params", "fragment"), [
    ({"attack_steps": 2.5}, "attack_steps: must be an integer, got 2.5"),
    ({"image_size": "big"}, "image_size: must be an integer, got 'big'"),
    ({"sparsity": True}, "sparsity: must be a number, got True"),
    ({"eval_batches": 0}, "eval_batches: must be at least 1, got 0"),
    ({"num_workers": -1}, "num_workers: must be an integer in [0, 256], got -1"),
])
def test_trial_parameters_are_checked_by_the_config(tmp_path, params, fragment):
    with pytest.raises(ConfigError) as info:
        config_for({**DEFAULTS, **params}, tmp_path / "trial")
    assert fragment in str(info.value)
    # numbers as NNI's search spaces send them are read as the setting's type
    config = config_for({**DEFAULTS, "attack_steps": 3.0, "batch_size": "32", "eps": "0.01"}, tmp_path / "trial")
    assert (config.attack_steps, config.batch_size, config.eps) == (3, 32, 0.01)


def test_names_come_from_their_registries():
    help_text = build_parser()._subparsers._group_actions[0].choices["prune"].format_help()
    assert "{" + ",".join(DATASETS) + "}" in help_text
    assert "{" + ",".join(pruner_names()) + "}" in help_text
    assert "{" + ",".join(LOSSES) + "}" in help_text
    evaluate = build_parser().parse_args(["evaluate", "test_resnet", "--checkpoint", "x", "--dataset", DATASETS[-1]])
    assert evaluate.dataset == DATASETS[-1] and evaluate.eval_samples == 200 and evaluate.export_onnx is True


def test_evaluate_takes_its_arguments_and_shared_defaults_from_the_declarations(monkeypatch, tmp_path, capsys):
    pipeline = {f.name: f for f in declared_settings()}
    evaluate = {f.name: f for f in declared_settings(EvaluateConfig)}
    for name in ("eps", "eval_attack_steps", "eval_samples", "autoattack", "seed", "latency_runs", "export_onnx"):
        assert evaluate[name].default == pipeline[name].default, name  # declared once, in PipelineConfig
        assert evaluate[name].metadata["help"] == pipeline[name].metadata["help"], name
    checkpoint = tmp_path / "w.pt"
    checkpoint.write_bytes(b"")
    args = build_parser().parse_args(["evaluate", "test_resnet", "--checkpoint", str(checkpoint), "--no-onnx"])
    seen = []
    monkeypatch.setattr("nni_harp.pipeline.evaluate", lambda config, callbacks=None: seen.append(config) or _stop())
    with pytest.raises(_Stop):
        main(["evaluate", "test_resnet", "--checkpoint", str(checkpoint), "--no-onnx", "--quiet"])
    assert seen[0] == EvaluateConfig(model="test_resnet", checkpoint=str(checkpoint), export_onnx=False)
    assert {f.name: getattr(args, f.name) for f in declared_settings(EvaluateConfig)} == seen[0].__dict__
    # a bad choice is the config's one line, as for prune
    assert main(["evaluate", "test_resnet", "--checkpoint", str(checkpoint), "--dataset", "nope"]) == 2
    assert capsys.readouterr().err.startswith("nni-harp: error: dataset: must be one of digits")


def _stop():
    raise _Stop


@pytest.fixture
def extra_loss():
    """A loss registered the way a user adds one; unregistered afterwards."""
    name = "unit_test_pgd"
    assert name not in LOSSES

    @register_loss(name)
    class UnitTestLoss(PGDATLoss):
        pass

    try:
        yield name
    finally:
        LOSSES.pop(name, None)


def test_a_loss_registered_with_register_loss_can_be_chosen(extra_loss, monkeypatch, tmp_path, capsys):
    from nni_harp.pipeline.training import adversarial_loss

    config = PipelineConfig(model="test_resnet", adv_loss=extra_loss, output_dir=str(tmp_path / "out"))
    assert type(adversarial_loss(SimpleNamespace(config=config))).__name__ == "UnitTestLoss"
    cli = _prune_config(monkeypatch, ["test_resnet", "--adv-loss", extra_loss, "--output-dir", str(tmp_path / "o")])
    assert cli.adv_loss == extra_loss
    with pytest.raises(SystemExit):
        main(["prune", "--help"])
    assert f"--adv-loss {{pgd,trades,mart,{extra_loss}}}" in capsys.readouterr().out
    assert config_for(resolve_params({"adv_loss": extra_loss}), tmp_path / "trial").adv_loss == extra_loss


def test_an_unregistered_loss_is_refused_in_one_line(tmp_path, capsys):
    assert main(["prune", "test_resnet", "--adv-loss", "unit_test_pgd", "--output-dir", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert err == "nni-harp: error: adv_loss: must be one of pgd, trades, mart; got 'unit_test_pgd'\n"
    assert not (tmp_path / "o").exists()


def test_older_runs_resume_with_the_defaults_of_the_latency_settings_and_exact_norm_statistics():
    defaults = resume_defaults()
    # latency_checks: an older run resumed in its prune stage measures its final plan as a new one does
    # (the pruner takes a setting its stored state lacks at the default: nni_harp.pruning._state)
    assert set(defaults) == {"budget", "latency_target", "latency_backend", "latency_checks", "latency_threads",
                             "norm_stats"}
    # older runs fine-tuned with exact statistics: the new default ('kept') would change their pruned model
    assert defaults["norm_stats"] == "exact" != PipelineConfig.__dataclass_fields__["norm_stats"].default
    assert all(v == PipelineConfig.__dataclass_fields__[k].default for k, v in defaults.items() if k != "norm_stats")
