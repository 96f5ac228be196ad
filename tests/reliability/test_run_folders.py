"""Nothing mixed: concurrent writers into one --out, commands pointed at another kind of run."""

from __future__ import annotations

import hashlib
import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from tests.helpers_cli import run_cli
from tests.reliability.conftest import TRAIN_ARGS, assert_one_error, subprocess_env

LOCK = ".histoshield.lock"  # histoshield.runfolder.LOCK, spelled out so this file runs on old code
STUDY = {
    "name": "tiny",
    "seed": 0,
    "data": "synthetic:n=48,size=32,seed=1",
    "train": {"model": "smallcnn", "image_size": 32, "epochs": 50, "batch_size": 16},
    "curve_eps": [0, "4/255"],
    "curve_attacks": ["fgsm"],
    "transfer": False,
    "sanity": False,
    "certify": {"enabled": False},
}


def _digests(run: Path) -> dict[str, str]:
    return {
        p.name: hashlib.sha256(p.read_bytes()).hexdigest()
        for p in run.iterdir()
        if p.is_file() and p.name != LOCK
    }


def _start(argv: list[str], out: Path) -> subprocess.Popen:
    """`histoshield ARGV` in a child process, returned once it holds `out`'s lock."""
    cmd = [sys.executable, "-m", "histoshield", *argv]
    proc = subprocess.Popen(
        cmd, env=subprocess_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True
    )
    deadline = time.time() + 120
    while True:
        try:
            if json.loads((out / LOCK).read_text())["pid"] == proc.pid:
                return proc
        except (OSError, ValueError, KeyError):
            pass
        if proc.poll() is not None:
            pytest.fail(
                f"the first writer ended early: {proc.stderr.read() if proc.stderr else ''}"
            )
        assert time.time() < deadline, "the first writer never took the lock"
        time.sleep(0.05)


def _stop(proc: subprocess.Popen) -> None:
    proc.send_signal(signal.SIGKILL)
    proc.wait()


@pytest.mark.slow
def test_two_studies_into_one_out_the_second_fails_naming_the_first(
    tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    (tmp_path / "s0.yaml").write_text(yaml.safe_dump(STUDY))
    (tmp_path / "s1.yaml").write_text(yaml.safe_dump({**STUDY, "seed": 1}))
    out = tmp_path / "R"
    first = _start(["study", "-c", str(tmp_path / "s0.yaml"), "--out", str(out), "-q"], out)
    try:
        code, o, e = run_cli(capsys, "study", "-c", str(tmp_path / "s1.yaml"), "--out", str(out))
        assert_one_error(code, o, e, f"pid {first.pid}", "in use", str(out))
        # a training run or an attack into the same folder are refused just the same
        code, o, e = run_cli(capsys, "train", *TRAIN_ARGS, "--epochs", "1", "--out", str(out))
        assert_one_error(code, o, e, f"pid {first.pid}")
        assert yaml.safe_load((out / "config.yaml").read_text())["seed"] == 0  # not mixed
    finally:
        _stop(first)


@pytest.mark.slow
def test_two_trainings_into_one_out(
    tmp_path: Path, trained: Path, capsys: pytest.CaptureFixture
) -> None:
    out = tmp_path / "R"
    first = _start(["train", *TRAIN_ARGS, "--epochs", "200", "--out", str(out)], out)
    try:
        code, o, e = run_cli(capsys, "train", *TRAIN_ARGS, "--epochs", "1", "--out", str(out))
        assert_one_error(code, o, e, f"pid {first.pid}", "histoshield train")
        code, o, e = run_cli(capsys, "attack", "-c", str(trained / "best.pt"), "--eps", "0",
                             "--out", str(out))  # fmt: skip
        assert_one_error(code, o, e, f"pid {first.pid}")
    finally:
        _stop(first)
    # the killed holder's lock is taken over at once
    code, o, e = run_cli(capsys, "train", *TRAIN_ARGS, "--epochs", "1", "--out", str(out))
    assert code == 0, e
    assert json.loads((out / LOCK).read_text())["pid"] != first.pid


@pytest.mark.parametrize("command", ["attack", "certify", "study"])
def test_commands_refuse_a_training_run_and_leave_it_resumable(
    command: str, run_copy: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    before = _digests(run_copy)
    argv = {
        "attack": ["attack", "-c", str(run_copy / "best.pt"), "--eps", "0,2/255"],
        "certify": ["certify", "-c", str(run_copy / "best.pt"), "--n0", "4", "--n", "8"],
        "study": ["study", "-c", "cpu"],
    }[command]
    code, o, e = run_cli(capsys, *argv, "--out", str(run_copy))
    assert_one_error(code, o, e, str(run_copy), "holds a train run")
    assert _digests(run_copy) == before  # config.yaml, env.json, results.json, split.csv...
    code, o, e = run_cli(capsys, "train", str(run_copy), "--resume", "-q")
    assert code == 0, e


def test_attack_into_a_study_or_finished_attack_needs_overwrite(
    trained: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    ckpt = str(trained / "best.pt")
    out = tmp_path / "a"
    assert run_cli(capsys, "attack", "-c", ckpt, "--eps", "0", "--out", str(out))[0] == 0
    assert json.loads((out / "run.json").read_text())["kind"] == "attack"
    code, o, e = run_cli(capsys, "attack", "-c", ckpt, "--eps", "0", "--out", str(out))
    assert_one_error(code, o, e, "already holds an attack run", "--overwrite")
    assert run_cli(capsys, "attack", "-c", ckpt, "--eps", "0", "--out", str(out),
                   "--overwrite")[0] == 0  # fmt: skip
    study = tmp_path / "study"
    study.mkdir()
    (study / "state.json").write_text('{"finished": ["split"]}')  # a study made before run.json
    code, o, e = run_cli(capsys, "attack", "-c", ckpt, "--eps", "0", "--out", str(study),
                         "--overwrite")  # fmt: skip
    assert_one_error(code, o, e, "holds a study run")
