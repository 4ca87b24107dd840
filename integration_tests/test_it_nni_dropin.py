"""NNI users' own speedup code, with ``graph_passes`` imported where they imported
``nni.compression.speedup``: NNI's tutorial flow (a hand-made mask, ``speedup_model()``, then
``print(model)``), the model list of NNI's ``test_speedup_torchvision.py`` (plus convnext_tiny and
shufflenet_v2_x0_5, which NNI had to comment out) with ``L1NormPruner`` masks straight from the
pruner and with dependency groups, and every NNI pruner on a timm test model. The model is
pruned in place and computes what the masked model computes (the masks as ModelSpeedup applied
them: ``applied_masks``).

Default run: the tutorial, resnet18 in both flows, every pruner on ``test_resnet``.
``-m slow``: the rest of the torchvision list.
"""
from __future__ import annotations

import copy
import warnings
from typing import Any, Callable

import nni
import pytest
import timm
import torch
import torch.nn.functional as F
import torchvision.models as tm
from nni.compression import TorchEvaluator
from nni.compression.pruning import (AGPPruner, FPGMPruner, L1NormPruner, L2NormPruner, LevelPruner, LinearPruner,
                                     MovementPruner, SlimPruner, TaylorPruner)
from torch import nn

import graph_passes as gp

ATOL = RTOL = 1e-4  # as in test_it_timm_models: the pruned model equals the masked one

TORCHVISION = ["resnet18", "alexnet", "densenet121", "efficientnet_b0", "inception_v3", "mnasnet0_5", "mobilenet_v2",
               "resnext50_32x4d", "squeezenet1_0", "vgg11", "wide_resnet50_2", "convnext_tiny", "shufflenet_v2_x0_5"]
FAST = {"resnet18"}


def _cases() -> list[Any]:
    return [pytest.param(name, marks=() if name in FAST else pytest.mark.slow, id=name) for name in TORCHVISION]


def _calibrated(model: nn.Module, x: torch.Tensor) -> nn.Module:
    """BatchNorm statistics from one pass on ``x``: random weights with the default (0, 1)
    statistics grow activations to 1e6 and more, where float32 rounding alone exceeds any fixed
    tolerance."""
    bns = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    for m in bns:
        m.reset_running_stats()
        m.momentum = None
    model.train()
    with torch.no_grad():
        model(x)
    return model.eval()


def _torchvision(name: str) -> tuple[nn.Module, torch.Tensor]:
    torch.manual_seed(0)
    x = torch.rand(2, 3, 224, 224)  # as NNI's test
    kwargs = {"init_weights": False, "aux_logits": False} if name == "inception_v3" else {}
    return _calibrated(getattr(tm, name)(**kwargs), x), x


def _speedup(model: nn.Module, x: torch.Tensor, masks: dict) -> tuple[nn.Module, nn.Module, gp.ModelSpeedup]:
    """NNI's call, in place; returns the model, the masked model it must equal, and the speedup."""
    dense = copy.deepcopy(model)
    speedup = gp.ModelSpeedup(model, x, masks)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", gp.SpeedupWarning)  # masked weights in channels that stay
        assert speedup.speedup_model() is model
    masked = gp.masked_copy(dense, speedup.applied_masks)
    with torch.no_grad():
        torch.testing.assert_close(model(x), masked(x), atol=ATOL, rtol=RTOL)
    return model, dense, speedup


