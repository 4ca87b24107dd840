"""The pruner registry and the NNI trial's parameter handling (no experiment started)."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from nni_harp import compact
from nni_harp.adversarial import AttackConfig, make_adversarial_loss
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
    with pytest.raises(KeyError, match="sparsty"):
        resolve_params({"sparsty": 0.8})


def _tiny():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 16, 3, padding=1), nn.ReLU(),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 10))


@pytest.mark.parametrize("name", ["l1norm", "l2norm", "taylor", "movement", "hydra"])
def test_compact_prune_reaches_the_target_sparsity(name):
    model = _tiny()
    g = torch.Generator().manual_seed(0)
    data = [(torch.rand(8, 3, 8, 8, generator=g), torch.randint(0, 10, (8,), generator=g)) for _ in range(3)]
    adv = make_adversarial_loss("pgd", AttackConfig(eps=8 / 255, step_size=4 / 255, steps=1))
    masks, _ = compact.prune(model, data, adv, name, "unstructured", 0.75, 2, 0.01, data[0][0][:1])
    compact.finetune(model, masks, data, adv, 0, 0.01)
    assert abs(compact.sparsity_of(model) - 0.75) < 0.08
    assert 0.1 < compact.flops_kept(model, data[0][0][:1]) < 0.4
