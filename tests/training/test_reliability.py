"""Issue 9 regressions for training and inference: diverged runs, NaN checkpoints, patient
leakage in split CSVs, non-UTF-8 file names and undecodable files under --skip-bad."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

from histoshield import models
from histoshield.config import TrainConfig
from histoshield.data import read_split
from histoshield.errors import HistoshieldError
from histoshield.models.checkpoint import FORMAT
from histoshield.training import loop, train
from tests.data.helpers import png_header_only, write_image
from tests.data.test_reliability import split_csv
from tests.helpers_cli import run_cli

TINY = ["--model", "smallcnn", "--image-size", "32", "--batch-size", "4", "--epochs", "1", "-q"]


def _one_line_error(code: int, err: str) -> str:
    assert code == 2, err
    assert err.startswith("error: ") and err.count("\n") == 1 and "Traceback" not in err, err
    return err


def _tree(root: Path, n: int = 6) -> Path:
    for i in range(n):
        write_image(root / "benign" / f"b{i}.png", value=i, size=16)
        write_image(root / "malignant" / f"m{i}.png", value=100 + i, size=16)
    return root


# ---- item 7: diverged training -----------------------------------------------------------------


def test_huge_lr_stops_with_one_line_and_no_nan_checkpoint(tmp_path: Path, capsys) -> None:
    data = _tree(tmp_path / "d")
    args = ["train", "--data", str(data), "--lr", "1e30", "--out", str(tmp_path / "r"), *TINY]
    code, _, err = run_cli(capsys, *args)
    assert "diverged in epoch 1" in _one_line_error(code, err) and "--lr" in err
    assert not (tmp_path / "r" / "best.pt").exists() and not (tmp_path / "r" / "last.pt").exists()


def test_infinite_lr_is_refused(tmp_path: Path, capsys) -> None:
    args = ["train", "--data", "synthetic:n=16,size=32", "--lr", "inf", *TINY]
    code, _, err = run_cli(capsys, *args, "--out", str(tmp_path / "r"))
    assert "lr" in _one_line_error(code, err)


def test_divergence_later_keeps_the_last_finite_checkpoints(tmp_path: Path, monkeypatch) -> None:
    real = loop.train_epoch

    def epoch_two_diverges(stepper, d, cfg, augment, g_perm, g_aug, epoch, show):
        out = real(stepper, d, cfg, augment, g_perm, g_aug, epoch, show)
        if epoch == 2:
            with torch.no_grad():
                next(stepper.raw.parameters()).fill_(float("nan"))
            out["loss"] = float("nan")
        return out

    monkeypatch.setattr(loop, "train_epoch", epoch_two_diverges)
    cfg = TrainConfig(
        data="synthetic:n=32,size=32", image_size=32, epochs=3, batch_size=8, device="cpu"
    )
    res = train(cfg, tmp_path / "r", progress=False)
    assert res["epochs_run"] == 1 and "diverged in epoch 2" in res["stopped"]
    for name in ("best.pt", "last.pt"):
        m = models.load_checkpoint(tmp_path / "r" / name)  # finite, so it loads
        assert m.meta["metrics"]["epoch"] == 1
    assert all(torch.isfinite(v).all() for v in m.state_dict().values() if v.is_floating_point())


def _nan_checkpoint(path: Path) -> Path:
    """A checkpoint written the way an old histoshield wrote a diverged run's best.pt."""
    model = models.create("smallcnn", image_size=32, classes=["benign", "malignant"])
    state = {k: v.clone() for k, v in model.state_dict().items()}
    first = next(k for k, v in state.items() if v.is_floating_point())
    state[first].fill_(float("nan"))
    payload = {"format": FORMAT, "state_dict": state, "name": "smallcnn", "weights": "none",
               "num_classes": 2, "classes": ["benign", "malignant"], "image_size": 32,
               "stain_norm": "none", "config": None, "metrics": None, "extra": None}  # fmt: skip
    torch.save(payload, path)
    return path


def test_nan_weights_are_never_saved_or_loaded(tmp_path: Path, capsys) -> None:
    model = models.create("smallcnn", image_size=32)
    with torch.no_grad():
        next(model.parameters())[0] = float("inf")
    with pytest.raises(HistoshieldError, match="refusing to save.*NaN or infinite"):
        models.save_checkpoint(tmp_path / "x.pt", model)
    assert not (tmp_path / "x.pt").exists()
    bad = _nan_checkpoint(tmp_path / "nan.pt")
    with pytest.raises(HistoshieldError, match=f"{bad}.*NaN or infinite"):
        models.load_checkpoint(bad)
    data = _tree(tmp_path / "d", n=2)
    code, out, err = run_cli(capsys, "predict", "-c", str(bad), str(data / "benign" / "b0.png"))
    assert str(bad) in _one_line_error(code, err) and "nan" not in out.lower()
    code, out, err = run_cli(capsys, "evaluate", "-c", str(bad), "--data", str(data))
    assert str(bad) in _one_line_error(code, err) and "nan" not in out.lower()


