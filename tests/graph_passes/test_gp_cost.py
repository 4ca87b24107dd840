"""The cost model against torch's FlopCounterMode, dense and on the physically pruned model
(activation elements: against the re-traced pruned model)."""
from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode
import torch.nn.functional as F

import graph_passes as gp
from _gp_helpers import n_params, prune
from test_gp_attention import Attention
from test_gp_layers import ConvBn, ConvChain2d, Depthwise, Grouped, Mlp
from test_gp_ops import Concat, FlattenHead, SE, Residual


def measured_flops(model: nn.Module, x: torch.Tensor) -> int:
    model.eval()
    return gp.count_flops(model, x)


def fractions(groups: list[gp.ChannelGroup], keep: dict[int, torch.Tensor]) -> dict[int, float]:
    return {gid: float(vec.float().mean()) for gid, vec in keep.items() if groups[gid].prunable}


CASES = {
    "conv": (ConvChain2d, (2, 3, 12, 12)),
    "conv_bn": (ConvBn, (2, 3, 8, 8)),
    "grouped": (Grouped, (2, 3, 8, 8)),
    "depthwise": (Depthwise, (2, 3, 8, 8)),
    "mlp_tokens": (Mlp, (2, 7, 10)),
    "residual": (Residual, (2, 3, 8, 8)),
    "se": (SE, (2, 3, 8, 8)),
    "concat": (Concat, (2, 3, 5, 5)),
    "flatten": (lambda: FlattenHead("view"), (2, 3, 6, 6)),
    "attention_sdpa": (lambda: Attention(False), (2, 5, 6)),
    "attention_explicit": (lambda: Attention(True), (2, 5, 6)),
}


@pytest.mark.parametrize("name", list(CASES))
def test_cost_matches_flop_counter_dense_and_pruned(name):
    factory, shape = CASES[name]
    torch.manual_seed(0)
    model = factory().eval()
    x = torch.randn(*shape)
    cm = gp.cost(model, x)
    assert cm.total_flops == measured_flops(model, x) > 0
    assert cm.flops() == pytest.approx(cm.total_flops)
    assert cm.params() == pytest.approx(n_params(model))
    r = prune(model, x)
    frac = fractions(r.groups, r.keep)
    assert any(f < 1 for f in frac.values())
    pruned_flops = measured_flops(r.pruned, x)
    assert pruned_flops < cm.total_flops
    assert cm.flops(frac) == pytest.approx(pruned_flops, rel=1e-9)
    assert cm.params(frac) == pytest.approx(n_params(r.pruned), rel=1e-9)
    # activation elements: predicted from the fractions = counted on the re-traced pruned model
    assert cm.activations() == pytest.approx(cm.total_activations) and cm.total_activations > 0
    measured_acts = gp.cost(r.pruned, x).total_activations
    assert measured_acts < cm.total_activations
    assert float(cm.activations(frac)) == pytest.approx(measured_acts, rel=1e-9)


def test_cost_flops_is_differentiable_in_the_fractions():
    model = ConvChain2d().eval()
    x = torch.randn(1, 3, 12, 12)
    cm = gp.cost(model, x)
    groups = gp.channel_groups(model, x)
    frac = {g.id: torch.tensor(0.5, requires_grad=True) for g in groups if g.prunable}
    total = cm.flops(frac)
    total.backward()
    assert all(f.grad is not None and f.grad > 0 for f in frac.values())


@pytest.mark.parametrize("name", ["test_vit", "test_efficientnet", "test_resnet"])
def test_cost_on_timm_test_model(name):
    import timm  # a hard dependency: a missing timm must fail, not skip
    assert name in timm.list_models("test_*"), f"timm has no {name}"
    torch.manual_seed(0)
    model = timm.create_model(name, pretrained=False).eval()
    x = torch.randn(1, *model.pretrained_cfg["input_size"])
    cm = gp.cost(model, x)
    assert cm.total_flops == measured_flops(model, x)
    r = prune(model, x)
    frac = fractions(r.groups, r.keep)
    assert any(f < 1 for f in frac.values())
    assert cm.flops(frac) == pytest.approx(measured_flops(r.pruned, x), rel=1e-9)
    assert cm.params(frac) == pytest.approx(n_params(r.pruned), rel=1e-9)
    assert float(cm.activations(frac)) == pytest.approx(gp.cost(r.pruned, x).total_activations, rel=1e-9)


