"""What a run trains on: the split (made, read or resumed), its images in memory, the model."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch import nn

from histoshield.config import TrainConfig
from histoshield.errors import HistoshieldError


def prepare_split(cfg: TrainConfig, out: Path, resume: bool):
    from histoshield import data as hd

    saved = out / "split.csv"
    labels = {"classes": cfg.classes, "allow_patient_leak": cfg.leak_allowed}
    if resume and saved.is_file():  # the run's own split, accepted when the run started
        return hd.read_split(saved, classes=cfg.classes, allow_patient_leak=True)
    if cfg.split:
        p = Path(cfg.split).expanduser()
        if not p.is_file():
            raise HistoshieldError(
                f"split file not found: {p} (write one with `histoshield data split` or omit "
                "--split to make one)"
            )
        return hd.read_split(p, **labels)
    on_bad = "skip" if cfg.skip_bad else "raise"
    iset = hd.load_imageset(
        cfg.data, magnifications=cfg.magnification or None, on_bad=on_bad, **labels
    )
    if all(r.split in ("train", "val", "test") for r in iset.records):
        return iset  # the data path was itself a split CSV
    return hd.make_split(iset, by=cfg.split_by, val=cfg.val, test=cfg.test, seed=cfg.seed)


class Data:
    """One split's images as uint8 (N,3,H,W), labels and patient ids, held in memory."""

    def __init__(self, records: list, classes: list[str], cfg: TrainConfig, progress: bool):
        from histoshield.data import labels_of, load_arrays

        self.records = records
        self.classes = classes
        self.patients = [r.patient for r in records]
        if records:
            arr = load_arrays(
                records,
                cfg.image_size,
                cache_dir=cfg.cache_dir,
                progress=progress,
            )
            self.x = torch.from_numpy(np.ascontiguousarray(arr)).permute(0, 3, 1, 2).contiguous()
            self.y = torch.as_tensor(np.asarray(labels_of(records, classes)), dtype=torch.long)
        else:
            s = cfg.image_size
            self.x = torch.empty(0, 3, s, s, dtype=torch.uint8)
            self.y = torch.empty(0, dtype=torch.long)

    def __len__(self) -> int:
        return int(self.y.numel())


def build_model(cfg: TrainConfig, classes: list[str]) -> nn.Module:
    from histoshield import models

    return models.create(
        cfg.model,
        weights=cfg.weights,
        num_classes=len(classes),
        classes=classes,
        image_size=cfg.image_size,
        stain_norm=cfg.stain_norm,
        tta=cfg.tta,
    )
