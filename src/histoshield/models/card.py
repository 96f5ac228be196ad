"""Model cards: a small YAML file that describes any external classifier, and `from_card`,
which turns it into a `HistoModel` (RGB [0,1] in, logits in the project's class order out), so
every attack, defense wrapper and certification runs on it unchanged.

A card (docs/audit.md)::

    format: onnx            # torchscript | onnx | timm | torchvision | histoshield
    path: model.onnx        # relative to the card file
    architecture: resnet18  # timm / torchvision state_dicts only
    input_size: 96          # the side the model was trained on (inputs are resized to it)
    mean: [0.5, 0.5, 0.5]   # the model's input is (x * scale - mean) / std, per channel,
    std: [0.25, 0.25, 0.25] #   in the model's channel order; x is the image in [0, 1]
    scale: 1                # 255 for models that take 0..255 pixels
    channel_order: rgb      # rgb | bgr
    classes: [benign, malignant]   # output order (sigmoid: the output is classes[1]'s logit)
    output: logits          # logits | probabilities | sigmoid | sigmoid-probability
    gradcam_layer: null     # optional: the module Grad-CAM reads (a dotted name)

Probability outputs become log-probabilities and a single sigmoid logit z becomes
[log σ(-z), log σ(z)]: exact logits (their softmax is the model's probability and their
difference the log-odds), so white-box attacks are not weakened by a softmax layer. A model that
outputs probabilities is still flagged as a gradient-masking risk (`model.meta["warnings"]`):
a probability saturated to exactly 0 or 1 in float32 has no gradient left to follow.
Weights are never unpickled: TorchScript is read by `torch.jit.load`, ONNX is converted to a
torch module by onnx2torch, state_dicts are read with `weights_only=True`.
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any, Literal

import torch
import torch.nn.functional as F
from pydantic import Field, ValidationError, field_validator, model_validator
from torch import nn

from histoshield.config import Strict, read_yaml
from histoshield.errors import HistoshieldError
from histoshield.models.wrapper import HistoModel

FORMATS = ("torchscript", "onnx", "timm", "torchvision", "histoshield")
OUTPUTS = ("logits", "probabilities", "sigmoid", "sigmoid-probability")
PROBABILITY_OUTPUTS = ("probabilities", "sigmoid-probability")
MASKING_RISK = (
    "the model outputs probabilities: histoshield attacks their logarithm (exact logits), but "
    "a probability saturated to 0 or 1 in float32 has a zero gradient, so white-box results "
    "may overstate robustness (gradient-masking risk); export the logits if you can"
)


class ModelCard(Strict):
    """A model card: how to load an external model and what its inputs and outputs mean."""

    format: Literal["torchscript", "onnx", "timm", "torchvision", "histoshield"]
    path: str
    name: str | None = None  # shown in reports; default: the file's stem
    architecture: str | None = None
    input_size: int | None = Field(None, ge=8, le=4096)
    mean: tuple[float, float, float] | None = None
    std: tuple[float, float, float] | None = None
    scale: float = Field(1.0, gt=0, allow_inf_nan=False)
    channel_order: Literal["rgb", "bgr"] = "rgb"
    classes: list[str] | None = None
    output: Literal["logits", "probabilities", "sigmoid", "sigmoid-probability"] = "logits"
    gradcam_layer: str | None = None

    @field_validator("classes", mode="before")
    @classmethod
    def _classes(cls, v: Any) -> Any:
        from histoshield.data.layouts import parse_classes

        if v is None:
            return None
        try:
            return list(parse_classes(v))
        except HistoshieldError:
            raise ValueError(
                f"classes needs two or more different names in output order, got {v!r}"
            ) from None

    @field_validator("std")
    @classmethod
    def _std(cls, v: Any) -> Any:
        if v is not None and not all(s > 0 for s in v):
            raise ValueError(f"std values must be > 0, got {list(v)}")
        return v

    @model_validator(mode="after")
    def _complete(self) -> ModelCard:
        if self.format == "histoshield":
            return self  # a histoshield checkpoint carries its own size, scaling and classes
        for key in ("input_size", "classes"):
            if getattr(self, key) is None:
                raise ValueError(f"a {self.format} card needs {key}")
        if self.format in ("timm", "torchvision") and not self.architecture:
            raise ValueError(f"a {self.format} card needs architecture (the model name)")
        if (self.mean is None) != (self.std is None):
            raise ValueError("give mean and std together (or neither)")
        if self.output.startswith("sigmoid") and len(self.classes or []) != 2:
            raise ValueError("a sigmoid output needs exactly two classes")
        return self


def load_card(card: str | Path | dict[str, Any] | ModelCard) -> tuple[ModelCard, Path]:
    """A validated ModelCard and the folder its `path` is relative to (one-line errors)."""
    if isinstance(card, ModelCard):
        return card, Path.cwd()
    if isinstance(card, dict):
        data, base, source = card, Path.cwd(), None
    else:
        source = Path(card).expanduser()
        data, base = read_yaml(source, "model card"), source.parent
    try:
        return ModelCard.model_validate(data), base
    except ValidationError as e:
        raise card_error(e, source or "the model card") from None


def card_error(e: ValidationError, source: str | Path) -> HistoshieldError:
    """One line for the first problem of a card: missing, unknown or invalid key."""
    err = e.errors()[0]
    key = ".".join(str(x) for x in err["loc"])
    msg = str(err["msg"]).removeprefix("Value error, ")
    if err["type"] == "missing":
        return HistoshieldError(f"model card {source} is missing the key {key}")
    if err["type"] == "extra_forbidden":
        return HistoshieldError(
            f"unknown model card key {key} in {source}: valid keys are "
            f"{', '.join(ModelCard.model_fields)}"
        )
    if not key:  # a rule across keys (model_validator)
        return HistoshieldError(f"model card {source}: {msg}")
    got = err.get("input")
    value = f" (got {got!r})" if isinstance(got, (str, int, float, bool)) else ""
    return HistoshieldError(f"invalid model card key {key} in {source}: {msg}{value}")


def is_card(path: str | Path) -> bool:
    """A YAML file is a card; anything else given to `audit` is a histoshield checkpoint."""
    return Path(path).suffix.lower() in (".yaml", ".yml")


# ---- output conversion ----------------------------------------------------------------------


class CardAdapter(nn.Module):
    """Wraps an external network: channel order in, 2+-class logits in sorted class order out."""

    def __init__(self, net: nn.Module, card: ModelCard) -> None:
        super().__init__()
        self.net = net
        self.output = card.output
        self.bgr = card.channel_order == "bgr"
        own = list(card.classes or [])
        self.register_buffer(
            "order", torch.tensor([own.index(c) for c in sorted(own)]), persistent=False
        )

    def raw(self, z: torch.Tensor) -> torch.Tensor:
        """The wrapped network's own output for preprocessed input `z` (RGB order)."""
        return self.net(z.flip(1) if self.bgr else z)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        """Logits (N,C) in sorted class order for preprocessed input (N,3,S,S)."""
        return to_logits(self.raw(z), self.output)[:, self.order]


