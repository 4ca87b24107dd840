"""The per-step shortcuts of HARP's masking: each must give what the plain computation gives, bit
for bit (masks, forward values, gradients), and the wrapped model must mask while it is wrapped."""
from __future__ import annotations

import gc

import nni
import pytest
import torch
import torch.nn.functional as F
from nni.compression import TorchEvaluator
from nni.compression.base.wrapper import ModuleWrapper

from nni_harp.adversarial import AttackConfig, pgd
from nni_harp.pruning import HARPPruner
from nni_harp.pruning._masking import ProductCache
from nni_harp.pruning._ste import given_product, masked_straight_through, straight_through_mask
from nni_harp.pruning._topk import BAND_MIN_SIZE, fill_topk, topk_mask

from _pruning_helpers import tiny_cnn

UNSTRUCTURED = [{"op_types": ["Conv2d", "Linear"], "sparse_ratio": 0.8}]


def _plain_topk(values: torch.Tensor, count: int) -> torch.Tensor:
    mask = torch.zeros(values.numel())
    mask[torch.topk(values.reshape(-1), count, sorted=False).indices] = 1.0
    return mask.view_as(values)


@pytest.mark.parametrize("fraction", [1e-6, 0.03, 0.1, 0.27, 0.5, 0.51, 0.9, 0.999, 1.0])
@pytest.mark.parametrize("shape", [(64, 64, 3, 3), (1536, 128), (100, 7)])
def test_fill_topk_selects_what_one_topk_selects(shape: tuple[int, ...], fraction: float) -> None:
    values = torch.randn(shape, generator=torch.Generator().manual_seed(0)).abs()
    count = max(1, round(fraction * values.numel()))
    out = torch.full(shape, 7.0)
    fill_topk(out, values, count)
    assert torch.equal(out, _plain_topk(values, count))
    assert torch.equal(topk_mask(values, count), out)


def test_fill_topk_falls_back_where_the_sample_misleads() -> None:
    # sorted entries make the strided sample's threshold exact, NaN makes the band test unusable
    ordered = torch.arange(4 * BAND_MIN_SIZE, dtype=torch.float32)
    out = torch.empty_like(ordered)
    fill_topk(out, ordered, 5000)
    assert torch.equal(out, _plain_topk(ordered, 5000))
    with_nan = torch.rand(2 * BAND_MIN_SIZE, generator=torch.Generator().manual_seed(1))
    with_nan[5] = float("nan")
    fill_topk(out[: with_nan.numel()], with_nan, 3000)
    assert torch.equal(out[: with_nan.numel()], _plain_topk(with_nan, 3000))


@pytest.mark.parametrize("weight_grad", [False, True])
def test_masked_straight_through_matches_the_unfused_chain_bit_for_bit(weight_grad: bool) -> None:
    gen = torch.Generator().manual_seed(2)
    weight = torch.randn(6, 5, 3, generator=gen).requires_grad_(weight_grad)
    coeff = torch.randn(6, 5, 3, generator=gen)
    grads = []
    for fused in (False, True):
        scores = torch.randn(6, 5, 3, generator=torch.Generator().manual_seed(3))
        scores[0, 0, 0] = 0.0
        scores.requires_grad_(True)
        rate = torch.tensor(0.4, requires_grad=True)
        keep = 0.1 + 0.9 * torch.sigmoid(rate)
        hard = topk_mask(scores.abs(), 40)
        if fused:
            out = masked_straight_through(weight, scores, keep, hard, torch.mul(weight.detach(), hard))
        else:
            out = torch.mul(weight, straight_through_mask(scores.abs(), keep, hard))
        (coeff * out).sum().backward()
        grads.append((out.detach(), scores.grad, rate.grad, None if weight.grad is None else weight.grad.clone()))
        weight.grad = None
    for a, b in zip(*grads):
        assert (a is None and b is None) or torch.equal(a, b)


def test_given_product_matches_mul_with_a_broadcast_mask_bit_for_bit() -> None:
    gen = torch.Generator().manual_seed(4)
    target = torch.randn(8, 6, 3, 3, generator=gen, requires_grad=True)
    coeff = torch.randn(8, 6, 3, 3, generator=gen)
    results = []
    for fused in (False, True):
        channels = torch.rand(6, generator=torch.Generator().manual_seed(5)).round().requires_grad_(True)
        mask = channels.view(1, 6, 1, 1)
        out = given_product(target, mask, torch.mul(target, mask).detach()) if fused else torch.mul(target, mask)
        (coeff * out).sum().backward()
        results.append((out.detach(), channels.grad, target.grad.clone()))
        target.grad = None
    for a, b in zip(*results):
        assert torch.equal(a, b)


