"""The card's Grad-CAM evidence: clean vs PGD maps of a few positive-class images."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from histoshield.errors import HistoshieldError

GRADCAM_IMAGES = 4
GRADCAM_ATTACK = ("pgd", {"steps": 10})


def gradcam_section(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    classes: Sequence[str],
    *,
    eps: float,
    seed: int,
    layer: str | None,
    out: Path,
) -> dict[str, Any]:
    """Clean vs adversarial Grad-CAM (PGD-10 at the headline eps) of the first few correctly
    classified positive-class images, drawn to out/figures/gradcam.png. A model Grad-CAM cannot
    explain (e.g. TorchScript: no hooks) gets a note instead: the audit's numbers stand."""
    from histoshield.data.records import positive_index
    from histoshield.evaluation.explain import gradcam_evidence
    from histoshield.evaluation.predict import predict_proba
    from histoshield.report.explain import evidence_panel

    classes = list(classes)
    pos = positive_index(classes)
    y = torch.as_tensor(y).long().cpu()
    pred = predict_proba(model, x).argmax(1)
    idx = ((y == pos) & (pred == y)).nonzero()[:, 0][:GRADCAM_IMAGES]
    attack, params = GRADCAM_ATTACK
    info: dict[str, Any] = {
        "figure": None,
        "layer": layer,
        "attack": f"{attack}:steps={params['steps']}",
        "eps": eps,
        "n": len(idx),
        "target": classes[pos],
        "note": None,
    }
    if len(idx) == 0:
        return {**info, "note": f"no correctly classified {classes[pos]} image to explain"}
    try:
        ev = gradcam_evidence(model, x[idx.to(x.device)], y[idx].to(x.device), attack=attack,
                              eps=eps, params=dict(params), seed=seed, layer=layer)  # fmt: skip
    except HistoshieldError as e:
        return {**info, "note": f"no Grad-CAM: {e}"}
    evidence_panel(ev, out / "figures" / "gradcam.png")
    return {
        **info,
        "figure": "figures/gradcam.png",
        "layer": ev.layer,
        "target": ev.classes[ev.target],
        "clean_predictions": [ev.classes[int(k)] for k in ev.p_clean.argmax(1)],
        "adversarial_predictions": [ev.classes[int(k)] for k in ev.p_adv.argmax(1)],
    }
