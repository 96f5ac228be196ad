"""Checkpoints: plain dicts of tensors and primitives, written atomically, read weights_only."""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

import numpy as np
import torch

from histoshield.errors import HistoshieldError
from histoshield.models.registry import build
from histoshield.models.weights import safe_torch_load
from histoshield.models.wrapper import HistoModel, raise_if_not_histomodel
from histoshield.runtime import atomic_write

FORMAT = 1
_REQUIRED = ("format", "state_dict", "name", "weights", "num_classes", "classes")


def _plain(obj: Any, where: str) -> Any:
    """Keep only what `torch.load(weights_only=True)` reads back: tensors and primitives."""
    if obj is None or isinstance(obj, (bool, int, float, str, torch.Tensor)):
        return obj
    if isinstance(obj, dict):
        return {
            k if isinstance(k, (str, int)) else str(k): _plain(v, where) for k, v in obj.items()
        }
    if isinstance(obj, (list, tuple)):
        items = [_plain(v, where) for v in obj]
        return tuple(items) if isinstance(obj, tuple) else items
    if isinstance(obj, Path):
        return str(obj)
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, np.ndarray):
        return torch.from_numpy(np.ascontiguousarray(obj))
    if hasattr(obj, "model_dump"):  # pydantic config
        return _plain(obj.model_dump(mode="json"), where)
    raise HistoshieldError(
        f"cannot store {type(obj).__name__} in a checkpoint ({where}): pass tensors, numbers, "
        "strings, lists or dicts"
    )


def first_nonfinite(state_dict: dict[str, Any]) -> str | None:
    """Name of the first floating-point tensor holding NaN or inf, or None when all are finite."""
    names = [k for k, v in state_dict.items() if torch.is_tensor(v) and v.is_floating_point()]
    if not names:
        return None
    ok = torch.stack([torch.isfinite(state_dict[k]).all() for k in names])  # one sync
    if bool(ok.all()):
        return None
    return names[int((~ok).nonzero()[0])]


def save_checkpoint(
    path: str | Path,
    model: HistoModel,
    *,
    config: Any = None,
    metrics: dict[str, Any] | None = None,
    extra: dict[str, Any] | None = None,
) -> Path:
    """Atomically write weights + everything needed to rebuild the model (weights_only-loadable).

    Non-finite weights (a diverged run) are refused: such a file would only ever predict NaN.
    """
    model = raise_if_not_histomodel(model)
    state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    bad = first_nonfinite(state)
    if bad is not None:
        raise HistoshieldError(
            f"refusing to save {path}: weight {bad!r} is NaN or infinite (training diverged; "
            "lower --lr)"
        )
    payload = {
        "format": FORMAT,
        "state_dict": state,
        "name": model.name,
        "weights": model.weights,
        "num_classes": model.num_classes,
        "classes": list(model.classes),
        "image_size": model.image_size,
        "stain_norm": model.stain_norm,
        "config": _plain(config, "config"),
        "metrics": _plain(metrics, "metrics"),
        "extra": _plain(extra, "extra"),
    }
    buf = io.BytesIO()  # torch.save to a path turns a full disk into a vague RuntimeError
    torch.save(payload, buf)
    return atomic_write(path, lambda tmp: tmp.write_bytes(buf.getbuffer()))


def read_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """The raw checkpoint dict (for resume), read with weights_only=True and validated."""
    obj = safe_torch_load(path, "checkpoint", map_location=map_location)
    if not isinstance(obj, dict) or any(k not in obj for k in _REQUIRED):
        raise HistoshieldError(
            f"{path} is not a histoshield checkpoint (missing keys): pass a best.pt/last.pt "
            "written by histoshield train"
        )
    if obj["format"] != FORMAT:
        raise HistoshieldError(
            f"checkpoint {path} has format {obj['format']!r}, this histoshield reads {FORMAT}: "
            "use a matching histoshield version"
        )
    return obj


def _mismatch(own: dict[str, Any], given: dict[str, Any], show: int = 2) -> str:
    """'' when the keys and shapes agree, else counts and a few example keys of each problem."""
    parts = []
    missing = sorted(set(own) - set(given))
    unexpected = sorted(set(given) - set(own))
    shapes = sorted(
        k
        for k in set(own) & set(given)
        if getattr(given[k], "shape", None) != getattr(own[k], "shape", None)
    )
    for what, keys in (("missing", missing), ("unexpected", unexpected), ("wrong-shape", shapes)):
        if keys:
            more = f", … {len(keys) - show} more" if len(keys) > show else ""
            parts.append(f"{len(keys)} {what} weights: {', '.join(keys[:show])}{more}")
    return "; ".join(parts)


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> HistoModel:
    """Rebuild the model from a checkpoint (no pretrained files needed), in eval mode."""
    ckpt = read_checkpoint(path, map_location)
    if isinstance(ckpt["state_dict"], dict):
        bad = first_nonfinite(ckpt["state_dict"])
        if bad is not None:
            raise HistoshieldError(
                f"checkpoint {path} holds NaN or infinite weights ({bad!r}): it comes from a "
                "diverged run; retrain with a lower --lr"
            )
    model = build(
        ckpt["name"],
        ckpt["weights"],
        ckpt["num_classes"],
        classes=ckpt["classes"],
        image_size=ckpt.get("image_size"),
        stain_norm=ckpt.get("stain_norm", "none"),
        pretrained=False,
    )
    state = ckpt["state_dict"]
    mismatch = _mismatch(model.state_dict(), state) if isinstance(state, dict) else "no weights"
    if mismatch:  # torch's own message lists every key: kilobytes for a user to read
        raise HistoshieldError(
            f"checkpoint {path} does not match model {ckpt['name']!r} ({mismatch}): was it "
            "written for another architecture or number of classes?"
        )
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as e:
        raise HistoshieldError(
            f"checkpoint {path} does not match model {ckpt['name']!r}: "
            f"{str(e).strip().splitlines()[0][:200]}"
        ) from None
    model.meta = {k: v for k, v in ckpt.items() if k != "state_dict"}
    return model.to(map_location).eval()
