"""Malicious pickles through every loader: refused in one line, never executed."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import yaml

from tests.helpers_cli import run_cli
from tests.reliability.conftest import assert_one_error

# {evil} = the malicious checkpoint, {ckpt} = a good one, {run} = a damaged copy of a run
ENTRY_POINTS = {
    "evaluate": ["evaluate", "-c", "{evil}", "--split", "{run}/split.csv"],
    "predict": ["predict", "-c", "{evil}", "{image}"],
    "attack": ["attack", "-c", "{evil}", "--split", "{run}/split.csv", "--eps", "0,2/255"],
    "attack-transfer-to": ["attack", "-c", "{ckpt}", "--eps", "0,2/255", "--transfer-to", "{evil}"],
    "certify": ["certify", "-c", "{evil}", "--split", "{run}/split.csv", "--n0", "4", "--n", "8"],
    "train-weights": [
        "train",
        "--data",
        "synthetic:n=96,size=32",
        "--image-size",
        "32",
        "--weights",
        "{evil}",
        "--out",
        "{tmp}/w",
    ],  # fmt: skip
    "train-resume": ["train", "{run}", "--resume", "-q"],  # last.pt replaced by the payload
}


@pytest.mark.parametrize("entry", list(ENTRY_POINTS))
def test_malicious_checkpoint_is_refused_everywhere(
    entry: str, evil, run_copy: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    from histoshield.data import read_split

    good = tmp_path / "good.pt"
    shutil.copy(run_copy / "best.pt", good)
    shutil.copy(evil["pt"], run_copy / "last.pt")
    image = read_split(run_copy / "split.csv").records[0].path
    kw = {"evil": evil["pt"], "ckpt": good, "run": run_copy, "image": image, "tmp": tmp_path}
    code, o, e = run_cli(capsys, *[a.format(**kw) for a in ENTRY_POINTS[entry]])
    assert_one_error(code, o, e, "refusing", "unpickling code (")
    assert not evil["marker"].exists()


@pytest.mark.parametrize("which", ["last.pt", "best.pt"])
def test_malicious_checkpoint_in_a_study_being_resumed(
    which: str, evil, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    """A study stopped after its split; a payload planted as a model's last.pt (training
    resumes from it) or as finished best.pt + results.json (the clean stage loads it)."""
    import histoshield.study.engine as E

    cfg = {"data": "synthetic:n=96,size=32,seed=1", "seed": 0,
           "train": {"image_size": 32, "epochs": 1, "batch_size": 16}, "curve_attacks": ["fgsm"],
           "transfer": False, "sanity": False, "certify": {"enabled": False}}  # fmt: skip
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(cfg))
    out = tmp_path / "study"

    def stop(ctx, *args):
        raise KeyboardInterrupt

    with monkeypatch.context() as m:
        m.setattr(E, "stage_train", stop)
        code, o, e = run_cli(capsys, "study", "-c", str(tmp_path / "c.yaml"), "--out", str(out),
                             "-q")  # fmt: skip
    assert code == 130 and json.loads((out / "state.json").read_text())["finished"] == ["split"]
    for model in ("original", "gaussian"):
        (out / model).mkdir()
        shutil.copy(evil["pt"], out / model / which)
        if which == "best.pt":
            (out / model / "results.json").write_text("{}")
    code, o, e = run_cli(capsys, "study", "-c", str(tmp_path / "c.yaml"), "--out", str(out),
                         "--resume", "-q")  # fmt: skip
    assert_one_error(code, o, e, "refusing", f"original/{which}")
    assert not evil["marker"].exists()
