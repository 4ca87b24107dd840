"""fix_masks / release_masks / apply_masks: masked fine-tuning on a plain model."""
from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.nn.utils import parametrize

from nni_harp.pruning import MaskError, apply_masks, fix_masks, release_masks


def _model_and_masks() -> tuple[nn.Sequential, dict[str, dict[str, torch.Tensor]]]:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(2, 4, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 5 * 5, 3))
    masks = {
        "0": {"weight": (torch.rand(4, 2, 3, 3) > 0.5).float(), "bias": torch.tensor([1.0, 0.0, 1.0, 1.0])},
        "3": {"weight": (torch.rand(3, 100) > 0.7).float(), "bias": None},
    }
    return model, masks


def test_fix_masks_trains_only_the_kept_weights_and_release_bakes_them() -> None:
    model, masks = _model_and_masks()
    x = torch.randn(8, 2, 5, 5)
    reference = nn.Sequential(nn.Conv2d(2, 4, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(100, 3))
    reference.load_state_dict(model.state_dict())
    apply_masks(reference, masks)

    fix_masks(model, masks)
    assert parametrize.is_parametrized(model[0], "weight") and parametrize.is_parametrized(model[3], "weight")
    torch.testing.assert_close(model(x), reference(x))  # computes with weight * mask
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5)  # built after fix_masks, as documented
    for _ in range(3):
        optimizer.zero_grad()
        model(x).square().sum().backward()
        # masked entries get no gradient, kept ones do
        grad = model[0].parametrizations.weight.original.grad
        assert torch.all(grad[masks["0"]["weight"] == 0] == 0) and grad[masks["0"]["weight"] == 1].abs().sum() > 0
        optimizer.step()

    release_masks(model)
    assert not parametrize.is_parametrized(model[0]) and not parametrize.is_parametrized(model[3])
    assert isinstance(model[0].weight, nn.Parameter) and isinstance(model[3].weight, nn.Parameter)
    assert torch.all(model[0].weight[masks["0"]["weight"] == 0] == 0)
    assert torch.all(model[0].bias[1] == 0)
    assert torch.all(model[3].weight[masks["3"]["weight"] == 0] == 0)
    # the kept weights were really trained
    assert not torch.allclose(model[3].weight, reference[3].weight)
    assert set(dict(model.named_parameters())) == {"0.weight", "0.bias", "3.weight", "3.bias"}


def test_apply_masks_zeroes_in_place() -> None:
    model, masks = _model_and_masks()
    before = model[3].weight.detach().clone()
    apply_masks(model, masks)
    torch.testing.assert_close(model[3].weight.detach(), before * masks["3"]["weight"])
    assert model[0].bias[1] == 0


def test_mask_errors_name_module_and_shapes() -> None:
    model, masks = _model_and_masks()
    with pytest.raises(MaskError, match="'missing'"):
        apply_masks(model, {"missing": {"weight": torch.ones(1)}})
    with pytest.raises(MaskError, match=r"3\.weight has shape \(3, 99\), the tensor has \(3, 100\)"):
        fix_masks(model, {"3": {"weight": torch.ones(3, 99)}})
    with pytest.raises(MaskError, match="no tensor 'gamma'"):
        apply_masks(model, {"0": {"gamma": torch.ones(4)}})
    fix_masks(model, masks)
    with pytest.raises(MaskError, match="already has a fixed mask"):
        fix_masks(model, masks)
    model[3]._nni_wrapper = object()  # what an NNI-wrapped module looks like
    with pytest.raises(MaskError, match="unwrap_model"):
        apply_masks(model, masks)
