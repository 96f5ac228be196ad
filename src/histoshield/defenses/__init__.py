"""Defenses, grouped by when they act.

Training-time (`create(spec)`): `gaussian` (the paper's noise training), `pgd-at` (Madry),
`trades`, `fgsm-rs` (fast AT with the catastrophic-overfitting guard), `hed-at` (adversarial
stain training, REET-style) and `pgd-at+hed-at` (PGD around the adversarial stain). Inference-time:
`purify.wrap(model, spec)` (JPEG, median, bit depth with BPDA gradients). Certification:
`smoothing.Smoothed` (randomized smoothing, Cohen et al. 2019).

Examples:
    >>> from histoshield import defenses
    >>> d = defenses.create("pgd-at:eps=2/255,steps=7")
    >>> d.spec, d.adversarial
    ('pgd-at:eps=2/255,steps=7', True)
"""

from __future__ import annotations

from histoshield.defenses.base import REGISTRY, TrainingDefense
from histoshield.defenses.fgsm_rs import FGSMRandomStart
from histoshield.defenses.gaussian import GaussianNoise
from histoshield.defenses.hed_at import HEDAdversarialTraining, PGDHEDTraining
from histoshield.defenses.pgd_at import PGDAdversarialTraining
from histoshield.defenses.spec import parse_spec
from histoshield.defenses.trades import TRADES

__all__ = [
    "REGISTRY",
    "TRADES",
    "FGSMRandomStart",
    "GaussianNoise",
    "HEDAdversarialTraining",
    "PGDAdversarialTraining",
    "PGDHEDTraining",
    "TrainingDefense",
    "available",
    "create",
]


def available() -> list[str]:
    """Names of the training-time defenses."""
    return REGISTRY.names()


def create(spec: str) -> TrainingDefense:
    """Build a training-time defense from `"name:key=value,..."` (eps accepts `2/255`)."""
    name, params = parse_spec(spec, REGISTRY.schemas(), "defense")
    return REGISTRY[name](params)
