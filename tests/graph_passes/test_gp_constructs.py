"""Constructs met in timm families, each on a small hand-built module: the pruned model equals the
masked one (``prune`` asserts it) and the shapes really shrink."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from _gp_helpers import group_of, kept_count, prune


class CatBiasQKV(nn.Module):
    """BEiT/EVA: a bias-free qkv Linear called through F.linear with cat(q_bias, k_bias, v_bias),
    k_bias a (non-persistent) zero buffer."""

    def __init__(self, dim: int = 16, heads: int = 2) -> None:
        super().__init__()
        self.heads = heads
        self.embed = nn.Linear(6, dim)
        self.qkv = nn.Linear(dim, 3 * dim, bias=False)
        self.q_bias = nn.Parameter(torch.randn(dim))
        self.register_buffer("k_bias", torch.zeros(dim), persistent=False)
        self.v_bias = nn.Parameter(torch.randn(dim))
        self.proj = nn.Linear(dim, dim)

    def forward(self, x):
        x = self.embed(x)
        B, N, C = x.shape
        bias = torch.cat((self.q_bias, self.k_bias, self.v_bias))
        qkv = F.linear(x, weight=self.qkv.weight, bias=bias)
        q, k, v = qkv.reshape(B, N, 3, self.heads, -1).permute(2, 0, 3, 1, 4).unbind(0)
        y = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(B, N, C)
        return x + self.proj(y)


def test_linear_with_concatenated_bias_parameters_prunes_them_with_the_weight_rows():
    model = CatBiasQKV()
    r = prune(model, torch.randn(2, 5, 6))
    g = group_of(r.groups, "qkv")
    assert g.prunable
    assert {(m.module, m.param) for m in g.members} >= {("", "q_bias"), ("", "k_bias"), ("", "v_bias")}
    d = int(r.keep[g.id].sum())
    assert d < 8
    assert r.pruned.q_bias.shape == r.pruned.v_bias.shape == r.pruned.k_bias.shape == (2 * d,)
    assert r.pruned.qkv.weight.shape[0] == 6 * d
    assert "k_bias" not in r.pruned.state_dict()  # stays a non-persistent buffer


class StackedAggregate(nn.Module):
    """CoaT: class tokens of three streams stacked on a new axis 1 and mixed by a Conv1d over that
    axis; the channels sit on the conv's length axis."""

    def __init__(self, dim: int = 12) -> None:
        super().__init__()
        self.a, self.b, self.c = nn.Linear(5, dim), nn.Linear(5, dim), nn.Linear(5, dim)
        self.aggregate = nn.Conv1d(3, 1, kernel_size=1)
        self.head = nn.Linear(dim, 4)

    def forward(self, x):
        tokens = [f(x)[:, :1] for f in (self.a, self.b, self.c)]
        merged = self.aggregate(torch.cat(tokens, dim=1)).squeeze(dim=1)
        return self.head(merged)


def test_pointwise_conv_passes_channels_on_its_length_axis():
    model = StackedAggregate()
    r = prune(model, torch.randn(2, 7, 5))
    g = group_of(r.groups, "a")
    assert g.prunable and group_of(r.groups, "head", dim=1).id == g.id == group_of(r.groups, "c").id
    assert r.pruned.head.in_features == kept_count(r, "a") < 12


