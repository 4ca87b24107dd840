"""Pruning through element-wise, concat/split, shape, pooling and pass-through ops."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from _gp_helpers import group_of, kept_count, prune


class Residual(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.a = nn.Conv2d(8, 6, 3, padding=1)
        self.b = nn.Conv2d(6, 8, 3, padding=1)
        self.bias = nn.Parameter(torch.randn(8, 1, 1))  # broadcast over H, W
        self.head = nn.Conv2d(8, 4, 1)

    def forward(self, x):
        s = self.stem(x)
        y = s + self.b(torch.relu(self.a(s))) + self.bias
        return self.head(torch.relu(y))


def test_residual_add_with_broadcast_ties_both_branches():
    r = prune(Residual(), torch.randn(2, 3, 8, 8))
    gid = group_of(r.groups, "stem").id
    assert group_of(r.groups, "b").id == gid
    assert group_of(r.groups, "", "bias").id == gid
    n, na = kept_count(r, "stem"), kept_count(r, "a")
    assert n < 8 and na < 6
    assert r.pruned.stem.weight.shape[0] == r.pruned.b.weight.shape[0] == n
    assert r.pruned.bias.shape == (n, 1, 1)
    assert r.pruned.a.weight.shape == (na, n, 3, 3)
    assert r.pruned.head.weight.shape == (4, n, 1, 1)


class SE(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.reduce = nn.Conv2d(8, 4, 1)
        self.expand = nn.Conv2d(4, 8, 1)
        self.head = nn.Conv2d(8, 5, 1)

    def forward(self, x):
        y = torch.relu(self.conv(x))
        gate = torch.sigmoid(self.expand(F.relu(self.reduce(self.pool(y)))))
        return self.head(y * gate)


def test_se_gating_by_multiplication():
    r = prune(SE(), torch.randn(2, 3, 8, 8))
    assert group_of(r.groups, "conv").id == group_of(r.groups, "expand").id
    n, nr = kept_count(r, "conv"), kept_count(r, "reduce")
    assert n < 8 and nr < 4
    assert r.pruned.expand.weight.shape == (n, nr, 1, 1)
    assert r.pruned.reduce.weight.shape == (nr, n, 1, 1)


class LayerScale(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(6, 10)
        self.gamma = nn.Parameter(torch.randn(10))
        self.fc2 = nn.Linear(10, 3)

    def forward(self, x):
        return self.fc2(self.fc1(x) * self.gamma)


def test_layer_scale_parameter_sliced():
    r = prune(LayerScale(), torch.randn(2, 4, 6))
    assert group_of(r.groups, "", "gamma").id == group_of(r.groups, "fc1").id
    n = kept_count(r, "fc1")
    assert n < 10 and r.pruned.gamma.shape == (n,) and r.pruned.fc2.weight.shape == (3, n)


class Concat(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Conv2d(3, 4, 1)
        self.b = nn.Conv2d(3, 6, 1)
        self.head = nn.Conv2d(10, 5, 1)

    def forward(self, x):
        return self.head(torch.cat([self.a(x), self.b(x)], dim=1))


def test_concat_maps_channel_offsets():
    model = Concat()
    r = prune(model, torch.randn(2, 3, 5, 5))
    na, nb = kept_count(r, "a"), kept_count(r, "b")
    assert na < 4 and nb < 6
    assert r.pruned.head.weight.shape == (5, na + nb, 1, 1)
    ka = r.keep[group_of(r.groups, "a").id].nonzero().flatten()
    kb = r.keep[group_of(r.groups, "b").id].nonzero().flatten()
    expected = torch.cat([model.head.weight[:, ka], model.head.weight[:, 4 + kb]], dim=1)
    assert torch.equal(r.pruned.head.weight, expected)


class SplitChunk(nn.Module):
    def __init__(self, how: str) -> None:
        super().__init__()
        self.how = how
        self.conv = nn.Conv2d(3, 12, 1)
        self.x1 = nn.Conv2d(4, 2, 1)
        self.x2 = nn.Conv2d(8, 2, 1)
        self.y1 = nn.Conv2d(6, 2, 1)
        self.y2 = nn.Conv2d(6, 2, 1)

    def forward(self, x):
        h = self.conv(x)
        if self.how == "split":
            a, b = torch.split(h, [4, 8], dim=1)
            return self.x1(a) + self.x2(b)
        if self.how == "method":
            a, b = h.split([4, 8], 1)
            return self.x1(a) + self.x2(b)
        if self.how == "chunk":
            a, b = h.chunk(2, dim=1)
            return self.y1(a) + self.y2(b)
        a, b = h[:, :4], h[:, 4:]
        return self.x1(a) + self.x2(b)


@pytest.mark.parametrize("how", ["split", "method", "chunk", "slice"])
def test_split_and_chunk_map_channel_offsets(how):
    r = prune(SplitChunk(how), torch.randn(2, 3, 4, 4))
    n = kept_count(r, "conv")
    assert n < 12 and r.pruned.conv.out_channels == n
    if how == "chunk":
        # the chunk sizes must stay equal: the two halves are pruned alike
        assert r.pruned.y1.in_channels == r.pruned.y2.in_channels == n // 2
    else:
        assert r.pruned.x1.in_channels + r.pruned.x2.in_channels == n
        assert r.pruned.x1.in_channels < 4 or r.pruned.x2.in_channels < 8


class FlattenHead(nn.Module):
    def __init__(self, how: str) -> None:
        super().__init__()
        self.how = how
        self.conv = nn.Conv2d(3, 6, 3, padding=1)
        self.pool = nn.AdaptiveAvgPool2d(2)
        self.flat = nn.Flatten()
        self.fc = nn.Linear(6 * 4, 5)

    def forward(self, x):
        y = self.pool(torch.relu(self.conv(x)))
        if self.how == "module":
            y = self.flat(y)
        elif self.how == "flatten":
            y = torch.flatten(y, 1)
        elif self.how == "view":
            y = y.view(y.shape[0], -1)
        else:
            y = y.reshape(y.size(0), 24)
        return self.fc(y)


@pytest.mark.parametrize("how", ["module", "flatten", "view", "reshape"])
def test_flatten_into_linear_prunes_blocks_of_inputs(how):
    model = FlattenHead(how)
    r = prune(model, torch.randn(2, 3, 6, 6))
    n = kept_count(r, "conv")
    assert n < 6
    assert r.pruned.fc.weight.shape == (5, n * 4) and r.pruned.fc.in_features == n * 4
    kept = r.keep[group_of(r.groups, "conv").id].nonzero().flatten()
    cols = (kept[:, None] * 4 + torch.arange(4)).flatten()
    assert torch.equal(r.pruned.fc.weight, model.fc.weight[:, cols])


class PermuteTokens(nn.Module):
    def __init__(self, how: str) -> None:
        super().__init__()
        self.how = how
        self.conv = nn.Conv2d(3, 8, 2, stride=2)
        self.fc = nn.Linear(8, 6)
        self.out = nn.Conv1d(6, 4, 1)

    def forward(self, x):
        y = self.conv(x)  # B, C, H, W
        if self.how == "permute":
            t = y.flatten(2).permute(0, 2, 1)
        else:
            t = y.flatten(2).transpose(1, 2)
        t = self.fc(t)  # B, N, C'
        return self.out(t.transpose(-1, -2).contiguous())


@pytest.mark.parametrize("how", ["permute", "transpose"])
def test_permute_and_transpose_follow_the_channel_axis(how):
    r = prune(PermuteTokens(how), torch.randn(2, 3, 8, 8))
    n, m = kept_count(r, "conv"), kept_count(r, "fc")
    assert n < 8 and m < 6
    assert r.pruned.fc.weight.shape == (m, n)
    assert r.pruned.out.weight.shape == (4, m, 1)


class PassThrough(nn.Module):
    """Pooling, activations, dropout, identity between two convs."""

    def __init__(self) -> None:
        super().__init__()
        self.c1 = nn.Conv2d(3, 8, 3, padding=1)
        self.ops = nn.Sequential(nn.GELU(), nn.MaxPool2d(2), nn.Dropout(0.3), nn.Identity(), nn.SiLU(),
                                 nn.AvgPool2d(2), nn.Hardswish(), nn.LeakyReLU(0.1), nn.Dropout2d(0.2))
        self.c2 = nn.Conv2d(8, 4, 1)

    def forward(self, x):
        y = self.ops(self.c1(x))
        y = F.max_pool2d(F.relu6(y), 1) + F.dropout(torch.tanh(y), 0.5, training=self.training)
        return self.c2(F.adaptive_avg_pool2d(y, 1))


def test_pooling_activation_dropout_identity_pass_channels_through():
    r = prune(PassThrough(), torch.randn(2, 3, 8, 8))
    n = kept_count(r, "c1")
    assert n < 8 and r.pruned.c1.out_channels == n and r.pruned.c2.in_channels == n
    assert [g for g in r.groups if not g.prunable and g.size > 1] == [group_of(r.groups, "c2")]  # only the output


class SumOverChannels(nn.Module):
    """A sum over the channels of act(Linear): with sigmoid, removed channels add sigmoid(0) = 0.5
    each in the masked model; with relu they add nothing."""

    def __init__(self, act) -> None:
        super().__init__()
        self.act = act
        self.a, self.head = nn.Linear(6, 4), nn.Linear(4, 3)

    def forward(self, x):
        y = self.act(self.a(x))
        return self.head(y) + y.sum(-1, keepdim=True)


def test_sum_over_channels_after_sigmoid():
    """Same root cause as test_gp_layers' test_exact_norm_after_an_op_that_makes_removed_channels_non_zero."""
    torch.manual_seed(0)
    r = prune(SumOverChannels(torch.sigmoid), torch.randn(2, 5, 6))  # asserts pruned == masked
    g = group_of(r.groups, "a")
    assert not g.prunable and "sums over channels that are not zero where removed" in g.reason


