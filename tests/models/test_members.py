"""Backbones trained side by side (`a+b`, models.members): the output is the members' mean
probability, each member keeps its own input scaling and pretrained weights, the training loss
is the mean of the members' own cross-entropies, and a checkpoint round-trips."""

from __future__ import annotations

from pathlib import Path

import pytest
import skimage.data
import torch
import torch.nn.functional as F

from histoshield import models
from histoshield.config import AugmentConfig, TrainConfig
from histoshield.errors import HistoshieldError
from histoshield.models.members import MemberMean
from histoshield.training import train
from histoshield.training.stepper import Stepper


def test_output_is_the_mean_member_probability_with_each_members_own_scaling() -> None:
    m = models.create("efficientnet_lite0+resnet18", "none", image_size=32).eval()
    assert isinstance(m.backbone, MemberMean) and len(m.backbone.nets) == 2
    x = torch.rand(3, 3, 32, 32)
    with torch.no_grad():
        out = m(x)
        lite = models.create("efficientnet_lite0", "none", image_size=32)
        res = models.create("resnet18", "none", image_size=32)
        lite.backbone.load_state_dict(m.backbone.nets[0].state_dict())
        res.backbone.load_state_dict(m.backbone.nets[1].state_dict())
        p = (lite.eval()(x).softmax(1) + res.eval()(x).softmax(1)) / 2
    assert torch.allclose(out.softmax(1), p, atol=1e-6)


def test_pretrained_members_keep_their_imagenet_weights() -> None:
    m = models.create("efficientnet_lite1+efficientnet_lite2", "imagenet", num_classes=1000,
                      image_size=224).eval()  # fmt: skip
    img = torch.tensor(skimage.data.chelsea()).permute(2, 0, 1)[None].float() / 255
    with torch.no_grad():
        assert 281 <= int(m(img).argmax(1)) <= 285  # a cat, through both members


def test_training_loss_is_the_mean_of_the_members_cross_entropies() -> None:
    torch.manual_seed(0)
    m = models.create("smallcnn+smallcnn", "none", image_size=32).train()
    x, y = torch.rand(8, 3, 32, 32), torch.randint(0, 2, (8,))
    opt = torch.optim.SGD(m.parameters(), lr=0.0)
    with torch.no_grad():
        z = m.preprocess(x)
        own = [F.cross_entropy(net(z * m.backbone.scales[0] + m.backbone.shifts[0]), y)
               for net in m.backbone.nets]  # fmt: skip
    loss, logits = Stepper(m, opt, torch.device("cpu")).step(x, y)
    assert loss.item() == pytest.approx(torch.stack(own).mean().item(), rel=1e-5)
    # the mean of the members' losses is not the loss of their averaged output
    assert loss.item() != pytest.approx(F.cross_entropy(logits, y).item(), rel=1e-4)
    assert m.backbone.member_logits() is None  # read once, then forgotten


def test_a_trained_member_model_round_trips_through_its_checkpoint(tmp_path: Path) -> None:
    cfg = TrainConfig(data="synthetic:n=32,size=32", model="smallcnn+smallcnn", image_size=32,
                      epochs=1, batch_size=16, augment=AugmentConfig(enabled=False))  # fmt: skip
    train(cfg, tmp_path / "run", progress=False)
    back = models.load_checkpoint(tmp_path / "run" / "best.pt")
    assert back.name == "smallcnn+smallcnn" and isinstance(back.backbone, MemberMean)


@pytest.mark.parametrize(
    "name,weights,needle",
    [("smallcnn+", "none", "two or more"), ("smallcnn+nonet", "none", "nonet"),
     ("smallcnn+smallcnn", "/some/file.pt", "weights keyword")],
)  # fmt: skip
def test_bad_member_specs_are_one_line_errors(name: str, weights: str, needle: str) -> None:
    with pytest.raises(HistoshieldError, match=needle):
        models.create(name, weights)


def test_a_timm_model_can_be_a_member() -> None:
    m = models.create("timm:resnet10t+smallcnn", "none", image_size=32).eval()
    with torch.no_grad():
        assert m(torch.rand(2, 3, 32, 32)).shape == (2, 2)
