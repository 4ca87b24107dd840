"""One run of the model per analysis (#14): the eager check of ``trace`` reuses the leaf modules'
calls of the traced run (graph_passes._leaf_replay), and still sees every way eager can differ."""
from __future__ import annotations

import pytest
import timm
import torch
from torch import nn
from torch.fx._symbolic_trace import is_fx_tracing
from torch.utils._python_dispatch import TorchDispatchMode

import graph_passes as gp


class _Count(TorchDispatchMode):
    """The aten ops run, by name."""

    def __init__(self) -> None:
        super().__init__()
        self.ops: dict[str, int] = {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops[str(func)] = self.ops.get(str(func), 0) + 1
        return func(*args, **(kwargs or {}))


def test_an_analysis_and_its_cost_run_every_conv_and_linear_once():
    torch.manual_seed(0)
    model = timm.create_model("test_resnet", num_classes=10).eval()
    convs = sum(isinstance(m, nn.Conv2d) for m in model.modules())
    with _Count() as count:
        analysis = gp.analysis_for(model, torch.rand(1, 3, 32, 32))
        gp.cost(analysis)
    assert count.ops["aten.convolution.default"] == convs
    assert count.ops["aten.addmm.default"] == 1  # the classifier
    assert all("forward" not in vars(m) for m in model.modules())  # the leaf patches are gone


class EagerDiffers(nn.Module):
    """Eager computes something else than the trace, after a leaf or before one."""

    def __init__(self, where: str) -> None:
        super().__init__()
        self.where = where
        self.conv = nn.Conv2d(3, 4, 1)
        self.fc = nn.Linear(4, 2)

    def forward(self, x):
        if self.where == "before" and not is_fx_tracing():
            x = x * 2  # the conv gets other inputs in eager: computed, not given the recorded output
        y = self.conv(x)
        if self.where == "after" and not is_fx_tracing():
            y = y + 1  # the recorded conv output must not be changed for the traced side
        return self.fc(y.mean((2, 3)))


@pytest.mark.parametrize("where", ["before", "after"])
def test_the_check_still_sees_eager_differ(where):
    model = EagerDiffers(where)
    with pytest.raises(gp.TraceError, match="differs from eager"):
        gp.trace(model, torch.randn(1, 3, 4, 4))
    assert all("forward" not in vars(m) for m in model.modules())


class InPlace(nn.Module):
    """Recorded outputs changed in place after their call, and an in-place leaf whose output is
    its input: given back as recorded, eager would compute other values and the check would fail."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 1)
        self.bn = nn.BatchNorm2d(4)
        self.act = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(4, 4, 1)

    def forward(self, x):
        y = self.conv(x)
        y.add_(1)  # in the traced graph too (fx records `+=` as an add): changes the recorded output
        z = self.bn(y)
        w = self.act(z)  # in place: w is z
        return self.conv2(w) + z + y


def test_outputs_changed_in_place_and_in_place_leaves_are_computed_again():
    torch.manual_seed(0)
    model = InPlace().eval()
    with torch.no_grad():
        model.bn.running_mean.normal_()
    x = torch.randn(1, 3, 5, 5)
    with _Count() as count:
        gm = gp.trace(model, x)
    assert count.ops["aten.convolution.default"] == 3  # conv computed again (its output changed), conv2 once
    with torch.no_grad():
        assert torch.equal(gm(x), model(x))


class NormActConv(nn.Module):
    """A norm whose output an in-place activation changes, then a conv (every ResNet block)."""

    def __init__(self, eager_only_change: bool = False) -> None:
        super().__init__()
        self.eager_only_change = eager_only_change
        self.conv, self.bn, self.act, self.conv2 = nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4), nn.ReLU(inplace=True), nn.Conv2d(4, 4, 1)

    def forward(self, x):
        y = self.act(self.bn(self.conv(x)))
        if self.eager_only_change and not is_fx_tracing():
            y.add_(1)  # eager changes the activation's output in place after the call
        return self.conv2(y)


def test_calls_computed_again_tell_the_next_call_its_inputs_without_comparing_values():
    torch.manual_seed(0)
    model = NormActConv().eval()
    with _Count() as count:
        gp.trace(model, torch.randn(1, 3, 5, 5))
    # bn and act run again (the act changed bn's output), and then hold what they held in the
    # traced run: conv2 is given its output without reading its input
    assert count.ops["aten.convolution.default"] == 2
    assert count.ops.get("aten.equal.default", 0) == 0
    with pytest.raises(gp.TraceError, match="differs from eager"):
        gp.trace(NormActConv(eager_only_change=True).eval(), torch.randn(1, 3, 5, 5))


class Unpacks(nn.Module):
    """Parameters read in the forward, and proxies unpacked: fx's per-use look-ups."""

    def __init__(self) -> None:
        super().__init__()
        self.qkv = nn.Linear(8, 24)
        self.scale = nn.Parameter(torch.ones(8))
        self.blocks = nn.ModuleList(nn.Linear(8, 8) for _ in range(3))

    def forward(self, x):
        for block in self.blocks:
            B, N, C = x.shape
            q, k, v = self.qkv(x).reshape(B, N, 3, C).unbind(2)
            x = block(q * self.scale + k + v * self.blocks[0].bias)
        return x


def _nodes(graph):
    return [(n.name, n.op, str(n.target), str(n.args), str(n.kwargs)) for n in graph.nodes]


def test_the_tracer_makes_fx_graph_with_its_look_ups_made_once(monkeypatch):
    from torch import fx

    from graph_passes import _tracer_lookups

    class FxLookups(gp.HarpTracer):  # fx's own: a scan of the parameters, a disassembly per use
        def proxy(self, node):
            return fx.Proxy(node, self)

        def getattr(self, attr, attr_val, cache):
            return fx.Tracer.getattr(self, attr, attr_val, cache)

    disassembled = []
    real = _tracer_lookups.dis.get_instructions
    monkeypatch.setattr(_tracer_lookups.dis, "get_instructions", lambda code: disassembled.append(code) or real(code))
    model = Unpacks()
    expected = FxLookups().trace(model)
    del disassembled[:]
    graph = gp.HarpTracer().trace(model)
    assert _nodes(graph) == _nodes(expected)
    assert disassembled == [Unpacks.forward.__code__]  # six unpackings, one disassembly
    gm = gp.trace(model, torch.randn(2, 5, 8))  # the checked trace equals eager
    assert len([n for n in gm.graph.nodes if n.op == "get_attr"]) == 2


class IteratesAProxy(nn.Module):
    def forward(self, x):
        return sum(t for t in x)  # iteration of unknown length: fx refuses


def test_iterating_a_proxy_is_refused_as_by_fx():
    from torch import fx

    with pytest.raises(fx.proxy.TraceError, match="Proxy object cannot be iterated"):
        gp.HarpTracer().trace(IteratesAProxy())


def test_element_channel_names_the_group_and_channel_of_a_member_position():
    torch.manual_seed(0)
    analysis = gp.analysis_for(timm.create_model("test_resnet", num_classes=10).eval(), torch.rand(1, 3, 32, 32))
    checked = 0
    for rec in analysis.state.members:
        for position, element in enumerate(rec.ids.tolist()):
            gid, channel = analysis.element_channel(element)
            member = next(m for m in analysis.groups[gid].members if (m.module, m.param, m.dim) == (rec.module, rec.param, rec.dim))
            assert member.channel[member.index.index(position)] == channel
            checked += 1
    assert checked > 100
    pairs = dict(analysis.channel_of.items())  # a map read as a dict, by group and channel
    assert analysis.channel_of == pairs and len(pairs) == sum(g.size for g in analysis.groups)
    assert list(pairs.values()) == [(g.id, c) for g in analysis.groups for c in range(g.size)]
