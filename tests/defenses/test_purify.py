"""Input purification: exact forward transforms, straight-through gradients, and BPDA attacks
that are not fooled by non-differentiable purifiers."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from PIL import Image
from scipy.ndimage import median_filter
from torch import nn

from histoshield import attacks
from histoshield.defenses import purify
from histoshield.errors import HistoshieldError
from tests.defenses.toy import EPS, accuracy, toy_data, toy_model, train


def _pil_jpeg(img: np.ndarray, quality: int) -> np.ndarray:
    buf = io.BytesIO()
    Image.fromarray(img).save(buf, format="JPEG", quality=quality)
    return np.asarray(Image.open(io.BytesIO(buf.getvalue())).convert("RGB"))


def test_jpeg_forward_equals_pil_round_trip_and_gradient_is_straight_through():
    g = torch.Generator().manual_seed(0)
    u8 = torch.randint(0, 256, (2, 3, 16, 16), generator=g, dtype=torch.uint8)
    x = (u8.float() / 255).requires_grad_(True)
    jpeg = purify.create("jpeg:quality=60")
    out = jpeg(x)
    for i in range(2):
        want = _pil_jpeg(u8[i].permute(1, 2, 0).numpy(), 60)
        got = (out[i].detach() * 255).round().byte().permute(1, 2, 0).numpy()
        assert np.array_equal(got, want)
    w = torch.randn(out.shape, generator=g)
    (out * w).sum().backward()
    assert torch.equal(x.grad, w)  # BPDA: identity backward


def test_bitdepth_levels_and_median_match_references():
    x = torch.rand(2, 3, 9, 9, generator=torch.Generator().manual_seed(1))
    q = purify.create("bitdepth:bits=3")(x)
    assert torch.allclose(q * 7, (q * 7).round(), atol=1e-5)
    assert (q - x).abs().max() <= 0.5 / 7 + 1e-6
    med = purify.create("median:k=3")(x)
    # torch "reflect" padding is scipy's "mirror" mode
    want = median_filter(x.numpy(), size=(1, 1, 3, 3), mode="mirror")
    assert np.allclose(med.numpy(), want)


def test_wrapper_exposes_inner_model_and_flags():
    inner = toy_model()
    inner.classes, inner.image_size, inner.meta = ["benign", "malignant"], 4, {"k": 1}
    m = purify.wrap(inner, "median:k=3+bitdepth:bits=5")
    assert (m.classes, m.image_size, m.meta) == (["benign", "malignant"], 4, {"k": 1})
    assert m.differentiable is False and m.default_eot == 1
    assert m.purify == "median:k=3+bitdepth:bits=5"
    r = purify.wrap(inner, "randpad:scale=1.5,eot=4")
    assert r.differentiable and r.default_eot == 4
    assert attacks.create("pgd", r, eps=EPS).eot == 4  # EOT picked up automatically
    out = r.purifiers(torch.rand(2, 3, 4, 4))
    assert out.shape == (2, 3, 6, 6)


@pytest.mark.parametrize(
    ("spec", "fragment"),
    [
        ("blur:k=3", "choose one of bitdepth, jpeg, median, randpad"),
        ("jpeg:quality=0", "quality must be in 1..95"),
        ("median:k=4", "odd integer"),
        ("bitdepth:levels=4", "valid parameters are bits, bpda"),
    ],
)
def test_purifier_spec_errors(spec, fragment):
    with pytest.raises(HistoshieldError, match=fragment.replace(".", r"\.")):
        purify.wrap(toy_model(), spec)


def test_bpda_attack_is_not_fooled_by_a_non_differentiable_purifier():
    x, y = toy_data(200, 0)
    x_test, y_test = toy_data(200, 1)
    torch.manual_seed(0)
    model = toy_model()
    train(model, x, y, steps=60, lr=0.05)
    defended = purify.wrap(model, "bitdepth:bits=5")  # straight-through gradient (BPDA)
    naive = purify.wrap(model, "bitdepth:bits=5,bpda=false")  # the true (zero) gradient
    assert accuracy(defended, x_test, y_test) > 0.9
    adv_bpda = attacks.run("pgd", defended, x_test, y_test, eps=EPS, steps=20, seed=0)
    adv_naive = attacks.run("pgd", naive, x_test, y_test, eps=EPS, steps=20, seed=0)
    acc_bpda = accuracy(defended, adv_bpda, y_test)
    acc_naive = accuracy(defended, adv_naive, y_test)
    # zero gradients make the naive attack report robustness the purifier does not have
    assert acc_naive > acc_bpda + 0.3
    assert (
        acc_bpda
        <= accuracy(
            model, attacks.run("pgd", model, x_test, y_test, eps=EPS, steps=20, seed=0), y_test
        )
        + 0.1
    )


def test_jpeg_purified_model_is_attackable_with_bpda():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 2, 16), nn.Flatten())  # one 16×16 linear filter
    x = torch.rand(8, 3, 16, 16, generator=torch.Generator().manual_seed(2))
    defended = purify.wrap(model, "jpeg:quality=75")
    with torch.no_grad():
        y = defended(x).argmax(1)
    adv = attacks.run("pgd", defended, x, y, eps=16 / 255, steps=10, seed=0)
    assert accuracy(defended, adv, y) < 0.5
