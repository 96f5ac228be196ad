"""The training loop: it learns, writes a complete run folder, selects best.pt honestly, and a
run interrupted mid-epoch and resumed ends with exactly the weights of an uninterrupted run."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
import yaml

from histoshield import models
from histoshield.config import AugmentConfig, TrainConfig
from histoshield.data import labels_of, load_arrays, read_split, to_float
from histoshield.errors import HistoshieldError
from histoshield.report.training import training_figures
from histoshield.training import loop, resolve_config, train
from tests.training.helpers import train_killed_at_step


def _val_of(run: Path, ckpt: str) -> tuple[float, float]:
    """Independent val accuracy / mean CE of a checkpoint, straight from split.csv."""
    m = models.load_checkpoint(run / ckpt)
    recs = read_split(run / "split.csv").subset("val")
    x = to_float(load_arrays(recs, m.image_size, progress=False))
    y = torch.as_tensor(labels_of(recs, m.classes))
    with torch.no_grad():
        logits = m(x)
    return (logits.argmax(1) == y).sum().item() / len(y), F.cross_entropy(logits, y).item()


def _rows(run: Path) -> list[dict[str, str]]:
    with open(run / "metrics.csv", newline="") as f:
        return list(csv.DictReader(f))


def test_learns_and_writes_run_folder(tmp_path: Path) -> None:
    cfg = TrainConfig(
        data="synthetic:n=240,size=40",
        image_size=40,
        epochs=5,
        lr=2e-3,
        batch_size=16,
        val=0.25,
        augment=AugmentConfig(crop_scale=None, color_jitter=0.0, hed_sigma=0.0),
    )
    run = tmp_path / "run"
    res = train(cfg, run, progress=False, figures=training_figures)  # as the CLI draws
    for f in ("config.yaml", "env.json", "split.csv", "metrics.csv", "accuracy.png", "best.pt",
              "last.pt", "results.json"):  # fmt: skip
        assert (run / f).is_file(), f
    assert not list(run.glob(".*.tmp"))
    assert TrainConfig.model_validate(yaml.safe_load((run / "config.yaml").read_text())) == cfg
    assert json.loads((run / "results.json").read_text())["test"] == json.loads(
        json.dumps(res["test"])
    )
    assert json.loads((run / "env.json").read_text())["torch"] == torch.__version__
    assert (run / "accuracy.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    split = read_split(run / "split.csv")
    pats = {s: {r.patient for r in split.subset(s)} for s in ("train", "val", "test")}
    assert not (pats["train"] & pats["val"]) and not (pats["train"] & pats["test"])

    rows = _rows(run)
    assert [int(r["epoch"]) for r in rows] == [1, 2, 3, 4, 5]
    # best.pt: the highest val balanced accuracy among non-degenerate epochs, then lower loss.
    best = max(rows, key=lambda r: (r["val_degenerate"] == "", float(r["val_bal_acc"]),
                                    -float(r["val_loss"])))  # fmt: skip
    assert res["best_epoch"] == int(best["epoch"])
    acc, loss = _val_of(run, "best.pt")
    assert acc == pytest.approx(float(best["val_acc"]), abs=1e-9)
    assert loss == pytest.approx(float(best["val_loss"]), rel=1e-4)
    assert res["val"]["accuracy"] == pytest.approx(acc)
    # It learned: validation accuracy clearly above the majority-class rate.
    y = labels_of(split.subset("val"), split.classes)
    majority = max(y.mean(), 1 - y.mean())
    assert acc >= majority + 0.2, (acc, majority)
    assert res["n"]["train"] + res["n"]["val"] + res["n"]["test"] == 240
    assert {"sensitivity", "specificity", "auc", "patient_accuracy"} <= set(res["test"])

    with pytest.raises(HistoshieldError, match="--resume"):
        train(cfg, run, progress=False)  # refuses to overwrite a run


def test_resume_after_kill_equals_uninterrupted(tmp_path: Path, monkeypatch) -> None:
    cfg = TrainConfig(
        data="synthetic:n=64,size=32",
        image_size=32,
        epochs=3,
        batch_size=16,
        scheduler="cosine",
        augment=AugmentConfig(color_jitter=0.1, hed_sigma=0.05),
    )
    full = tmp_path / "full"
    train(cfg, full, progress=False)

    # Kill the second run in the middle of epoch 2.
    per_epoch = -(-len(read_split(full / "split.csv").subset("train")) // cfg.batch_size)
    assert per_epoch >= 2
    part = tmp_path / "part"
    train_killed_at_step(cfg, part, monkeypatch, per_epoch + 2)
    assert [r["epoch"] for r in _rows(part)] == ["1"]  # lost only the current epoch
    assert not (part / "results.json").exists()

    # Torture the global RNGs in between, as a fresh process would have different ones.
    torch.manual_seed(12345)
    torch.rand(100)
    calls = {"n": 0}
    real_step = loop.Stepper.step

    def counted_step(self, x, y, *rest):
        calls["n"] += 1
        return real_step(self, x, y, *rest)

    monkeypatch.setattr(loop.Stepper, "step", counted_step)
    train(resolve_config(resume=part), part, resume=True, progress=False)
    assert calls["n"] == 2 * per_epoch  # resumed at epoch 2, not from scratch

    a = models.read_checkpoint(full / "last.pt")["state_dict"]
    b = models.read_checkpoint(part / "last.pt")["state_dict"]
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    strip = [{k: v for k, v in r.items() if k != "seconds"} for r in _rows(full)]
    assert strip == [{k: v for k, v in r.items() if k != "seconds"} for r in _rows(part)]
    assert (full / "split.csv").read_text() == (part / "split.csv").read_text()


def test_resume_needs_a_run(tmp_path: Path) -> None:
    with pytest.raises(HistoshieldError, match="does not exist"):
        train(TrainConfig(), tmp_path / "nothing", resume=True, progress=False)


def test_resolve_config_flat_study_and_overrides(tmp_path: Path) -> None:
    flat = tmp_path / "flat.yaml"
    flat.write_text("model: resnet18\nepochs: 7\nlr: 0.01\n")
    c = resolve_config(flat, epochs=2, lr=None)
    assert (c.model, c.epochs, c.lr) == ("resnet18", 2, 0.01)
    study = tmp_path / "study.yaml"
    study.write_text(
        "name: paper\ndata: tiles.csv\nseed: 3\nonly: malignant\n"
        "train:\n  model: densenet121\n  weights: xrv\n  epochs: 400\n  seed: 4\n"
    )
    c = resolve_config(study, image_size=64)
    assert (c.model, c.weights, c.epochs, c.image_size) == ("densenet121", "xrv", 400, 64)
    assert (c.data, c.seed) == ("tiles.csv", 4)  # study-wide data; train section wins
    with pytest.raises(HistoshieldError, match="image_size"):
        resolve_config(flat, image_size=16)
    bad = tmp_path / "bad.yaml"
    bad.write_text("epocs: 3\n")
    with pytest.raises(HistoshieldError, match="epocs"):
        resolve_config(bad)
    with pytest.raises(HistoshieldError, match="not found"):
        resolve_config(tmp_path / "missing.yaml")


class _EveryOtherIsNoise:
    """A duck-typed adversarial defense: 'robust' accuracy on noisy validation inputs."""

    name, spec, adversarial, stop_on_robust_collapse = "toy", "toy", True, True

    def __init__(self) -> None:
        self.val_calls = 0

    def loss(self, model, x, y):
        logits = model(x)
        return F.cross_entropy(logits, y), logits

    def perturb_val(self, model, x, y):
        self.val_calls += 1
        return (x + 0.3 * torch.randn_like(x)).clamp(0, 1)


def test_adversarial_defense_selects_on_balanced_robust_accuracy(tmp_path: Path) -> None:
    cfg = TrainConfig(data="synthetic:n=64,size=32", image_size=32, epochs=2, batch_size=16)
    d = _EveryOtherIsNoise()
    res = train(cfg, tmp_path / "adv", defense=d, progress=False)
    rows = _rows(tmp_path / "adv")
    assert d.val_calls > 0 and all(r["val_bal_robust_acc"] != "" for r in rows)
    assert all("val_robust_degenerate" in r for r in rows)  # the under-attack constant check
    # non-degenerate epochs first, then balanced robust, balanced clean accuracy, lower loss
    best = max(rows, key=lambda r: (r["val_degenerate"] == "", float(r["val_bal_robust_acc"]),
                                    float(r["val_bal_acc"]), -float(r["val_loss"])))  # fmt: skip
    assert res["best_epoch"] == int(best["epoch"])
    assert res["selected_by"] == "val_bal_robust_acc"
    assert res["selection"]["epoch"] == res["best_epoch"]
    assert res["selection"]["degenerate"] == all(r["val_degenerate"] for r in rows)


def test_stain_norm_is_fitted_on_training_images(tmp_path: Path) -> None:
    cfg = TrainConfig(data="synthetic:n=64,size=32", image_size=32, epochs=1, stain_norm="reinhard")
    train(cfg, tmp_path / "stain", progress=False)
    m = models.load_checkpoint(tmp_path / "stain" / "best.pt")
    assert int(m.stain.fitted) == 1 and m.stain_norm == "reinhard"
    # The reference equals a fit on the same training images (all of them: fewer than the cap).
    recs = read_split(tmp_path / "stain" / "split.csv").subset("train")
    ref = models.create("smallcnn", image_size=32, stain_norm="reinhard")
    ref.fit_stain(to_float(load_arrays(recs, 32, progress=False)))
    torch.testing.assert_close(m.stain.ref_mean, ref.stain.ref_mean, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(m.stain.ref_std, ref.stain.ref_std, atol=1e-4, rtol=1e-4)


def test_constant_model_is_flagged_as_collapsed(tmp_path: Path, monkeypatch, capsys) -> None:
    real = loop.build_model

    def constant(cfg, classes):  # a model that says "class 1" for every image
        m = real(cfg, classes)
        fwd = m.forward
        m.forward = lambda x: fwd(x) * 0 + torch.tensor([0.0, 5.0], device=x.device)
        return m

    monkeypatch.setattr(loop, "build_model", constant)
    cfg = TrainConfig(data="synthetic:n=64,size=32", image_size=32, epochs=2, batch_size=16)
    res = train(cfg, tmp_path / "const", progress=False)
    err = capsys.readouterr().err
    # never non-degenerate, so "degenerate" (not learning), not "collapse" (learned, then lost)
    assert err.count("warning: epoch") == 2 and err.count(": degenerate: ") == 2
    assert "collapse:" not in err
    assert "every epoch's validation predictions were degenerate" in err
    rows = _rows(tmp_path / "const")
    assert all("100%" in r["val_degenerate"] for r in rows)
    assert all(float(r["val_bal_acc"]) == 0.5 for r in rows)
    assert res["selection"]["degenerate"] is True and "100%" in res["selection"]["reason"]
    assert res["collapse"]["degenerate_epochs"] == [1, 2]


def test_balance_loss_needs_a_defense_that_can_weight(tmp_path: Path) -> None:
    cfg = TrainConfig(data="synthetic:n=64,size=32", image_size=32, epochs=1, balance="loss")
    with pytest.raises(HistoshieldError, match="cannot weight its loss by class"):
        train(cfg, tmp_path / "w", defense=_EveryOtherIsNoise(), progress=False)


def test_a_model_that_learned_then_went_constant_is_reported_as_collapse(
    tmp_path: Path, monkeypatch, capsys
) -> None:
    real = loop.validate
    calls = {"n": 0}

    def later_constant(stepper, d, cfg, defense):  # epoch 1 real, epoch 2 degenerate
        va = real(stepper, d, cfg, defense)
        calls["n"] += 1
        if calls["n"] == 2:
            va["degenerate"] = "the model predicts malignant for 100% of the images"
        else:
            va["degenerate"] = None
        return va

    monkeypatch.setattr(loop, "validate", later_constant)
    cfg = TrainConfig(data="synthetic:n=64,size=32", image_size=32, epochs=2, batch_size=16)
    train(cfg, tmp_path / "later", progress=False)
    err = capsys.readouterr().err
    assert "warning: epoch 2: collapse: the model predicts malignant" in err
    assert "epoch 1:" not in err


def test_training_loop_gives_the_defense_its_class_counts(tmp_path: Path) -> None:
    seen = []

    class Counting(_EveryOtherIsNoise):
        def set_class_counts(self, counts):
            seen.append(counts.tolist())

    cfg = TrainConfig(data="synthetic:n=64,size=32", image_size=32, epochs=1, batch_size=16)
    train(cfg, tmp_path / "counts", defense=Counting(), progress=False)
    recs = read_split(tmp_path / "counts" / "split.csv").subset("train")
    labels = labels_of(recs, ["benign", "malignant"])
    assert seen == [[int((labels == 0).sum()), int((labels == 1).sum())]]
