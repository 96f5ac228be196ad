"""Shared by the training tests: a run killed in the middle of training, as a crash would."""

from __future__ import annotations

from pathlib import Path

import pytest

from histoshield.config import TrainConfig
from histoshield.training import loop, train


class Killed(Exception):
    """Raised in place of the optimisation step the run dies at."""


def train_killed_at_step(cfg: TrainConfig, out: Path, monkeypatch, step: int) -> None:
    """Train `cfg` into `out`, dying when `Stepper.step` is called for the `step`-th time."""
    real_step = loop.Stepper.step
    calls = {"n": 0}

    def dying_step(self, x, y, *rest):
        calls["n"] += 1
        if calls["n"] == step:
            raise Killed
        return real_step(self, x, y, *rest)

    monkeypatch.setattr(loop.Stepper, "step", dying_step)
    with pytest.raises(Killed):
        train(cfg, out, progress=False)
    monkeypatch.setattr(loop.Stepper, "step", real_step)
