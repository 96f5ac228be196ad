"""One optimisation step and one evaluation pass (AMP, DDP or explicit gradient sync)."""

from __future__ import annotations

import contextlib
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from histoshield.models.members import member_logits
from histoshield.training import distributed as D


def to_float(xb: torch.Tensor, device: torch.device, channels_last: bool) -> torch.Tensor:
    x = xb.to(device, non_blocking=True).float().div_(255.0)
    return x.contiguous(memory_format=torch.channels_last) if channels_last else x


class Stepper:
    """One optimisation step and one evaluation pass, shared by `train` and the benchmark."""

    def __init__(
        self,
        model: nn.Module,
        opt: torch.optim.Optimizer,
        device: torch.device,
        *,
        amp: bool = True,
        defense: Any = None,
        ctx: D.DistContext | None = None,
        class_weight: torch.Tensor | None = None,
        ema: float | None = None,
        label_smoothing: float = 0.0,
        sam: float = 0.0,
    ) -> None:
        self.raw = model
        self.label_smoothing = label_smoothing
        self.sam = sam
        self.averaged = ema_of(model, ema) if ema is not None else None
        self.class_weight = None if class_weight is None else class_weight.to(device)
        self.opt = opt
        self.device = device
        self.defense = defense
        self.ctx = ctx or D.DistContext(device=device)
        self.channels_last = device.type == "cuda"
        if device.type == "cuda":
            torch.backends.cudnn.benchmark = True  # fixed input size: let cuDNN pick kernels
        self.amp_dtype: torch.dtype | None = None
        if amp and device.type == "cuda":
            bf16 = torch.cuda.is_bf16_supported()
            self.amp_dtype = torch.bfloat16 if bf16 else torch.float16
        self.scaler = torch.amp.GradScaler(
            "cuda", enabled=self.amp_dtype == torch.float16 and device.type == "cuda"
        )
        self.manual_sync = False
        self.model: nn.Module = model
        if self.ctx.distributed:
            D.broadcast_parameters(model, self.ctx)
            if defense is None:
                from torch.nn.parallel import DistributedDataParallel as DDP

                ids = [device.index] if device.type == "cuda" else None
                self.model = DDP(model, device_ids=ids)
            else:
                self.manual_sync = True

    def autocast(self):
        """Mixed precision on CUDA (bf16 when supported, else fp16); a no-op on CPU."""
        if self.amp_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast("cuda", dtype=self.amp_dtype)

    def step(
        self, x: torch.Tensor, y: torch.Tensor, target: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """One update on float images x (soft `target` probabilities, e.g. mixup's, replace y
        in the clean loss); returns (loss, logits) detached."""
        self.opt.zero_grad(set_to_none=True)
        with self.autocast():
            if self.defense is not None:
                loss, logits = self.defense.loss(self.model, x, y)
            else:
                loss, logits = self.clean_loss(x, y, target)
        self.scaler.scale(loss).backward()
        if self.sam:
            self.sharpness_aware_backward(x, y, target)
        if self.manual_sync:
            D.sync_gradients(self.raw, self.ctx)
        self.scaler.step(self.opt)
        self.scaler.update()
        if self.averaged is not None:
            self.averaged.update_parameters(self.raw)
        return loss.detach(), logits.detach()

    def clean_loss(
        self, x: torch.Tensor, y: torch.Tensor, target: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Cross-entropy of the model on x (members trained side by side: the mean of their
        own losses, models.members) and the logits."""
        logits = self.model(x)
        members = member_logits(self.raw) or [logits]
        loss = torch.stack([
            F.cross_entropy(
                m.float(),
                y if target is None else target,
                weight=self.class_weight,
                label_smoothing=self.label_smoothing,
            )
            for m in members
        ]).mean()  # fmt: skip
        return loss, logits

    def sharpness_aware_backward(
        self, x: torch.Tensor, y: torch.Tensor, target: torch.Tensor | None
    ) -> None:
        """Replace the gradients by those at the worst nearby weights (SAM, Foret et al. 2021).

        w + e with e = rho * g / ||g||_2 (g: the gradient just computed) approximately
        maximises the loss within an L2 ball of radius rho around w; the step then uses the
        gradient there, at w. Cost: a second forward and backward per step. The gradient
        direction does not depend on AMP's loss scale; a non-finite g skips the ascent (the
        scaler then skips the step). BatchNorm statistics are not updated by the second pass.
        """
        params = [p for p in self.raw.parameters() if p.grad is not None]
        if not params:
            return
        norm = torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in params]))
        if not torch.isfinite(norm) or norm == 0:
            return
        with torch.no_grad():
            shifts = [p.grad * (self.sam / norm) for p in params]
            for p, e in zip(params, shifts, strict=True):
                p.add_(e)
        self.opt.zero_grad(set_to_none=True)
        with frozen_batchnorm_stats(self.raw), self.autocast():
            loss, _ = self.clean_loss(x, y, target)
        self.scaler.scale(loss).backward()
        with torch.no_grad():
            for p, e in zip(params, shifts, strict=True):
                p.sub_(e)

    @property
    def eval_model(self) -> nn.Module:
        """The model validation scores and best.pt holds: the weight average when there is one."""
        return self.raw if self.averaged is None else self.averaged.module


@contextlib.contextmanager
def frozen_batchnorm_stats(model: nn.Module):
    """BatchNorm layers keep normalising by the batch but leave their running statistics."""
    bns = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    saved = [m.momentum for m in bns]
    for m in bns:
        m.momentum = 0.0
    try:
        yield
    finally:
        for m, mom in zip(bns, saved, strict=True):
            m.momentum = mom


def ema_of(model: nn.Module, decay: float) -> torch.optim.swa_utils.AveragedModel:
    """torch's AveragedModel as an exponential moving average of weights and buffers.

    Buffers (BatchNorm running statistics) are averaged too (`use_buffers`), so the average
    needs no extra BatchNorm pass before it is used. The first update copies the weights.
    """
    from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

    return AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(decay), use_buffers=True)
