"""train --target-sensitivity: threshold picked on validation, stored in best.pt, reported."""

from __future__ import annotations

from pathlib import Path

from histoshield import models
from histoshield.config import TrainConfig
from histoshield.evaluation.predict import evaluate_checkpoint
from histoshield.training import train


def test_target_sensitivity_is_reached_on_validation_and_stored(tmp_path: Path) -> None:
    cfg = TrainConfig(
        data="synthetic:n=80,size=32,seed=4", model="smallcnn", image_size=32, epochs=1,
        batch_size=16, val=0.3, target_sensitivity=0.95,
    )  # fmt: skip
    res = train(cfg, tmp_path / "run", progress=False)
    t = res["threshold"]
    assert res["at_threshold"]["val"]["sensitivity"] >= 0.95
    assert res["at_threshold"]["val"]["threshold"] == t
    meta = models.load_checkpoint(tmp_path / "run" / "best.pt").meta
    assert meta["extra"]["threshold"] == t and meta["extra"]["target_sensitivity"] == 0.95
    ev = evaluate_checkpoint(tmp_path / "run" / "best.pt", subset="val", device="cpu")
    assert ev["at_threshold"]["sensitivity"] >= 0.95  # evaluate reports 0.5 and the threshold
    assert ev["at_threshold"]["tp"] + ev["at_threshold"]["fn"] == ev["tp"] + ev["fn"]
