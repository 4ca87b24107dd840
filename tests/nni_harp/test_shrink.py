"""nni_harp._shrink: a pipeline-built timm model pruned in place keeps its width attributes true, so
its own ``reset_classifier`` and ``forward_features`` users fit the pruned model."""
from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import graph_passes as gp
from nni_harp._shrink import shrink
from nni_harp.loading import create_model


def _half_masks(model: nn.Module, x: torch.Tensor) -> dict:
    analysis = gp.analysis_for(copy.deepcopy(model).eval(), (x,))
    return gp.group_masks(analysis.gm, analysis.groups, gp.random_keep(analysis.groups, 0.5, 0))


# ResNet (plain fc), ConvNeXt (NormMlpClassifierHead), ViT (tokens, embed_dim), MobileNetV3 (a head conv
# between the features and the classifier: num_features and head_hidden_size differ)
@pytest.mark.parametrize("name", ["test_resnet", "test_convnext", "test_vit", "mobilenetv3_small_100"])
def test_a_model_pruned_in_place_resets_its_classifier_to_the_pruned_width(name):
    torch.manual_seed(0)
    model = create_model(name, 10, 3, 32, (0.5,) * 3, (0.25,) * 3)[0].eval()
    x = torch.rand(2, 3, 32, 32)
    masks = _half_masks(model, x[:1])
    expected = gp.masked_copy(model, masks)(x)
    dense_features = model.model.num_features
    pruned, speedup = shrink(model, x[:1], masks, fallback_to_graph=True)
    assert pruned is model and speedup.inplace_error is None
    torch.testing.assert_close(pruned(x), expected, atol=1e-5, rtol=1e-4)
    net = pruned.model
    features = net.forward_features(x)
    width = features.shape[-1] if features.dim() == 3 else features.shape[1]  # tokens: channels last
    assert net.num_features == width < dense_features
    assert getattr(net, "embed_dim", width) == width
    net.reset_classifier(3)
    assert pruned(x).shape == (2, 3)


class _Net(nn.Module):
    """timm's interface on a small net whose ``num_features`` is not the features' width."""

    def __init__(self) -> None:
        super().__init__()
        self.conv, self.fc = nn.Conv2d(3, 8, 1), nn.Linear(8, 2)
        self.num_features, self.head_hidden_size = 7, 8

    def get_classifier(self) -> nn.Module:
        return self.fc

    def forward_features(self, x):
        return self.conv(x)

    def forward(self, x):
        return self.fc(self.forward_features(x).mean((2, 3)))


def test_attributes_that_do_not_name_the_width_are_left_alone():
    torch.manual_seed(0)
    net, x = _Net().eval(), torch.rand(1, 3, 4, 4)
    mask = torch.ones(8)
    mask[:3] = 0
    pruned, _ = shrink(net, x, {"conv": {"weight": mask.view(8, 1, 1, 1).expand(8, 3, 1, 1), "bias": mask}})
    assert pruned is net and net.fc.in_features == 5
    assert net.num_features == 7  # it never named the width of 8
    assert net.head_hidden_size == 5  # the classifier's input width, followed


class _OddFeatures(_Net):
    def forward_features(self, x, extra):  # timm's name, another signature: no width to read
        return self.conv(x) + extra

    def forward(self, x):
        return self.fc(self.conv(x).mean((2, 3)))


def test_a_forward_features_that_cannot_run_leaves_the_feature_widths_and_still_prunes():
    torch.manual_seed(0)
    net, x = _OddFeatures().eval(), torch.rand(1, 3, 4, 4)
    net.num_features = 8
    mask = torch.ones(8)
    mask[:3] = 0
    pruned, speedup = shrink(net, x, {"conv": {"weight": mask.view(8, 1, 1, 1).expand(8, 3, 1, 1), "bias": mask}})
    assert pruned is net and speedup.inplace_error is None and net.fc.in_features == 5
    assert net.num_features == 8 and net.head_hidden_size == 5
