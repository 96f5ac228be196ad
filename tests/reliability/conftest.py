"""Shared pieces of the fault-injection suite: a tiny finished training run, a malicious
checkpoint, tmpfs mounts (skipped where mounting is not allowed) and the one-line-error check."""

from __future__ import annotations

import builtins
import os
import shutil
import subprocess
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
TRAIN_ARGS = ["--data", "synthetic:n=96,size=32,seed=2", "--image-size", "32", "--batch-size",
              "16", "--seed", "1", "--quiet", "--device", "cpu"]  # fmt: skip


def assert_one_error(code: int, out: str, err: str, *expect: str) -> str:
    """Exit 2, no traceback, exactly one `error: ...` line on stderr containing `expect`."""
    lines = [ln for ln in err.splitlines() if ln.strip() and not ln.startswith("warning: ")]
    assert code == 2, (code, out, err)
    assert "Traceback" not in out + err, err
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    for e in expect:
        assert e in lines[0], (e, lines[0])
    return lines[0]


class _Evil:
    """Unpickling this creates a marker file: no loader may ever run it."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (builtins.open, (str(self.marker), "w"))


@pytest.fixture(scope="session")
def trained(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A finished 1-epoch training run (config.yaml, env.json, split.csv, best/last.pt...)."""
    from histoshield.config import TrainConfig
    from histoshield.training import train

    base = tmp_path_factory.getbasetemp()
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("HISTOSHIELD_CACHE", str(base / "hs-cache"))
        run = tmp_path_factory.mktemp("trained") / "run"
        cfg = TrainConfig(data="synthetic:n=96,size=32,seed=2", image_size=32, epochs=1,
                          batch_size=16, seed=1, device="cpu")  # fmt: skip
        train(cfg, run, progress=False)
    return run


@pytest.fixture
def run_copy(trained: Path, tmp_path: Path) -> Path:
    """A private copy of the trained run, free to damage."""
    dst = tmp_path / "run"
    shutil.copytree(trained, dst)
    return dst


@pytest.fixture(scope="session")
def evil(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A checkpoint whose unpickling would write `marker` (it must never appear)."""
    import torch

    t = tmp_path_factory.mktemp("evil")
    marker = t / "pwned"
    torch.save({"model": _Evil(marker)}, t / "evil.pt")
    return {"pt": t / "evil.pt", "marker": marker}


@pytest.fixture
def tmpfs(tmp_path: Path) -> Iterator[Callable[..., Path]]:
    """`mount(size="256k", ro=False)` -> a fresh tmpfs; the test skips where mount is refused."""
    mounted: list[Path] = []

    def mount(size: str = "256k", ro: bool = False) -> Path:
        point = tmp_path / f"mnt-{uuid.uuid4().hex[:6]}"
        point.mkdir()
        opts = f"size={size}" + (",ro" if ro else "")
        res = subprocess.run(["mount", "-t", "tmpfs", "-o", opts, "tmpfs", str(point)],
                             capture_output=True, text=True)  # fmt: skip
        if res.returncode != 0:
            pytest.skip(f"cannot mount a tmpfs here ({res.stderr.strip() or 'not root'})")
        mounted.append(point)
        return point

    yield mount
    for point in mounted:
        subprocess.run(["umount", "-l", str(point)], capture_output=True)


@pytest.fixture
def no_decoding(monkeypatch: pytest.MonkeyPatch) -> None:
    """Fail the test loudly if any image is decoded (the check must come before computing)."""
    import histoshield.data
    import histoshield.data.arrays

    def refuse(*args, **kwargs):
        raise AssertionError("images were decoded before the check")

    monkeypatch.setattr(histoshield.data.arrays, "load_arrays", refuse)
    monkeypatch.setattr(histoshield.data, "load_arrays", refuse)


def subprocess_env() -> dict[str, str]:
    """Environment for `python -m histoshield` children: this checkout, one thread."""
    return {**os.environ, "PYTHONPATH": str(REPO / "src"), "OMP_NUM_THREADS": "1"}
