"""load_weights accepts the state dicts older torch releases wrote for traced models: they hold
the input normalisation's non-persistent ``mean``/``std`` buffers, which are not weights."""
from __future__ import annotations

import pytest
import torch

from nni_harp.loading import LoadError, create_model, load_weights

MEAN, STD = (0.3, 0.3, 0.3), (0.4, 0.4, 0.4)


def _model(seed: int):
    torch.manual_seed(seed)
    return create_model("test_resnet", 10, 3, 32, MEAN, STD)[0].eval()


def test_state_dict_with_non_persistent_buffers_loads():
    source, target = _model(0), _model(1)
    state = {"mean": source.mean.clone(), "std": source.std.clone(), **source.state_dict()}
    assert "mean" not in source.state_dict()  # non-persistent in the eager model
    load_weights(target, state)
    x = torch.rand(2, 3, 32, 32)
    torch.testing.assert_close(target(x), source(x))


def test_other_unexpected_keys_are_still_refused():
    source, target = _model(0), _model(1)
    state = {"model.extra.weight": torch.zeros(1), **source.state_dict()}
    with pytest.raises(LoadError, match="unexpected"):
        load_weights(target, state)
