"""Stage `gradcam`: clean vs adversarial Grad-CAM evidence for a few malignant test images."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch

from histoshield.data.records import positive_index
from histoshield.evaluation.harness import eps_255, parse_attack_spec
from histoshield.study.context import Context
from histoshield.study.settings import curve_attacks
from histoshield.study.shared import load_model, save_npz, test_set


def stage_gradcam(ctx: Context) -> dict[str, Any]:
    """Grad-CAM evidence: clean vs adversarial maps of the first few malignant test images per
    model, under the curves' PGD (else the Table-3 attack) at the Table-3 eps."""
    from histoshield.evaluation.explain import gradcam_evidence
    from histoshield.report.explain import N_PANEL

    cfg, d = ctx.cfg, test_set(ctx)
    pos = positive_index(d["classes"])
    idx = torch.nonzero(d["y"] == pos).flatten()[:N_PANEL]
    if not len(idx):
        return {}
    pgd = [s for s in curve_attacks(cfg) if parse_attack_spec(s)[0] == "pgd"]
    spec = (pgd or [cfg.table3_attack])[0]
    attack, params = parse_attack_spec(spec)
    out: dict[str, Any] = {
        "attack": spec, "eps": cfg.table3_eps, "eps_255": eps_255(cfg.table3_eps),
        "target": d["classes"][pos], "classes": d["classes"], "models": {},
    }  # fmt: skip
    names = [Path(d["records"][int(i)].path).name for i in idx]
    for name in ctx.model_names:
        ev = gradcam_evidence(
            load_model(ctx, name), d["x"][idx], d["y"][idx], attack=attack, params=params,
            eps=cfg.table3_eps, seed=cfg.seed, names=names,
        )  # fmt: skip
        npz = f"examples/gradcam_{name}.npz"
        save_npz(
            ctx, ctx.out / npz, x=ev.x.numpy(), adv=ev.adv.numpy(), cam_clean=ev.cam_clean,
            cam_adv=ev.cam_adv, p_clean=ev.p_clean.numpy(), p_adv=ev.p_adv.numpy(),
            labels=ev.labels.numpy(),
        )  # fmt: skip
        rows = ev.to_dict()["images"]
        out["models"][name] = {
            "layer": ev.layer,
            "n": len(rows),
            "flipped": sum(r["flipped"] for r in rows),
            "cam_mean_abs_change": float(np.mean([r["cam_mean_abs_change"] for r in rows])),
            "npz": npz,
            "images": rows,
        }
    return {"gradcam": out}
