"""Class balancing for training (`TrainConfig.balance`): a weighted loss or a weighted sampler.

BreakHis is ~3:1 malignant:benign. Under adversarial training the cheapest way to lower the
loss is to give up on the minority class, and runs collapsed to "always malignant". Both
options give every class the same total weight per epoch:

- `loss`: cross-entropy with class weights w_c = N / (C · n_c) (sklearn's "balanced");
- `sampler`: each epoch draws N training images with replacement, image i with probability
  ∝ 1 / n_{y_i} (PyTorch's WeightedRandomSampler), so every class fills ~1/C of the batches.
  Data that is already balanced keeps the plain permutation.
"""

from __future__ import annotations

import torch

BALANCE_MODES = ("none", "loss", "sampler")


def class_weights(y: torch.Tensor, num_classes: int) -> torch.Tensor:
    """w_c = N / (C · n_c) for the classes present (0 for an absent class), float32."""
    counts = torch.bincount(y.reshape(-1).cpu(), minlength=num_classes).double()
    present = counts > 0
    w = torch.zeros(num_classes, dtype=torch.float64)
    w[present] = counts.sum() / (present.sum() * counts[present])
    return w.float()


def epoch_order(y: torch.Tensor, balance: str, generator: torch.Generator) -> torch.Tensor:
    """The training indices of one epoch: a permutation, or a class-balanced draw (sampler)."""
    n = int(y.numel())
    if balance != "sampler" or n == 0:
        return torch.randperm(n, generator=generator)
    w = class_weights(y, int(y.max().item()) + 1)
    if bool((w[w > 0] == 1).all()):  # already balanced: keep the plain permutation
        return torch.randperm(n, generator=generator)
    per_image = w[y.reshape(-1).cpu()].double()
    return torch.multinomial(per_image, n, replacement=True, generator=generator)
