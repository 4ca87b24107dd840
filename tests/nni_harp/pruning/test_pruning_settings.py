"""HARPSettings validation and config_list errors: each names the field or entry and what is allowed."""
from __future__ import annotations

from typing import Any

import pytest
import torch
from torch import nn

from nni_harp.pruning import ConfigListError, HARPPruner, HARPSettings, HydraPruner, PruningError, SettingsError

from _pruning_helpers import Digits, make_evaluator, tiny_cnn


def test_defaults_follow_the_paper() -> None:
    s = HARPSettings()
    assert (s.gamma_0, s.alpha, s.learn_rates, s.stage_boundaries) == (0.01, 0.1, True, None)
    assert s.budget_for(structured=False) == "params" and s.budget_for(structured=True) == "flops"
    assert HARPSettings(budget="flops").budget_for(structured=False) == "flops"
    assert HARPSettings(stage_boundaries=[3, 6]).stage_boundaries == (3, 6)  # lists are frozen into tuples


@pytest.mark.parametrize(("share", "epochs", "epoch"), [(0.5, 20, 9), (0.5, 8, 3), (0.5, 3, 1), (0.5, 1, 0), (1.0, 20, None), (0.99, 20, 19),
                                                         (0.1, 20, 1), (0.01, 20, 0)])
def test_descent_deadline_epoch(share: float, epochs: int, epoch: int | None) -> None:
    assert HARPSettings(descent_deadline=share).deadline_epoch(epochs, structured=False) == epoch
    assert HARPSettings(descent_deadline=share).deadline_epoch(epochs, structured=True) == epoch


def test_descent_deadline_default_depends_on_the_mode() -> None:
    """Left at None: no deadline for unstructured pruning, half the run for structured pruning."""
    assert HARPSettings().deadline_epoch(20, structured=False) is None
    assert HARPSettings().deadline_epoch(20, structured=True) == 9


def test_glide_path_ends_at_the_deadline_else_before_settling() -> None:
    assert HARPSettings().glide_end(20, structured=True) == 9  # the default structured deadline
    assert HARPSettings().glide_end(20, structured=False) == 18  # settling starts with epoch 19
    assert HARPSettings(settle_epochs=0).glide_end(20, structured=False) is None
    assert HARPSettings(descent_glide=False).glide_end(20, structured=True) is None
    assert HARPSettings(learn_rates=False).glide_end(20, structured=True) is None  # HYDRA's rates are fixed


@pytest.mark.parametrize(("settle", "epochs", "epoch"), [(1, 20, 19), (1, 2, 1), (1, 1, None), (0, 20, None), (3, 3, None),
                                                          (3, 4, 1)])
def test_settle_epoch(settle: int, epochs: int, epoch: int | None) -> None:
    assert HARPSettings(settle_epochs=settle).settle_epoch(epochs) == epoch


@pytest.mark.parametrize(
    ("field", "value", "allowed"),
    [
        ("gamma_0", -1.0, "(0, inf)"),
        ("gamma_0", float("nan"), "finite real number"),
        ("alpha", 0.0, "(0, 1]"),
        ("alpha", 1.5, "(0, 1]"),
        ("stage_boundaries", (3, 2), "strictly increasing"),
        ("stage_boundaries", (0, 2), ">= 1"),
        ("budget", "energy", "'params', 'flops'"),
        ("learn_rates", 1, "True or False"),
        ("optimizer", "rmsprop", "'sgd', 'adam'"),
        ("score_lr", 0.0, "(0, inf)"),
        ("momentum", 1.0, "[0, 1)"),
        ("score_weight_decay", -1e-4, "[0, inf)"),
        ("lr_schedule", "step", "'cosine', 'constant'"),
        ("steps_per_epoch", 0, "int >= 1"),
        ("met_tolerance", -0.1, "[0, 1)"),
        ("descent_deadline", 0.0, "(0, 1]"),
        ("descent_deadline", 1.5, "(0, 1]"),
        ("norm_lr", 0.0, "(0, inf)"),
        ("rate_grad_clip", 0.0, "(0, inf)"),
        ("rate_grad_clip", float("inf"), "finite real number"),
        ("min_kept_per_output", -1, "int >= 0"),
        ("min_kept_per_output", 1.5, "int >= 0"),
        ("round_to", 0, "int >= 1"),
        ("round_to", 8.0, "int >= 1"),
        ("settle_epochs", -1, "int >= 0"),
        ("settle_epochs", True, "int >= 0"),
        ("descent_glide", 1, "True or False"),
        ("latency_norms", "fast", "'exact', 'kept'"),
    ],
)
def test_settings_errors_name_field_and_range(field: str, value: Any, allowed: str) -> None:
    with pytest.raises(SettingsError) as info:
        HARPSettings(**{field: value})
    message = str(info.value)
    assert f"HARPSettings.{field}=" in message and allowed in message
    assert info.value.field == field


def test_unknown_setting_keyword_is_named() -> None:
    with pytest.raises(TypeError, match="gamma0"):
        HARPSettings.resolve(None, {"gamma0": 0.1})
    merged = HARPSettings.resolve(HARPSettings(alpha=0.2), {"gamma_0": 0.3})
    assert (merged.alpha, merged.gamma_0) == (0.2, 0.3)


@pytest.fixture
def tiny(digits: Digits) -> tuple[nn.Module, Any]:
    model = tiny_cnn()
    return model, make_evaluator(model, digits)


