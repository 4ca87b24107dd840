"""Pruning of single layer kinds: conv, grouped/depthwise conv, linear, the norms."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from _gp_helpers import group_of, kept_count, prune
from graph_passes import ExactStatsNorm


class ConvChain1d(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.c1 = nn.Conv1d(3, 8, 3, padding=1)
        self.c2 = nn.Conv1d(8, 6, 3)
        self.head = nn.Conv1d(6, 4, 1)

    def forward(self, x):
        return self.head(torch.relu(self.c2(torch.relu(self.c1(x)))))


class ConvChain2d(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.c1 = nn.Conv2d(3, 8, 3, padding=1)
        self.c2 = nn.Conv2d(8, 6, 3, stride=2, bias=False)
        self.head = nn.Conv2d(6, 4, 1)

    def forward(self, x):
        return self.head(torch.relu(self.c2(torch.relu(self.c1(x)))))


def test_conv1d_shrinks_and_matches_masked():
    r = prune(ConvChain1d(), torch.randn(2, 3, 16))
    n1, n2 = kept_count(r, "c1"), kept_count(r, "c2")
    assert (n1, n2) != (8, 6) and n1 < 8 and n2 < 6
    assert r.pruned.c1.out_channels == n1 and r.pruned.c1.weight.shape == (n1, 3, 3)
    assert r.pruned.c1.bias.shape == (n1,)
    assert r.pruned.c2.in_channels == n1 and r.pruned.c2.weight.shape == (n2, n1, 3)
    assert r.pruned.head.weight.shape == (4, n2, 1)  # the output is a model output: kept whole


def test_conv2d_shrinks_and_matches_masked():
    r = prune(ConvChain2d(), torch.randn(2, 3, 12, 12))
    n1, n2 = kept_count(r, "c1"), kept_count(r, "c2")
    assert n1 < 8 and n2 < 6
    assert r.pruned.c1.weight.shape == (n1, 3, 3, 3)
    assert r.pruned.c2.weight.shape == (n2, n1, 3, 3) and r.pruned.c2.bias is None
    assert r.pruned.head.in_channels == n2 and r.pruned.head.out_channels == 4


class Grouped(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.c1 = nn.Conv2d(3, 8, 1)
        self.g = nn.Conv2d(8, 12, 3, padding=1, groups=4)  # 2 in, 3 out per group
        self.head = nn.Conv2d(12, 5, 1)

    def forward(self, x):
        return self.head(torch.relu(self.g(torch.relu(self.c1(x)))))


def test_grouped_conv_pruned_by_whole_groups():
    model = Grouped()
    x = torch.randn(2, 3, 8, 8)
    r = prune(model, x)
    n_in, n_out = kept_count(r, "c1"), kept_count(r, "g")
    assert n_in < 8
    g = r.pruned.g
    assert g.in_channels == n_in and g.out_channels == n_out
    assert n_in % 2 == 0 and n_out % 3 == 0 and n_in // 2 == n_out // 3 == g.groups  # whole conv groups
    assert g.groups < 4
    assert g.weight.shape == (n_out, 2, 3, 3)
    assert r.pruned.head.weight.shape == (5, n_out, 1, 1)


class Depthwise(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.pw = nn.Conv2d(3, 8, 1)
        self.dw = nn.Conv2d(8, 8, 3, padding=1, groups=8)
        self.head = nn.Conv2d(8, 4, 1)

    def forward(self, x):
        return self.head(torch.relu(self.dw(torch.relu(self.pw(x)))))


def test_depthwise_conv_ties_input_and_output_channels():
    r = prune(Depthwise(), torch.randn(2, 3, 8, 8))
    assert group_of(r.groups, "pw").id == group_of(r.groups, "dw").id == group_of(r.groups, "head", dim=1).id
    n = kept_count(r, "pw")
    assert n < 8
    dw = r.pruned.dw
    assert dw.in_channels == dw.out_channels == dw.groups == n and dw.weight.shape == (n, 1, 3, 3)
    assert r.pruned.head.weight.shape == (4, n, 1, 1)


class Mlp(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(10, 16)
        self.fc2 = nn.Linear(16, 12)
        self.fc3 = nn.Linear(12, 3)

    def forward(self, x):
        return self.fc3(torch.relu(self.fc2(torch.relu(self.fc1(x)))))


@pytest.mark.parametrize("shape", [(4, 10), (2, 7, 10)], ids=["2d", "tokens"])
def test_linear_shrinks_on_2d_and_token_inputs(shape):
    r = prune(Mlp(), torch.randn(*shape))
    n1, n2 = kept_count(r, "fc1"), kept_count(r, "fc2")
    assert n1 < 16 and n2 < 12
    assert r.pruned.fc1.weight.shape == (n1, 10) and r.pruned.fc1.out_features == n1
    assert r.pruned.fc2.weight.shape == (n2, n1) and r.pruned.fc2.in_features == n1
    assert r.pruned.fc3.weight.shape == (3, n2) and r.pruned.fc3.in_features == n2


class ConvBn(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(8)
        self.head = nn.Conv2d(8, 4, 1)

    def forward(self, x):
        return self.head(torch.relu(self.bn(self.conv(x))))


def _randomise_bn(bn: nn.modules.batchnorm._NormBase) -> None:
    with torch.no_grad():
        bn.running_mean.normal_()
        bn.running_var.uniform_(0.5, 2.0)
        bn.weight.normal_()
        bn.bias.normal_()


def test_batchnorm_sliced_with_its_conv():
    model = ConvBn()
    _randomise_bn(model.bn)
    r = prune(model, torch.randn(2, 3, 8, 8))
    assert group_of(r.groups, "conv").id == group_of(r.groups, "bn").id
    n = kept_count(r, "conv")
    bn = r.pruned.bn
    assert n < 8 and bn.num_features == n
    for t in (bn.weight, bn.bias, bn.running_mean, bn.running_var):
        assert t.shape == (n,)
    kept = r.keep[group_of(r.groups, "bn").id].nonzero().flatten()
    assert torch.equal(bn.running_mean, model.bn.running_mean[kept])


class TokenLN(nn.Module):
    def __init__(self, norm: nn.Module) -> None:
        super().__init__()
        self.fc1 = nn.Linear(6, 10)
        self.norm = norm
        self.fc2 = nn.Linear(10, 4)

    def forward(self, x):
        return self.fc2(self.norm(self.fc1(x)))


def _simple_norm() -> nn.Module:
    import timm.layers

    return timm.layers.SimpleNorm(10)  # x / std(x) * weight, torch.var's unbiased variance


@pytest.mark.parametrize("norm", [nn.LayerNorm(10), nn.RMSNorm(10), _simple_norm()],
                         ids=["layernorm", "rmsnorm", "timm-simplenorm"])
def test_layernorm_keeps_exact_statistics(norm):
    with torch.no_grad():
        norm.weight.normal_()
        if getattr(norm, "bias", None) is not None:
            norm.bias.normal_()
    r = prune(TokenLN(norm), torch.randn(2, 5, 6))
    n = kept_count(r, "fc1")
    assert n < 10
    assert isinstance(r.pruned.norm, ExactStatsNorm)
    assert r.pruned.norm.weight.shape == (n,) and r.pruned.norm.original_channels == 10
    assert r.pruned.fc2.weight.shape == (4, n)


class ConvGN(nn.Module):
    def __init__(self, groups: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 12, 3, padding=1)
        self.gn = nn.GroupNorm(groups, 12)
        self.head = nn.Conv2d(12, 4, 1)
        with torch.no_grad():
            self.gn.weight.normal_()
            self.gn.bias.normal_()

    def forward(self, x):
        return self.head(torch.relu(self.gn(self.conv(x))))


def test_groupnorm_with_groups_prunes_whole_groups():
    r = prune(ConvGN(4), torch.randn(2, 3, 8, 8))
    n = kept_count(r, "conv")
    gn = r.pruned.gn
    assert isinstance(gn, nn.GroupNorm)
    assert n < 12 and n % 3 == 0 and gn.num_channels == n and gn.num_groups == n // 3
    assert gn.weight.shape == (n,)
    assert r.pruned.head.weight.shape == (4, n, 1, 1)


def test_groupnorm_one_group_keeps_exact_statistics():
    r = prune(ConvGN(1), torch.randn(2, 3, 8, 8))
    n = kept_count(r, "conv")
    assert n < 12
    assert isinstance(r.pruned.gn, ExactStatsNorm) and r.pruned.gn.weight.shape == (n,)
    assert r.pruned.conv.out_channels == n


def test_timm_layernorm2d_keeps_exact_statistics():
    from timm import layers as timm_layers

    class M(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv2d(3, 8, 3, padding=1)
            self.norm = timm_layers.LayerNorm2d(8)
            self.head = nn.Conv2d(8, 4, 1)
            with torch.no_grad():
                self.norm.weight.normal_()
                self.norm.bias.normal_()

        def forward(self, x):
            return self.head(self.norm(self.conv(x)))

    r = prune(M(), torch.randn(2, 3, 6, 6))
    n = kept_count(r, "conv")
    assert n < 8
    assert isinstance(r.pruned.norm, ExactStatsNorm) and r.pruned.norm.weight.shape == (n,)
    assert r.pruned.head.weight.shape == (4, n, 1, 1)


class FunctionalNorms(nn.Module):
    def __init__(self, kind: str) -> None:
        super().__init__()
        self.kind = kind
        self.fc1 = nn.Linear(6, 10)
        self.w = nn.Parameter(torch.randn(10))
        self.b = nn.Parameter(torch.randn(10))
        self.fc2 = nn.Linear(10, 4)

    def forward(self, x):
        y = self.fc1(x)
        if self.kind == "rms":
            y = F.rms_norm(y, (10,), self.w)  # eps=None: the dtype's epsilon
        else:
            y = F.layer_norm(y, (10,), self.w, self.b)
        return self.fc2(y)


@pytest.mark.parametrize("kind", ["rms", "layer"])
def test_functional_norms_keep_exact_statistics(kind):
    r = prune(FunctionalNorms(kind), torch.randn(2, 5, 6))
    n = kept_count(r, "fc1")
    assert n < 10 and r.pruned.w.shape == (n,) and r.pruned.fc2.weight.shape == (4, n)


def test_groupnorm_one_channel_per_group_prunes_channels():
    r = prune(ConvGN(12), torch.randn(2, 3, 8, 8))
    n = kept_count(r, "conv")
    assert n < 12 and r.pruned.gn.num_groups == r.pruned.gn.num_channels == n


# Found by test_gp_fuzz (slow run): a removed channel is zero in the masked model only until an
# op maps zero to something else. Between the layer that produces the channels and a norm whose
# statistics span them, ExactStatsNorm counts the removed channels as zeros while the masked
# model feeds it sigmoid(0) = 0.5, 0 + 1 or a token-mixing Linear's bias. The analysis tracks on
# which axes removed channels stay zero (TensorInfo.zero) and pins the channels such a norm reads
# where they do not.
class NonZeroBeforeNorm(nn.Module):
    """Linear -> (an op that maps 0 to non-zero, or one that keeps 0) -> LayerNorm over the
    channels -> Linear."""

    def __init__(self, how: str) -> None:
        super().__init__()
        self.how = how
        self.fc1 = nn.Linear(6, 4)
        self.mix = nn.Linear(5, 5, bias=how != "token_mixing_no_bias")  # across the 5 tokens (MLP-Mixer)
        self.gate = nn.Linear(6, 4)
        self.norm = nn.LayerNorm(4)
        self.fc2 = nn.Linear(4, 3)

    def forward(self, x):
        y = self.fc1(x)
        if self.how.startswith("token_mixing"):
            y = y + self.mix(y.transpose(1, 2)).transpose(1, 2)
        elif self.how == "sigmoid":
            y = torch.sigmoid(y)
        elif self.how == "add_constant":
            y = y + 1.0
        elif self.how == "sigmoid_gate":
            y = F.gelu(y) * torch.sigmoid(self.gate(x))
        else:  # "scale_shift": x * 2 - 0 stays zero
            y = y * 2.0 - 0.0
        return self.fc2(self.norm(y))


@pytest.mark.parametrize("how", ["token_mixing_bias", "sigmoid", "add_constant"])
def test_exact_norm_after_an_op_that_makes_removed_channels_non_zero(how):
    torch.manual_seed(0)
    r = prune(NonZeroBeforeNorm(how), torch.randn(2, 5, 6))  # asserts pruned == masked
    g = group_of(r.groups, "fc1")
    assert not g.prunable and "not zero where removed" in g.reason and "norm" in g.reason
    assert group_of(r.groups, "fc2").prunable is False  # the output


@pytest.mark.parametrize("how", ["token_mixing_no_bias", "sigmoid_gate", "scale_shift"])
def test_exact_norm_after_ops_that_keep_removed_channels_zero_still_prunes(how):
    torch.manual_seed(0)
    r = prune(NonZeroBeforeNorm(how), torch.randn(2, 5, 6))
    assert group_of(r.groups, "fc1").prunable
    n = kept_count(r, "fc1")
    assert n < 4 and r.pruned.norm.num_channels == n
