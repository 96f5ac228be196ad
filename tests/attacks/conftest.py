"""Tiny models and inputs shared by the attack tests."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from tests.helpers_models import one_torch_thread, tiny_cnn


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    with one_torch_thread():
        yield


@pytest.fixture(scope="module")
def model() -> nn.Module:
    return tiny_cnn(2)


@pytest.fixture(scope="module")
def batch(model) -> tuple[torch.Tensor, torch.Tensor]:
    """16 images labelled with the model's own predictions (clean accuracy 1)."""
    x = torch.rand(16, 3, 16, 16, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        y = model(x).argmax(1)
    return x, y
