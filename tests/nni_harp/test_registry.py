"""The pruner registry, every pruner through the pipeline's prune stage, and the NNI trial
(parameters, intermediate and final results; no experiment started)."""
from __future__ import annotations

import json

import pytest
import torch

from nni_harp.pipeline import ConfigError
from nni_harp.registry import config_list, get_pruner, pruner_names
from nni_harp.trial import DEFAULTS, resolve_params


def test_registry_knows_harp_hydra_and_nni_pruners():
    assert {"harp", "hydra", "l1norm", "l2norm", "fpgm", "taylor", "movement"} <= set(pruner_names())
    assert get_pruner("L1NormPruner").name == "l1norm"
    assert get_pruner("HARPPruner").name == "harp"
    with pytest.raises(KeyError, match="known: harp"):
        get_pruner("nope")


def test_config_list_global_budget_only_for_learned_pruners():
    assert config_list("harp", "unstructured", 0.9) == [
        {"op_types": ["Conv2d", "Linear"], "sparse_ratio": 0.9, "granularity": "default", "global_group_id": 0}]
    assert "global_group_id" not in config_list("l1norm", "structured", 0.5)[0]
    assert config_list("fpgm", "structured", 0.5)[0]["granularity"] == "out_channel"
    with pytest.raises(ValueError, match="structured only"):
        config_list("fpgm", "unstructured", 0.5)
    with pytest.raises(ValueError, match="sparsity"):
        config_list("harp", "unstructured", 1.0)


def test_trial_parameters_default_outside_nni_and_reject_unknown_keys():
    assert resolve_params(None) == {**DEFAULTS, **{k: float(DEFAULTS[k]) for k in ("sparsity", "gamma_0", "eps", "pretrain_lr", "prune_lr", "finetune_lr")}}
    got = resolve_params({"pruner": "l1norm", "sparsity": 0.8}, {"gamma_0": 1})
    assert got["pruner"] == "l1norm" and got["sparsity"] == 0.8 and got["gamma_0"] == 1.0
    with pytest.raises(ConfigError, match="sparsty: unknown trial parameter"):
        resolve_params({"sparsty": 0.8})


def _prune_stage(tmp_path, **overrides):
    """The pipeline's prune stage alone, on test_resnet with random weights and one tiny batch."""
    from nni_harp.pipeline import PipelineConfig
    from nni_harp.pipeline import stages as st
    from nni_harp.pipeline.stages.prune import stage_prune
    from nni_harp.pipeline.callbacks import CallbackList
    from nni_harp.pipeline.checkpoint import RunStore

    settings = dict(model="test_resnet", batch_size=16, max_train_batches=1, attack_steps=1, prune_epochs=2,
                    output_dir=str(tmp_path / "run"))
    config = PipelineConfig(**{**settings, **overrides})
    store = RunStore(config.out_path)
    store.start(config.to_dict(), False, False, PipelineConfig.RESUME_KEYS)
    torch.manual_seed(0)
    ctx = st.make_context(config, store, CallbackList())
    model = st.new_model(ctx)
    return ctx, *stage_prune(ctx, model)


@pytest.mark.parametrize("name", ["harp", "hydra", "l1norm", "l2norm", "taylor", "movement"])
def test_pipeline_prune_stage_reaches_the_sparsity_with_every_pruner(tmp_path, name):
    from nni_harp.pipeline.stages._pruning import masks_sparsity

    ctx, model, masks, result = _prune_stage(tmp_path, pruner=name, sparsity=0.75)
    assert result["pruner"] == name
    assert result["sparsity"] == pytest.approx(masks_sparsity(model, masks))
    assert abs(result["sparsity"] - 0.75) < 0.03
    assert result["layer_rates"] and all(0.0 < r <= 1.0 for r in result["layer_rates"].values())
    assert (len(result["history"]) == 2) == (name in ("harp", "hydra"))
    assert ctx.store.is_done("prune")
    assert not any(hasattr(m, "_nni_wrapper") for m in model.modules())  # unwrapped for fine-tuning


@pytest.mark.parametrize("name", ["fpgm", "l1norm"])
def test_nni_structured_masks_are_consistent_channel_groups(tmp_path, name):
    import graph_passes

    ctx, model, masks, result = _prune_stage(tmp_path, pruner=name, mode="structured", flops_target=0.5)
    assert result["sparsity"] > 0.1  # channels really went
    example = ctx.example.to(ctx.device)
    groups = graph_passes.channel_groups(model, (example,))
    # group-consistent masks are a fixed point of "reconcile onto groups, then expand again"
    again = graph_passes.group_masks(model, groups, graph_passes.keep_from_masks(groups, masks))
    assert again.keys() == masks.keys()
    assert all(torch.equal(masks[m][p], again[m][p]) for m in masks for p in masks[m])
    small = graph_passes.ModelSpeedup(model.cpu().eval(), ctx.example, masks).speedup_model(inplace=False)
    x = torch.stack([ctx.test_ds[i][0] for i in range(4)])
    with torch.no_grad():
        assert torch.allclose(graph_passes.masked_copy(model, masks)(x), small.eval()(x), atol=1e-4)


def test_pruner_that_does_not_fit_the_mode_is_a_config_error():
    from nni_harp.pipeline import ConfigError, PipelineConfig

    with pytest.raises(ConfigError, match=r"pruner 'movement' cannot prune in mode 'structured'.*pruners for structured: harp"):
        PipelineConfig(model="test_resnet", pruner="movement", mode="structured")
    with pytest.raises(ConfigError, match="pruner: must be one of harp, hydra"):
        PipelineConfig(model="test_resnet", pruner="slim")
    assert PipelineConfig(model="test_resnet", pruner="FPGMPruner", mode="structured").pruner == "fpgm"


def test_cli_rejects_a_pruner_for_the_wrong_mode(capsys):
    from nni_harp.cli import main

    assert main(["prune", "test_resnet", "--pruner", "fpgm", "--quiet"]) == 2
    err = capsys.readouterr().err
    assert "pruner 'fpgm' cannot prune in mode 'unstructured'" in err and "l1norm" in err


def test_trial_runs_the_pipeline_and_reports_each_epoch(tmp_path):
    from nni_harp.trial import resolve_params, run_trial

    class Sink:
        def __init__(self):
            self.intermediate, self.final = [], None

        def report_intermediate_result(self, value):
            self.intermediate.append(value)

        def report_final_result(self, value):
            self.final = value

    sink = Sink()
    params = resolve_params({"pruner": "l1norm", "sparsity": 0.8}, {
        "max_train_batches": 1, "pretrain_epochs": 1, "finetune_epochs": 2, "eval_batches": 1,
        "eval_attack_steps": 1, "attack_steps": 1, "batch_size": 16})
    result = run_trial(params, sink, tmp_path / "trial")
    assert sink.final == result
    # the one-shot pruner's pass, then two fine-tuning epochs
    assert [(r["stage"], r["epoch"]) for r in sink.intermediate] == [("prune", 0), ("finetune", 1), ("finetune", 2)]
    assert all(0.0 <= r["default"] <= 1.0 and 0.0 <= r["clean"] <= 1.0 for r in sink.intermediate)
    assert result["pruner"] == "l1norm" and result["default"] == result["robust_acc"]
    assert abs(result["sparsity"] - 0.8) < 0.03 and 0.0 < result["flops_kept"] < 0.5
    report = json.loads((tmp_path / "trial" / "report.json").read_text())
    assert report["pruner"] == "l1norm" and report["pruned"]["pgd_acc"] == result["robust_acc"]
