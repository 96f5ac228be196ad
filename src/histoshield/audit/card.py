"""The robustness card: card.json from `run_audit`'s measurements, `Card`, `format_card`."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

from torch import nn

from histoshield.audit.budgets import Budget

SCHEMA = "histoshield-robustness-card/1"
SCHEMA_FILE = Path(__file__).parent.parent / "schemas" / "robustness_card.schema.json"
def _parameters(model: nn.Module) -> int:
    return int(sum(p.numel() for p in model.parameters()))


def model_info(model: nn.Module, source: str | None = None) -> dict[str, Any]:
    """The card's `model` section: what was audited and how its inputs were prepared."""
    meta = getattr(model, "meta", None) or {}
    card = meta.get("card") or {}
    cfg = meta.get("config") or {}
    fmt = card.get("format") or ("histoshield" if meta.get("format") else "module")
    return {
        "name": getattr(model, "name", type(model).__name__),
        "source": source or meta.get("source"),
        "format": fmt,
        "architecture": card.get("architecture") or meta.get("name") or cfg.get("model"),
        "input_size": getattr(model, "image_size", None),
        "classes": list(getattr(model, "classes", []) or []),
        "output": card.get("output", "logits"),
        "preprocessing": meta.get("preprocessing"),
        "tta": bool(getattr(model, "tta", False)),
        "stain_norm": getattr(model, "stain_norm", "none"),
        "parameters": _parameters(model),
        "gradcam_layer": card.get("gradcam_layer"),
    }


def _attack_entry(r: dict[str, Any]) -> dict[str, Any]:
    keys = ("attack", "name", "description", "params", "eps", "eps_255", "norm", "n",
            "clean_correct", "adv_correct", "adversarial_accuracy", "adversarial_accuracy_ci",
            "balanced_adversarial_accuracy", "class_accuracy", "success_rate", "queries",
            "seconds", "forward_passes", "backward_passes")  # fmt: skip
    return {k: r.get(k) for k in keys}


def card_warnings(m: dict[str, Any], model: nn.Module) -> list[str]:
    """Every warning the card carries: degenerate model, masking risks, failed self-checks."""
    out = []
    if m["degenerate"]:
        out.append(f"robustness numbers NOT meaningful: {m['degenerate']}")
    out += list((getattr(model, "meta", None) or {}).get("warnings") or [])
    out += [f"{c['attack']}: {c['detail']}" for c in m["sanity"] if not c["passed"]]
    return out