class TorchModel(nn.Module):
    """The model of NNI's tutorials (``nni_assets.compression.mnist_model``), written out: that
    module downloads MNIST when imported."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, 6, 5, 1)
        self.conv2 = nn.Conv2d(6, 16, 5, 1)
        self.fc1 = nn.Linear(16 * 4 * 4, 120)
        self.fc2 = nn.Linear(120, 84)
        self.fc3 = nn.Linear(84, 10)
        self.relu1, self.relu2, self.relu3, self.relu4 = nn.ReLU(), nn.ReLU(), nn.ReLU(), nn.ReLU()
        self.pool1, self.pool2 = nn.MaxPool2d((2, 2)), nn.MaxPool2d((2, 2))

    def forward(self, x):
        x = self.pool1(self.relu1(self.conv1(x)))
        x = self.pool2(self.relu2(self.conv2(x)))
        x = torch.flatten(x, 1)
        x = self.relu3(self.fc1(x))
        x = self.relu4(self.fc2(x))
        return F.log_softmax(self.fc3(x), dim=1)


def test_nni_tutorial_flow_prunes_the_model_in_place(capsys):
    torch.manual_seed(0)
    model = TorchModel()
    conv1_mask = torch.ones_like(model.conv1.weight.data)
    conv1_mask[0:3] = 0  # the first three output channels of conv1
    masks = {"conv1": {"weight": conv1_mask}}
    print(model)
    gp.ModelSpeedup(model, torch.rand(10, 1, 28, 28), masks).speedup_model()
    print(model)
    before, after = capsys.readouterr().out.split("TorchModel(")[1:]
    assert "(conv1): Conv2d(1, 6, kernel_size=(5, 5), stride=(1, 1))" in before
    assert "(conv1): Conv2d(1, 3, kernel_size=(5, 5), stride=(1, 1))" in after
    assert "(conv2): Conv2d(3, 16, kernel_size=(5, 5), stride=(1, 1))" in after
    assert model(torch.rand(128, 1, 28, 28)).shape == (128, 10)


def test_tutorial_model_equals_its_masked_self():
    torch.manual_seed(0)
    model, x = TorchModel().eval(), torch.rand(128, 1, 28, 28)
    mask = torch.ones_like(model.conv1.weight)
    mask[0:3] = 0
    _speedup(model, x, {"conv1": {"weight": mask}})


@pytest.mark.parametrize("name", _cases())
def test_l1norm_masks_straight_from_the_pruner_prune_in_place(name):
    model, x = _torchvision(name)
    pruner = L1NormPruner(model, [{"op_types": ["Conv2d"], "sparsity": 0.5}])  # NNI's test, as written
    _, masks = pruner.compress()
    pruner.unwrap_model()
    _speedup(model, x, masks)


@pytest.mark.parametrize("name", _cases())
def test_with_dependency_groups_half_the_channels_remove_most_flops(name):
    model, x = _torchvision(name)
    config = gp.auto_set_dependency_group_ids(model, x, [{"op_types": ["Conv2d", "Linear"], "sparse_ratio": 0.5}])
    pruner = L1NormPruner(model, config)
    _, masks = pruner.compress()
    pruner.unwrap_model()
    model, dense, _ = _speedup(model, x, masks)
    assert gp.count_flops(model, x) <= 0.6 * gp.count_flops(dense, x)


X, Y = torch.randn(16, 3, 32, 32, generator=torch.Generator().manual_seed(0)), torch.arange(16) % 10
CONV = [{"op_types": ["Conv2d"], "sparse_ratio": 0.5}]


def _evaluator(model: nn.Module) -> TorchEvaluator:
    def training_func(model, optimizers, training_step, lr_schedulers=None, max_steps=None, max_epochs=None, *a, **k):
        model.train()
        for step in range(max_steps or 4 * (max_epochs or 1)):
            i = 4 * (step % 4)
            loss = training_step((X[i:i + 4], Y[i:i + 4]), model)
            optimizers.zero_grad()
            loss.backward()
            optimizers.step()

    optimizer = nni.trace(torch.optim.SGD)(model.parameters(), lr=0.01)
    return TorchEvaluator(training_func, optimizer, lambda batch, model: F.cross_entropy(model(batch[0]), batch[1]),
                          dummy_input=X[:2])


PRUNERS: dict[str, Callable[[nn.Module], Any]] = {
    "LevelPruner": lambda m: LevelPruner(m, CONV),
    "L1NormPruner": lambda m: L1NormPruner(m, CONV),
    "L2NormPruner": lambda m: L2NormPruner(m, CONV),
    "FPGMPruner": lambda m: FPGMPruner(m, CONV),
    "SlimPruner": lambda m: SlimPruner(m, [{"op_types": ["BatchNorm2d"], "sparse_ratio": 0.5}], _evaluator(m), training_steps=4),
    "TaylorPruner": lambda m: TaylorPruner(m, CONV, _evaluator(m), training_steps=4),
    "LinearPruner": lambda m: LinearPruner(L1NormPruner(m, CONV), interval_steps=2, total_times=2, evaluator=_evaluator(m)),
    "AGPPruner": lambda m: AGPPruner(L1NormPruner(m, CONV), interval_steps=2, total_times=2, evaluator=_evaluator(m)),
    "MovementPruner": lambda m: MovementPruner(m, CONV, _evaluator(m), warmup_step=1, cooldown_begin_step=3),
}


@pytest.mark.parametrize("name", list(PRUNERS))
def test_every_nni_pruner_masks_a_timm_model_that_prunes_in_place(name):
    torch.manual_seed(0)
    model = timm.create_model("test_resnet", num_classes=10).eval()
    pruner = PRUNERS[name](model)
    schedule = name in ("LinearPruner", "AGPPruner", "MovementPruner")
    _, masks = pruner.compress(max_steps=4, max_epochs=None) if schedule else pruner.compress()
    pruner.unwrap_model()
    model.eval()
    if name == "LevelPruner":  # element-wise: nothing to remove, the zeros are baked in
        with pytest.warns(gp.SpeedupWarning, match="nothing to remove"):
            gp.ModelSpeedup(copy.deepcopy(model), X[:2], masks).speedup_model()
    model, dense, _ = _speedup(model, X[:2], masks)
    flops = gp.count_flops(model, X[:2]) / gp.count_flops(dense, X[:2])
    assert flops == 1.0 if name == "LevelPruner" else flops < 0.8