class WideConvOverChannels(nn.Module):
    """A conv with a 3-wide kernel along an axis that carries channels: they must stay."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(5, 12)
        self.mix = nn.Conv1d(7, 2, kernel_size=3, padding=1)
        self.head = nn.Linear(12, 4)

    def forward(self, x):
        return self.head(self.mix(self.a(x)))


def test_conv_over_a_channel_axis_pins_those_channels():
    model = WideConvOverChannels()
    r = prune(model, torch.randn(2, 7, 5))
    g = group_of(r.groups, "a")
    assert not g.prunable and "convolves over axis 2" in g.reason
    assert r.pruned.a.out_features == 12


class TalkingHeads(nn.Module):
    """CaiT: Linear layers across the heads axis of the attention map; the head output is reshaped
    with C read from the (pruned) residual stream's shape."""

    def __init__(self, dim: int = 16, heads: int = 4) -> None:
        super().__init__()
        self.heads = heads
        self.embed = nn.Linear(6, dim)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj_l = nn.Linear(heads, heads)
        self.proj_w = nn.Linear(heads, heads)
        self.proj = nn.Linear(dim, dim)
        self.head = nn.Linear(dim, 3)

    def forward(self, x):
        x = self.embed(x)
        B, N, C = x.shape
        qkv = self.qkv(x).reshape(B, N, 3, self.heads, C // self.heads).permute(2, 0, 3, 1, 4)
        q, k, v = qkv[0], qkv[1], qkv[2]
        attn = q @ k.transpose(-2, -1)
        attn = self.proj_l(attn.permute(0, 2, 3, 1)).permute(0, 3, 1, 2).softmax(dim=-1)
        attn = self.proj_w(attn.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)
        y = (attn @ v).transpose(1, 2).reshape(B, N, C)
        return self.head(x + self.proj(y))


def test_run_time_size_read_from_a_pruned_axis_becomes_the_static_kept_length():
    model = TalkingHeads()
    r = prune(model, torch.randn(2, 5, 6))
    stream = group_of(r.groups, "embed")
    assert stream.prunable and r.pruned.embed.out_features < 16
    assert not group_of(r.groups, "qkv").prunable  # head channels merged with the heads axis stay
    assert r.pruned.proj.in_features == 16


class SingleChannelFold(nn.Module):
    """A size-1 channel axis (a Conv1d with one output channel) squeezed into the channel axis
    next to it: the wide axis keeps its channels."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(5, 10)
        self.one = nn.Conv1d(3, 1, kernel_size=1)
        self.head = nn.Linear(10, 4)

    def forward(self, x):
        return self.head(self.one(self.a(x)).reshape(x.shape[0], -1))


def test_single_channel_axis_folds_without_pinning_its_neighbour():
    model = SingleChannelFold()
    r = prune(model, torch.randn(2, 3, 5))
    assert group_of(r.groups, "a").prunable
    assert r.pruned.head.in_features == kept_count(r, "a") < 10


class Gates(nn.Module):
    """FocalNet: one conv makes query, context and per-level gates; each gate is a one-channel
    slice broadcast over the context channels."""

    def __init__(self, dim: int = 8, levels: int = 2) -> None:
        super().__init__()
        self.dim, self.levels = dim, levels
        self.f = nn.Conv2d(3, 2 * dim + levels, 1)
        self.focal = nn.ModuleList(nn.Conv2d(dim, dim, 3, padding=1, groups=dim) for _ in range(levels))
        self.h = nn.Conv2d(dim, dim, 1)
        self.head = nn.Linear(dim, 3)

    def forward(self, x):
        q, ctx, gates = torch.split(self.f(x), (self.dim, self.dim, self.levels), 1)
        acc = 0
        for level, conv in enumerate(self.focal):
            ctx = conv(ctx)
            acc = acc + ctx * gates[:, level:level + 1]
        return self.head((q * self.h(acc)).mean((2, 3)))


def test_single_channel_broadcast_over_channels_pins_that_channel():
    model = Gates()
    r = prune(model, torch.randn(2, 3, 6, 6))
    gate_groups = [g for g in r.groups if any(m.module == "f" and set(m.index) & {16, 17} for m in g.members)]
    assert gate_groups and all(not g.prunable and "broadcasts a single channel" in g.reason for g in gate_groups)
    assert r.pruned.f.out_channels == kept_count(r, "f") < 18
    assert r.pruned.h.out_channels < 8


class OptionalMask(nn.Module):
    """Hiera: ``forward(x, mask=None)`` with a branch on ``mask is not None``."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Linear(4, 10), nn.Linear(10, 3)

    def forward(self, x, mask=None, scale_up=False):
        y = self.a(x)
        if mask is not None:
            y = y * mask.view(x.shape[0], 1)
        if scale_up:
            y = 2 * y
        return self.b(y)


def test_constant_default_arguments_are_fixed_while_tracing():
    model = OptionalMask()
    r = prune(model, torch.randn(2, 4))
    assert r.pruned.a.out_features == kept_count(r, "a") < 10


class ViewedScale(nn.Module):
    """PoolFormer v2: a per-channel scale stored 1-D and viewed with a constant shape (C, 1, 1)."""

    def __init__(self, dim: int = 8) -> None:
        super().__init__()
        self.shape = (dim, 1, 1)
        self.conv = nn.Conv2d(3, dim, 1)
        self.scale = nn.Parameter(torch.randn(dim))
        self.head = nn.Linear(dim, 2)

    def forward(self, x):
        y = self.conv(x) * self.scale.view(self.shape)
        return self.head(y.mean((2, 3)))


def test_constant_view_of_a_sliced_parameter_takes_its_new_length():
    model = ViewedScale()
    r = prune(model, torch.randn(2, 3, 4, 4))
    assert r.pruned.scale.shape == (kept_count(r, "conv"),) and kept_count(r, "conv") < 8


class DataDependent(nn.Module):
    """Gemma4-style: Python control flow on buffer values and input ranks, factory calls sized by
    proxies, a buffer expanded to the batch, ``int(t.item())`` slice bounds."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Linear(4, 10), nn.Linear(10, 3)
        self.register_buffer("freq", torch.arange(5.0))

    def forward(self, x):
        if x.ndim != 2:
            raise ValueError("2-D input expected")
        y = self.a(x)
        if (self.freq > 100).any():  # decided by a buffer, not by the input's values
            y = y * 0
        valid = torch.ones(x.shape[0], 5, dtype=torch.bool)
        n = int(valid.sum(dim=1).max().item())
        extra = self.freq[None, :].expand(x.shape[0], -1)[:, :n].sum(1, keepdim=True)
        return self.b(y) + extra


def test_data_dependent_control_flow_is_traced_concretely():
    model = DataDependent()
    x = torch.randn(2, 4)
    with pytest.raises(Exception):
        torch.fx.symbolic_trace(model)
    r = prune(model, x)
    assert r.pruned.a.out_features == kept_count(r, "a") < 10


def test_timm_same_padding_pools_pass_channels():
    from timm.layers import pool2d_same

    class M(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a = nn.Conv2d(3, 8, 1)
            self.pool = pool2d_same.MaxPool2dSame(3, stride=2)
            self.avg = pool2d_same.AvgPool2dSame(3, stride=1)
            self.head = nn.Linear(8, 2)

        def forward(self, x):
            return self.head(self.avg(self.pool(self.a(x))).mean((2, 3)))

    r = prune(M(), torch.randn(2, 3, 9, 9))
    assert group_of(r.groups, "a").prunable
    assert r.pruned.head.in_features == kept_count(r, "a") < 8


class WindowPad(nn.Module):
    """Hiera-Det/Swin: an NHWC tensor padded on H and W by amounts computed at run time, the
    channel axis by literal zeros."""

    def __init__(self, window: int = 4) -> None:
        super().__init__()
        self.window = window
        self.a = nn.Linear(3, 8)
        self.head = nn.Linear(8, 2)

    def forward(self, x):
        y = self.a(x)  # B, H, W, C
        H, W = y.shape[1], y.shape[2]
        pad_h, pad_w = (self.window - H % self.window) % self.window, (self.window - W % self.window) % self.window
        y = F.pad(y, (0, 0, 0, pad_w, 0, pad_h))
        return self.head(y.mean((1, 2)))


def test_pad_with_zero_amounts_on_the_channel_axis_passes_channels():
    r = prune(WindowPad(), torch.randn(2, 6, 7, 3))
    assert group_of(r.groups, "a").prunable
    assert r.pruned.head.in_features == kept_count(r, "a") < 8
