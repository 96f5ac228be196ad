"""Stain normalisation inside the model: statistics, gradients, persistence."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from skimage.color import rgb2lab

from histoshield import models
from histoshield.errors import HistoshieldError
from histoshield.models.stain import _from_od, _to_od, lab_to_rgb, macenko_stain_matrix, rgb_to_lab

RUIFROK_HE = torch.tensor([[0.65, 0.07], [0.70, 0.99], [0.29, 0.11]])  # columns: H, E


def _he_images(he: torch.Tensor, n: int, size: int, seed: int, scale: float = 1.0) -> torch.Tensor:
    """H&E-like tiles from a known stain matrix: per-pixel mixtures, some nearly pure stains."""
    g = torch.Generator().manual_seed(seed)
    he = he / he.norm(dim=0, keepdim=True)
    total = 0.3 + 1.2 * torch.rand(n, 1, size * size, generator=g)
    t = torch.rand(n, 1, size * size, generator=g)
    conc = torch.cat([total * (1 - t), total * t], dim=1) * scale  # (n,2,P)
    return _from_od(he @ conc).view(n, 3, size, size)


def test_lab_matches_scikit_image_and_round_trips() -> None:
    x = torch.rand(2, 3, 8, 8, dtype=torch.float64)
    ours = rgb_to_lab(x)
    theirs = np.stack([rgb2lab(img.permute(1, 2, 0).numpy()) for img in x]).transpose(0, 3, 1, 2)
    np.testing.assert_allclose(ours.numpy(), theirs, atol=2e-3)
    torch.testing.assert_close(lab_to_rgb(ours), x, atol=1e-5, rtol=0)


def test_reinhard_matches_reference_statistics_and_passes_gradients(tmp_path: Path) -> None:
    train = _he_images(RUIFROK_HE, 8, 24, seed=0)
    # another "lab": lighter staining and a colour cast (kept inside the sRGB gamut, where
    # Reinhard is exact; out-of-gamut targets are clipped, as in every implementation)
    cast = torch.tensor([0.9, 1.0, 0.85]).view(1, 3, 1, 1)
    other = _he_images(RUIFROK_HE, 3, 24, seed=1, scale=0.8) * cast
    model = models.create("smallcnn", stain_norm="reinhard")
    with pytest.raises(HistoshieldError, match="not fitted"):
        model(train)
    model.fit_stain(train)
    lab_train = np.stack([rgb2lab(i.permute(1, 2, 0).numpy()) for i in train.double()])
    ref_mean = lab_train.reshape(8, -1, 3).mean(1).mean(0)
    torch.testing.assert_close(
        model.stain.ref_mean.double(), torch.tensor(ref_mean), atol=1e-2, rtol=0
    )

    out = model.stain(other)
    lab = np.stack([rgb2lab(i.permute(1, 2, 0).numpy()) for i in out.double()]).reshape(3, -1, 3)
    ref_std = model.stain.ref_std.double().numpy()
    np.testing.assert_allclose(lab.mean(1), np.broadcast_to(ref_mean, (3, 3)), atol=0.05)
    np.testing.assert_allclose(lab.std(1, ddof=1), np.broadcast_to(ref_std, (3, 3)), rtol=0.01)
    before = np.stack([rgb2lab(i.permute(1, 2, 0).numpy()) for i in other.double()])
    assert np.abs(before.reshape(3, -1, 3).mean(1) - ref_mean).max() > 5  # it did change them

    x = other.clone().requires_grad_(True)
    model.eval()(x)[:, 1].sum().backward()
    assert torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0

    models.save_checkpoint(tmp_path / "c.pt", model)
    back = models.load_checkpoint(tmp_path / "c.pt")
    assert back.stain_norm == "reinhard" and bool(back.stain.fitted)
    assert torch.equal(back.stain.ref_mean, model.stain.ref_mean)
    with torch.no_grad():
        assert torch.equal(back(other), model(other))


def _cos(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.cosine_similarity(a.double(), b.double(), dim=0)


def test_macenko_recovers_stains_and_maps_new_stains_to_the_reference(tmp_path: Path) -> None:
    target = RUIFROK_HE / RUIFROK_HE.norm(dim=0)
    train = _he_images(RUIFROK_HE, 6, 24, seed=0)
    model = models.create("smallcnn", stain_norm="macenko").fit_stain(train)
    assert (_cos(model.stain.ref_he, target) > 0.99).all()

    shifted = torch.tensor([[0.45, 0.20], [0.80, 0.90], [0.40, 0.35]])  # another lab's stains
    other = _he_images(shifted, 2, 24, seed=1)
    x = other.clone().requires_grad_(True)
    out = model.stain(x)
    for i in range(2):
        est_before = macenko_stain_matrix(_to_od(other[i]).flatten(1).T)
        est_after = macenko_stain_matrix(_to_od(out[i].detach()).flatten(1).T)
        assert (_cos(est_after, target) > 0.99).all()
        assert (_cos(est_after, target) > _cos(est_before, target)).all()
    model.eval()(x).sum().backward()
    assert torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0

    models.save_checkpoint(tmp_path / "m.pt", model)
    back = models.load_checkpoint(tmp_path / "m.pt")
    assert torch.equal(back.stain.ref_he, model.stain.ref_he)
    with torch.no_grad():
        assert torch.equal(back(other), model.eval()(other))
