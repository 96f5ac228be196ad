"""Bad input on every command: one `error: ...` line naming the culprit, exit 2, no traceback.

Runs the real console entry point (`histoshield.cli.main`) in-process on tiny fixtures built
once per module, so the whole file costs one torch import and no training.
"""

from __future__ import annotations

import builtins
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tests.helpers_cli import run_cli

BH = "BreaKHis_v1/histology_slides/breast"


def _png(path: Path, value: int, mode: str = "RGB") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    arr = np.random.default_rng(value).integers(0, 256, (16, 16, 3), dtype=np.uint8)
    Image.fromarray(arr).convert(mode).save(path)
    return path


def _two_classes(root: Path, offset: int = 0) -> Path:
    for i in range(3):
        _png(root / "benign" / f"b{i}.png", offset + i)
        _png(root / "malignant" / f"m{i}.png", offset + 100 + i)
    return root


class _Evil:
    """Unpickling this would create a marker file: a checkpoint must never run it."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (builtins.open, (str(self.marker), "w"))


@pytest.fixture(scope="module")
def fx(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Every bad input of the issues, plus one good data set and checkpoint to point them at."""
    import torch

    from histoshield import models

    t = tmp_path_factory.mktemp("cli-errors")
    good = _two_classes(t / "good")
    f: dict[str, Path] = {"t": t, "good": good}
    (t / "empty").mkdir()
    f["empty"] = t / "empty"
    f["nonimage"] = _two_classes(t / "nonimage")
    (f["nonimage"] / "benign" / "notes.png").write_text("hello")
    f["zerobyte"] = _two_classes(t / "zerobyte")
    (f["zerobyte"] / "benign" / "zero.png").write_bytes(b"")
    f["truncated"] = _two_classes(t / "truncated")
    data = (good / "benign" / "b0.png").read_bytes()
    (f["truncated"] / "benign" / "cut.png").write_bytes(data[: len(data) // 2])
    f["noclass"] = _two_classes(t / "noclass")
    (f["noclass"] / "normal").mkdir()
    f["single"] = t / "single"
    for i in range(4):
        _png(f["single"] / "benign" / f"b{i}.png", i)
    f["dup"] = _two_classes(t / "dup")
    (f["dup"] / "malignant" / "copy.png").write_bytes(data)
    slide = t / "bh" / BH / "benign/SOB/adenosis/SOB_B_A_14-22549AB/100X"
    _png(slide / "SOB_M_DC-14-22549AB-100-001.png", 1)  # name says malignant, folder benign
    _png(slide / "SOB_B_A-14-22549AB-100-002.png", 2)
    other = t / "bh" / BH / "malignant/SOB/ductal_carcinoma/SOB_M_DC_14-2523/100X"
    _png(other / "SOB_M_DC-14-2523-100-001.png", 3)
    f["bh"] = t / "bh"

    header = "path,label,split,patient,subtype,magnification\n"
    rows = [
        f"{p},{p.parent.name},{s},,,\n"
        for p, s in zip(sorted(good.rglob("*.png")), ["train", "val", "test"] * 2, strict=True)
    ]
    (t / "split_missing.csv").write_text(header + "".join(rows) + "nowhere.png,benign,test,,,\n")
    (t / "split_badname.csv").write_text(header + "".join(rows).replace(",val,", ",validation,"))
    (t / "split_nolabel.csv").write_text("path,split\n" + f"{good}/benign/b0.png,train\n")
    (t / "split_extra.csv").write_text(
        header.replace("\n", ",notes\n") + "".join(r.replace("\n", ",x\n") for r in rows)
    )
    (t / "empty.csv").write_text("")
    (t / "binary.yaml").write_bytes(b"\xff\xfe\x00\x01")
    (t / "badyaml.yaml").write_text("epochs: [1\n")
    (t / "unknown.yaml").write_text("epochs: 1\nlearning_rate: 0.1\n")
    (t / "list.yaml").write_text("- 1\n- 2\n")
    (t / "note.txt").write_text("not a run")

    torch.manual_seed(0)
    model = models.create("smallcnn", image_size=32)
    models.save_checkpoint(t / "model.pt", model)
    ckpt = (t / "model.pt").read_bytes()
    (t / "truncated.pt").write_bytes(ckpt[: len(ckpt) // 2])
    torch.save(model.state_dict(), t / "state_dict.pt")
    f["marker"] = t / "pwned"
    torch.save({"model": _Evil(f["marker"])}, t / "evil.pt")
    return f


# (argv with {placeholders} filled from the fixture, text the one error line must contain)
CASES = {
    # data: missing, empty and bad files; a command that needs clean data stops on each
    "missing-path": (["data", "inspect", "{t}/nope"], "{t}/nope"),
    "empty-path": (["data", "inspect", ""], "data path is empty"),
    "empty-folder": (["data", "inspect", "{empty}"], "no images found in {empty}"),
    "non-image": (["data", "split", "{nonimage}", "--out", "{t}/s.csv"], "notes.png"),
    "zero-byte": (["data", "split", "{zerobyte}", "--out", "{t}/s.csv"], "zero.png"),
    "truncated-image": (["data", "split", "{truncated}", "--out", "{t}/s.csv"], "cut.png"),
    "class-without-images": (["data", "split", "{noclass}", "--out", "{t}/s.csv"], "normal"),
    "single-class": (["data", "split", "{single}", "--out", "{t}/s.csv"], "only one class"),
    "same-sha256-two-classes": (["data", "split", "{dup}", "--out", "{t}/s.csv"], "copy.png"),
    "breakhis-name-vs-folder": (
        ["data", "split", "{bh}", "--out", "{t}/s.csv"],
        "SOB_M_DC-14-22549AB-100-001.png",
    ),
    "split-csv-missing-file": (
        ["data", "split", "{t}/split_missing.csv", "--out", "{t}/s.csv"],
        "nowhere.png",
    ),
    "split-csv-unknown-split": (
        ["evaluate", "-c", "{t}/model.pt", "--split", "{t}/split_badname.csv"],
        "validation",
    ),
    "split-csv-without-label": (["data", "inspect", "{t}/split_nolabel.csv"], "label"),
    "empty-csv": (["data", "inspect", "{t}/empty.csv"], "{t}/empty.csv"),
    "bad-magnification": (["data", "inspect", "{good}", "-m", "forty"], "forty"),
    "split-out-is-folder": (["data", "split", "{good}", "--out", "{empty}"], "{empty}"),
    "split-by-unknown": (
        ["data", "split", "{good}", "--out", "{t}/s.csv", "--by", "slide"],
        "slide",
    ),
    "split-fraction": (["data", "split", "{good}", "--out", "{t}/s.csv", "--val", "1.5"], "1.5"),
    "synth-too-few": (["data", "synth", "--out", "{t}/syn", "--n", "1"], "--n"),
    "synth-into-data": (["data", "synth", "--out", "{good}"], "{good}"),
    # checkpoints and weights: never unpickle, never a traceback
    "checkpoint-missing": (["evaluate", "-c", "{t}/none.pt", "--data", "{good}"], "{t}/none.pt"),
    "checkpoint-not-torch": (
        ["evaluate", "-c", "{t}/note.txt", "--data", "{good}"],
        "{t}/note.txt",
    ),
    "checkpoint-truncated": (["evaluate", "-c", "{t}/truncated.pt", "--data", "{good}"], "corrupt"),
    "checkpoint-malicious": (["evaluate", "-c", "{t}/evil.pt", "--data", "{good}"], "refusing"),
    "checkpoint-state-dict": (
        ["predict", "-c", "{t}/state_dict.pt", "{good}/benign/b0.png"],
        "not a histoshield checkpoint",
    ),
    "weights-malicious": (
        [
            "train",
            "--data",
            "{good}",
            "--model",
            "smallcnn",
            "--weights",
            "{t}/evil.pt",
            "--out",
            "{t}/r1",
        ],
        "refusing",
    ),
    # evaluate / predict options
    "only-unknown-class": (
        ["evaluate", "-c", "{t}/model.pt", "--data", "{good}", "--only", "normal"],
        "normal",
    ),
    "purify-unknown": (
        ["evaluate", "-c", "{t}/model.pt", "--data", "{good}", "--purify", "blur:k=3"],
        "blur",
    ),
    "purify-bad-value": (
        ["evaluate", "-c", "{t}/model.pt", "--data", "{good}", "--purify", "jpeg:quality=500"],
        "500",
    ),
    "evaluate-split-missing": (
        ["evaluate", "-c", "{t}/model.pt", "--split", "{t}/no.csv"],
        "{t}/no.csv",
    ),
    "predict-non-image": (
        ["predict", "-c", "{t}/model.pt", "{nonimage}/benign/notes.png"],
        "notes.png",
    ),
    "predict-missing-image": (["predict", "-c", "{t}/model.pt", "{t}/no.png"], "{t}/no.png"),
    "subset-unknown": (
        ["evaluate", "-c", "{t}/model.pt", "--data", "{good}", "--subset", "tset"],
        "tset",
    ),
    "device-unknown": (
        ["evaluate", "-c", "{t}/model.pt", "--data", "{good}", "--device", "tpu9"],
        "tpu9",
    ),
    # train: models, sizes, defenses, configs, run folders
    "model-unknown": (
        ["train", "--data", "{good}", "--model", "vgg99", "--out", "{t}/r2"],
        "vgg99",
    ),
    "image-size-small": (
        ["train", "--data", "{good}", "--image-size", "16", "--out", "{t}/r3"],
        "image_size",
    ),
    "defense-unknown": (
        ["train", "--data", "{good}", "--defense", "mixup", "--out", "{t}/r4"],
        "mixup",
    ),
    "defense-bad-value": (
        ["train", "--data", "{good}", "--defense", "gaussian:sigma=-1", "--out", "{t}/r5"],
        "sigma",
    ),
    "defense-bad-eps": (
        ["train", "--data", "{good}", "--defense", "pgd-at:eps=lots", "--out", "{t}/r6"],
        "lots",
    ),
    "resume-missing-run": (["train", "--resume", "{t}/never"], "{t}/never"),
    "out-is-a-file": (["train", "--data", "{good}", "--out", "{t}/note.txt"], "{t}/note.txt"),
    "train-split-missing": (["train", "--split", "{t}/no.csv", "--out", "{t}/r7"], "{t}/no.csv"),
    "config-missing": (["train", "--config", "{t}/no.yaml"], "{t}/no.yaml"),
    "config-binary": (["train", "--config", "{t}/binary.yaml"], "{t}/binary.yaml"),
    "config-not-yaml": (["train", "--config", "{t}/badyaml.yaml"], "{t}/badyaml.yaml"),
    "config-unknown-key": (["train", "--config", "{t}/unknown.yaml"], "learning_rate"),
    "config-not-mapping": (["train", "--config", "{t}/list.yaml"], "{t}/list.yaml"),
    # certify: settings checked before any work
    "certify-sigma": (
        ["certify", "-c", "{t}/model.pt", "--data", "{good}", "--sigma", "-1"],
        "sigma",
    ),
    "certify-batch-zero": (
        ["certify", "-c", "{t}/model.pt", "--data", "{good}", "--batch", "0"],
        "batch",
    ),
    "certify-out-is-file": (
        ["certify", "-c", "{t}/model.pt", "--data", "{good}", "--out", "{t}/note.txt"],
        "{t}/note.txt",
    ),
    "attack-negative-eps": (
        ["attack", "-c", "{t}/model.pt", "--data", "{good}", "--eps", "-1/255"],
        "-1/255",
    ),
    # usage errors from the parser are one line too
    "unknown-option": (["data", "inspect", "{good}", "--colour"], "--colour"),
    "not-an-integer": (["data", "split", "{good}", "--out", "{t}/s.csv", "--seed", "x"], "--seed"),
    "unknown-command": (["fit"], "fit"),
    "missing-argument": (["predict", "-c", "{t}/model.pt"], "images"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_bad_input_is_one_error_line_and_exit_2(
    case: str, fx: dict[str, Path], capsys: pytest.CaptureFixture
) -> None:
    argv, expect = CASES[case]
    code, out, err = run_cli(capsys, *[a.format(**fx) for a in argv])
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert code == 2, (out, err)
    assert "Traceback" not in out + err
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    assert expect.format(**fx) in lines[0]
    assert not fx["marker"].exists()  # the malicious checkpoint was never unpickled


def test_split_csv_extra_columns_are_ignored(
    fx: dict[str, Path], capsys: pytest.CaptureFixture
) -> None:
    import json

    code, out, err = run_cli(capsys, "data", "inspect", str(fx["t"] / "split_extra.csv"), "--json")
    assert code == 0, err
    info = json.loads(out)
    assert info["classes"] == {"benign": 3, "malignant": 3} and info["problems"] == []


def test_attack_batch_size_zero_is_refused(
    fx: dict[str, Path], capsys: pytest.CaptureFixture
) -> None:
    argv = [
        "attack",
        "-c",
        "{t}/model.pt",
        "--data",
        "{good}",
        "--subset",
        "all",
        "--eps",
        "0.01",
        "--batch-size",
        "0",
    ]
    code, out, err = run_cli(capsys, *[a.format(**fx) for a in argv])
    assert code == 2 and err.startswith("error: ") and "--batch-size" in err


def test_ctrl_c_is_a_clean_message(
    fx: dict[str, Path], monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    import histoshield.data

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(histoshield.data, "synthesize", interrupted)
    code, out, err = run_cli(capsys, "data", "synth", "--out", str(fx["t"] / "s2"))
    assert code == 130
    assert err.startswith("error: interrupted") and len(err.strip().splitlines()) == 1
    assert "Traceback" not in out + err


def test_help_needs_no_torch() -> None:
    """`histoshield --help` must stay fast: the CLI module imports no heavy library."""
    code = (
        "import sys, histoshield.cli; "
        "heavy = [m for m in ('torch', 'torchvision', 'timm', 'sklearn', 'matplotlib') "
        "if m in sys.modules]; print(heavy)"
    )
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert res.stdout.strip() == "[]"