@pytest.mark.parametrize("name", ["test_vit", "test_efficientnet", "test_resnet", "test_convnext"])
def test_cost_with_tensor_fractions_equals_the_float_sums_and_their_derivatives(name):
    """Tensor fractions take the vectorised sums: the same values as the floats' Python sums, the
    dtype of the fractions, and gradients equal to central differences of the float sums."""
    import timm
    torch.manual_seed(0)
    model = timm.create_model(name, pretrained=False).eval()
    x = torch.randn(1, *model.pretrained_cfg["input_size"])
    cm = gp.cost(model, x)
    ids = [g.id for g in gp.channel_groups(model, x) if g.prunable]
    floats = {g: 0.2 + 0.7 * i / len(ids) for i, g in enumerate(ids)}
    kinds = sorted({layer.kind for layer in cm.layers})
    for what in ("flops", "params", "activations"):
        f = getattr(cm, what)
        for dtype in (torch.float32, torch.float64):
            tensors = {g: torch.tensor(v, dtype=dtype, requires_grad=True) for g, v in floats.items()}
            value = f(tensors)
            assert value.dtype == dtype
            assert float(value.detach()) == pytest.approx(f(floats), rel=1e-6 if dtype == torch.float32 else 1e-12)
        value.backward()
        h = 1e-4
        for g in ids:
            up, down = {**floats, g: floats[g] + h}, {**floats, g: floats[g] - h}
            slope = (f(up) - f(down)) / (2 * h)
            assert float(tensors[g].grad) == pytest.approx(slope, rel=1e-6, abs=1e-6 * abs(f(floats)))
    whole = {g: torch.tensor(i % 2) for i, g in enumerate(ids)}  # integer fractions: a float result
    assert cm.flops(whole).dtype == torch.get_default_dtype()
    assert float(cm.flops(whole)) == pytest.approx(cm.flops({g: float(v) for g, v in whole.items()}), rel=1e-6)
    assert len(kinds) > 1
    by_kind = [cm.flops({g: torch.tensor(v) for g, v in floats.items()}, kinds=[k]) for k in kinds]
    assert float(sum(by_kind)) == pytest.approx(cm.flops(floats), rel=1e-6)
    assert cm.flops(floats, kinds=kinds[:1]) == pytest.approx(float(by_kind[0]), rel=1e-6)


class _Sdpa(nn.Module):
    def forward(self, q, k, v):
        return F.scaled_dot_product_attention(q, k, v)


@pytest.mark.parametrize("grad", [False, True], ids=["inference", "training"])
def test_flop_counter_counts_sdpa_on_every_torch_release(grad):
    # torch < 2.15 has no FlopCounterMode formula for the CPU flash-attention kernel (counts 0);
    # gp.flop_counter adds the one torch 2.15 uses. Reference: the same attention written as two
    # matmuls, which every release counts.
    q, k, v = (torch.randn(2, 3, 5, 8, requires_grad=grad) for _ in range(3))
    with gp.flop_counter() as counter:
        out = _Sdpa()(q, k, v)
        if grad:
            out.sum().backward()
    with FlopCounterMode(display=False) as reference:
        scores = (q @ k.transpose(-2, -1) * 8 ** -0.5).softmax(-1)
        ref = scores @ v
        if grad:
            ref.sum().backward()
    assert torch.allclose(out, ref, atol=1e-5)
    matmul = 2 * (2 * 3) * 5 * 5 * 8  # 2 FLOPs per multiply-accumulate, batch 2 x 3 heads
    expected = matmul * (7 if grad else 2)  # forward: 2 matmuls; backward: 5 (torch's flash formula recomputes the scores)
    assert reference.get_total_flops() == matmul * (6 if grad else 2)
    assert counter.get_total_flops() == expected


class TwiceLinear(nn.Module):
    """A conv, then one Linear called twice (weight sharing)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 6, 3, padding=1)
        self.fc = nn.Linear(6, 6)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv(x).mean((2, 3))
        return self.fc(torch.relu(self.fc(h)))


def test_flops_by_module_names_modules_and_sums_their_calls() -> None:
    model, x = TwiceLinear().eval(), torch.randn(2, 3, 5, 5)
    by_module = gp.cost(model, (x,)).flops_by_module()
    assert by_module == {"conv": 2 * 2 * 5 * 5 * 6 * 27, "fc": 2 * (2 * 2 * 6 * 6)}
    assert sum(by_module.values()) == measured_flops(model, x)