def to_logits(out: torch.Tensor, output: str) -> torch.Tensor:
    """Exact logits (N,C) from a model's output: logits, probabilities, or one sigmoid value."""
    if isinstance(out, (tuple, list)):  # e.g. a TorchScript module returning (logits, extra)
        out = out[0]
    out = out if out.is_floating_point() else out.float()
    tiny = torch.finfo(out.dtype).tiny  # log(0) = -inf would poison every gradient
    if output == "logits":
        return out
    if output == "probabilities":
        return torch.log(out.clamp_min(tiny))
    z = out.reshape(len(out), -1)[:, :1]
    if output == "sigmoid":
        return torch.cat([F.logsigmoid(-z), F.logsigmoid(z)], dim=1)
    p = z.clamp(tiny, 1.0)  # sigmoid-probability: p of classes[1]
    return torch.cat([torch.log((1 - p).clamp_min(tiny)), torch.log(p)], dim=1)


# ---- loaders per format ---------------------------------------------------------------------


def _first_line(e: BaseException) -> str:
    """The informative line of an exception: TorchScript wraps the real error ('RuntimeError:
    mat1 and mat2 shapes cannot be multiplied ...') in a long interpreter trace."""
    lines = [x.strip() for x in str(e).strip().splitlines() if x.strip()]
    real = [x.split("Error: ", 1)[1] for x in lines if "Error: " in x]
    text = real[-1] if real else (lines[0] if lines else type(e).__name__)
    return text[:200]


def _torchscript(path: Path) -> nn.Module:
    try:
        with warnings.catch_warnings():  # torch.jit is deprecated upstream; the format is not
            warnings.simplefilter("ignore")
            return torch.jit.load(str(path), map_location="cpu")
    except Exception as e:  # jit raises RuntimeError/ValueError with C++ traces on junk
        raise HistoshieldError(
            f"cannot read {path} as TorchScript ({type(e).__name__}): is the card's format "
            "right? Save TorchScript with torch.jit.save(torch.jit.trace(model, x), path)"
        ) from None


def _fold_constants(model: Any) -> Any:
    """Turn Constant nodes and Identity-of-initializer nodes into initializers: torch's ONNX
    exporter writes shared weights that way, and onnx2torch needs conv weights as initializers."""
    from onnx import numpy_helper

    graph = model.graph
    inits = {i.name: i for i in graph.initializer}
    keep = []
    for node in graph.node:
        if node.op_type == "Identity" and node.input[0] in inits:
            t = type(inits[node.input[0]])()
            t.CopyFrom(inits[node.input[0]])
            t.name = node.output[0]
        elif node.op_type == "Constant" and len(node.attribute) == 1 and node.attribute[0].t.dims:
            t = numpy_helper.from_array(numpy_helper.to_array(node.attribute[0].t), node.output[0])
        else:
            keep.append(node)
            continue
        graph.initializer.append(t)
        inits[t.name] = t
    del graph.node[:]
    graph.node.extend(keep)
    return model


