"""Fixtures of the pruning tests: sklearn digits at 16 px and a tiny CNN trained on them."""
from __future__ import annotations

import copy
from collections.abc import Callable, Iterator

import pytest
import torch
import torch.nn.functional as F
from sklearn.datasets import load_digits
from torch import nn

from _pruning_helpers import Digits, tiny_cnn


@pytest.fixture(scope="session", autouse=True)
def _one_thread() -> Iterator[None]:
    """The tests are tiny: one intra-op thread is fastest, and fair to a shared machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def digits() -> Digits:
    raw = load_digits()
    x = torch.tensor(raw.images, dtype=torch.float32)[:, None] / 16.0
    x = F.interpolate(x, size=16, mode="bilinear", align_corners=False).repeat(1, 3, 1, 1)
    y = torch.tensor(raw.target, dtype=torch.long)
    return Digits(x[:768], y[:768], x[1400:], y[1400:])


@pytest.fixture(scope="session")
def _pretrained_state(digits: Digits) -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    model = tiny_cnn()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    for epoch in range(6):
        model.train()
        for x, y in digits.batches(seed=100 + epoch):
            optimizer.zero_grad()
            F.cross_entropy(model(x), y).backward()
            optimizer.step()
    return copy.deepcopy(model.state_dict())


@pytest.fixture
def pretrained(_pretrained_state: dict[str, torch.Tensor]) -> Callable[[], nn.Sequential]:
    """A factory of fresh copies of the dense tiny CNN trained on digits."""

    def build() -> nn.Sequential:
        model = tiny_cnn()
        model.load_state_dict(_pretrained_state)
        return model

    return build
