"""Mixup and label smoothing (`train.mixup`, `train.label_smoothing`): the blend and its soft
targets follow the formula, the loss is the smoothed cross-entropy, a mixup run resumed after a
kill equals an uninterrupted one, and combining either with a defense is refused in one line."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from histoshield import models
from histoshield.config import AugmentConfig, TrainConfig
from histoshield.data import read_split
from histoshield.defenses import create as create_defense
from histoshield.errors import HistoshieldError
from histoshield.training import resolve_config, train
from histoshield.training.mixup import mixup
from histoshield.training.stepper import Stepper
from tests.training.helpers import train_killed_at_step

_NO_AUG = AugmentConfig(crop_scale=None, color_jitter=0.0, hed_sigma=0.0)


def test_mixup_blends_pairs_and_their_labels_with_the_same_weight() -> None:
    torch.manual_seed(0)
    x = torch.rand(16, 3, 8, 8)
    y = torch.arange(16)  # one class per image: a target row names both blended images
    mixed, target = mixup(x, y, 0.4, 16, torch.Generator().manual_seed(3))
    assert mixed.shape == x.shape and target.shape == (16, 16)
    assert torch.allclose(target.sum(1), torch.ones(16))
    own_lam = target[torch.arange(16), y]
    assert bool((own_lam >= 0.5 - 1e-6).all())  # the image's own label dominates (λ >= 0.5)
    assert bool((own_lam < 1 - 1e-3).any())  # and some images really are blends
    # every blended image is λ·x_i + (1 − λ)·x_j for some j of the batch, with that same λ
    for i in range(16):
        j = int(target[i].clone().index_fill_(0, y[i], 0).argmax()) if own_lam[i] < 1 else i
        expect = own_lam[i] * x[i] + (1 - own_lam[i]) * x[j]
        assert torch.allclose(mixed[i], expect, atol=1e-6), i
    again = mixup(x, y, 0.4, 16, torch.Generator().manual_seed(3))
    assert torch.equal(again[0], mixed) and torch.equal(again[1], target)
    assert not torch.equal(mixup(x, y, 0.4, 16, torch.Generator().manual_seed(4))[0], mixed)


def test_stepper_loss_is_the_label_smoothed_cross_entropy() -> None:
    torch.manual_seed(0)
    model = nn.Linear(4, 2)
    x, y = torch.randn(8, 4), torch.randint(0, 2, (8,))
    with torch.no_grad():
        logits = model(x)
    eps = 0.2
    soft = F.one_hot(y, 2).float() * (1 - eps) + eps / 2
    expect = -(soft * logits.log_softmax(1)).sum(1).mean()
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    loss, _ = Stepper(model, opt, torch.device("cpu"), label_smoothing=eps).step(x, y)
    assert loss.item() == pytest.approx(expect.item(), rel=1e-6)
    plain, _ = Stepper(model, opt, torch.device("cpu")).step(x, y)
    assert plain.item() != pytest.approx(loss.item(), rel=1e-3)


def _cfg(**kw) -> TrainConfig:
    base = dict(data="synthetic:n=64,size=32", image_size=32, epochs=2, batch_size=16, lr=3e-3,
                mixup=0.4, label_smoothing=0.1, augment=_NO_AUG)  # fmt: skip
    return TrainConfig(**{**base, **kw})


def test_mixup_run_resumed_after_a_kill_equals_an_uninterrupted_one(
    tmp_path: Path, monkeypatch
) -> None:
    cfg = _cfg()
    full = tmp_path / "full"
    train(cfg, full, progress=False)
    per_epoch = -(-len(read_split(full / "split.csv").subset("train")) // cfg.batch_size)
    part = tmp_path / "part"
    train_killed_at_step(cfg, part, monkeypatch, per_epoch + 1)
    train(resolve_config(resume=part), part, resume=True, progress=False)
    a = models.read_checkpoint(full / "last.pt")["state_dict"]
    b = models.read_checkpoint(part / "last.pt")["state_dict"]
    assert all(torch.equal(a[k], b[k]) for k in a)
    plain = tmp_path / "plain"
    train(_cfg(mixup=0.0, label_smoothing=0.0), plain, progress=False)
    c = models.read_checkpoint(plain / "last.pt")["state_dict"]
    assert any(not torch.equal(a[k], c[k]) for k in a)  # the options change training


@pytest.mark.parametrize("kw", [{"mixup": 0.4, "label_smoothing": 0.0}, {"label_smoothing": 0.1,
                                                                          "mixup": 0.0}])
def test_mixup_or_smoothing_with_a_defense_is_a_one_line_error(tmp_path: Path, kw) -> None:
    with pytest.raises(HistoshieldError, match="clean training only"):
        train(_cfg(**kw), tmp_path / "run", defense=create_defense("gaussian:sigma=0.1"),
              progress=False)  # fmt: skip


@pytest.mark.parametrize("kw", [{"mixup": -1}, {"mixup": 11}, {"label_smoothing": 0.5},
                                {"label_smoothing": -0.1}])
def test_out_of_range_values_are_refused(kw) -> None:
    with pytest.raises(ValueError):
        TrainConfig(**kw)