def make_card(
    m: dict[str, Any],
    model: nn.Module,
    *,
    data: dict[str, Any],
    seed: int,
    source: str | None = None,
    env: dict[str, Any] | None = None,
    gradcam: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """The robustness card (card.json) from `run_audit`'s measurements (`gradcam`: what
    `gradcam_section` drew, or None)."""
    from histoshield.runtime import environment

    b: Budget = m["budget"]
    env = env or environment()
    head = next((w for w in m["worst_case"] if w["eps"] == b.headline), None)
    clean = m["clean"]
    warns = card_warnings(m, model)
    unreliable = bool(
        m["degenerate"]
        or any(c.get("upper_bound") and not c["passed"] for c in m["sanity"])
        or (model_info(model)["output"] in ("probabilities", "sigmoid-probability"))
    )
    software = {k: env.get(k) for k in ("histoshield", "python", "torch", "torchvision", "timm",
                                         "numpy", "platform", "device", "git_commit")}  # fmt: skip
    return {
        "schema": SCHEMA,
        "name": getattr(model, "name", type(model).__name__),
        "model": model_info(model, source),
        "data": data,
        "threat_model": "Linf",
        "eps": b.headline,
        "eps_255": round(b.headline * 255, 4),
        "budget": {
            "name": b.name,
            "eps": list(b.eps),
            "attacks": list(b.attacks),
            "black_box": b.square,
            "sanity_limit": b.sanity_limit,
            "certify": dict(b.certify) if m["certified"] is not None else None,
            "stain": list(b.stain),
        },
        "seed": int(seed),
        "clean_acc": clean["accuracy"],
        "clean_acc_ci": list(clean["accuracy_ci"]) if clean.get("accuracy_ci") else None,
        "clean_balanced_acc": clean["balanced_accuracy"],
        "clean": {
            k: clean.get(k)
            for k in (
                "n",
                "accuracy",
                "balanced_accuracy",
                "sensitivity",
                "specificity",
                "auc",
                "tp",
                "tn",
                "fp",
                "fn",
            )
        },
        "positive_class": m["positive"],
        "robust_acc": head["adversarial_accuracy"] if head else None,
        "robust_acc_ci": head["adversarial_accuracy_ci"] if head else None,
        "robust_balanced_acc": head["balanced_adversarial_accuracy"] if head else None,
        "robust_attacks": head["attacks"] if head else [],
        "attacks": [_attack_entry(r) for r in m["results"]],
        "worst_case": [
            {
                k: w[k]
                for k in (
                    "eps",
                    "eps_255",
                    "attacks",
                    "n",
                    "adv_correct",
                    "adversarial_accuracy",
                    "adversarial_accuracy_ci",
                    "balanced_adversarial_accuracy",
                    "class_accuracy",
                )
            }
            for w in m["worst_case"]
        ],  # fmt: skip
        "stain": _stain_section(m, b),
        "certified": m["certified"],
        "sanity": m["sanity"],
        "degenerate": m["degenerate"],
        "gradcam": gradcam,
        "number_forward_passes": 8 if getattr(model, "tta", False) else 1,
        "attack_forward_passes": m["forward_passes"],
        "attack_backward_passes": m["backward_passes"],
        "seconds": m["seconds"],
        "software": software,
        "warnings": warns,
        "unreliable": unreliable,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }


def _stain_section(m: dict[str, Any], b: Budget) -> dict[str, Any] | None:
    """The stain threat model's rows and per-image worst case (budget a = b, not pixel eps)."""
    st = m.get("stain")
    if not st:
        return None
    keep = ("eps", "attacks", "n", "adv_correct", "adversarial_accuracy",
            "adversarial_accuracy_ci", "balanced_adversarial_accuracy", "class_accuracy")
    return {
        "threat_model": "stain (HED / colour, docs/stain.md)",
        "eps": list(b.stain_eps),
        "attacks": [_attack_entry(r) for r in st["rows"]],
        "worst_case": [
            {**{k: w[k] for k in keep}, "eps_255": None, "norm": "stain"} for w in st["worst_case"]
        ],  # fmt: skip
    }


def validate_card(card: dict[str, Any]) -> None:
    """Check a card against the committed JSON schema (needs `jsonschema`)."""
    import jsonschema

    schema = json.loads(SCHEMA_FILE.read_text(encoding="utf-8"))
    jsonschema.validate(card, schema)


class Card:
    """A robustness card: `.data` is card.json's dict; `.save(folder)` writes card.json and
    report.html; the headline numbers are attributes."""

    def __init__(self, data: dict[str, Any]) -> None:
        self.data = data

    @property
    def clean_acc(self) -> float | None:
        """Clean accuracy."""
        return self.data["clean_acc"]

    @property
    def robust_acc(self) -> float | None:
        """Worst-case robust accuracy at the headline eps."""
        return self.data["robust_acc"]

    @property
    def warnings(self) -> list[str]:
        """Every warning (degenerate model, masking risk, failed self-checks)."""
        return list(self.data["warnings"])

    def to_dict(self) -> dict[str, Any]:
        """card.json's content."""
        return self.data

    def save(self, folder: str | Path) -> Path:
        """Write card.json and report.html into `folder`; returns the card path."""
        from histoshield.report.audit import build_audit_report
        from histoshield.runtime import write_json

        path = write_json(Path(folder) / "card.json", self.data)
        build_audit_report(folder)
        return path

    def __repr__(self) -> str:
        d = self.data
        return (
            f"Card({d['name']!r}: clean {d['clean_acc']:.3f}, robust {d['robust_acc']:.3f} at "
            f"{d['eps_255']:g}/255 (worst case of {', '.join(d['robust_attacks'])}), "
            f"{len(d['warnings'])} warnings)"
        )

def _f4(v: float | None) -> str:
    """A fraction with 4 decimals; n/a when undefined (e.g. balanced accuracy of one class)."""
    return "n/a" if v is None else f"{v:.4f}"


def format_card(card: dict[str, Any]) -> str:
    """A few plain-text lines: warnings first, then clean and robust accuracy per attack."""
    lines = [f"warning: {w}" for w in card["warnings"]]
    c = card["clean"]
    lines.append(
        f"{card['name']}: {card['data']['n']} images, clean accuracy {_f4(c['accuracy'])} "
        f"(balanced {_f4(c['balanced_accuracy'])})"
    )
    for w in card["worst_case"]:
        if w["eps"] > 0:
            lines.append(
                f"  eps {w['eps_255']:g}/255: robust accuracy {w['adv_correct']}/{w['n']} = "
                f"{_f4(w['adversarial_accuracy'])} (worst case of {', '.join(w['attacks'])})"
            )
    for w in (card.get("stain") or {}).get("worst_case", []):
        if w["eps"] > 0:
            lines.append(
                f"  stain {w['eps']:g}: robust accuracy {w['adv_correct']}/{w['n']} = "
                f"{_f4(w['adversarial_accuracy'])} (worst case of {', '.join(w['attacks'])})"
            )
    lines.append(
        f"headline (eps {card['eps_255']:g}/255): robust accuracy "
        f"{_f4(card['robust_acc'])}, balanced {_f4(card['robust_balanced_acc'])}; "
        f"{card['attack_forward_passes']} forward / {card['attack_backward_passes']} backward "
        f"image passes, {card['seconds']:.1f} s"
    )
    return "\n".join(lines)
