"""The paper's protocol end to end, as a list of named, resumable stages.

split (Table 1) → train original → train gaussian (+ extra defenses) → clean metrics (Table 2) →
Table 3 (FGSM on malignant test images) → robustness curves → transfer → certification of the
gaussian model → sanity checks → report.

Each finished stage is recorded atomically in ``state.json`` and its results merged into
``results.json``; ``resume=True`` skips finished stages and training stages continue from their
``last.pt``. Every stage reseeds from ``cfg.seed``, so a resumed study gives the same numbers as
an uninterrupted one.

The package, one job per module: `engine` (run the stages, state.json, resume), `settings`
(presets, the up-front config check, which keys each stage depends on), `context` (`Context`,
`Stage`), `shared` (test images, models and harness calls the stages share), and one module per
group of stages: `train` (split, training), `tables` (clean, Table 3), `robustness` (curves,
transfer), `certify`, `sanity`, `report`.
"""

from histoshield.evaluation.harness import parse_attack_spec
from histoshield.study.context import RESULTS, STATE, Context, Stage
from histoshield.study.engine import build_stages, run_study
from histoshield.study.settings import (
    GAUSSIAN,
    ORIGINAL,
    check_study_config,
    config_changes,
    defense_slugs,
    gaussian_spec,
    load_study_config,
    shipped_configs,
    stage_keys,
)

__all__ = [
    "GAUSSIAN",
    "ORIGINAL",
    "RESULTS",
    "STATE",
    "Context",
    "Stage",
    "build_stages",
    "check_study_config",
    "config_changes",
    "defense_slugs",
    "gaussian_spec",
    "load_study_config",
    "parse_attack_spec",
    "run_study",
    "shipped_configs",
    "stage_keys",
]
