"""Shared fixtures: a tiny conv net trained for a few seconds on scikit-learn's 8x8 digits."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import torch
import torch.nn.functional as F
from sklearn.datasets import load_digits
from torch import Tensor, nn

N_TRAIN = 400
N_TEST = 64


def make_net() -> nn.Module:
    """Conv + BatchNorm + Dropout: enough state for train/eval-mode bugs to show."""
    return nn.Sequential(
        nn.Conv2d(1, 8, 3, padding=1),
        nn.BatchNorm2d(8),
        nn.ReLU(),
        nn.Flatten(),
        nn.Dropout(0.1),
        nn.Linear(8 * 8 * 8, 10),
    )


@pytest.fixture(autouse=True)
def _single_thread() -> Iterator[None]:
    """The models here are tiny: one intra-op thread is faster and fair to a shared machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def digits() -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """``(x_train, y_train, x_test, y_test)``; images ``[N, 1, 8, 8]`` in ``[0, 1]``."""
    data = load_digits()
    x = torch.tensor(data.images / 16.0, dtype=torch.float32).unsqueeze(1)
    y = torch.tensor(data.target, dtype=torch.long)
    order = torch.randperm(len(y), generator=torch.Generator().manual_seed(0))
    train, test = order[:N_TRAIN], order[N_TRAIN : N_TRAIN + N_TEST]
    return x[train], y[train], x[test], y[test]


@pytest.fixture(scope="session")
def trained_state(digits: tuple[Tensor, Tensor, Tensor, Tensor]) -> dict[str, Tensor]:
    x_train, y_train, _, _ = digits
    torch.manual_seed(0)
    net = make_net()
    optimizer = torch.optim.Adam(net.parameters(), lr=1e-2)
    net.train()
    for _ in range(120):
        optimizer.zero_grad()
        F.cross_entropy(net(x_train), y_train).backward()
        optimizer.step()
    return {k: v.clone() for k, v in net.state_dict().items()}


@pytest.fixture
def trained_model(trained_state: dict[str, Tensor]) -> nn.Module:
    """A fresh copy of the trained net, in eval mode (tests may change it freely)."""
    net = make_net()
    net.load_state_dict(trained_state)
    return net.eval()


@pytest.fixture
def test_batch(digits: tuple[Tensor, Tensor, Tensor, Tensor]) -> tuple[Tensor, Tensor]:
    return digits[2], digits[3]
