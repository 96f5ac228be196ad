"""The run-folder contract: one writer at a time (flock), one kind of run per folder."""

from __future__ import annotations

import errno
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from histoshield import runfolder
from histoshield.errors import HistoshieldError
from histoshield.runfolder import LOCK, RUN, claim, kind_of

REPO = Path(__file__).resolve().parents[1]
HOLD = (
    "import sys, time; from histoshield.runfolder import claim\n"
    "with claim(sys.argv[1], 'study'):\n"
    "    print('held', flush=True); time.sleep(60)\n"
)


def _holder(folder: Path) -> subprocess.Popen:
    """Another process that claims `folder` and sleeps (until killed)."""
    env = {**os.environ, "PYTHONPATH": str(REPO / "src")}
    proc = subprocess.Popen(
        [sys.executable, "-c", HOLD, str(folder)], env=env, stdout=subprocess.PIPE, text=True
    )
    assert proc.stdout is not None and proc.stdout.readline().strip() == "held"
    return proc


def test_second_writer_fails_at_once_naming_the_holder_and_a_dead_holder_is_taken_over(
    tmp_path: Path,
) -> None:
    out = tmp_path / "run"
    proc = _holder(out)
    try:
        t0 = time.monotonic()
        with pytest.raises(HistoshieldError) as e, claim(out, "study"):
            pass
        assert time.monotonic() - t0 < 5  # fails at once, never waits
        msg = str(e.value)
        assert f"pid {proc.pid}" in msg and "in use" in msg and "\n" not in msg
        assert "started 20" in msg  # the holder's start time
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    # kill -9 left the lock file behind: the kernel released the lock, so it is taken over
    assert (out / LOCK).is_file()
    with claim(out, "study"):
        holder = json.loads((out / LOCK).read_text())
        assert holder["pid"] == os.getpid() and holder["kind"] == "study"


def test_nested_claims_do_not_deadlock(tmp_path: Path) -> None:
    out = tmp_path / "study"
    with claim(out, "study"), claim(out, "study"), claim(out / "original", "train"):
        (out / "original" / "last.pt").write_bytes(b"x")
    assert kind_of(out) == "study" and kind_of(out / "original") == "train"


@pytest.mark.parametrize(
    ("files", "kind"),
    [
        ({"best.pt": "x", "metrics.csv": "epoch\n"}, "train"),
        ({"last.pt": "x"}, "train"),
        ({"state.json": "{}", "results.json": "{}", "certify.json": "{}"}, "study"),
        ({"results.json": json.dumps({"results": [{"attack": "fgsm"}], "sanity": []})}, "attack"),
        ({"certify.json": "{}", "certify.csv": ""}, "certify"),
        ({"notes.txt": "hello"}, None),
        ({}, None),
    ],
)
def test_folders_made_before_run_json_are_recognised(
    tmp_path: Path, files: dict[str, str], kind: str | None
) -> None:
    for name, text in files.items():
        (tmp_path / name).write_text(text)
    assert kind_of(tmp_path) == kind


def test_another_kind_is_refused_and_nothing_is_written(tmp_path: Path) -> None:
    run = tmp_path / "train"
    run.mkdir()
    for name in ("best.pt", "last.pt", "config.yaml", "results.json"):
        (run / name).write_text(name)
    before = {p.name: p.read_text() for p in run.iterdir()}
    for kind in ("attack", "study", "certify"):
        with pytest.raises(HistoshieldError, match="holds a train run"), claim(run, kind):
            pass
    after = {p.name: p.read_text() for p in run.iterdir() if p.name != LOCK}
    assert after == before and not (run / RUN).exists()


def test_finished_run_of_the_same_kind_needs_resume_or_overwrite(tmp_path: Path) -> None:
    out = tmp_path / "a"
    with claim(out, "attack"):
        (out / "results.json").write_text(json.dumps({"results": []}))
    assert json.loads((out / RUN).read_text())["kind"] == "attack"
    with pytest.raises(HistoshieldError, match="--overwrite"), claim(out, "attack"):
        pass
    with claim(out, "attack", overwrite=True):
        pass
    # an unfinished run of the same kind (no results yet) is simply started again
    with claim(tmp_path / "t", "train"):
        (tmp_path / "t" / "config.yaml").write_text("x")
    with claim(tmp_path / "t", "train"):
        pass


def test_a_claim_that_wrote_nothing_leaves_no_folder(tmp_path: Path) -> None:
    with pytest.raises(RuntimeError), claim(tmp_path / "new" / "run", "train"):
        raise RuntimeError("failed before writing")
    assert not (tmp_path / "new" / "run").exists()


@pytest.mark.parametrize(
    ("code", "words"),
    [
        (errno.EROFS, "read-only file system"),
        (errno.EACCES, "permission denied"),
        (errno.ENOSPC, "no space left"),
        (errno.ENOTDIR, "existing file"),
    ],
)
def test_unwritable_out_is_one_line_before_any_work(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, code: int, words: str
) -> None:
    real_open = os.open

    def failing_open(path, *args, **kwargs):
        if str(path).startswith(str(tmp_path)):
            raise OSError(code, os.strerror(code), str(path))
        return real_open(path, *args, **kwargs)

    monkeypatch.setattr(runfolder.os, "open", failing_open)
    ran = []
    with pytest.raises(HistoshieldError) as e, claim(tmp_path / "run", "attack"):
        ran.append(1)
    assert not ran and words in str(e.value) and str(tmp_path / "run") in str(e.value)


def test_out_that_is_a_file_is_refused(tmp_path: Path) -> None:
    (tmp_path / "f").write_text("x")
    with pytest.raises(HistoshieldError, match="existing file"), claim(tmp_path / "f", "train"):
        pass
