"""`histoshield export`: a trained checkpoint as a TorchScript or ONNX file plus the model card
that describes it, so any tool (and `histoshield audit` through `from_card`) can load it.

When the model has no stain normalisation and no test-time augmentation, only the backbone is
exported and the input scaling goes into the card as mean/std, as an external model would
ship; otherwise the whole pixel-space model is exported (mean 0, std 1 in the card).
"""

from __future__ import annotations

import io
import warnings
from pathlib import Path
from typing import Any

import torch
import yaml
from torch import nn

from histoshield.errors import HistoshieldError
from histoshield.models.wrapper import HistoModel
from histoshield.runtime import atomic_write, write_text

EXPORT_FORMATS = ("onnx", "torchscript")
OPSET = 17


def _exported_part(model: HistoModel) -> tuple[nn.Module, list[float], list[float]]:
    """What goes into the file and the card's mean/std (per RGB channel, scale 1)."""
    if model.stain_norm == "none" and not model.tta:
        scale = model.in_scale.flatten().tolist()
        shift = model.in_shift.flatten().tolist()
        std = [1.0 / s for s in scale]
        mean = [-b / s for b, s in zip(shift, scale, strict=True)]
        return model.backbone, mean, std
    return model, [0.0, 0.0, 0.0], [1.0, 1.0, 1.0]


def export_model(model: HistoModel, fmt: str, out: str | Path) -> tuple[Path, Path]:
    """Write `model` as `out` (ONNX or TorchScript) and its card `out` + '.yaml'."""
    if fmt not in EXPORT_FORMATS:
        raise HistoshieldError(f"unknown export format {fmt!r}: use onnx or torchscript")
    if model.image_size is None:
        raise HistoshieldError(
            f"model {model.name} has no fixed input size; export needs one (train with "
            "--image-size)"
        )
    out = Path(out).expanduser()
    net, mean, std = _exported_part(model)
    net = net.cpu().eval()
    s = int(model.image_size)
    dummy = torch.rand(2, 3, s, s, generator=torch.Generator().manual_seed(0))
    buf = io.BytesIO()
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")  # deprecation notes of torch.jit / the legacy exporter
        if fmt == "torchscript":
            torch.jit.save(torch.jit.trace(net, dummy), buf)
        else:
            torch.onnx.export(
                net,
                (dummy,),
                buf,
                input_names=["input"],
                output_names=["logits"],
                dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}},
                opset_version=OPSET,
                dynamo=False,
            )
    atomic_write(out, lambda p: p.write_bytes(buf.getbuffer()))
    card: dict[str, Any] = {
        "format": fmt,
        "path": out.name,
        "name": f"{model.name} ({fmt})",
        "input_size": s,
        "mean": mean,
        "std": std,
        "channel_order": "rgb",
        "classes": list(model.classes),
        "output": "logits",
    }
    card_path = out.with_name(out.name + ".yaml")
    write_text(card_path, yaml.safe_dump(card, sort_keys=False))
    return out, card_path


def export_checkpoint(checkpoint: str | Path, fmt: str, out: str | Path) -> tuple[Path, Path]:
    """Load a histoshield checkpoint and export it (see `export_model`)."""
    from histoshield.models.checkpoint import load_checkpoint

    p = Path(checkpoint).expanduser()
    if not p.is_file():
        raise HistoshieldError(f"checkpoint not found: {p} (pass a best.pt from histoshield train)")
    return export_model(load_checkpoint(p), fmt, out)