def test_overflowing_outputs_are_not_printed_as_predictions(tmp_path: Path, capsys) -> None:
    torch.manual_seed(0)
    model = models.create("smallcnn", image_size=32, classes=["benign", "malignant"])
    with torch.no_grad():
        for p in model.parameters():  # finite weights whose logits overflow float32
            p.mul_(1e30) if p.dim() > 1 else None
    models.save_checkpoint(tmp_path / "big.pt", model)
    data = _tree(tmp_path / "d", n=2)
    code, out, err = run_cli(
        capsys, "predict", "-c", str(tmp_path / "big.pt"), str(data / "benign" / "b0.png")
    )
    assert "NaN or infinite outputs" in _one_line_error(code, err) and "nan" not in out.lower()
    code, out, err = run_cli(
        capsys, "evaluate", "-c", str(tmp_path / "big.pt"), "--data", str(data)
    )
    assert "NaN or infinite outputs" in _one_line_error(code, err)


# ---- item 4: patient leakage is refused for training and evaluation ----------------------------


def test_train_and_evaluate_refuse_a_leaking_split(tmp_path: Path, capsys) -> None:
    leak = split_csv(tmp_path, leak=True)
    run = tmp_path / "r"
    code, _, err = run_cli(capsys, "train", "--split", str(leak), "--out", str(run), *TINY)
    assert "--allow-patient-leak" in _one_line_error(code, err) and "B0" in err
    assert not (run / "last.pt").exists()
    args = ["train", "--split", str(leak), "--out", str(run), "--allow-patient-leak", *TINY]
    code, _, err = run_cli(capsys, *args)
    assert code == 0, err
    assert "allowed for an image-level protocol" in err  # said, in one warning line
    ckpt = str(run / "best.pt")
    code, _, err = run_cli(capsys, "evaluate", "-c", ckpt, "--split", str(leak))
    assert code == 0, err  # the run allowed it, and its checkpoint says so
    fresh = tmp_path / "fresh.pt"
    model = models.load_checkpoint(run / "best.pt")
    models.save_checkpoint(fresh, model)  # a model trained without that permission
    code, _, err = run_cli(capsys, "evaluate", "-c", str(fresh), "--split", str(leak))
    assert "--allow-patient-leak" in _one_line_error(code, err)
    code, _, err = run_cli(
        capsys, "evaluate", "-c", str(fresh), "--split", str(leak), "--allow-patient-leak"
    )
    assert code == 0, err


def test_image_level_protocol_allows_the_leak_by_itself(tmp_path: Path) -> None:
    leak = split_csv(tmp_path, leak=True)
    assert TrainConfig(split_by="image").leak_allowed and not TrainConfig().leak_allowed
    cfg = TrainConfig(split=str(leak), split_by="image", image_size=32)
    iset = loop.prepare_split(cfg, tmp_path / "r", resume=False)
    assert any("allowed for an image-level protocol" in p for p in iset.problems)
    with pytest.raises(HistoshieldError, match="more than one split"):
        loop.prepare_split(TrainConfig(split=str(leak)), tmp_path / "r", resume=False)


# ---- items 8 and 10: odd file names and undecodable files reach training ---------------------


def test_train_on_non_utf8_file_names(tmp_path: Path, capsys) -> None:
    root = tmp_path / "d"
    for cls, base in (("benign", 0), ("malignant", 50)):
        for i in range(10):
            raw = os.fsencode(root / cls) + b"/\xff-%d.png" % i
            write_image(Path(os.fsdecode(raw)), value=base + i, size=16)
    code, _, err = run_cli(
        capsys, "train", "--data", str(root), "--out", str(tmp_path / "r"), *TINY
    )
    assert code == 0, err
    back = read_split(tmp_path / "r" / "split.csv")
    assert len(back.records) == 20 and all(r.path.is_file() for r in back.records)


def test_train_skip_bad_skips_a_file_that_fails_to_decode(tmp_path: Path, capsys) -> None:
    root = _tree(tmp_path / "d")
    bad = png_header_only(root / "benign" / "empty-idat.png", 3000, 3000)
    run = tmp_path / "r"
    args = ["train", "--data", str(root), "--out", str(run), "--skip-bad", *TINY]
    code, _, err = run_cli(capsys, *args)
    assert code == 0, err
    assert "empty-idat.png" in err  # reported, not dropped silently
    assert bad not in {r.path for r in read_split(run / "split.csv").records}
    assert json.loads((run / "results.json").read_text())["epochs_run"] == 1


def test_train_with_an_explicit_classes_list(tmp_path: Path, capsys) -> None:
    root = tmp_path / "d"
    for cls, base in (("Normal", 0), ("tumour", 50)):
        for i in range(10):
            write_image(root / cls / f"{i}.png", value=base + i, size=16)
    run = tmp_path / "r"
    code, _, err = run_cli(capsys, "train", "--data", str(root), "--out", str(run), *TINY)
    assert "'Normal'" in _one_line_error(code, err) and "--classes" in err
    args = ["train", "--data", str(root), "--out", str(run), "--classes", "normal,tumour", *TINY]
    code, _, err = run_cli(capsys, *args)
    assert code == 0, err
    assert json.loads((run / "results.json").read_text())["classes"] == ["normal", "tumour"]
    code, _, err = run_cli(capsys, "evaluate", "-c", str(run / "best.pt"), "--data", str(root))
    assert code == 0, err  # the model's classes are the accepted labels
