"""Augment: HED deconvolution matches scikit-image; each op keeps shape/range and is seeded."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from skimage.color import hed2rgb, rgb2hed

from histoshield.config import AugmentConfig
from histoshield.data.transforms import Augment, hed_to_rgb, rgb_to_hed

OFF = dict(flip=False, rot90=False, crop_scale=None, color_jitter=0.0, hed_sigma=0.0)


def _batch(n: int = 4, size: int = 16, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, 3, size, size, generator=g, dtype=torch.float64) * 0.9 + 0.05


def test_hed_matches_skimage() -> None:
    x = _batch()
    ours = rgb_to_hed(x).permute(0, 2, 3, 1).numpy()
    ref = np.stack([rgb2hed(im) for im in x.permute(0, 2, 3, 1).numpy()])
    np.testing.assert_allclose(ours, ref, atol=1e-10)
    back = hed_to_rgb(torch.from_numpy(ref).permute(0, 3, 1, 2)).permute(0, 2, 3, 1).numpy()
    ref_back = np.stack([hed2rgb(h) for h in ref])
    np.testing.assert_allclose(back, ref_back, atol=1e-10)


def test_hed_roundtrip_and_sigma_zero_identity() -> None:
    x = _batch().float()
    torch.testing.assert_close(hed_to_rgb(rgb_to_hed(x, clip=False)), x, atol=1e-5, rtol=0)
    aug = Augment(AugmentConfig(**{**OFF, "hed_sigma": 0.0}))
    torch.testing.assert_close(aug._hed(x, torch.Generator().manual_seed(1)), x, atol=1e-5, rtol=0)
    assert torch.equal(aug(x, torch.Generator().manual_seed(1)), x)  # everything off


def test_hed_jitter_changes_colour_not_geometry() -> None:
    x = _batch().float()
    y = Augment(AugmentConfig(**{**OFF, "hed_sigma": 0.1}))(x, torch.Generator().manual_seed(0))
    assert y.shape == x.shape and 0 <= y.min() and y.max() <= 1
    assert (y - x).abs().max() > 1e-3
    # A pixel-wise colour map: identical input pixels map to identical output pixels.
    x2 = x.clone()
    x2[:, :, 0, 1] = x2[:, :, 0, 0]
    y2 = Augment(AugmentConfig(**{**OFF, "hed_sigma": 0.1}))(x2, torch.Generator().manual_seed(0))
    torch.testing.assert_close(y2[:, :, 0, 0], y2[:, :, 0, 1])


def test_flip_rot_are_permutations_of_pixels() -> None:
    x = _batch(8).float()
    y = Augment(AugmentConfig(**{**OFF, "flip": True, "rot90": True}))(
        x, torch.Generator().manual_seed(3)
    )
    for a, b in zip(x, y, strict=True):
        cands = [torch.rot90(v, k, dims=(-2, -1)) for v in (a, a.flip(-1)) for k in range(4)]
        assert any(torch.equal(b, c) for c in cands)
    assert not torch.equal(x, y)


@pytest.mark.parametrize(
    "opt", [{"crop_scale": (0.5, 0.9)}, {"color_jitter": 0.2}, {}], ids=["crop", "jitter", "all"]
)
def test_ops_keep_shape_range_and_are_seeded(opt: dict) -> None:
    cfg = AugmentConfig(**{**OFF, **opt}) if opt else AugmentConfig()
    x = _batch(6, 24).float()
    a = Augment(cfg)(x, torch.Generator().manual_seed(5))
    b = Augment(cfg)(x, torch.Generator().manual_seed(5))
    c = Augment(cfg)(x, torch.Generator().manual_seed(6))
    assert a.shape == x.shape and a.min() >= 0 and a.max() <= 1
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert not torch.equal(a, x)


def test_crop_full_scale_is_identity() -> None:
    x = _batch(3, 16).float()
    aug = Augment(AugmentConfig(**{**OFF, "crop_scale": (1.0, 1.0)}))
    assert torch.equal(aug(x, torch.Generator().manual_seed(0)), x)
    # The crop path itself at scale 1, aspect 1 and centre is the identity resample.
    aug2 = Augment(AugmentConfig(**{**OFF, "crop_scale": (0.999999, 1.0)}))
    y = aug2._crop(x, torch.Generator().manual_seed(0))
    assert (y - x).abs().mean() < 0.1


def test_disabled_is_identity() -> None:
    x = _batch().float()
    assert Augment(AugmentConfig(enabled=False))(x, torch.Generator()) is x
