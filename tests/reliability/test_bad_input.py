"""Bad values and bad files of issue 9: each is one `error:` line and exit 2, found before any
image is decoded or model trained; folders and bad files in `predict` work as documented."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import yaml

from tests.helpers_cli import run_cli
from tests.reliability.conftest import assert_one_error


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    import torch

    from histoshield import models

    t = tmp_path_factory.mktemp("bad-input")
    (t / "empty.yaml").write_text("# nothing here\n")
    (t / "dup.yaml").write_text("epochs: 1\nlr: 0.01\nepochs: 5\n")
    (t / "dup-nested.yaml").write_text(
        "seed: 0\ntrain:\n  epochs: 1\n  model: smallcnn\n  epochs: 2\n"
    )
    torch.manual_seed(0)
    m = models.create("smallcnn", image_size=32)
    models.save_checkpoint(t / "small.pt", m)
    payload = models.read_checkpoint(t / "small.pt")
    payload["name"] = "resnet18"  # a checkpoint claiming another architecture
    torch.save(payload, t / "wrong-arch.pt")
    data = (t / "small.pt").read_bytes()
    (t / "truncated.pt").write_bytes(data[: len(data) // 3])
    return {"t": t}


def _fmt(argv: list[str], **kw: object) -> list[str]:
    return [a.format(**kw) for a in argv]


# (argv, words the one error line must contain); {t} = fixture folder, {ckpt} = trained best.pt
CASES = {
    "attack-eps-above-1": (["attack", "-c", "{ckpt}", "--eps", "2"], ["did you mean 2/255?"]),
    "attack-eps-list-above-1": (["attack", "-c", "{ckpt}", "--eps", "0,8"], ["8/255"]),
    "attack-eps-underscore": (["attack", "-c", "{ckpt}", "--eps", "1_0"], ["'1_0'"]),
    "attack-transfer-to-missing": (
        ["attack", "-c", "{ckpt}", "--eps", "0,2/255", "--transfer-to", "{t}/none.pt"],
        ["{t}/none.pt"],
    ),
    "certify-sigma-huge": (["certify", "-c", "{ckpt}", "--sigma", "1e6"], ["--sigma", "(0, 1]"]),
    "certify-sigma-nan": (["certify", "-c", "{ckpt}", "--sigma", "nan"], ["--sigma"]),
    "config-empty": (["train", "--config", "{t}/empty.yaml"], ["{t}/empty.yaml", "empty"]),
    "config-duplicate-key": (
        ["train", "--config", "{t}/dup.yaml"],
        ["{t}/dup.yaml", "duplicate key 'epochs'"],
    ),
    "study-config-duplicate-key": (
        ["study", "--config", "{t}/dup-nested.yaml", "--out", "{t}/s"],
        ["duplicate key 'epochs'"],
    ),
    "split-val-0-test-0": (
        [
            "data",
            "split",
            "synthetic:n=40,size=32",
            "--out",
            "{t}/s.csv",
            "--val",
            "0",
            "--test",
            "0",
        ],
        ["--val 0 --test 0"],
    ),  # fmt: skip
    "checkpoint-wrong-architecture": (
        ["evaluate", "-c", "{t}/wrong-arch.pt"],
        ["does not match model 'resnet18'", "missing weights", "unexpected weights"],
    ),
    "checkpoint-truncated-plain-words": (["evaluate", "-c", "{t}/truncated.pt"], ["truncated"]),
    "predict-empty-folder": (["predict", "-c", "{ckpt}", "{t}"], ["no image files"]),
}


@pytest.mark.parametrize("case", list(CASES))
def test_bad_input_is_one_line_before_any_work(
    case: str, files, trained: Path, no_decoding, capsys: pytest.CaptureFixture
) -> None:
    argv, expect = CASES[case]
    kw = {"t": files["t"], "ckpt": trained / "best.pt"}
    code, out, err = run_cli(capsys, *_fmt(argv, **kw))
    line = assert_one_error(code, out, err, *_fmt(expect, **kw))
    assert len(line) < 500, line  # summarised, not kilobytes of key names
    for internal in ("PytorchStreamReader", "zip archive", "weights_only", "enforce fail"):
        assert internal not in line


STUDY_TYPOS = {
    "curve_attacks": ("curve_attacks", ["fgsmm"], "unknown attack 'fgsmm'"),
    "attack-parameter": ("curve_attacks", ["pgd:stepz=3"], "stepz"),
    "extra_attacks": ("extra_attacks", ["square:queries=5"], "queries"),
    "table3_attack": ("table3_attack", "bim:steps=0", "steps"),
    "extra_defenses": ("extra_defenses", ["mixup"], "mixup"),
    "defense-parameter": ("extra_defenses", ["pgd-at:eps=lots"], "lots"),
    "eps-in-spec": ("curve_attacks", ["pgd:eps=8/255"], "eps"),
}


@pytest.mark.parametrize("case", list(STUDY_TYPOS))
def test_study_config_typos_are_found_before_the_first_stage(
    case: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    import histoshield.study.engine as E

    key, value, words = STUDY_TYPOS[case]
    cfg = {"data": "synthetic:n=48,size=32", "train": {"image_size": 32, "epochs": 1}, key: value}
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(cfg))

    def no_stage(ctx):
        raise AssertionError("a stage ran before the config was checked")

    monkeypatch.setattr(E, "stage_split", no_stage)
    code, out, err = run_cli(capsys, "study", "-c", str(tmp_path / "c.yaml"), "--out",
                             str(tmp_path / "run"), "-q")  # fmt: skip
    assert_one_error(code, out, err, key, words)
    assert not (tmp_path / "run").exists()  # nothing written


def test_predict_a_folder_and_skip_bad_files(
    trained: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    import json

    from histoshield.data import read_split

    images = [r.path for r in read_split(trained / "split.csv").records[:3]]
    folder = tmp_path / "imgs"
    (folder / "sub").mkdir(parents=True)
    for i, p in enumerate(images):
        shutil.copy(p, folder / ("sub" if i else "") / f"img{i}.png")
    code, out, err = run_cli(capsys, "predict", "-c", str(trained / "best.pt"), str(folder))
    assert code == 0, err
    assert sorted(ln.split("\t")[0] for ln in out.splitlines()) == sorted(
        str(p) for p in folder.rglob("*.png")
    )
    (folder / "broken.png").write_bytes(b"\x89PNG not really")
    code, out, err = run_cli(capsys, "predict", "-c", str(trained / "best.pt"), str(folder))
    assert_one_error(code, out, err, "broken.png")
    code, out, err = run_cli(capsys, "predict", "-c", str(trained / "best.pt"), str(folder),
                             str(tmp_path / "gone.png"), "--skip-bad", "--json")  # fmt: skip
    assert code == 0, err
    assert len(json.loads(out)) == 3
    assert "broken.png" in err and "gone.png" in err and err.count("warning: skipped") == 2
