"""Clean vs adversarial Grad-CAM panel: image and map overlay per row, predictions in titles."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from histoshield.data import positive_index
from histoshield.errors import HistoshieldError
from histoshield.report.figures import _img, _save, plt

N_PANEL = 4  # images per panel: enough to see a pattern, small enough to read


def _np(a: Any) -> np.ndarray:
    return a.detach().cpu().numpy() if isinstance(a, torch.Tensor) else np.asarray(a)


def gradcam_panel(
    x: Any,
    adv: Any,
    cam_clean: Any,
    cam_adv: Any,
    p_clean: Any,
    p_adv: Any,
    classes: Sequence[str],
    path: str | Path,
    *,
    labels: Sequence[int] | None = None,
    names: Sequence[str] = (),
    title: str = "",
    n: int = N_PANEL,
) -> Path:
    """Write a PNG with, per image, clean | clean Grad-CAM | adversarial | adversarial Grad-CAM.

    x, adv: (N,3,H,W) in [0,1]; cam_*: (N,H,W) in [0,1]; p_*: (N,C) probabilities.
    """
    x, adv, cc, ca = _np(x), _np(adv), _np(cam_clean), _np(cam_adv)
    pc, pa = _np(p_clean), _np(p_adv)
    k = min(int(n), len(x))
    if k < 1:
        raise HistoshieldError("Grad-CAM panel got no images")
    if not (len(adv) >= k and len(cc) >= k and len(ca) >= k and len(pc) >= k and len(pa) >= k):
        raise HistoshieldError("Grad-CAM panel: images, maps and probabilities differ in number")
    classes = [str(c) for c in classes]
    pos = positive_index(classes)

    def caption(p: np.ndarray, what: str) -> str:
        c = int(p.argmax())
        return f"{what}: {classes[c]}\np({classes[pos]}) = {float(p[pos]):.3f}"

    fig, axes = plt.subplots(k, 4, figsize=(10.4, 3.0 * k + 0.6), squeeze=False)
    for i in range(k):
        head = []
        if i < len(names):
            head.append(Path(names[i]).name)
        if labels is not None:
            head.append(f"true: {classes[int(labels[i])]}")
        linf = float(np.abs(adv[i] - x[i]).max()) * 255
        cells = (
            (x[i], None, ("  ".join(head) + "\n" if head else "") + caption(pc[i], "clean")),
            (x[i], cc[i], _cam_title(cc[i], "clean", classes[pos])),
            (adv[i], None, caption(pa[i], f"adversarial (L∞ {linf:.1f}/255)")),
            (adv[i], ca[i], _cam_title(ca[i], "adversarial", classes[pos])),
        )
        for ax, (img, cam, text) in zip(axes[i], cells, strict=True):
            ax.imshow(_img(img), interpolation="nearest")
            if cam is not None:
                ax.imshow(np.clip(cam, 0, 1), cmap="jet", alpha=0.45, vmin=0, vmax=1)
            ax.set_title(text, fontsize=8)
            ax.set_xticks([])
            ax.set_yticks([])
    fig.suptitle(title or f"Grad-CAM for {classes[pos]}: clean vs adversarial", fontsize=11)
    fig.tight_layout()
    return _save(fig, Path(path))


def _cam_title(cam: np.ndarray, what: str, positive: str) -> str:
    # Grad-CAM keeps the positive part only: an all-zero map means no evidence for the class
    return f"Grad-CAM ({what})" + ("" if float(cam.max()) > 0 else f"\nno {positive} evidence")


def evidence_panel(evidence: Any, path: str | Path, *, title: str = "", n: int = N_PANEL) -> Path:
    """`gradcam_panel` of an `evaluation.explain.Evidence`."""
    ev = evidence
    if not title:
        what = f"{ev.attack} eps={ev.eps * 255:g}/255, layer {ev.layer}"
        title = f"Grad-CAM for {ev.classes[ev.target]}: clean vs {what}"
    return gradcam_panel(
        ev.x,
        ev.adv,
        ev.cam_clean,
        ev.cam_adv,
        ev.p_clean,
        ev.p_adv,
        ev.classes,
        path,
        labels=None if ev.labels is None else [int(v) for v in ev.labels],
        names=ev.names,
        title=title,
        n=n,
    )
