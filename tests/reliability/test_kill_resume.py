"""Nothing lost: kill -9 at random points of `train` and `study`, then --resume, gives the
numbers of an uninterrupted run; a study resumes with a config changed only in stages it has
not run yet, and refuses a change that a finished stage used.

The kill points are random (`HISTOSHIELD_FAULT_SEED` fixes them; failures print the seed).
"""

from __future__ import annotations

import csv
import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

import histoshield.study as S
import histoshield.study.engine as E
from histoshield.errors import HistoshieldError
from tests.helpers_cli import run_cli
from tests.reliability.conftest import TRAIN_ARGS, subprocess_env
from tests.test_study import _stable

SEED = int(os.environ.get("HISTOSHIELD_FAULT_SEED", time.time_ns() % 10_000))
STUDY = {
    "name": "kill",
    "seed": 0,
    "data": "synthetic:n=96,size=32,seed=1",
    "train": {"model": "smallcnn", "image_size": 32, "epochs": 2, "batch_size": 16},
    "curve_eps": [0, "4/255"],
    "curve_attacks": ["fgsm"],
    "extra_attacks": ["pgd:steps=2"],
    "transfer": True,
    "sanity": False,
    "certify": {"n0": 4, "n": 16, "limit": 4},
}


def _kill_when(argv: list[str], ready, delay: float) -> None:
    """Run `histoshield ARGV` in a child; once `ready()` holds, wait `delay` s and kill -9."""
    proc = subprocess.Popen([sys.executable, "-m", "histoshield", *argv], env=subprocess_env(),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
    try:
        deadline = time.time() + 180
        while not ready():
            assert proc.poll() is None, f"the run ended before the kill point (seed {SEED})"
            assert time.time() < deadline
            time.sleep(0.02)
        time.sleep(delay)
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.wait()


def _metrics(run: Path) -> list[dict[str, str]]:
    with open(run / "metrics.csv", newline="") as f:
        return [{k: v for k, v in r.items() if k != "seconds"} for r in csv.DictReader(f)]


@pytest.fixture(scope="module")
def train_reference(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from histoshield.cli import main

    out = tmp_path_factory.mktemp("train-ref") / "run"
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("HISTOSHIELD_CACHE", str(tmp_path_factory.getbasetemp() / "hs-cache"))
        with pytest.raises(SystemExit) as e:
            main(["train", *TRAIN_ARGS, "--epochs", "3", "--out", str(out)])
    assert e.value.code in (0, None)
    return out


@pytest.mark.slow
@pytest.mark.parametrize("point", ["first-checkpoint", "random"])
def test_train_killed_then_resumed_equals_uninterrupted(
    point: str, train_reference: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    from histoshield import models

    out = tmp_path / "run"
    delay = 0.0 if point == "first-checkpoint" else random.Random(SEED).uniform(0.0, 1.5)
    argv = ["train", *TRAIN_ARGS, "--epochs", "3", "--out", str(out)]
    _kill_when(argv, lambda: (out / "last.pt").is_file(), delay)
    code, o, e = run_cli(capsys, "train", str(out), "--resume", "-q")
    assert code == 0, (e, SEED, delay)
    a = models.read_checkpoint(train_reference / "last.pt")["state_dict"]
    b = models.read_checkpoint(out / "last.pt")["state_dict"]
    assert all(bool((a[k] == b[k]).all()) for k in a), (SEED, delay)
    assert _metrics(out) == _metrics(train_reference), (SEED, delay)


def _study(tmp: Path, **changes) -> Path:
    p = tmp / f"study-{len(list(tmp.glob('study-*.yaml')))}.yaml"
    p.write_text(yaml.safe_dump({**STUDY, **changes}))
    return p


@pytest.fixture(scope="module")
def study_reference(tmp_path_factory: pytest.TempPathFactory) -> dict:
    tmp = tmp_path_factory.mktemp("study-ref")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("HISTOSHIELD_CACHE", str(tmp_path_factory.getbasetemp() / "hs-cache"))
        S.run_study(S.load_study_config(_study(tmp)), tmp / "run", progress=False)
    return json.loads((tmp / "run" / "results.json").read_text())


@pytest.mark.slow
def test_study_killed_after_training_then_resumed_equals_uninterrupted(
    study_reference: dict, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    out = tmp_path / "run"
    delay = random.Random(SEED).uniform(0.0, 2.0)

    def trained() -> bool:
        try:
            return "train_gaussian" in json.loads((out / "state.json").read_text())["finished"]
        except (OSError, ValueError):
            return False

    _kill_when(["study", "-c", str(_study(tmp_path)), "--out", str(out), "-q"], trained, delay)
    code, o, e = run_cli(capsys, "study", "-c", str(_study(tmp_path)), "--out", str(out),
                         "--resume", "-q")  # fmt: skip
    assert code == 0, (e, SEED, delay)
    resumed = json.loads((out / "results.json").read_text())
    assert _stable(resumed) == _stable(study_reference), (SEED, delay)


@pytest.mark.slow
def test_study_resumes_with_changes_to_stages_not_yet_run(
    study_reference: dict, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    out = tmp_path / "run"
    typo = S.load_study_config(_study(tmp_path, extra_attacks=["pgdd:steps=2"]))
    with pytest.raises(HistoshieldError, match="extra_attacks 'pgdd:steps=2'"):
        S.run_study(typo, out, progress=False)  # before anything is trained
    assert not out.exists()

    # the study stops in its curves stage (as a typo there used to stop it, hours in)
    def stop(ctx):
        raise KeyboardInterrupt

    first = S.load_study_config(_study(tmp_path, extra_attacks=[]))
    with monkeypatch.context() as m:
        m.setattr(E, "stage_curves", stop)
        with pytest.raises(KeyboardInterrupt):
            S.run_study(first, out, progress=False)
    finished = json.loads((out / "state.json").read_text())["finished"]
    assert finished == ["split", "train_original", "train_gaussian", "clean", "table3"]

    # a change a finished stage used is refused, naming the key and the stage
    for changes, key, stage in (
        ({"seed": 5}, "seed", "split"),
        ({"train": {**STUDY["train"], "epochs": 3}}, "train.epochs", "train_original"),
        ({"gaussian_sigma": 0.2}, "gaussian_sigma", "train_gaussian"),
        ({"table3_eps": "4/255"}, "table3_eps", "table3"),
        ({"extra_defenses": ["gaussian:sigma=0.05"]}, "extra_defenses.gaussian-2", "clean"),
    ):
        cfg = S.load_study_config(_study(tmp_path, **changes))
        with pytest.raises(HistoshieldError) as e:
            S.run_study(cfg, out, resume=True, progress=False)
        assert f"{key} changed" in str(e.value) and f"stage {stage!r}" in str(e.value)
    assert json.loads((out / "state.json").read_text())["finished"] == finished

    # the corrected config (extra attack added, curves not run yet) resumes and keeps the rest
    said: list[str] = []
    S.run_study(S.load_study_config(_study(tmp_path)), out, resume=True, progress=False,
                echo=said.append)  # fmt: skip
    assert any(
        "extra_attacks" in s and "kept finished stages split, train_original" in s for s in said
    ), said
    resumed = json.loads((out / "results.json").read_text())
    assert _stable(resumed) == _stable(study_reference)