def onnx_input_shape(model: Any) -> list[int | None]:
    """Static dims of the ONNX graph's first real input (None where dynamic)."""
    inits = {i.name for i in model.graph.initializer}
    inputs = [i for i in model.graph.input if i.name not in inits]
    if not inputs:
        return []
    dims = inputs[0].type.tensor_type.shape.dim
    return [d.dim_value if d.HasField("dim_value") else None for d in dims]


def _onnx(path: Path, input_size: int) -> nn.Module:
    try:
        import onnx
        from onnx2torch import convert
    except ImportError:  # pragma: no cover - both are dependencies
        raise HistoshieldError(
            "ONNX cards need onnx and onnx2torch: pip install onnx onnx2torch"
        ) from None
    try:
        model = onnx.load(str(path))
        onnx.checker.check_model(model)
    except Exception as e:  # protobuf DecodeError, ValidationError, ...
        raise HistoshieldError(
            f"cannot read {path} as ONNX ({_first_line(e)}): is the card's format right?"
        ) from None
    shape = onnx_input_shape(model)
    if len(shape) == 4:
        if shape[1] not in (None, 3):
            raise HistoshieldError(
                f"ONNX model {path} takes {shape[1]} input channels; histoshield audits RGB "
                "models (3 channels)"
            )
        fixed = [d for d in shape[2:] if d is not None]
        if any(d != input_size for d in fixed):
            raise HistoshieldError(
                f"ONNX model {path} takes {shape[2]}x{shape[3]} inputs but the card says "
                f"input_size: {input_size}: set input_size to the model's input side"
            )
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return convert(_fold_constants(model))
    except NotImplementedError as e:
        op = _first_line(e)
        if "operation_type=" in op:
            op = op.split("operation_type=")[1].split(",")[0].strip("'\"")
            op = f"op {op!r}"
        raise HistoshieldError(
            f"cannot convert ONNX model {path} to torch: {op} is not supported by onnx2torch; "
            "re-export with standard ops (e.g. a lower opset) or give a TorchScript file"
        ) from None
    except Exception as e:
        raise HistoshieldError(
            f"cannot convert ONNX model {path} to torch ({_first_line(e)})"
        ) from None


def _state_dict_model(card: ModelCard, path: Path, num_outputs: int) -> nn.Module:
    from histoshield.models import weights as W

    arch = str(card.architecture)
    if card.format == "timm":
        import timm

        try:
            net = timm.create_model(arch, pretrained=False, num_classes=num_outputs)
        except RuntimeError as e:
            raise HistoshieldError(
                f"unknown timm architecture {arch!r} in the card ({_first_line(e)})"
            ) from None
    else:
        import torchvision.models as tvm

        if arch not in tvm.list_models():
            raise HistoshieldError(
                f"unknown torchvision architecture {arch!r} in the card: use a name from "
                "torchvision.models such as resnet18"
            )
        net = getattr(tvm, arch)(weights=None, num_classes=num_outputs)
    state = W.load_state_file(path, "model weights")
    if arch.startswith("densenet"):
        state = W.fix_densenet_keys(state)
    W.load_into(net, state, source=str(path))  # strict: a head of another size is an error
    return net


def _default_mean_std(card: ModelCard, net: nn.Module) -> tuple[tuple, tuple]:
    """The card's mean/std, else the architecture's own (timm/torchvision: ImageNet), else 0/1."""
    from histoshield.models.registry import IMAGENET_MEAN, IMAGENET_STD

    if card.mean is not None and card.std is not None:
        return tuple(card.mean), tuple(card.std)
    if card.format == "timm":
        cfg = getattr(net, "pretrained_cfg", {}) or {}
        return tuple(cfg.get("mean", IMAGENET_MEAN)), tuple(cfg.get("std", IMAGENET_STD))
    if card.format == "torchvision":
        return IMAGENET_MEAN, IMAGENET_STD
    return (0.0, 0.0, 0.0), (1.0, 1.0, 1.0)


# ---- the probe ------------------------------------------------------------------------------


