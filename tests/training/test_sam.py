"""Sharpness-aware minimisation (`train.sam`): the step follows the formula of Foret et al. 2021,
the second pass leaves BatchNorm's running statistics alone, the whole run still resumes
exactly, and SAM with a defense or out of range is refused."""

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
from histoshield.training.stepper import Stepper
from tests.training.helpers import train_killed_at_step

_NO_AUG = AugmentConfig(crop_scale=None, color_jitter=0.0, hed_sigma=0.0)


def _grads(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> list[torch.Tensor]:
    model.zero_grad()
    F.cross_entropy(model(x), y).backward()
    return [p.grad.clone() for p in model.parameters()]


def test_sam_step_uses_the_gradient_at_the_ascended_weights() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 2))
    x, y = torch.randn(16, 4), torch.randint(0, 2, (16,))
    w0 = [p.detach().clone() for p in model.parameters()]
    rho, lr = 0.3, 0.5
    # by hand: e = rho * g / ||g||, w1 = w0 - lr * grad(w0 + e)
    g = _grads(model, x, y)
    norm = torch.sqrt(sum((t**2).sum() for t in g))
    ref = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 2))
    with torch.no_grad():
        for p, w, t in zip(ref.parameters(), w0, g, strict=True):
            p.copy_(w + rho * t / norm)
    g_adv = _grads(ref, x, y)
    expect = [w - lr * t for w, t in zip(w0, g_adv, strict=True)]

    opt = torch.optim.SGD(model.parameters(), lr=lr)
    loss, _ = Stepper(model, opt, torch.device("cpu"), sam=rho).step(x, y)
    got = list(model.parameters())
    assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(got, expect, strict=True))
    # the reported loss is the one at w0, and SAM really changes the step
    assert loss.item() == pytest.approx(F.cross_entropy(_at(w0, x), y).item(), rel=1e-6)
    plain = [w - lr * t for w, t in zip(w0, g, strict=True)]
    assert any(not torch.allclose(a, b, atol=1e-4) for a, b in zip(got, plain, strict=True))


def _at(w: list[torch.Tensor], x: torch.Tensor) -> torch.Tensor:
    """The 2-layer net's logits with weights w."""
    return F.linear(torch.tanh(F.linear(x, w[0], w[1])), w[2], w[3])


def test_second_pass_leaves_batchnorm_running_statistics_alone() -> None:
    torch.manual_seed(0)
    x, y = torch.randn(16, 4), torch.randint(0, 2, (16,))

    def net() -> nn.Module:
        torch.manual_seed(1)
        return nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 2))

    stats = []
    for rho in (0.0, 0.5):
        m = net()
        Stepper(m, torch.optim.SGD(m.parameters(), lr=0.1), torch.device("cpu"),
                sam=rho).step(x, y)  # fmt: skip
        stats.append((m[1].running_mean.clone(), m[1].running_var.clone()))
        assert m[1].momentum == 0.1  # restored after the second pass
    assert torch.equal(stats[0][0], stats[1][0]) and torch.equal(stats[0][1], stats[1][1])


def _cfg(**kw) -> TrainConfig:
    base = dict(data="synthetic:n=64,size=32", image_size=32, epochs=2, batch_size=16, lr=3e-3,
                sam=0.05, augment=_NO_AUG)  # fmt: skip
    return TrainConfig(**{**base, **kw})


def test_sam_run_resumed_after_a_kill_equals_an_uninterrupted_one(
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
    train(_cfg(sam=0.0), plain, progress=False)
    c = models.read_checkpoint(plain / "last.pt")["state_dict"]
    assert any(not torch.equal(a[k], c[k]) for k in a)


def test_sam_with_a_defense_is_a_one_line_error(tmp_path: Path) -> None:
    with pytest.raises(HistoshieldError, match="sam apply to clean training only"):
        train(_cfg(), tmp_path / "run", defense=create_defense("gaussian:sigma=0.1"),
              progress=False)  # fmt: skip


@pytest.mark.parametrize("rho", [-0.1, 1.5])
def test_out_of_range_radius_is_refused(rho: float) -> None:
    with pytest.raises(ValueError):
        TrainConfig(sam=rho)
