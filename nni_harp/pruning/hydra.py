"""HYDRA (Sehwag et al., NeurIPS 2020) on HARP's code path: the same scores, straight-through masks
and optimizers, with every rate fixed at the target."""
from __future__ import annotations

from typing import Any

from nni.compression.utils import Evaluator
from torch import nn

from .errors import SettingsError
from .harp import HARPPruner
from .settings import HARPSettings

__all__ = ["HydraPruner"]


class HydraPruner(HARPPruner):
    """HYDRA (Sehwag et al., 2020): HARP's scores and straight-through top-k masks, but every
    layer's (or group's) rate is fixed at the target, so only the scores are learned. Takes the
    same arguments as :class:`HARPPruner`; ``learn_rates`` is always ``False``."""

    def __init__(
        self,
        model: nn.Module,
        config_list: list[dict[str, Any]],
        evaluator: Evaluator,
        settings: HARPSettings | None = None,
        dummy_input: Any | None = None,
        **settings_kwargs: Any,
    ) -> None:
        if settings_kwargs.get("learn_rates", False) is not False:
            raise SettingsError("learn_rates", settings_kwargs["learn_rates"], "False for HydraPruner (HARPPruner learns rates)")
        settings_kwargs["learn_rates"] = False
        super().__init__(model, config_list, evaluator, settings, dummy_input, **settings_kwargs)