def _assert_untouched(model: nn.Module) -> None:
    # errors are raised before NNI wraps anything
    assert not any(hasattr(m, "_nni_wrapper") for m in model.modules())


@pytest.mark.parametrize(
    ("config_list", "needles"),
    [
        ([{"op_types": ["Conv2d"], "sparse_ratio": 1.5}], ["config_list[0]", "sparse_ratio", "[0, 1)", "1.5"]),
        ([{"op_types": ["Conv2d"], "sparse_ratio": -0.1}], ["config_list[0]", "sparse_ratio"]),
        ([{"op_types": ["Conv2d"], "sparse_ratio": "0.5"}], ["config_list[0]", "sparse_ratio must be a real number"]),
        ([{"op_types": ["Conv2d"]}], ["config_list[0]", "needs a sparse_ratio"]),
        ([{"op_types": ["Conv2d"], "sparse_ratio": 0.5, "granularity": "in_channel"}],
         ["config_list[0]", "granularity 'in_channel'", "'default'", "'out_channel'"]),
        ([{"op_types": ["Conv2d"], "sparse_ratio": 0.5}, {"op_names": ["does.not.exist"], "sparse_ratio": 0.5}],
         ["config_list[1]", "matches no module", "does.not.exist"]),
        ([{"op_types": ["LSTM"], "sparse_ratio": 0.5}], ["config_list[0]", "matches no module"]),
        ([{"sparse_ratio": 0.5}], ["config_list[0]", "op_types, op_names or op_names_re"]),
        ([{"op_types": ["Conv2d"], "sparse_threshold": 0.5}], ["config_list[0]", "sparse_threshold", "not supported"]),
        ([{"op_types": ["Conv2d"], "sparse_ratio": 0.5, "max_sparse_ratio": 0.4}],
         ["config_list[0]", "max_sparse_ratio", "unreachable"]),
        ([{"op_types": ["Conv2d"], "sparse_ratio": 0.5, "sparsity_typo": 1}], ["config_list[0]", "unknown key 'sparsity_typo'"]),
        ([{"op_types": ["Conv2d"], "sparse_ratio": 0.5}, {"op_types": ["Linear"], "sparse_ratio": 0.5, "granularity": "out_channel"}],
         ["mixes granularities", "entry 0 is 'default'", "entry 1 is 'out_channel'"]),
        ([], ["non-empty list"]),
    ],
)
def test_config_list_errors_name_the_entry(tiny: tuple[nn.Module, Any], config_list: list, needles: list[str]) -> None:
    model, evaluator = tiny
    with pytest.raises(ConfigListError) as info:
        HARPPruner(model, config_list, evaluator)
    for needle in needles:
        assert needle in str(info.value)
    _assert_untouched(model)


def test_legacy_sparsity_key_is_translated(tiny: tuple[nn.Module, Any]) -> None:
    model, evaluator = tiny
    pruner = HARPPruner(model, [{"op_types": ["Conv2d"], "sparsity": 0.75}], evaluator)
    assert pruner.target_fraction == pytest.approx(0.25)


def test_pruner_needs_an_evaluator_and_hydra_refuses_learned_rates(tiny: tuple[nn.Module, Any]) -> None:
    model, evaluator = tiny
    with pytest.raises(PruningError, match="needs an NNI evaluator"):
        HARPPruner(model, [{"op_types": ["Conv2d"], "sparse_ratio": 0.5}], None)  # type: ignore[arg-type]
    with pytest.raises(SettingsError, match="learn_rates"):
        HydraPruner(model, [{"op_types": ["Conv2d"], "sparse_ratio": 0.5}], evaluator, learn_rates=True)
    with pytest.raises(SettingsError, match="HARPSettings.alpha"):
        HARPPruner(model, [{"op_types": ["Conv2d"], "sparse_ratio": 0.5}], evaluator, alpha=2.0)
    _assert_untouched(model)


def test_compress_arguments_are_checked(tiny: tuple[nn.Module, Any]) -> None:
    model, evaluator = tiny
    pruner = HARPPruner(model, [{"op_types": ["Conv2d"], "sparse_ratio": 0.5}], evaluator)
    with pytest.raises(ValueError, match="max_epochs"):
        pruner.compress()
    with pytest.raises(ValueError, match="max_epochs must be None or an int >= 1"):
        pruner.compress(max_epochs=0)
    with pytest.raises(SettingsError, match="steps_per_epoch"):
        pruner.compress(max_steps=5)
    # nothing trained, nothing left frozen by the failed calls
    assert all(p.requires_grad for n, p in model.named_parameters() if "harp" not in n)
    assert torch.is_tensor(next(model.parameters()))


class _LoopsByValue(nn.Module):
    """Calls its layer a number of times that depends on the input's values: fx cannot trace it."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for _ in range(int(x.abs().sum().item()) % 3 + 1):
            x = self.fc(x)
        return x


def test_unstructured_flops_budget_on_an_untraceable_model_names_the_way_out(digits: Digits) -> None:
    model = _LoopsByValue()
    with pytest.raises(SettingsError, match=r"budget must be 'params' for a model graph_passes cannot trace"):
        HARPPruner(model, [{"op_types": ["Linear"], "sparse_ratio": 0.5}], make_evaluator(model, digits),
                   budget="flops", dummy_input=torch.randn(2, 4))
    _assert_untouched(model)
    HARPPruner(model, [{"op_types": ["Linear"], "sparse_ratio": 0.5}], make_evaluator(model, digits))  # params: no trace
