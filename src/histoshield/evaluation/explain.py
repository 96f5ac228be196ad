"""Grad-CAM maps (Selvaraju et al. 2017) of a [0,1] pixel-space model, via pytorch-grad-cam.

Grad-CAM weights a conv layer's activations A^k by the spatial mean of d y_c / d A^k and keeps
the positive part: map = ReLU(sum_k mean(dy_c/dA^k) * A^k), upsampled to the input and scaled
to [0,1] per image. Cost: one forward and one backward pass per image.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

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
    "efficientnet_lite1": "backbone.bn2",
    "efficientnet_lite2": "backbone.bn2",
    "resnet18": "backbone.layer4",
    "resnet50": "backbone.layer4",
}
BATCH = 16  # images per Grad-CAM pass: bounds the memory of the kept activations


def _no_torchscript(model: nn.Module, module: nn.Module | None = None) -> None:
    """TorchScript modules take no forward hooks (traced ones ignore them): say so in one line."""
    if isinstance(module if module is not None else model, torch.jit.ScriptModule) or (
        module is None and any(isinstance(m, torch.jit.ScriptModule) for m in model.modules())
    ):
        raise HistoshieldError(
            "Grad-CAM cannot hook a TorchScript model (no forward hooks in TorchScript): "
            "explain the original nn.Module or its ONNX export instead"
        )


def default_layer(model: nn.Module) -> str:
    """The layer Grad-CAM uses when none is given: the model's last conv stage."""
    _no_torchscript(model)
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
    _no_torchscript(model, module)
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
                except (IndexError, ValueError, TypeError, AttributeError):
                    _explain_failure(name, hooks)
                    raise
                maps.append(m)
        finally:
            hooks.release()
    out = np.concatenate(maps).astype(np.float32)
    if not np.isfinite(out).all():
        raise HistoshieldError(
            f"Grad-CAM at layer {name} gave NaN or inf (the model's activations or gradients "
            "overflow)"
        )
    return np.clip(out, 0.0, 1.0)


def _explain_failure(layer: str, hooks: object) -> None:
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


# ---- clean vs adversarial evidence ----------------------------------------------------------


@dataclass
class Evidence:
    """Clean and adversarial images of one model with their Grad-CAM maps and probabilities."""

    x: torch.Tensor  # (N,3,H,W) clean, [0,1]
    adv: torch.Tensor  # (N,3,H,W) adversarial
    cam_clean: np.ndarray  # (N,H,W) in [0,1]
    cam_adv: np.ndarray
    p_clean: torch.Tensor  # (N,C) softmax probabilities
    p_adv: torch.Tensor
    classes: list[str]
    layer: str
    target: int  # the class the maps explain
    attack: str
    params: dict[str, Any]
    eps: float
    seed: int
    labels: torch.Tensor | None = None  # true classes when known
    names: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        """What explain.json stores: the run's settings and, per image, both predictions."""

        def pred(p: torch.Tensor) -> dict[str, Any]:
            k = int(p.argmax())
            probs = {c: float(v) for c, v in zip(self.classes, p, strict=True)}
            return {"class": self.classes[k], "probability": float(p[k]), "probabilities": probs}

        images = []
        for i in range(len(self.x)):
            row: dict[str, Any] = {"image": self.names[i] if i < len(self.names) else str(i)}
            if self.labels is not None:
                row["label"] = self.classes[int(self.labels[i])]
            row["clean"] = pred(self.p_clean[i])
            row["adversarial"] = pred(self.p_adv[i])
            row["flipped"] = row["clean"]["class"] != row["adversarial"]["class"]
            row["linf_255"] = float((self.adv[i] - self.x[i]).abs().max()) * 255
            row["cam_mean_abs_change"] = float(np.abs(self.cam_adv[i] - self.cam_clean[i]).mean())
            images.append(row)
        return {
            "layer": self.layer,
            "target": self.classes[self.target],
            "attack": self.attack,
            "params": self.params,
            "eps": self.eps,
            "eps_255": self.eps * 255,
            "seed": self.seed,
            "attacked_labels": "true labels" if self.labels is not None else "clean predictions",
            "classes": self.classes,
            "images": images,
        }


