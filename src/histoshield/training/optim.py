"""Optimizer, parameter groups and learning-rate schedule from a TrainConfig."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from histoshield.config import TrainConfig
from histoshield.errors import HistoshieldError


def make_optimizer(cfg: TrainConfig, params) -> torch.optim.Optimizer:
    """Adam / AdamW / SGD (momentum 0.9, Nesterov) with the configured weight decay."""
    params = list(params)
    for g in params:  # groups from `param_groups`: lr = cfg.lr * the group's scale
        if isinstance(g, dict) and "lr_scale" in g:
            g["lr"] = cfg.lr * g.pop("lr_scale")
    if cfg.optimizer == "adam":
        return torch.optim.Adam(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    if cfg.optimizer == "adamw":
        return torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    return torch.optim.SGD(
        params, lr=cfg.lr, momentum=0.9, nesterov=True, weight_decay=cfg.weight_decay
    )


def param_groups(model: nn.Module, backbone_lr_scale: float = 1.0) -> list[dict[str, Any]]:
    """One group, or (scale != 1) the classifier head (the last Linear layer) at the full lr and
    every other weight at lr * scale: pretrained features move less than the new head. Scale 0
    freezes every weight but the head (requires_grad off; a linear probe)."""
    params = [p for p in model.parameters() if p.requires_grad]
    if backbone_lr_scale == 1.0:
        return [{"params": params}]
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    if not linears:
        raise HistoshieldError("backbone_lr_scale needs a model with a Linear classifier head")
    head_ids = {id(p) for p in linears[-1].parameters()}
    head = [p for p in params if id(p) in head_ids]
    rest = [p for p in params if id(p) not in head_ids]
    if backbone_lr_scale == 0:
        # lr 0 alone would leave them fixed too, but backward would still run through the whole
        # backbone for nothing; without requires_grad it stops at the head (about 3x cheaper).
        # Input gradients (attacks, adversarial training) still flow through the frozen layers.
        for p in rest:
            p.requires_grad_(False)
        return [{"params": head, "lr_scale": 1.0}]
    return [{"params": rest, "lr_scale": backbone_lr_scale}, {"params": head, "lr_scale": 1.0}]


def make_scheduler(cfg: TrainConfig, opt: torch.optim.Optimizer):
    """Per-epoch LR schedule: cosine to 0 over the run, or ×0.1 every third of it."""
    if cfg.scheduler == "cosine":
        return torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=cfg.epochs)
    if cfg.scheduler == "step":
        return torch.optim.lr_scheduler.StepLR(opt, step_size=max(1, cfg.epochs // 3), gamma=0.1)
    return None
