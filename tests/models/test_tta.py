"""In-model test-time augmentation and the backbone learning-rate scale."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from histoshield import models
from histoshield.config import TrainConfig
from histoshield.training.optim import make_optimizer, param_groups


def test_tta_model_is_invariant_to_flips_and_rotations_and_differentiable() -> None:
    torch.manual_seed(0)
    m = models.create("smallcnn", tta=True).eval()
    x = torch.rand(3, 3, 32, 32, requires_grad=True)
    out = m(x)
    for v in (x.flip(3), torch.rot90(x, 1, (2, 3)), torch.rot90(x.flip(2), 3, (2, 3))):
        assert torch.allclose(m(v), out, atol=1e-5)
    plain = models.create("smallcnn", tta=False).eval()
    plain.load_state_dict(m.state_dict())
    assert not torch.allclose(plain(torch.rot90(x, 1, (2, 3))), plain(x), atol=1e-5)
    out.sum().backward()  # attacks differentiate through the averaged function
    assert x.grad is not None and x.grad.abs().sum() > 0
    m.train()
    assert m(x).shape == (3, 2)  # one view in training


def test_tta_survives_a_checkpoint(tmp_path: Path) -> None:
    m = models.create("smallcnn", tta=True)
    models.save_checkpoint(tmp_path / "m.pt", m)
    assert models.load_checkpoint(tmp_path / "m.pt").tta is True


def test_backbone_lr_scale_gives_the_head_the_full_lr() -> None:
    m = models.create("smallcnn")
    opt = make_optimizer(TrainConfig(lr=0.01), param_groups(m, 0.1))
    lrs = [g["lr"] for g in opt.param_groups]
    assert lrs == [pytest.approx(0.001), 0.01]
    head = {id(p) for p in m.backbone.head.parameters()}
    assert {id(p) for p in opt.param_groups[1]["params"]} == head
    assert sum(len(g["params"]) for g in opt.param_groups) == len(list(m.parameters()))
    one = make_optimizer(TrainConfig(lr=0.01), param_groups(m, 1.0))
    assert len(one.param_groups) == 1


def test_backbone_lr_scale_zero_freezes_all_but_the_head() -> None:
    torch.manual_seed(0)
    m = models.create("smallcnn")
    opt = make_optimizer(TrainConfig(lr=0.01), param_groups(m, 0.0))
    head = {id(p) for p in m.backbone.head.parameters()}
    assert [{id(p) for p in g["params"]} for g in opt.param_groups] == [head]
    frozen = {n: p.detach().clone() for n, p in m.named_parameters() if id(p) not in head}
    assert frozen and not any(p.requires_grad for p in m.parameters() if id(p) not in head)
    before = m.backbone.head.weight.detach().clone()
    x = torch.rand(4, 3, 32, 32, requires_grad=True)
    torch.nn.functional.cross_entropy(m(x), torch.tensor([0, 1, 0, 1])).backward()
    opt.step()
    assert not torch.equal(m.backbone.head.weight, before)
    for n, p in m.named_parameters():
        if n in frozen:
            assert torch.equal(p, frozen[n]) and p.grad is None, n
    assert x.grad is not None and x.grad.abs().sum() > 0  # attacks still see input gradients


def test_ensemble_averages_member_probabilities(tmp_path: Path) -> None:
    torch.manual_seed(1)
    a, b = models.create("smallcnn").eval(), models.create("smallcnn").eval()
    for i, m in enumerate((a, b)):
        models.save_checkpoint(tmp_path / f"{i}.pt", m)
    ens = models.load_ensemble([tmp_path / "0.pt", tmp_path / "1.pt"])
    x = torch.rand(4, 3, 32, 32)
    want = (torch.softmax(a(x), 1) + torch.softmax(b(x), 1)) / 2
    assert torch.allclose(torch.softmax(ens(x), 1), want, atol=1e-5)
    assert ens.classes == a.classes