def gradcam_evidence(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor | None = None,
    *,
    attack: str = "pgd",
    eps: float = 2 / 255,
    params: dict[str, Any] | None = None,
    seed: int = 0,
    layer: str | None = None,
    names: Sequence[str] = (),
) -> Evidence:
    """Attack `x` (labels `y`, else the model's clean predictions) and explain both versions."""
    from histoshield import attacks
    from histoshield.evaluation.harness import check_attack
    from histoshield.evaluation.predict import predict_proba

    x = _check_images(x)
    params = dict(params or {})
    check_attack(attack, [eps], params, model=model)
    name = default_layer(model) if layer is None else layer
    resolve_layer(model, name)
    classes = list(getattr(model, "classes", None) or range(2))
    device = next(model.parameters()).device
    x = x.to(device)
    p_clean = predict_proba(model, x, device=device).cpu()
    targets = (y if y is not None else p_clean.argmax(1)).to(device)
    adv = attacks.run(attack, model, x, targets, eps=eps, seed=seed, **params).detach().cpu()
    p_adv = predict_proba(model, adv, device=device).cpu()
    return Evidence(
        x=x.detach().cpu(),
        adv=adv,
        cam_clean=gradcam(model, x, layer=name),
        cam_adv=gradcam(model, adv, layer=name),
        p_clean=p_clean,
        p_adv=p_adv,
        classes=[str(c) for c in classes],
        layer=name,
        target=_target(model, None) % len(classes),
        attack=attack,
        params=params,
        eps=float(eps),
        seed=int(seed),
        labels=None if y is None else y.detach().cpu(),
        names=list(names),
    )


def explain_images(
    checkpoint: str | Path,
    images: Sequence[str | Path],
    *,
    attack: str = "pgd",
    eps: float = 2 / 255,
    params: dict[str, Any] | None = None,
    seed: int = 0,
    layer: str | None = None,
    label: str | None = None,
    out: str | Path | None = None,
    device: str = "auto",
    overwrite: bool = False,
    figure: Callable[[Evidence, Path], Any] | None = None,
) -> dict[str, Any]:
    """`histoshield explain`: clean vs adversarial Grad-CAM of image files, as explain.json and
    (through `figure(evidence, png_path)`, the CLI's report panel) gradcam.png in `out`.

    `label`: the true class of every image (attacked away from it); None attacks each image's
    clean prediction."""
    from histoshield.attacks import resolve_class
    from histoshield.data.images import read_rgb
    from histoshield.evaluation.harness import check_attack
    from histoshield.evaluation.predict import _image_paths, load_model
    from histoshield.runfolder import claim
    from histoshield.runtime import environment, pick_device, seed_everything, write_json

    check_attack(attack, [eps], dict(params or {}))
    paths = _image_paths(list(images), skip_bad=False)
    if not paths:
        raise HistoshieldError("no image to explain: pass image files or folders")
    dev = pick_device(device)
    model = load_model(checkpoint, dev)
    if layer is not None:
        resolve_layer(model, layer)
    y = None
    if label is not None:
        y = torch.full((len(paths),), resolve_class(label, model.classes, "--label"), device=dev)
    size = model.image_size or 224
    arr = np.stack([read_rgb(p, size) for p in paths])  # an unreadable file: one line
    x = torch.from_numpy(arr).permute(0, 3, 1, 2).float().div_(255.0)
    if out is None:
        out = Path("runs") / f"explain-{time.strftime('%Y%m%d-%H%M%S')}"
    out = Path(out)
    with claim(out, "explain", overwrite=overwrite):
        seed_everything(seed)
        ev = gradcam_evidence(
            model,
            x.to(dev),
            y,
            attack=attack,
            eps=eps,
            params=params,
            seed=seed,
            layer=layer,
            names=[str(p) for p in paths],
        )
        result = {
            "checkpoint": str(checkpoint),
            "model": getattr(model, "name", type(model).__name__),
            **ev.to_dict(),
        }
        if figure is not None:
            result["panel"] = str(figure(ev, out / "gradcam.png"))
        write_json(out / "env.json", environment(dev))
        write_json(out / "explain.json", result)
    result["out"] = str(out)
    return result
