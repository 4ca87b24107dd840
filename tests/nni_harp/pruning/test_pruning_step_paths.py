"""The per-step shortcuts of HARP's masking: each must give what the plain computation gives, bit
for bit (masks, forward values, gradients), and the wrapped model must mask while it is wrapped."""
from __future__ import annotations

import gc

import nni
import torch
from nni.compression import TorchEvaluator

from nni_harp.pruning import HARPPruner

from _pruning_helpers import tiny_cnn

UNSTRUCTURED = [{"op_types": ["Conv2d", "Linear"], "sparse_ratio": 0.8}]


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
