"""Shared run plumbing: atomic writes, seeding, device choice and the environment record."""

from __future__ import annotations

import hashlib
import json
import os
import platform
import random
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from histoshield.errors import HistoshieldError
from histoshield.runfolder import os_error


def _default_mode() -> int:
    # mkstemp creates 0600 files; results and reports should get the usual umask-derived mode.
    umask = os.umask(0)
    os.umask(umask)
    return 0o666 & ~umask


_FILE_MODE = _default_mode()


def atomic_write(path: str | Path, write: Callable[[Path], None]) -> Path:
    """Call `write(tmp)` on a temp file in the target folder, then rename it over `path`."""
    path = Path(path)
    if path.is_dir():
        raise HistoshieldError(f"cannot write {path}: it is a folder; pass a file path instead")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    except (FileExistsError, NotADirectoryError):
        raise HistoshieldError(
            f"cannot write {path}: part of its folder path is an existing file; choose another"
        ) from None
    except OSError as e:  # e.g. a read-only folder or a full disk
        raise os_error(e, path) from None
    os.close(fd)
    try:
        write(Path(tmp))
        os.chmod(tmp, _FILE_MODE)
        os.replace(tmp, path)
    except OSError as e:  # full disk, quota, a folder made read-only meanwhile: one line
        Path(tmp).unlink(missing_ok=True)
        raise os_error(e, path) from None
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def write_text(path: str | Path, text: str) -> Path:
    """Atomically write a text file."""
    return atomic_write(path, lambda p: p.write_text(text, encoding="utf-8"))


def write_json(path: str | Path, obj: Any) -> Path:
    """Atomically write JSON (NaN/inf become null so the file stays valid JSON)."""
    return write_text(path, json.dumps(_json_safe(obj), indent=2, sort_keys=False) + "\n")


def _json_safe(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {str(k): _json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_json_safe(v) for v in obj]
    if isinstance(obj, Path):
        return str(obj)
    if isinstance(obj, (np.integer,)):
        return int(obj)
    if isinstance(obj, (np.floating, float)):
        f = float(obj)
        return f if np.isfinite(f) else None
    if isinstance(obj, np.ndarray):
        return _json_safe(obj.tolist())
    if isinstance(obj, torch.Tensor):
        return _json_safe(obj.detach().cpu().tolist())
    return obj


def image_seed(seed: int, index: int, salt: str = "") -> int:
    """A 63-bit seed for image `index` under run seed `seed` (and a purpose `salt`): the same
    on any torchrun rank and in any batch, so per-image randomness never depends on either."""
    digest = hashlib.blake2b(f"{int(seed)}:{int(index)}:{salt}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & (2**63 - 1)


def seed_everything(seed: int) -> torch.Generator:
    """Seed python, numpy and torch; return a torch Generator seeded the same way."""
    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)
    return torch.Generator().manual_seed(seed)


def _silent(_: str) -> None:
    pass


def rank_output(
    dist: Any, progress: bool, echo: Callable[[str], None] | None
) -> tuple[bool, bool, Callable[[str], None] | None]:
    """(is this the writing rank, its progress flag, its echo): under torchrun only rank 0
    shows progress and prints; the other ranks stay silent."""
    main = dist is None or dist.is_main
    return (main, progress, echo) if main else (False, False, _silent)


def pick_device(device: str = "auto") -> torch.device:
    """'auto' → cuda when present, else cpu; anything else must name a device that exists here."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError):
        raise HistoshieldError(
            f"unknown device {device!r}: use auto, cpu, cuda or cuda:N"
        ) from None
    if dev.type == "cuda":
        n = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if n == 0 or (dev.index is not None and dev.index >= n):
            raise HistoshieldError(
                f"device {device!r} is not available here ({n} CUDA device(s)); "
                "use --device auto or cpu"
            )
    return dev


def _git_commit() -> str | None:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"],
            capture_output=True,
            text=True,
            timeout=5,
            cwd=Path(__file__).resolve().parent,
        )
        return out.stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def environment(device: torch.device | str | None = None) -> dict[str, Any]:
    """Versions, device, threads and git commit: written as env.json next to every run."""
    import histoshield

    info: dict[str, Any] = {
        "histoshield": histoshield.__version__,
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "torch": torch.__version__,
        "numpy": np.__version__,
        "cuda_available": torch.cuda.is_available(),
        "device": str(device) if device is not None else str(pick_device()),
        "torch_threads": torch.get_num_threads(),
        "cpu_count": os.cpu_count(),
        "git_commit": _git_commit(),
        "argv": sys.argv,
        "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    # Installed-package metadata, not imports: importing these costs seconds per run.
    from importlib.metadata import PackageNotFoundError, version

    dists = {
        "torchvision": "torchvision",
        "timm": "timm",
        "torchxrayvision": "torchxrayvision",
        "torchattacks": "torchattacks",
        "sklearn": "scikit-learn",
        "PIL": "pillow",
    }
    for mod, dist in dists.items():
        try:
            info[mod] = version(dist)
        except PackageNotFoundError:  # optional packages: record absence, never fail a run
            info[mod] = None
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    return info
