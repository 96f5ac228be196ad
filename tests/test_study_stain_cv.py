"""The study's optional stain_cv stage: one CV per training variant through `histoshield.cv`,
its comparison in results.json and the report, resume, and one-line config errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

import histoshield.study as S
from histoshield.config import StudyConfig
from histoshield.errors import HistoshieldError
from tests.test_study import TINY as STUDY

# the tiny study, leaner: the stain_cv stage does not read the other stages' numbers
TINY = {**STUDY, "curve_attacks": ["fgsm"], "stain_attacks": [], "transfer": False,
        "certify": {"enabled": False}, "sanity": False,
        "train": {**STUDY["train"], "epochs": 1}}  # fmt: skip

STAIN_CV = {
    "folds": 2,
    "attacks": ["pgd:steps=1", "hed:a=0.1,b=0.1,steps=1", "hed-random:a=0.1,b=0.1,steps=1"],
    "eps": "4/255",
    "batch_size": 32,
    "variants": {
        "plain": {"epochs": 1, "augment": {"hed_sigma": 0.0}},
        "hed-at": {"epochs": 1, "defense": "hed-at:a=0.1,b=0.1,steps=1,warmup=0"},
    },
}


@pytest.fixture(scope="module")
def stain_cv_run(tmp_path_factory: pytest.TempPathFactory, cache_env) -> Path:
    """A tiny finished study, resumed with a stain_cv section added: only stain_cv (and the
    report) run, the finished stages are kept."""
    run = tmp_path_factory.mktemp("stain-cv") / "run"
    S.run_study(StudyConfig(**TINY), run, progress=False)
    before = json.loads((run / "results.json").read_text())
    S.run_study(StudyConfig(**{**TINY, "stain_cv": STAIN_CV}), run, resume=True, progress=False)
    after = json.loads((run / "results.json").read_text())
    kept = {k: v for k, v in after["timings"].items() if k not in ("stain_cv", "report")}
    assert kept == {k: v for k, v in before["timings"].items() if k != "report"}
    return run


def test_stage_is_off_by_default_and_on_with_a_section() -> None:
    assert "stain_cv" not in [s.name for s in S.build_stages(StudyConfig(**TINY))]
    on = [s.name for s in S.build_stages(StudyConfig(**{**TINY, "stain_cv": STAIN_CV}))]
    assert on.index("curves") < on.index("stain_cv") < on.index("report")


@pytest.mark.slow  # a tiny study and two 2-fold CVs: ~30 s on 2 cores
def test_each_variant_is_a_cv_on_the_same_folds_with_its_overrides(stain_cv_run: Path) -> None:
    r = json.loads((stain_cv_run / "results.json").read_text())
    assert "stain_cv" in r["timings"]
    sc = r["stain_cv"]
    assert [v["variant"] for v in sc["variants"]] == ["plain", "hed-at"]
    folds = {(stain_cv_run / v["run"] / "folds.csv").read_text() for v in sc["variants"]}
    assert len(folds) == 1  # every variant is held out on the same patients
    for v in sc["variants"]:
        cv = json.loads((stain_cv_run / v["run"] / "results.json").read_text())
        assert cv["kind"] == "cv" and cv["k"] == 2 and cv["train_config"]["epochs"] == 1
        # the summary copies what the CV stored, nothing recomputed
        assert v["balanced_accuracy"]["value"] == cv["pooled"]["balanced_accuracy"]["value"]
        assert [f["balanced_accuracy"] for f in v["folds"]] == [
            f["metrics"]["balanced_accuracy"] for f in cv["folds"]
        ]
        assert [a["attack"] for a in v["attacks"]] == [*STAIN_CV["attacks"],
                                                       "worst case (all attacks)"]  # fmt: skip
        assert [a["adversarial"] for a in v["attacks"]] == [
            a["adversarial"] for a in cv["robustness"]
        ]
    plain, hed_at = (json.loads((stain_cv_run / v["run"] / "results.json").read_text())
                     for v in sc["variants"])  # fmt: skip
    assert plain["train_config"]["augment"]["hed_sigma"] == 0.0
    assert plain["train_config"]["defense"] is None  # the study's train section, as `original`
    assert hed_at["train_config"]["defense"].startswith("hed-at")
    train = json.loads((stain_cv_run / "stain_cv/hed-at/fold_0/train/results.json").read_text())
    assert train["selected_by"] == "val_bal_robust_acc"  # the defense really trained


@pytest.mark.slow  # a tiny study and two 2-fold CVs: ~30 s on 2 cores
def test_report_shows_the_comparison_and_per_fold_tables(stain_cv_run: Path) -> None:
    md = (stain_cv_run / "report.md").read_text()
    page = (stain_cv_run / "report.html").read_text()
    assert "## Stain-robust training on held-out patients (patient-level CV)" in md
    assert "Stain-robust training on held-out patients" in page
    r = json.loads((stain_cv_run / "results.json").read_text())
    for v in r["stain_cv"]["variants"]:
        bal = f"{100 * v['balanced_accuracy']['value']:.1f}"
        assert any(line.startswith(f"| {v['variant']} | {bal} ") for line in md.splitlines())
        for f in v["folds"]:
            assert f"| {v['variant']} | {f['fold']} | " in md
    assert "hed-random:a=0.1,b=0.1,steps=1" in md


@pytest.mark.slow  # a tiny study and two 2-fold CVs: ~30 s on 2 cores
def test_resuming_a_finished_stain_cv_changes_nothing(stain_cv_run: Path) -> None:
    before = json.loads((stain_cv_run / "results.json").read_text())
    cfg = StudyConfig(**{**TINY, "stain_cv": STAIN_CV})
    S.run_study(cfg, stain_cv_run, resume=True, progress=False)
    after = json.loads((stain_cv_run / "results.json").read_text())
    assert before["stain_cv"] == after["stain_cv"]
    assert before["timings"]["stain_cv"] == after["timings"]["stain_cv"]  # not run again


@pytest.mark.parametrize(
    "variants, fragment",
    [
        ({"plain": {"epochs": 0}}, "stain_cv variant 'plain': epochs"),
        ({"plain": {"defense": "hed-at:a=7"}}, "stain_cv variant 'plain' defense"),
        ({"plain": {"nonsense": 1}}, "stain_cv variant 'plain': nonsense"),
    ],
)
def test_bad_variants_are_one_line_errors_before_any_stage(variants, fragment) -> None:
    cfg = StudyConfig(**{**TINY, "stain_cv": {**STAIN_CV, "variants": variants}})
    with pytest.raises(HistoshieldError) as e:
        S.check_study_config(cfg)
    assert fragment in str(e.value) and "\n" not in str(e.value)


@pytest.mark.parametrize(
    "section, fragment",
    [
        ({"variants": {}}, "variants"),
        ({"variants": {"a/b": {}}}, "must be a folder name"),
        ({"variants": {"x": {"seed": 1}}}, "uses the study's data and seed"),
    ],
)
def test_bad_sections_are_one_line_config_errors(tmp_path: Path, section, fragment) -> None:
    import yaml

    p = tmp_path / "s.yaml"
    p.write_text(yaml.safe_dump({**TINY, "stain_cv": section}))
    with pytest.raises(HistoshieldError) as e:
        S.load_study_config(p)
    assert fragment in str(e.value) and "\n" not in str(e.value)
