"""Weight EMA (`train.ema`): the average is the exponential moving average of every step's
weights, validation and best.pt see it, last.pt keeps the trained weights, and a run killed and
resumed ends with the same average as an uninterrupted one."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from histoshield import models
from histoshield.config import AugmentConfig, TrainConfig
from histoshield.data import labels_of, load_arrays, read_split, to_float
from histoshield.errors import HistoshieldError
from histoshield.training import resolve_config, train
from histoshield.training.stepper import Stepper
from tests.training.helpers import train_killed_at_step

_NO_AUG = AugmentConfig(crop_scale=None, color_jitter=0.0, hed_sigma=0.0)


def test_stepper_average_is_the_exponential_moving_average_of_the_steps() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 3), nn.BatchNorm1d(3), nn.Linear(3, 2))
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    decay = 0.8
    st = Stepper(model, opt, torch.device("cpu"), ema=decay)
    expect: dict[str, torch.Tensor] | None = None
    for _ in range(5):
        st.step(torch.randn(8, 4), torch.randint(0, 2, (8,)))
        now = {k: v.detach().clone().float() for k, v in model.state_dict().items()}
        if expect is None:
            expect = now  # the first update copies the weights
        else:
            expect = {k: decay * expect[k] + (1 - decay) * now[k] for k in now}
    got = st.eval_model.state_dict()
    assert expect is not None
    for k, v in expect.items():
        if k.endswith("num_batches_tracked"):
            continue
        assert torch.allclose(got[k].float(), v, atol=1e-6), k
    # the average differs from the trained weights after several steps with a large lr
    assert not torch.allclose(got["0.weight"], model.state_dict()["0.weight"])
    assert Stepper(model, opt, torch.device("cpu")).eval_model is model


def _cfg(**kw) -> TrainConfig:
    base = dict(data="synthetic:n=64,size=32", image_size=32, epochs=3, batch_size=16, lr=3e-3,
                ema=0.7, augment=_NO_AUG)  # fmt: skip
    return TrainConfig(**{**base, **kw})


def test_best_pt_is_the_averaged_model_validation_scored(tmp_path: Path) -> None:
    run = tmp_path / "run"
    res = train(_cfg(), run, progress=False)
    best = models.load_checkpoint(run / "best.pt")
    recs = read_split(run / "split.csv").subset("val")
    x = to_float(load_arrays(recs, best.image_size, progress=False))
    y = torch.as_tensor(labels_of(recs, best.classes))
    with torch.no_grad():
        logits = best(x)
    row = models.read_checkpoint(run / "best.pt")["metrics"]
    assert row["epoch"] == res["best_epoch"]
    # the epoch's validation loss is best.pt's own: validation scored the average
    assert F.cross_entropy(logits, y).item() == pytest.approx(row["val_loss"], rel=1e-5)
    assert (logits.argmax(1) == y).sum().item() / len(y) == pytest.approx(row["val_acc"])
    saved = models.read_checkpoint(run / "last.pt")
    ema = saved["extra"]["train_state"]["ema"]
    assert ema is not None and int(ema["n_averaged"]) > 1
    trained = saved["state_dict"]
    averaged = {k.removeprefix("module."): v for k, v in ema.items() if k != "n_averaged"}
    assert averaged.keys() == trained.keys()
    assert any(not torch.equal(averaged[k], trained[k]) for k in trained)  # last.pt: trained


def test_resume_with_ema_equals_uninterrupted(tmp_path: Path, monkeypatch) -> None:
    cfg = _cfg()
    full = tmp_path / "full"
    train(cfg, full, progress=False)
    per_epoch = -(-len(read_split(full / "split.csv").subset("train")) // cfg.batch_size)
    part = tmp_path / "part"
    train_killed_at_step(cfg, part, monkeypatch, per_epoch + 1)  # first step of epoch 2
    train(resolve_config(resume=part), part, resume=True, progress=False)
    for name in ("best.pt", "last.pt"):
        a = models.read_checkpoint(full / name)
        b = models.read_checkpoint(part / name)
        for k in a["state_dict"]:
            assert torch.equal(a["state_dict"][k], b["state_dict"][k]), (name, k)
    ea = models.read_checkpoint(full / "last.pt")["extra"]["train_state"]["ema"]
    eb = models.read_checkpoint(part / "last.pt")["extra"]["train_state"]["ema"]
    for k in ea:
        assert torch.equal(ea[k], eb[k]), k


def test_resuming_a_run_without_ema_with_ema_is_refused(tmp_path: Path) -> None:
    run = tmp_path / "run"
    train(_cfg(ema=None, epochs=1), run, progress=False)
    with pytest.raises(HistoshieldError, match="trained without it"):
        train(_cfg(epochs=2), run, resume=True, progress=False)


@pytest.mark.parametrize("bad", [0, 1, 1.5, -0.1])
def test_ema_decay_must_lie_strictly_between_0_and_1(bad: float) -> None:
    with pytest.raises(ValueError):
        TrainConfig(ema=bad)
