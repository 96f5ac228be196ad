"""Counting the images that pass through a model's forward and backward passes."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn


class PassCounter:
    """Counts images through a model's forward (and backward: gradients reaching its output)
    while installed; attacks, scoring and checks all call the model's forward."""

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self.forward = 0
        self.backward = 0
        self._handle: Any = None

    def _hook(self, module: nn.Module, args: tuple, out: Any) -> None:
        if not torch.is_tensor(out):
            return
        n = int(out.shape[0]) if out.ndim else 1
        self.forward += n
        if out.requires_grad:
            out.register_hook(self._count_backward(n))

    def _count_backward(self, n: int) -> Callable[[torch.Tensor], None]:
        def hook(grad: torch.Tensor) -> None:
            self.backward += n

        return hook

    def __enter__(self) -> PassCounter:
        self._handle = self.model.register_forward_hook(self._hook)
        return self

    def __exit__(self, *exc: Any) -> None:
        self._handle.remove()

    def snapshot(self) -> tuple[int, int]:
        """(forward, backward) image passes so far."""
        return self.forward, self.backward
