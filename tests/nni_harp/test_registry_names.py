"""Pruners by NNI class name (registry, trial, the example search space) and NNI's pruners with
dependency groups in structured mode."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import timm
import torch

import graph_passes
from nni_harp.pipeline import ConfigError
from nni_harp.registry import PruneRequest, config_list, get_pruner, pruner_class_names, pruner_names
from nni_harp.trial import resolve_params

REPO = Path(__file__).resolve().parents[2]
CLASSES = {"harp": "HARPPruner", "hydra": "HydraPruner", "l1norm": "L1NormPruner", "l2norm": "L2NormPruner",
           "fpgm": "FPGMPruner", "taylor": "TaylorPruner", "movement": "MovementPruner"}


@pytest.mark.parametrize("short, cls", sorted(CLASSES.items()))
def test_every_pruner_is_found_by_short_and_class_name(short, cls):
    spec = get_pruner(short)
    assert spec.class_name == cls
    for name in (cls, cls.lower(), cls.upper(), f"nni.compression.pruning.{cls}", short.upper()):
        assert get_pruner(name) is spec, name


def test_class_names_are_declared_once_and_unknown_names_list_both_kinds():
    assert pruner_class_names() == tuple(get_pruner(n).class_name for n in pruner_names())
    assert get_pruner("l1").name == "l1norm" and get_pruner("L2").name == "l2norm"
    with pytest.raises(KeyError, match=r"known: harp \(HARPPruner\), hydra \(HydraPruner\)"):
        get_pruner("SlimPruner")


def test_trial_takes_class_names_and_rejects_unknown_pruners_before_running():
    assert resolve_params({"pruner": "L1NormPruner"})["pruner"] == "L1NormPruner"
    with pytest.raises(ConfigError, match=r"pruner: unknown name 'LevelPruner'.*known: harp \(HARPPruner\)"):
        resolve_params({"pruner": "LevelPruner"})


def test_example_search_space_selects_pruners_by_class_name():
    space = json.loads((REPO / "examples" / "nni_experiment" / "search_space.json").read_text())
    names = space["pruner"]["_value"]
    assert names and set(names) <= set(pruner_class_names())
    assert {get_pruner(n).name for n in names} >= {"harp", "hydra", "l1norm"}


@pytest.mark.parametrize("name", ["l1norm", "fpgm"])
def test_structured_nni_pruners_drop_the_same_channels_in_coupled_layers(name):
    torch.manual_seed(0)
    model = timm.create_model("test_resnet", num_classes=10).eval()
    x = torch.randn(2, 3, 32, 32)
    spec = get_pruner(name)
    pruner = spec.build(PruneRequest(model, config_list(name, "structured", 0.5), None, x))
    _, masks = spec.compress(pruner, 1, 1)
    pruner.unwrap_model()
    groups = graph_passes.channel_groups(model, x)
    coupled = 0
    for group in (g for g in groups if g.prunable):
        rows = []
        for m in group.members:
            mask = masks.get(m.module, {}).get(m.param)
            if m.role == "out" and m.param == "weight" and mask is not None:
                alive = (mask.flatten(1) != 0).any(1)
                rows.append(alive[torch.tensor(m.index)][torch.argsort(torch.tensor(m.channel))])
        coupled += len(rows) > 1
        assert all(torch.equal(r, rows[0]) for r in rows), f"group {group.id}: coupled layers disagree"
    assert coupled >= 2  # residual groups have several producers
    assert "fc" not in masks  # the classifier's outputs are the model's: left out of the config
    dense = graph_passes.count_flops(model, x)
    pruned = graph_passes.ModelSpeedup(model, x, masks).speedup_model()
    assert graph_passes.count_flops(pruned, x) <= 0.6 * dense
