"""Checkpoints: round trip, resume payload, refusal of pickled code, clear errors."""

from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np
import pytest
import torch

from histoshield import models
from histoshield.config import TrainConfig
from histoshield.errors import HistoshieldError
from histoshield.models import weights as W


def _trained_smallcnn() -> models.HistoModel:
    torch.manual_seed(0)
    model = models.create("smallcnn", image_size=32, classes=["benign", "malignant"])
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    x, y = torch.rand(8, 3, 32, 32), torch.tensor([0, 1] * 4)
    for _ in range(2):  # moves weights and BatchNorm statistics away from their init
        opt.zero_grad()
        torch.nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
    model.opt = opt  # type: ignore[attr-defined]
    return model


def test_round_trip_gives_identical_logits_and_metadata(tmp_path: Path) -> None:
    model = _trained_smallcnn()
    cfg = TrainConfig(model="smallcnn", epochs=3)
    extra = {
        "optimizer": model.opt.state_dict(),
        "torch_rng": torch.get_rng_state(),
        "numpy_rng": np.random.default_rng(0).bit_generator.state,
        "epoch": 2,
        "history": np.array([0.5, 0.75]),
    }
    path = models.save_checkpoint(
        tmp_path / "run" / "best.pt", model, config=cfg, metrics={"val_acc": 0.75}, extra=extra
    )
    assert [p.name for p in path.parent.iterdir()] == ["best.pt"]  # atomic: no temp files left

    back = models.load_checkpoint(path)
    assert not back.training
    assert (back.name, back.weights, back.classes, back.image_size, back.stain_norm) == (
        "smallcnn",
        "none",
        ["benign", "malignant"],
        32,
        "none",
    )
    assert back.meta["config"]["epochs"] == 3 and back.meta["metrics"] == {"val_acc": 0.75}
    assert "state_dict" not in back.meta
    x = torch.rand(4, 3, 40, 40)
    model.eval()
    with torch.no_grad():
        assert torch.equal(back(x), model(x))

    raw = models.read_checkpoint(path)
    opt = torch.optim.Adam(back.parameters(), lr=1e-2)
    opt.load_state_dict(raw["extra"]["optimizer"])  # resume state survives weights_only loading
    assert torch.equal(raw["extra"]["torch_rng"], extra["torch_rng"])
    assert torch.equal(raw["extra"]["history"], torch.tensor([0.5, 0.75], dtype=torch.float64))
    assert raw["extra"]["numpy_rng"]["state"] == extra["numpy_rng"]["state"]


def test_load_needs_no_pretrained_weight_files(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    model = models.create("efficientnet_lite0", "imagenet", image_size=32).eval()
    models.save_checkpoint(tmp_path / "lite.pt", model)

    def unavailable():
        raise AssertionError("load_checkpoint read pretrained weights")

    monkeypatch.setattr(W, "lite_state", unavailable)
    back = models.load_checkpoint(tmp_path / "lite.pt")
    assert back.weights == "imagenet"
    x = torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(back(x), model(x))


def test_load_does_not_need_the_local_weights_file_either(tmp_path: Path) -> None:
    torch.save(models.create("smallcnn").backbone.state_dict(), tmp_path / "init.pt")
    model = models.create("smallcnn", weights=str(tmp_path / "init.pt")).eval()
    models.save_checkpoint(tmp_path / "c.pt", model)
    (tmp_path / "init.pt").unlink()
    back = models.load_checkpoint(tmp_path / "c.pt")
    assert back.weights == str(tmp_path / "init.pt")
    x = torch.rand(2, 3, 24, 24)
    with torch.no_grad():
        assert torch.equal(back(x), model(x))


class _Evil:
    """Unpickling this creates a file: the proof that arbitrary code ran."""

    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_checkpoint_that_needs_unpickling_code_is_refused(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    payload = {"format": 1, "state_dict": {}, "name": "smallcnn", "evil": _Evil(marker)}
    torch.save(payload, tmp_path / "zip.pt")
    with open(tmp_path / "legacy.pt", "wb") as f:
        pickle.dump(payload, f, protocol=2)
    for name in ("zip.pt", "legacy.pt"):
        for load in (models.load_checkpoint, models.read_checkpoint):
            with pytest.raises(HistoshieldError, match="unpickling") as e:
                load(tmp_path / name)
            assert "\n" not in str(e.value)
            assert not marker.exists()
    # the payload is live: an unsafe load would have run it
    torch.load(tmp_path / "zip.pt", weights_only=False)
    assert marker.exists()


def test_missing_corrupt_and_foreign_files_are_clear_errors(tmp_path: Path) -> None:
    with pytest.raises(HistoshieldError, match="not found"):
        models.load_checkpoint(tmp_path / "nope.pt")
    (tmp_path / "junk.pt").write_bytes(b"this is not a checkpoint" * 10)
    with pytest.raises(HistoshieldError, match="corrupt"):
        models.load_checkpoint(tmp_path / "junk.pt")
    good = models.save_checkpoint(tmp_path / "good.pt", models.create("smallcnn"))
    (tmp_path / "cut.pt").write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    with pytest.raises(HistoshieldError, match="corrupt"):
        models.load_checkpoint(tmp_path / "cut.pt")
    torch.save(models.create("smallcnn").state_dict(), tmp_path / "plain.pt")
    with pytest.raises(HistoshieldError, match="not a histoshield checkpoint"):
        models.load_checkpoint(tmp_path / "plain.pt")

    raw = models.read_checkpoint(good)
    torch.save({**raw, "name": "timm:resnet10t"}, tmp_path / "swapped.pt")
    with pytest.raises(HistoshieldError, match="does not match model 'timm:resnet10t'"):
        models.load_checkpoint(tmp_path / "swapped.pt")
    torch.save({**raw, "format": 99}, tmp_path / "future.pt")
    with pytest.raises(HistoshieldError, match="format 99"):
        models.load_checkpoint(tmp_path / "future.pt")


def test_unstorable_values_and_foreign_models_are_rejected_before_writing(tmp_path: Path) -> None:
    with pytest.raises(HistoshieldError, match="cannot store object"):
        models.save_checkpoint(tmp_path / "x.pt", models.create("smallcnn"), extra={"o": object()})
    with pytest.raises(HistoshieldError, match="needs a HistoModel"):
        models.save_checkpoint(tmp_path / "x.pt", torch.nn.Linear(2, 2))
    assert list(tmp_path.iterdir()) == []