def test_sum_over_channels_that_stay_zero_prunes():
    torch.manual_seed(0)
    r = prune(SumOverChannels(torch.relu), torch.randn(2, 5, 6))
    n = kept_count(r, "a")
    assert group_of(r.groups, "a").prunable and n < 4 and r.pruned.head.in_features == n


class ContractionAfterSigmoid(nn.Module):
    """q @ k^T over channels of two computed tensors: removed channels add q_c * k_c to the masked
    model's sums unless one side is zero there."""

    def __init__(self, act) -> None:
        super().__init__()
        self.act = act
        self.q, self.k = nn.Linear(6, 4), nn.Linear(6, 4)

    def forward(self, x):
        return self.act(self.q(x)) @ torch.sigmoid(self.k(x)).transpose(1, 2)


@pytest.mark.parametrize("act", [torch.sigmoid, torch.relu], ids=["sigmoid", "relu"])
def test_contraction_of_computed_channels_needs_one_side_zero(act):
    torch.manual_seed(0)
    r = prune(ContractionAfterSigmoid(act), torch.randn(2, 5, 6))
    g = group_of(r.groups, "q")
    assert g == group_of(r.groups, "k")
    assert g.prunable == (act is torch.relu)


class OpBeforeNorm(nn.Module):
    """Linear -> ``op`` -> LayerNorm over the channels -> Linear: the norm's exact statistics need
    the removed channels to be zero after ``op`` in the masked model."""

    def __init__(self, op) -> None:
        super().__init__()
        self.op = op
        self.a, self.norm, self.head = nn.Linear(6, 4), nn.LayerNorm(4), nn.Linear(4, 3)
        self.scale = nn.Parameter(torch.rand(4) + 0.5)
        self.token_bias = nn.Parameter(torch.randn(5, 1))
        # fixed clamp limits kept as buffers (Gemma4's clipped Linear): +-inf, and one above zero
        self.register_buffer("low", torch.tensor(-float("inf")))
        self.register_buffer("high", torch.tensor(float("inf")))
        self.register_buffer("positive", torch.tensor(0.1))

    def forward(self, x):
        return self.head(self.norm(self.op(self, self.a(x))))


