"""Tracing (equals eager, names what breaks it) and ops without a channel rule."""
from __future__ import annotations

import pytest
import torch
from torch import fx, nn

import graph_passes as gp
from _gp_helpers import group_of, kept_count, outputs, prune


class TwoOutputs(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.fc = nn.Linear(8, 4)

    def forward(self, x):
        y = torch.relu(self.bn(self.conv(x)))
        return self.fc(y.mean((2, 3))), y.flatten(1).softmax(-1)


def test_trace_equals_eager_and_carries_shapes():
    model = TwoOutputs()
    with torch.no_grad():
        model.bn.running_mean.normal_()
    x = torch.randn(2, 3, 6, 6)
    gm = gp.trace(model, x)
    assert isinstance(gm, fx.GraphModule)
    a, b = outputs(model, x), outputs(gm, x)
    assert len(a) == len(b) == 2
    for e, g in zip(a, b):
        assert torch.equal(e, g)
    calls = [n for n in gm.graph.nodes if n.op in ("call_module", "call_function", "call_method")]
    assert calls and all("tensor_meta" in n.meta for n in calls)
    assert {n.target for n in gm.graph.nodes if n.op == "call_module"} == {"conv", "bn", "fc"}


class DataDependent(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 1)

    def forward(self, x):
        y = self.conv(x)
        if y.sum() > 0:  # data-dependent branch
            y = -y
        return y


def test_data_dependent_control_flow_raises_trace_error_naming_the_culprit():
    with pytest.raises(gp.TraceError) as info:
        gp.trace(DataDependent(), torch.randn(1, 3, 4, 4))
    message = str(info.value)
    assert "DataDependent" in message
    assert "test_gp_tracing.py" in message and "if y.sum() > 0" in message
    assert "leaf_types" in message  # it says how to fix it


def test_timm_leaf_modules_stay_leaves():
    from timm import layers as timm_layers

    class M(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv2d(3, 8, 1)
            self.norm = timm_layers.LayerNorm2d(8)

        def forward(self, x):
            return self.norm(self.conv(x))

    x = torch.randn(1, 3, 4, 4)
    gm = gp.trace(M(), x)
    assert "norm" in {n.target for n in gm.graph.nodes if n.op == "call_module"}
    assert torch.allclose(gm(x), M.__call__(gm, x))


class _Cube(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        ctx.save_for_backward(x)
        return x ** 3

    @staticmethod
    def backward(ctx, grad):
        (x,) = ctx.saved_tensors
        return 3 * x ** 2 * grad


@fx.wrap
def cube(x):
    return _Cube.apply(x)


class Unsupported(nn.Module):
    def __init__(self, how: str) -> None:
        super().__init__()
        self.how = how
        self.c1 = nn.Conv2d(3, 8, 1)  # feeds the op without a rule
        self.c2 = nn.Conv2d(8, 6, 1)  # an ordinary conv after it
        self.c3 = nn.Conv2d(6, 4, 1)

    def forward(self, x):
        y = self.c1(x)
        y = cube(y) if self.how == "autograd" else torch.fft.fft(y, dim=1).real
        return self.c3(torch.relu(self.c2(y)))


@pytest.mark.parametrize("how", ["autograd", "fft"])
def test_op_without_rule_pins_its_channels_and_says_why(how):
    model = Unsupported(how)
    x = torch.randn(2, 3, 4, 4)
    gm = gp.trace(model, x)
    node = next(n for n in gm.graph.nodes if n.op == "call_function" and n.target in (cube, torch.fft.fft))
    analysis = gp.analyze(gm)
    assert any(node.name in note for note in analysis.unsupported)
    fixed = group_of(analysis.groups, "c1")
    assert not fixed.prunable and node.name in fixed.reason and "no channel rule" in fixed.reason
    assert group_of(analysis.groups, "c2").prunable  # the rest of the model is still prunable
    r = prune(model, x)
    assert r.pruned.c1.out_channels == 8 and r.pruned.c2.in_channels == 8
    assert r.pruned.c2.out_channels == kept_count(r, "c2") < 6
