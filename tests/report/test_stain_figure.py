"""The stain-budget figure: one tile at each corner of the hed and color budgets."""

from __future__ import annotations

import torch

from histoshield.report.stain import color_corners, hed_corners, stain_corners_figure
from tests.helpers_models import stained


def test_corners_move_one_parameter_each_and_grow_with_the_budget(tmp_path):
    x, _ = stained(1, 16)
    tile = x[0]
    small, big = hed_corners(tile, 0.05), hed_corners(tile, 0.2)
    assert len(small) == 12 and len(color_corners(tile, 0.2)) == 8
    assert [lab for lab, _ in big[:4]] == ["H ×0.80", "H ×1.20", "H -0.20 OD", "H +0.20 OD"]
    for (_, a), (_, b) in zip(small, big, strict=True):
        assert 0 < float((a - tile).abs().mean()) < float((b - tile).abs().mean())
    # zero budget: every corner is the tile itself
    for _, img in [*hed_corners(tile, 0.0), *color_corners(tile, 0.0)]:
        torch.testing.assert_close(img, tile, atol=1e-5, rtol=0)
    png = stain_corners_figure(tile, tmp_path / "corners.png", eps=0.2)
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