ZERO_KEEPING = {  # op -> whether removed channels stay zero after it
    "gelu": (lambda m, y: F.gelu(y), True),
    "hardtanh": (lambda m, y: F.hardtanh(y), True),
    "clamp_min_0": (lambda m, y: y.clamp(min=0.0), True),
    "pow_2": (lambda m, y: y.pow(2), True),
    "times_param": (lambda m, y: y * m.scale, True),
    "minus_token_mean": (lambda m, y: y - y.mean(1, keepdim=True), True),
    "maximum": (lambda m, y: torch.maximum(y, 0.5 * y), True),
    "concat_halves": (lambda m, y: torch.cat([y[..., :2], y[..., 2:]], dim=-1), True),
    "clamp_buffers": (lambda m, y: torch.clamp(y, m.low, m.high), True),
    "exp": (lambda m, y: y.exp(), False),
    "clamp_buffer_above_zero": (lambda m, y: torch.clamp(y, m.positive, m.high), False),
    "clamp_min_positive": (lambda m, y: y.clamp(min=0.1), False),
    "plus_param_exp": (lambda m, y: y + m.scale.exp(), False),
    "plus_token_bias": (lambda m, y: y + m.token_bias, False),  # one value per token, broadcast over channels
    "softmax_over_tokens": (lambda m, y: y.softmax(dim=1), False),
    "pow_0": (lambda m, y: y ** 0, False),
}


@pytest.mark.parametrize("name", sorted(ZERO_KEEPING))
def test_which_ops_keep_removed_channels_zero(name):
    op, keeps_zero = ZERO_KEEPING[name]
    torch.manual_seed(0)
    r = prune(OpBeforeNorm(op), torch.randn(2, 5, 6))  # pruned == masked either way
    g = group_of(r.groups, "a")
    assert g.prunable == keeps_zero, g.reason
    if not keeps_zero:
        assert "not zero where removed" in g.reason