def test_product_cache_reuses_until_a_source_changes() -> None:
    cache, calls = ProductCache(), []
    weight, hard = torch.randn(4, 4), torch.ones(4, 4)

    def compute() -> torch.Tensor:
        calls.append(1)
        return weight * hard

    first = cache.product(("m", "weight"), (weight, hard), compute)
    assert cache.product(("m", "weight"), (weight, hard), compute) is first and len(calls) == 1
    hard[0, 0] = 0.0  # an in-place change (a mask refresh, an optimizer step) bumps the version
    assert float(cache.product(("m", "weight"), (weight, hard), compute)[0, 0]) == 0.0 and len(calls) == 2
    with torch.inference_mode():  # never cached: an inference tensor could not be saved for backward later
        cache.product(("m", "weight"), (weight, hard), compute)
    assert len(calls) == 3


def _pruned_cnn() -> tuple[torch.nn.Module, HARPPruner]:
    torch.manual_seed(0)
    model = tiny_cnn()
    evaluator = TorchEvaluator(lambda *a, **k: None, nni.trace(torch.optim.SGD)(model.parameters(), lr=0.1),
                               lambda b, m: 0)
    return model, HARPPruner(model, UNSTRUCTURED, evaluator)


def test_wrapped_model_masks_whether_or_not_the_pruner_is_still_referenced() -> None:
    model, pruner = _pruned_cnn()
    x = torch.rand(2, 3, 16, 16)
    masked = model(x)
    del pruner
    gc.collect()
    assert torch.equal(model(x), masked)


def test_attack_runs_with_frozen_parameters_and_reuses_the_masked_weights() -> None:
    model, pruner = _pruned_cnn()
    model.eval()
    x, y = torch.rand(4, 3, 16, 16), torch.randint(0, 10, (4,))
    flags = {name: p.requires_grad for name, p in model.named_parameters()}
    weights: list[torch.Tensor] = []
    model[0].register_forward_hook(lambda m, args, out: weights.append(m.weight))  # the masked weight NNI set
    pgd(model, x, y, AttackConfig(steps=3))
    assert {name: p.requires_grad for name, p in model.named_parameters()} == flags
    assert not any(p.grad is not None for p in model.parameters())
    # every attack step's forward uses one cached masked weight, which carries no graph
    assert len(weights) == 3 and all(w is weights[0] for w in weights) and not weights[0].requires_grad
    # outside the attack the masked weight carries the straight-through gradient again
    F.cross_entropy(model(x), y).backward()
    assert pruner._units[0].scores.grad is not None


def test_quick_wrapper_forward_is_nni_forward_and_steps_aside_for_other_targets() -> None:
    model, pruner = _pruned_cnn()
    inputs: dict[str, tuple] = {}
    for name, wrapper in pruner._module_wrappers.items():
        wrapper.module.register_forward_pre_hook(lambda m, args, name=name: inputs.setdefault(name, args))
    x = torch.rand(2, 3, 16, 16)
    model(x)
    assert set(inputs) == set(pruner._module_wrappers)
    for name, wrapper in pruner._module_wrappers.items():
        assert type(wrapper).forward is not ModuleWrapper.forward  # HARP's wrappers have their own
        assert torch.equal(wrapper.module(*inputs[name]), ModuleWrapper.forward(wrapper, *inputs[name]))
    # with anything else to track (or other targets), the forward pass goes through NNI's machinery
    seen: list[str] = []
    next(iter(pruner._module_wrappers.values())).register_track_func(lambda w, name, t: seen.append(name))
    model(x)
    assert "_input_0" in seen and "weight" in seen


def test_a_target_without_a_learned_mask_gets_its_stored_mask_once_per_attack() -> None:
    torch.manual_seed(0)
    model = tiny_cnn()
    evaluator = TorchEvaluator(lambda *a, **k: None, nni.trace(torch.optim.SGD)(model.parameters(), lr=0.1),
                               lambda b, m: 0)
    structured = [{"op_types": ["Conv2d", "Linear"], "sparse_ratio": 0.5, "granularity": "out_channel"}]
    pruner = HARPPruner(model, structured, evaluator, dummy_input=torch.rand(2, 3, 16, 16))
    model.eval()
    x, y = torch.rand(4, 3, 16, 16), torch.randint(0, 10, (4,))
    norm = model[1]  # its affine parameters are masked by the group's final mask only, not while learning
    space = pruner._module_wrappers["1"].pruning_target_spaces["weight"]
    weights: list[torch.Tensor] = []
    norm.register_forward_hook(lambda m, args, out: weights.append(m.weight))
    pgd(model, x, y, AttackConfig(steps=3))
    assert len(weights) == 3 and all(w is weights[0] for w in weights) and not weights[0].requires_grad
    assert torch.equal(weights[0], space.target * space.mask)
    model(x)  # with gradients the product is taken afresh, as NNI's 'mul'
    assert weights[-1] is not weights[0] and weights[-1].grad_fn is not None
    calls: list[str] = []  # with a global buffer registration hook, every pass sets its parameters again
    handle = torch.nn.modules.module.register_module_buffer_registration_hook(lambda m, n, b: calls.append(n))
    try:
        pgd(model, x, y, AttackConfig(steps=2))
    finally:
        handle.remove()
    assert calls.count("weight") >= 2 * len(pruner._module_wrappers)
