"""Grad-CAM maps (Selvaraju et al. 2017) of a [0,1] pixel-space model, via pytorch-grad-cam.

Grad-CAM weights a conv layer's activations A^k by the spatial mean of d y_c / d A^k and keeps
the positive part: map = ReLU(sum_k mean(dy_c/dA^k) * A^k), upsampled to the input and scaled
to [0,1] per image. Cost: one forward and one backward pass per image.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import numpy as np
import torch
from torch import nn

from histoshield.data import positive_index
from histoshield.errors import HistoshieldError

# Last conv stage of each registry architecture (module names inside HistoModel).
LAYERS: dict[str, str] = {
    "smallcnn": "backbone.features",
    "densenet121": "backbone.features.denseblock4",
    "efficientnet_lite0": "backbone.bn2",
    "resnet18": "backbone.layer4",
    "resnet50": "backbone.layer4",
}
BATCH = 16  # images per Grad-CAM pass: bounds the memory of the kept activations


def default_layer(model: nn.Module) -> str:
    """The layer Grad-CAM uses when none is given: the model's last conv stage."""
    modules = dict(model.named_modules())
    name = LAYERS.get(str(getattr(model, "name", "")))
    if name in modules:
        return name
    backbone = getattr(model, "backbone", None)
    info = getattr(backbone, "feature_info", None)  # timm: the last feature stage
    try:
        last = f"backbone.{info[-1]['module']}" if info is not None else None
    except (TypeError, KeyError, IndexError):
        last = None
    if last in modules:
        return last
    convs = [n for n, m in model.named_modules() if isinstance(m, nn.Conv2d) and n]
    if not convs:
        raise HistoshieldError(
            f"model {getattr(model, 'name', type(model).__name__)} has no Conv2d layer for "
            "Grad-CAM: give layer=<dotted module name> of a layer with (N,C,H,W) output"
        )
    return convs[-1]


def resolve_layer(model: nn.Module, layer: str) -> nn.Module:
    """The module named `layer` (dotted, as in `model.named_modules()`), or a one-line error."""
    modules = dict(model.named_modules())
    if not isinstance(layer, str) or not layer or layer not in modules:
        raise HistoshieldError(
            f"model {getattr(model, 'name', type(model).__name__)} has no layer {layer!r}: "
            f"use a dotted module name from model.named_modules(), e.g. {default_layer(model)}"
        )
    return modules[layer]


def _check_images(images: torch.Tensor) -> torch.Tensor:
    if not isinstance(images, torch.Tensor) or images.ndim != 4 or images.shape[1] != 3:
        shape = tuple(images.shape) if isinstance(images, torch.Tensor) else type(images).__name__
        raise HistoshieldError(f"Grad-CAM needs images (N,3,H,W) in [0,1], got {shape}")
    if images.shape[0] == 0:
        raise HistoshieldError("Grad-CAM got no images")
    if not torch.isfinite(images).all() or images.min() < 0 or images.max() > 1:
        raise HistoshieldError("Grad-CAM needs finite images in [0,1] (pixel space)")
    return images


def _target(model: nn.Module, target: int | None) -> int:
    classes = getattr(model, "classes", None)
    if target is None:
        return positive_index(list(classes)) if classes else -1
    n = len(classes) if classes else None
    ok = isinstance(target, int) and not isinstance(target, bool)
    if not ok or target < 0 or (n is not None and target >= n):
        raise HistoshieldError(f"Grad-CAM target must be a class index in 0..{n}, got {target!r}")
    return target


@contextmanager
def _untouched(model: nn.Module) -> Iterator[None]:
    """Restore every module's train/eval mode, each parameter's requires_grad and .grad, and tta.

    pytorch-grad-cam calls model.eval() and model.zero_grad(); parameters are frozen meanwhile
    so only the input's gradient is computed (the layer's output still needs a gradient).
    """
    modes = {m: m.training for m in model.modules()}
    params = [(p, p.requires_grad, p.grad) for p in model.parameters()]
    tta = getattr(model, "tta", None)
    try:
        for p, _, _ in params:
            p.requires_grad_(False)
        if tta:
            # One view: under TTA the backbone sees 8 stacked views, whose maps do not align.
            model.tta = False
        yield
    finally:
        for m, training in modes.items():
            m.training = training
        for p, requires_grad, grad in params:
            p.requires_grad_(requires_grad)
            p.grad = grad
        if tta is not None:
            model.tta = tta


def gradcam(
    model: nn.Module,
    images: torch.Tensor,
    target: int | None = None,
    layer: str | None = None,
) -> np.ndarray:
    """Grad-CAM maps (N,H,W) in [0,1] at the input's size; target None = the malignant class."""
    from pytorch_grad_cam import GradCAM
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

    x = _check_images(images)
    name = default_layer(model) if layer is None else layer
    module = resolve_layer(model, name)
    t = _target(model, target)
    try:
        device = next(model.parameters()).device
    except StopIteration:
        raise HistoshieldError("Grad-CAM needs a model with parameters") from None
    maps = []
    with _untouched(model):
        cam = GradCAM(model=model, target_layers=[module])
        hooks = cam.activations_and_grads
        try:
            for i in range(0, x.shape[0], BATCH):
                xb = x[i : i + BATCH].detach().to(device).float().clone().requires_grad_(True)
                try:
                    m = cam(input_tensor=xb, targets=[ClassifierOutputTarget(t)] * len(xb))
                except (IndexError, ValueError, TypeError, AttributeError) as e:
                    _explain_failure(name, hooks, e)
                    raise
                maps.append(m)
        finally:
            hooks.release()
    out = np.concatenate(maps).astype(np.float32)
    if not np.isfinite(out).all():
        raise HistoshieldError(f"Grad-CAM at layer {name} is not finite: the model's gradients are")
    return np.clip(out, 0.0, 1.0)


def _explain_failure(layer: str, hooks: object, error: Exception) -> None:
    """Turn what pytorch-grad-cam trips on for a wrong layer into one line; else let it raise."""
    acts = getattr(hooks, "activations", [])
    grads = getattr(hooks, "gradients", [])
    if not acts:
        raise HistoshieldError(
            f"Grad-CAM layer {layer} is not used by the model's forward"
        ) from None
    if acts[0].ndim != 4:
        raise HistoshieldError(
            f"Grad-CAM layer {layer} outputs shape {tuple(acts[0].shape)}: it needs a conv "
            "layer's (N,C,H,W) output"
        ) from None
    if not grads:
        raise HistoshieldError(
            f"Grad-CAM layer {layer} gets no gradient from the output (detached?)"
        ) from None
