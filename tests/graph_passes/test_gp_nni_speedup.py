"""ModelSpeedup as NNI's: in place by default, NNI's mask formats and constructor arguments, the
channel rule for NNI's per-layer masks, and a clear error where a model's own forward cannot
follow the pruning."""
from __future__ import annotations

import copy
import logging

import pytest
import timm
import torch
import torch.nn.functional as F
from torch import fx, nn

import graph_passes as gp
from _gp_helpers import assert_same, group_of, outputs, random_keep
from test_gp_ops import Residual


class Net(nn.Module):
    """NNI's tutorial model, small: conv1 (with bias) -> conv2 -> BN -> linear head."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, 6, 3)
        self.conv2 = nn.Conv2d(6, 8, 3, bias=False)
        self.bn = nn.BatchNorm2d(8)
        self.fc = nn.Linear(8, 4)

    def forward(self, x):
        x = F.relu(self.conv1(x))
        x = F.relu(self.bn(self.conv2(x)))
        return self.fc(x.mean((2, 3)))


def _net() -> Net:
    torch.manual_seed(0)
    model = Net()
    with torch.no_grad():
        model.bn.running_mean.uniform_(-0.5, 0.5)
        model.bn.bias.uniform_(-0.5, 0.5)
    return model.eval()


def _first_rows(weight: torch.Tensor, n: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    mask = torch.ones_like(weight, dtype=dtype)
    mask[:n] = 0
    return mask


def test_in_place_prunes_the_model_itself_and_equals_the_applied_masks():
    model, x = _net().train(), torch.randn(2, 1, 12, 12)
    reference, conv2 = copy.deepcopy(model), model.conv2
    masks = {"conv1": {"weight": _first_rows(model.conv1.weight, 3), "bias": None}}
    speedup = gp.ModelSpeedup(model, x, masks)
    assert speedup.speedup_model() is model
    assert model.training  # back in the mode it was in
    assert (model.conv1.in_channels, model.conv1.out_channels, model.conv2.in_channels) == (1, 3, 3)
    assert model.conv2 is not conv2 and tuple(model.conv2.weight.shape) == (8, 3, 3, 3)  # replaced through the parent
    assert "Conv2d(1, 3, kernel_size=(3, 3)" in repr(model) and not isinstance(model, fx.GraphModule)
    # conv1's bias was not masked: it goes with its channels (as in NNI), and the applied masks say so
    assert speedup.applied_masks["conv1"]["bias"].tolist() == [0.0] * 3 + [1.0] * 3
    assert_same(outputs(model, x), outputs(gp.masked_copy(reference, speedup.applied_masks), x))


def test_nni_mask_formats_prune_alike(tmp_path):
    x = torch.randn(2, 1, 12, 12)
    float_masks = {"conv1": {"weight": _first_rows(_net().conv1.weight, 2), "bias": None}, "bn": None}
    bool_masks = {"conv1": {"weight": _first_rows(_net().conv1.weight, 2, torch.bool)}}
    path = tmp_path / "masks.pth"
    torch.save(float_masks, path)
    results = [gp.ModelSpeedup(_net(), x, masks, map_location="cpu").speedup_model()
               for masks in (float_masks, bool_masks, path, str(path))]
    states = [m.state_dict() for m in results]
    for state in states[1:]:
        assert state.keys() == states[0].keys()
        assert all(torch.equal(state[k], states[0][k]) for k in state)
    assert results[0].conv1.out_channels == 4


def test_element_wise_masks_are_baked_in_with_a_warning():
    model, x = _net(), torch.randn(2, 1, 12, 12)
    torch.manual_seed(1)
    masks = {"conv2": {"weight": (torch.rand_like(model.conv2.weight) > 0.5).float()}}
    expected = outputs(gp.masked_copy(model, masks), x)
    with pytest.warns(gp.SpeedupWarning, match="nothing to remove"):
        gp.ModelSpeedup(model, x, masks).speedup_model()
    assert model.conv2.weight.shape == (8, 6, 3, 3) and torch.equal(model.conv2.weight == 0, masks["conv2"]["weight"] == 0)
    assert_same(outputs(model, x), expected)


def test_masks_that_do_not_fit_are_errors_naming_the_tensor():
    model, x = _net(), torch.randn(2, 1, 12, 12)
    with pytest.raises(gp.SpeedupError, match="module 'conv9'"):
        gp.ModelSpeedup(model, x, {"conv9": {"weight": torch.ones(1)}})
    with pytest.raises(gp.SpeedupError, match="conv2.bias, which the model does not have"):
        gp.ModelSpeedup(model, x, {"conv2": {"bias": torch.ones(8)}})
    with pytest.raises(gp.SpeedupError, match=r"mask for conv1.weight has shape \(6,\)"):
        gp.ModelSpeedup(model, x, {"conv1": {"weight": torch.ones(6)}})
    with pytest.raises(gp.SpeedupError, match="masks file not found"):
        gp.ModelSpeedup(model, x, "no/such/masks.pth")


def test_a_model_still_wrapped_by_an_nni_pruner_is_refused():
    from nni.compression.pruning import L1NormPruner

    model = _net()
    pruner = L1NormPruner(model, [{"op_types": ["Conv2d"], "sparse_ratio": 0.5}])
    _, masks = pruner.compress()
    with pytest.raises(gp.SpeedupError, match=r"unwrap_model\(\)"):
        gp.ModelSpeedup(model, torch.randn(2, 1, 12, 12), masks)
    pruner.unwrap_model()
    assert gp.ModelSpeedup(model, torch.randn(2, 1, 12, 12), masks).speedup_model().conv2.out_channels == 4


def test_nni_constructor_arguments_are_accepted_or_refused_by_name(caplog):
    x = torch.randn(2, 1, 12, 12)
    masks = {"conv1": {"weight": _first_rows(_net().conv1.weight, 3)}}
    log = logging.getLogger("nni_user")
    with caplog.at_level(logging.INFO, logger="nni_user"):
        model = gp.ModelSpeedup(_net(), {"x": x}, masks, None, 0, 4, None, None, None, False, log, confidence=8).speedup_model()
    assert model.conv1.out_channels == 3 and "pruned Net in place" in caplog.text
    for name, value in (("customized_mask_updaters", [object()]), ("customized_replacers", [object()]),
                        ("customized_replace_func", {"Conv2d": lambda *a: None})):
        with pytest.raises(gp.SpeedupError, match=f"ModelSpeedup\\({name}=...\\) is not supported"):
            gp.ModelSpeedup(_net(), x, masks, **{name: value})
    with pytest.raises(gp.SpeedupError, match="batch_size must be an int"):
        gp.ModelSpeedup(_net(), x, masks, batch_size="8")
    with pytest.raises(gp.SpeedupError, match="graph_module must be a torch.fx.GraphModule"):
        gp.ModelSpeedup(_net(), x, masks, graph_module=_net())


@pytest.mark.parametrize("tracer", ["graph_passes", "torch.fx"])
def test_graph_module_argument_is_analysed_and_pruned_with_the_model(tracer):
    model, x = _net(), torch.randn(2, 1, 12, 12)
    traced = gp.trace(model, x) if tracer == "graph_passes" else fx.symbolic_trace(model)
    masks = {"conv1": {"weight": _first_rows(model.conv1.weight, 3)}}
    reference = copy.deepcopy(model)
    speedup = gp.ModelSpeedup(model, x, masks, graph_module=traced)
    speedup.speedup_model()
    assert model.conv1.out_channels == traced.conv1.out_channels == 3
    expected = outputs(gp.masked_copy(reference, speedup.applied_masks), x)
    assert_same(outputs(model, x), expected)
    assert_same(outputs(traced, x), expected)


class Body(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 1)
        self.width = 8  # a channel count the forward reads from Python

    def forward(self, x):
        y = self.conv(x)
        return y.view(y.shape[0], self.width, -1).mean(-1)


class Baked(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.body = Body()
        self.fc = nn.Linear(8, 2)

    def forward(self, x):
        return self.fc(self.body(x))


def test_a_forward_that_bakes_in_a_size_raises_naming_the_module_and_leaves_the_model_alone():
    torch.manual_seed(0)
    model, x = Baked().eval(), torch.randn(2, 3, 4, 4)
    before = copy.deepcopy(model.state_dict())
    masks = {"body.conv": {"weight": _first_rows(model.body.conv.weight, 3), "bias": _first_rows(model.body.conv.bias, 3)}}
    with pytest.raises(gp.SpeedupError, match=r"module 'body' \(Body\) computes differently from the pruned graph "
                                              r"\(output 0 has shape \(2, 8\) instead of \(2, 5\)\); then module 'fc' "
                                              r"\(Linear\) fails.*speedup_model\(inplace=False\)"):
        gp.ModelSpeedup(model, x, masks).speedup_model()
    assert model.body.conv.out_channels == 8 and all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    pruned = gp.ModelSpeedup(model, x, masks).speedup_model(inplace=False)
    assert isinstance(pruned, fx.GraphModule) and pruned.body.conv.out_channels == 5
    assert_same(outputs(pruned, x), outputs(gp.masked_copy(model, masks), x))


def test_fallback_to_graph_returns_the_pruned_graph_where_the_forward_cannot_follow_and_the_model_where_it_can():
    torch.manual_seed(0)
    model, x = Baked().eval(), torch.randn(2, 3, 4, 4)
    before = copy.deepcopy(model.state_dict())
    masks = {"body.conv": {"weight": _first_rows(model.body.conv.weight, 3), "bias": _first_rows(model.body.conv.bias, 3)}}
    speedup = gp.ModelSpeedup(model, x, masks)
    pruned = speedup.speedup_model(fallback_to_graph=True)
    assert isinstance(pruned, fx.GraphModule) and pruned.body.conv.out_channels == 5
    assert "module 'body' (Body) computes differently" in speedup.inplace_error
    assert model.body.conv.out_channels == 8 and all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert_same(outputs(pruned, x), outputs(gp.masked_copy(model, masks), x))

    plain = nn.Sequential(nn.Conv2d(3, 8, 1), nn.ReLU(), nn.Conv2d(8, 2, 1)).eval()
    masks = {"0": {"weight": _first_rows(plain[0].weight, 3), "bias": _first_rows(plain[0].bias, 3)}}
    expected = outputs(gp.masked_copy(plain, masks), x)
    speedup = gp.ModelSpeedup(plain, x, masks)
    assert speedup.speedup_model(fallback_to_graph=True) is plain and speedup.inplace_error is None
    assert plain[0].out_channels == 5 and plain[2].in_channels == 5
    assert_same(outputs(plain, x), expected)


class OwnNorm(nn.Module):
    """A layer norm written with F.layer_norm: the graph gets exact statistics, this forward not."""

    def __init__(self, n: int) -> None:
        super().__init__()
        self.weight, self.bias = nn.Parameter(torch.rand(n) + 0.5), nn.Parameter(torch.randn(n))

    def forward(self, x):
        return F.layer_norm(x, (x.shape[-1],), self.weight, self.bias)


class NormBlock(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc0, self.norm, self.fc = nn.Linear(4, 8), OwnNorm(8), nn.Linear(8, 3)

    def forward(self, x):
        return self.fc(self.norm(self.fc0(x)))


def test_a_forward_that_computes_differently_is_named():
    torch.manual_seed(0)
    model = nn.Sequential(NormBlock()).eval()
    x = torch.randn(5, 4)
    groups = gp.channel_groups(model, x)
    masks = gp.group_masks(model, groups, {group_of(groups, "0.fc0").id: torch.arange(8) % 2 == 0})
    with pytest.raises(gp.SpeedupError, match=r"module '0.norm' \(OwnNorm\) computes differently from the pruned graph"):
        gp.ModelSpeedup(model, x, masks).speedup_model()
    assert model[0].fc0.out_features == 8


def test_timm_attention_prunes_in_place_with_its_head_width():
    torch.manual_seed(0)
    model = nn.Sequential(timm.layers.Attention(16, num_heads=2, qkv_bias=True)).eval()
    x = torch.randn(2, 5, 16)
    groups = gp.channel_groups(model, x)
    head = group_of(groups, "0.qkv")
    masks = gp.group_masks(model, groups, {head.id: torch.arange(head.size) % 2 == 0})
    expected = outputs(gp.masked_copy(model, masks), x)
    gp.ModelSpeedup(model, x, masks).speedup_model()
    attn = model[0]
    assert (attn.num_heads, attn.head_dim, attn.attn_dim, attn.qkv.out_features) == (2, 4, 8, 24)
    assert not attn.fused_attn  # keeps the original scale 1/sqrt(8)
    assert_same(outputs(model, x), expected)


def test_a_channel_goes_when_its_producers_or_its_readers_are_masked_out():
    model, x = Residual().eval(), torch.randn(2, 3, 8, 8)
    groups = gp.channel_groups(model, x)
    res, inner = group_of(groups, "stem"), group_of(groups, "a")
    rows = {name: _first_rows(getattr(model, name).weight, 2) for name in ("stem", "a", "b")}
    keep = gp.keep_from_masks(groups, {"stem": {"weight": rows["stem"]}, "b": {"weight": rows["b"]}})
    assert keep[res.id].tolist() == [False] * 2 + [True] * 6  # every producer drops 0 and 1
    keep = gp.keep_from_masks(groups, {"stem": {"weight": rows["stem"]}})
    assert keep[res.id].all()  # b, unmasked, still produces them
    cols = torch.ones_like(model.b.weight)
    cols[:, :3] = 0
    keep = gp.keep_from_masks(groups, {"b": {"weight": cols}})  # b is the one reader of a's channels
    assert keep[inner.id].tolist() == [False] * 3 + [True] * 3
    # BatchNorm scales alone (SlimPruner): a zero scale removes the channel, its shift goes with it
    bn_model = _net()
    bn_groups = gp.channel_groups(bn_model, torch.randn(2, 1, 12, 12))
    scale = torch.ones(8)
    scale[5] = 0
    keep = gp.keep_from_masks(bn_groups, {"bn": {"weight": scale, "bias": torch.ones(8)}})
    assert keep[group_of(bn_groups, "conv2").id].tolist() == [True] * 5 + [False] + [True] * 2


def test_a_residual_model_prunes_in_place_with_random_group_masks():
    torch.manual_seed(0)
    model, x = Residual().eval(), torch.randn(2, 3, 8, 8)
    groups = gp.channel_groups(model, x)
    masks = gp.group_masks(model, groups, random_keep(groups))
    expected = outputs(gp.masked_copy(model, masks), x)
    assert gp.ModelSpeedup(model, x, masks).speedup_model() is model
    assert model.bias.shape[0] == model.stem.out_channels < 8  # a parameter of the model itself, sliced
    assert_same(outputs(model, x), expected)


class PlainAttention(nn.Module):
    """Calls the fused kernel with its default scale, which would follow the narrower heads."""

    def __init__(self) -> None:
        super().__init__()
        self.qkv, self.proj = nn.Linear(16, 48), nn.Linear(16, 16)

    def forward(self, x):
        q, k, v = self.qkv(x).reshape(x.shape[0], x.shape[1], 3, 2, 8).permute(2, 0, 3, 1, 4).unbind(0)
        return self.proj(F.scaled_dot_product_attention(q, k, v).transpose(1, 2).flatten(2))


def test_an_attention_whose_default_scale_would_change_is_refused_in_place():
    torch.manual_seed(0)
    model, x = nn.Sequential(PlainAttention()).eval(), torch.randn(2, 5, 16)
    groups = gp.channel_groups(model, x)
    head = group_of(groups, "0.qkv")
    masks = gp.group_masks(model, groups, {head.id: torch.arange(head.size) % 2 == 0})
    with pytest.raises(gp.SpeedupError, match=r"module '0' \(PlainAttention\) calls scaled_dot_product_attention with "
                                              r"its default scale"):
        gp.ModelSpeedup(model, x, masks).speedup_model()
    pruned = gp.ModelSpeedup(model, x, masks).speedup_model(inplace=False)
    assert_same(outputs(pruned, x), outputs(gp.masked_copy(model, masks), x))
