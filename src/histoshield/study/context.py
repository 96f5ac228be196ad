"""What the stages share (`Context`: config, run folder, device, cache) and the `Stage` record."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from histoshield.config import StudyConfig, TrainConfig
from histoshield.study.settings import GAUSSIAN, ORIGINAL, defense_slugs

STATE = "state.json"
RESULTS = "results.json"


@dataclass
class Stage:
    """One named step of the study: `fn(ctx)` returns the results to merge into results.json."""

    name: str
    fn: Callable[[Context], dict[str, Any]]


@dataclass
class Context:
    """What the stages share: config, run folder, device and an in-process cache."""

    cfg: StudyConfig
    out: Path
    results: dict[str, Any]
    device: torch.device
    progress: bool
    echo: Callable[[str], None]
    cache: dict[str, Any] = field(default_factory=dict)
    dist: Any = None  # training.distributed.DistContext under torchrun

    @property
    def main(self) -> bool:
        """True on the one process that writes (rank 0, or alone)."""
        return self.dist is None or self.dist.is_main

    @property
    def model_names(self) -> list[str]:
        """Study models in training order: original, gaussian, then extra defenses."""
        return [ORIGINAL, GAUSSIAN, *defense_slugs(self.cfg)]

    def train_config(self, defense: str | None, name: str = ORIGINAL) -> TrainConfig:
        """Model `name`'s settings (the `train:` section with its `defense_train` overrides) on
        the study's split and seed, with `defense`."""
        return self.cfg.train_for(name).model_copy(
            update={
                "data": self.cfg.data,
                "split": str(self.out / "split.csv"),
                "split_by": self.cfg.split_by,
                "seed": self.cfg.seed,
                "defense": defense,
            }
        )