def _probe(adapter: CardAdapter, card: ModelCard, path: Path) -> list[str]:
    """Run a dummy batch at input_size; check the output's shape against `classes`. Returns
    warnings (e.g. outputs that look like probabilities in a card that says logits)."""
    s = int(card.input_size or 0)
    z = torch.full((2, 3, s, s), 0.5)
    try:
        with torch.no_grad():
            out = adapter.raw(z)
    except Exception as e:
        raise HistoshieldError(
            f"model {path} does not run on input_size {s} ({_first_line(e)}): set input_size "
            "to the side the model takes"
        ) from None
    if isinstance(out, (tuple, list)):
        out = out[0]
    if not torch.is_tensor(out):
        raise HistoshieldError(f"model {path} returns {type(out).__name__}, not a tensor")
    n_classes = len(card.classes or [])
    shape = tuple(out.shape)
    if card.output.startswith("sigmoid"):
        ok = shape in ((2,), (2, 1))
        want = "one value per image (N,1)"
    else:
        ok = shape == (2, n_classes)
        want = f"(N,{n_classes}) for the {n_classes} classes {card.classes}"
    if not ok:
        raise HistoshieldError(
            f"model {path} outputs shape {tuple(shape[1:])} per image but the card needs "
            f"{want}: fix classes or output"
        )
    if not torch.isfinite(out).all():
        raise HistoshieldError(f"model {path} gives NaN or infinite outputs on a grey image")
    warns = []
    if card.output in PROBABILITY_OUTPUTS:
        inside = bool(((out >= 0) & (out <= 1)).all())
        sums = card.output != "probabilities" or bool(((out.sum(1) - 1).abs() < 1e-3).all())
        if not (inside and sums):
            raise HistoshieldError(
                f"the card says output: {card.output} but model {path} outputs values that are "
                "not probabilities (outside [0, 1] or not summing to 1): use output: logits"
                + (" or sigmoid" if card.output == "sigmoid-probability" else "")
            )
        warns.append(MASKING_RISK)
    elif card.output == "logits" and n_classes > 1:
        if bool((out >= 0).all() and ((out.sum(1) - 1).abs() < 1e-5).all()):
            warns.append(
                "the outputs on a grey image sum to 1 like probabilities although the card "
                "says logits; if they are probabilities, set output: probabilities"
            )
    return warns


# ---- from_card ------------------------------------------------------------------------------


def from_card(card: str | Path | dict[str, Any] | ModelCard, *, device: str | torch.device = "cpu"
              ) -> HistoModel:  # fmt: skip
    """The model a card describes as a HistoModel: RGB (N,3,H,W) in [0,1] → logits (N,C) in
    sorted class order, in eval mode; `model.meta` holds the card and its warnings."""
    card, base = load_card(card)
    path = Path(card.path).expanduser()
    path = path if path.is_absolute() else base / path
    if not path.is_file():
        raise HistoshieldError(f"model file not found: {path} (the card's path is relative to "
                               "the card file)")  # fmt: skip
    if card.format == "histoshield":
        from histoshield.models.checkpoint import load_checkpoint

        model = load_checkpoint(path, map_location=device)
        model.meta["card"] = card.model_dump(mode="json")
        model.meta.setdefault("warnings", [])
        return model
    s = int(card.input_size or 0)
    outputs = 1 if card.output.startswith("sigmoid") else len(card.classes or [])
    if card.format == "torchscript":
        net = _torchscript(path)
    elif card.format == "onnx":
        net = _onnx(path, s)
    else:
        net = _state_dict_model(card, path, outputs)
    net.eval()
    for p in net.parameters():
        p.requires_grad_(False)  # attacks need input gradients only
    mean, std = _default_mean_std(card, net)
    if card.channel_order == "bgr":  # mean/std are in the model's order; scaling runs in RGB
        mean, std = mean[::-1], std[::-1]
    adapter = CardAdapter(net, card)
    warns = _probe(adapter, card, path)
    model = HistoModel(
        adapter,
        name=card.name or f"{card.format}:{path.stem}",
        weights=str(path),
        classes=sorted(card.classes or []),
        scale=[card.scale / sd for sd in std],
        shift=[-m / sd for m, sd in zip(mean, std, strict=True)],
        image_size=s,
    )
    model.meta = {
        "card": card.model_dump(mode="json"),
        "source": str(path),
        "preprocessing": {"mean": list(mean), "std": list(std), "scale": card.scale,
                          "channel_order": card.channel_order, "order": "rgb"},
        "warnings": warns,
    }  # fmt: skip
    return model.to(device).eval()


def load_model_or_card(path: str | Path, device: str | torch.device = "cpu") -> HistoModel:
    """A card (.yaml/.yml) through `from_card`, anything else as a histoshield checkpoint."""
    if is_card(path):
        return from_card(path, device=device)
    from histoshield.models.checkpoint import load_checkpoint

    p = Path(path).expanduser()
    if not p.is_file():
        raise HistoshieldError(
            f"model not found: {p} (pass a model card .yaml or a best.pt from histoshield train)"
        )
    model = load_checkpoint(p, map_location=device)
    model.meta.setdefault("warnings", [])
    return model
