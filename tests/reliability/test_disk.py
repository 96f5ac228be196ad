"""Write failures: a full disk, a read-only folder or file system, an --out or cache that is a
file. Each is one line and exit 2, found before computing where it can be, and loses nothing
already computed. Real tmpfs mounts where allowed (skipped otherwise), patched calls always."""

from __future__ import annotations

import errno
import json
import os
from pathlib import Path

import pytest

from tests.helpers_cli import run_cli
from tests.reliability.conftest import TRAIN_ARGS, assert_one_error


def _commands(ckpt: Path, out: Path) -> dict[str, list[str]]:
    return {
        "train": ["train", *TRAIN_ARGS, "--epochs", "1", "--out", str(out)],
        "study": ["study", "-c", "cpu", "--out", str(out), "-q"],
        "attack": ["attack", "-c", str(ckpt), "--eps", "0,2/255", "--out", str(out)],
        "certify": ["certify", "-c", str(ckpt), "--n0", "4", "--n", "8", "--out", str(out)],
        "data-synth": ["data", "synth", "--out", str(out), "--n", "40", "--size", "32"],
    }


COMMANDS = ["train", "study", "attack", "certify", "data-synth"]


@pytest.mark.parametrize("command", COMMANDS)
def test_out_that_is_a_file(
    command: str, trained: Path, tmp_path: Path, no_decoding, capsys: pytest.CaptureFixture
) -> None:
    out = tmp_path / "note.txt"
    out.write_text("not a folder")
    code, o, e = run_cli(capsys, *_commands(trained / "best.pt", out)[command])
    assert_one_error(code, o, e, str(out))
    assert out.read_text() == "not a folder"


@pytest.mark.parametrize("command", COMMANDS)
def test_read_only_file_system_before_any_work(
    command: str, trained: Path, tmpfs, no_decoding, capsys: pytest.CaptureFixture
) -> None:
    out = tmpfs(ro=True) / "run"
    code, o, e = run_cli(capsys, *_commands(trained / "best.pt", out)[command])
    assert_one_error(code, o, e, str(out), "read-only file system")


@pytest.mark.parametrize("command", ["train", "attack", "certify"])
def test_read_only_folder_before_any_work(
    command: str,
    trained: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    no_decoding,
    capsys: pytest.CaptureFixture,
) -> None:
    """Where no tmpfs can be mounted: the lock file cannot be created (EACCES, as non-root)."""
    from histoshield import runfolder

    out = tmp_path / "ro" / "run"
    real_open = os.open

    def denied(path, *args, **kwargs):
        if str(path).startswith(str(tmp_path / "ro")):
            raise PermissionError(errno.EACCES, "Permission denied", str(path))
        return real_open(path, *args, **kwargs)

    monkeypatch.setattr(runfolder.os, "open", denied)
    code, o, e = run_cli(capsys, *_commands(trained / "best.pt", out)[command])
    assert_one_error(code, o, e, str(out), "permission denied")


def test_full_disk_during_training_is_one_line_and_leaves_no_temp_files(
    tmpfs, capsys: pytest.CaptureFixture
) -> None:
    out = tmpfs(size="256k") / "run"  # room for config/split, not for a 1 MB checkpoint
    code, o, e = run_cli(capsys, "train", *TRAIN_ARGS, "--epochs", "1", "--out", str(out))
    assert_one_error(code, o, e, "no space left")
    assert not list(out.glob(".*.tmp"))


def test_full_disk_patched_replace(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    """The same without a mount: os.replace of a checkpoint fails with ENOSPC."""
    from histoshield import runtime

    real = os.replace

    def full(src, dst):
        if str(dst).endswith(".pt"):
            raise OSError(errno.ENOSPC, "No space left on device", str(dst))
        return real(src, dst)

    monkeypatch.setattr(runtime.os, "replace", full)
    out = tmp_path / "run"
    code, o, e = run_cli(capsys, "train", *TRAIN_ARGS, "--epochs", "1", "--out", str(out))
    assert_one_error(code, o, e, str(out / "best.pt"), "no space left")
    assert not list(out.glob(".*.tmp"))


def test_data_synth_on_a_full_disk_removes_its_partial_folder(
    tmpfs, capsys: pytest.CaptureFixture
) -> None:
    root = tmpfs(size="64k")
    out = root / "tiles"
    code, o, e = run_cli(capsys, "data", "synth", "--out", str(out), "--n", "200", "--size", "64")
    assert_one_error(code, o, e, str(out), "no space left")
    assert not out.exists()


def test_data_synth_partial_folder_removed_patched(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    from PIL import Image

    real_save = Image.Image.save
    calls = {"n": 0}

    def save(self, fp, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] > 5:
            raise OSError(errno.ENOSPC, "No space left on device", str(fp))
        return real_save(self, fp, *args, **kwargs)

    monkeypatch.setattr(Image.Image, "save", save)
    out = tmp_path / "tiles"
    code, o, e = run_cli(capsys, "data", "synth", "--out", str(out), "--n", "40", "--size", "32")
    assert_one_error(code, o, e, "no space left")
    assert not out.exists()


def test_cache_that_is_a_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    cache = tmp_path / "cache"
    cache.write_text("oops")
    monkeypatch.setenv("HISTOSHIELD_CACHE", str(cache))
    out = tmp_path / "run"
    code, o, e = run_cli(capsys, "train", *TRAIN_ARGS, "--epochs", "1", "--out", str(out))
    assert_one_error(code, o, e, str(cache), "HISTOSHIELD_CACHE")


def test_attack_writes_its_numbers_before_its_figure(
    trained: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    from histoshield.report import attack as attack_figures

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device", str(tmp_path / "a/robustness.png"))

    monkeypatch.setattr(attack_figures, "plot_curves", full)
    out = tmp_path / "a"
    code, o, e = run_cli(capsys, "attack", "-c", str(trained / "best.pt"), "--eps", "0,2/255",
                         "--out", str(out), "--json")  # fmt: skip
    assert_one_error(code, o, e, "cannot write", "no space left", "robustness.png")
    rows = json.loads((out / "results.json").read_text())["results"]
    assert [r["eps"] for r in rows] == [0, 2 / 255] and all("adv_correct" in r for r in rows)
