"""K-fold cross-validation grouped by patient (or, to measure the leak, by image).

Folds: scikit-learn's `StratifiedGroupKFold` on the image labels, with groups = patient groups
(`data.breakhis.patient_group`: slides sharing a number stay together) or single images. The
fold file (folds.csv) is written and can be reused (`folds_file=`). Fold k trains with
`training.train` on the other folds' images, selecting its checkpoint on an inner validation
split of those TRAINING groups only, and predicts fold k. Its held-out predictions are written
to `fold_k/oof.csv`; when every fold is done they are pooled (oof.csv) into metrics with
confidence intervals, a per-patient and per-subtype table, and robustness pooled over folds.

Run folder: config.yaml, env.json, folds.csv, state.json (finished folds), fold_k/ (split.csv,
train/ run folder, oof.csv, fold.json), oof.csv, results.json, report.md/report.html, figures/.
`resume=True` skips finished folds and continues an interrupted fold's training from its
last.pt; training and attacks are seeded, so a resumed CV gives the same numbers on CPU.

Modules, one job each: `layout` (file names and formats of the run folder), `config`
(`resolve_cv_config`), `folds` (grouped folds, folds.csv, a fold's split), `robustness` (a
fold's attack rows through the harness), `fold` (train, predict and attack one fold), `pooling`
(pooled metrics, per-patient/subtype tables, pooled robustness) and `run` (the resumable run
over folds, the leak comparison).
"""

from histoshield.cv.config import resolve_cv_config
from histoshield.cv.fold import run_fold
from histoshield.cv.folds import (
    extra_records,
    fold_split,
    group_keys,
    make_folds,
    read_folds,
    write_folds,
)
from histoshield.cv.layout import FOLDS_FILE, OOF_FIELDS, STATE, WORST_CASE
from histoshield.cv.pooling import (
    hanley_mcneil_ci,
    mean_sd,
    per_patient,
    per_subtype,
    pool_robustness,
    pooled_metrics,
    summarize,
)
from histoshield.cv.robustness import attack_rows
from histoshield.cv.run import run_cv, run_leak_comparison
from histoshield.report.cv import read_oof

__all__ = [
    "FOLDS_FILE",
    "OOF_FIELDS",
    "STATE",
    "WORST_CASE",
    "attack_rows",
    "extra_records",
    "fold_split",
    "group_keys",
    "hanley_mcneil_ci",
    "make_folds",
    "mean_sd",
    "per_patient",
    "per_subtype",
    "pool_robustness",
    "pooled_metrics",
    "read_folds",
    "read_oof",
    "resolve_cv_config",
    "run_cv",
    "run_fold",
    "run_leak_comparison",
    "summarize",
    "write_folds",
]
