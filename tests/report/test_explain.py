"""The clean vs adversarial Grad-CAM panel."""

from __future__ import annotations

import numpy as np
import PIL.Image
import pytest
import torch

from histoshield.errors import HistoshieldError
from histoshield.report.explain import gradcam_panel


def _arrays(n: int):
    g = torch.Generator().manual_seed(0)
    x = torch.rand(n, 3, 24, 24, generator=g)
    adv = (x + 0.03).clamp(0, 1)
    cam = np.random.default_rng(0).random((n, 24, 24)).astype(np.float32)
    p = torch.softmax(torch.randn(n, 2, generator=g), 1)
    return x, adv, cam, cam[::-1].copy(), p, p.flip(1)


@pytest.mark.parametrize(("n", "rows"), [(2, 2), (6, 4)])
def test_panel_has_one_row_per_image_up_to_n(tmp_path, n, rows):
    x, adv, cc, ca, pc, pa = _arrays(n)
    png = gradcam_panel(
        x, adv, cc, ca, pc, pa, ["benign", "malignant"], tmp_path / "g.png", labels=[1] * n
    )
    w, h = PIL.Image.open(png).size
    assert png == tmp_path / "g.png" and w > 800
    assert 250 * rows < h < 400 * rows + 150  # rows of 3 in at 110 dpi (the panel holds <= n)
    assert not list(tmp_path.glob("*.tmp*"))  # atomic write leaves no temp file


def test_panel_refuses_mismatched_inputs(tmp_path):
    x, adv, cc, ca, pc, pa = _arrays(3)
    with pytest.raises(HistoshieldError, match="differ in number"):
        gradcam_panel(x, adv[:1], cc, ca, pc, pa, ["benign", "malignant"], tmp_path / "g.png")
    assert not (tmp_path / "g.png").exists()
