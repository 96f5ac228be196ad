"""`histoshield audit` and `histoshield.audit(...)`: the card's numbers come from the harness,
pass counts are real, card.json validates against the committed schema, an interrupted audit
resumes to the same card, and (Done-when) a trained model audited through ONNX and TorchScript
cards gives the same robust accuracies as its checkpoint."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

import histoshield
from histoshield.audit import BUDGETS, Budget, budget_runs, validate_card
from histoshield.evaluation.harness import AttackRun, run_attacks, runs_for
from tests.helpers_cli import run_cli
from tests.helpers_models import one_torch_thread, tiny_cnn

REPO = Path(__file__).resolve().parents[1]


# Every attack family of the real budgets (one step, iterative, the AutoAttack ensemble, black
# box) at a size that keeps the end-to-end test under a minute on 2 busy cores.
SMALL = Budget(
    "quick",
    (0.0, 2 / 255, 4 / 255),
    2 / 255,
    ("fgsm", "pgd:steps=5", "autoattack-binary:steps=5,max_queries=50"),
    "square:max_queries=50",
    8,
)
# The plumbing tests run a CPU-test-sized budget under the name "quick" (the real budgets are
# exercised by the Done-when test below and measured in docs/audit.md).
TINY = Budget(
    "quick",
    (0.0, 2 / 255, 4 / 255),
    2 / 255,
    ("fgsm", "pgd:steps=3"),
    "square:max_queries=20",
    4,
    {"sigma": 0.25, "n0": 10, "n": 50, "alpha": 0.001, "limit": 4},
)


@pytest.fixture(autouse=True, scope="module")
def _one_thread_tiny_budget():
    with one_torch_thread(), pytest.MonkeyPatch.context() as mp:
        mp.setitem(BUDGETS, "quick", TINY)
        yield


@pytest.fixture(scope="module")
def toy():
    """A tiny random CNN on 16 px images and 12 labelled images (both classes)."""
    g = torch.Generator().manual_seed(0)
    x = torch.rand(12, 3, 16, 16, generator=g)
    return tiny_cnn(seed=1), x, torch.tensor([0, 1] * 6)


@pytest.fixture(scope="module")
def toy_card(toy):
    model, x, y = toy
    return histoshield.audit(model, x, y, budget="quick", seed=0)


def test_api_card_validates_and_matches_the_harness(toy, toy_card):
    model, x, y = toy
    card = toy_card.to_dict()
    validate_card(card)
    assert card["data"]["n"] == 12 and card["data"]["class_counts"] == {"benign": 6, "malignant": 6}
    assert card["model"]["format"] == "module" and card["budget"]["name"] == "quick"
    # every (attack, eps) of the budget, each row what the harness itself gives
    assert [(a["attack"], a["eps"]) for a in card["attacks"]] == [
        (r.name, r.eps) for r in budget_runs(BUDGETS["quick"])
    ]
    wrapped = histoshield.audit._as_histomodel(model, None)
    fgsm = next(a for a in card["attacks"] if a["attack"] == "fgsm" and a["eps"] == 2 / 255)
    (o,) = run_attacks(wrapped, x, y, [AttackRun("fgsm", 2 / 255, label="fgsm")], seed=0)
    assert fgsm["adv_correct"] == o.row.adv_correct
    # the headline is the per-image worst case: never above any single attack at that eps
    head = [a for a in card["attacks"] if a["eps"] == card["eps"]]
    assert card["robust_attacks"] == [a["attack"] for a in head]
    assert card["robust_acc"] <= min(a["adversarial_accuracy"] for a in head)
    assert {s["attack"] for s in card["sanity"]} == set(BUDGETS["quick"].attacks)


def test_pass_counts_are_counted_not_estimated(toy_card):
    n = 12
    rows = {(a["attack"], a["eps"]): a for a in toy_card.to_dict()["attacks"]}
    # FGSM: one forward with its backward per image to craft, one forward to score
    f = rows[("fgsm", 4 / 255)]
    assert (f["forward_passes"], f["backward_passes"]) == (2 * n, n)
    # PGD-3 crafts with up to 3 gradient steps per image and scores once; early stopping (the
    # harness default) drops an image once it is misclassified, so an image still robust at the
    # end had all 3 steps and none had more
    p = rows[("pgd:steps=3", 4 / 255)]
    assert 3 * p["adv_correct"] <= p["backward_passes"] <= 3 * n
    assert p["forward_passes"] >= p["backward_passes"] + n
    # Square is black box: queries only
    s = rows[("square:max_queries=20", 2 / 255)]
    assert s["backward_passes"] == 0 and s["forward_passes"] > n
    total = toy_card.to_dict()
    assert total["attack_forward_passes"] > sum(a["forward_passes"] for a in rows.values())


def test_degenerate_and_probability_models_are_flagged(toy):
    _, x, y = toy

    class Constant(nn.Module):
        def forward(self, x):
            return torch.stack([x.mean((1, 2, 3)) * 0 + 5.0, x.mean((1, 2, 3))], 1)

    card = histoshield.audit(Constant(), x, y, budget="quick").to_dict()
    validate_card(card)
    assert card["degenerate"] and card["unreliable"]
    assert any("NOT meaningful" in w for w in card["warnings"])


def test_api_input_errors_are_one_line(toy):
    model, x, y = toy
    from histoshield.errors import HistoshieldError

    for args, needle in (
        ((x * 255, y), "must lie in [0, 1]"),
        ((x[:, :1], y), "RGB"),
        ((x, y[:5]), "12 images but 5 labels"),
        ((x, ["benign", "tumour"] * 6), "not among the classes"),
    ):
        with pytest.raises(HistoshieldError, match=needle.replace("[", r"\[")):
            histoshield.audit(model, *args)
    with pytest.raises(HistoshieldError, match="unknown budget"):
        histoshield.audit(model, x, y, budget="fast")


def test_import_histoshield_stays_light_and_audit_stays_callable():
    code = (
        "import sys, histoshield; light = 'torch' not in sys.modules; "
        "import histoshield.audit as m; print(light, callable(histoshield.audit), "
        "callable(m), hasattr(m, 'run_audit'))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["True", "True", "True", "True"]


# ---- the command ----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    """An untrained seeded smallcnn checkpoint with a split.csv on 24 synthetic 32 px tiles."""
    from histoshield import data, models

    root = tmp_path_factory.mktemp("audit-ckpt")
    iset = data.make_split(
        data.synthesize(root / "syn", n=24, size=32, seed=0), by="image", val=0.25, test=0.25
    )
    data.write_split(root / "split.csv", iset)
    torch.manual_seed(0)
    models.save_checkpoint(root / "best.pt", models.create("smallcnn", image_size=32))
    return root


def _card(folder: Path) -> dict:
    return json.loads((folder / "card.json").read_text(encoding="utf-8"))


def _numbers(card: dict) -> list:
    """What must not depend on the route a model took: per-attack and worst-case counts."""
    rows = [(a["attack"], a["eps"], a["n"], a["clean_correct"], a["adv_correct"])
            for a in card["attacks"]]  # fmt: skip
    worst = [(w["eps"], w["adv_correct"]) for w in card["worst_case"]]
    return [card["clean"]["accuracy"], rows, worst]


def test_cli_audit_writes_a_run_folder_and_resumes(ckpt, tmp_path, capsys, monkeypatch):
    out = tmp_path / "audit"
    args = ["audit", str(ckpt / "best.pt"), "--out", str(out), "--quiet"]
    code, stdout, err = run_cli(capsys, *args)
    assert code == 0, err
    assert "headline (eps 2/255)" in stdout
    for f in ("config.yaml", "env.json", "run.json", "state.json", "results.json", "card.json",
              "report.html", "report.md", "figures/robustness.png"):  # fmt: skip
        assert (out / f).is_file(), f
    full = _card(out)
    validate_card(full)
    assert full["data"]["source"] == str(ckpt / "split.csv") and full["data"]["subset"] == "test"
    html = (out / "report.html").read_text(encoding="utf-8")
    assert "Robustness card" in html and "worst case" in html
    g = full["gradcam"]  # a figure, or a note saying why there is none
    assert (g["figure"] is not None) == (out / "figures" / "gradcam.png").is_file()
    assert g["figure"] is not None or g["note"]
    assert "Grad-CAM evidence" in html
    # a finished audit is not replaced silently
    code, _, err = run_cli(capsys, *args)
    assert code == 2 and "--overwrite" in err and len(err.strip().splitlines()) == 1
    # interrupted after 5 runs, then resumed: the same card
    import histoshield.evaluation.harness as H

    real = H.run_attacks
    stop = tmp_path / "again"

    def interrupted(*a, **k):
        for i, o in enumerate(real(*a, **k)):
            if i == 5:
                raise KeyboardInterrupt
            yield o

    monkeypatch.setattr(H, "run_attacks", interrupted)
    code, _, _ = run_cli(capsys, "audit", str(ckpt / "best.pt"), "--out", str(stop), "--quiet")
    assert code == 130 and len(json.loads((stop / "state.json").read_text())["runs"]) == 5
    monkeypatch.setattr(H, "run_attacks", real)
    code, _, err = run_cli(capsys, "audit", str(ckpt / "best.pt"), "--out", str(stop), "-q")
    assert code == 2 and "--resume" in err
    code, _, err = run_cli(capsys, "audit", str(ckpt / "best.pt"), "--out", str(stop), "-q",
                           "--resume")  # fmt: skip
    assert code == 0, err
    resumed = _card(stop)
    assert _numbers(resumed) == _numbers(full)
    # the resumed process scored the clean images once more before its first remaining run
    n = full["data"]["n"]
    assert resumed["attack_forward_passes"] == full["attack_forward_passes"] + n
    # another budget is another audit: --resume refuses to mix them
    code, _, err = run_cli(capsys, "audit", str(ckpt / "best.pt"), "--out", str(stop), "-q",
                           "--resume", "--budget", "standard")  # fmt: skip
    assert code == 2 and "other settings" in err


def test_cli_audit_refuses_another_kind_of_folder(ckpt, capsys):
    code, _, err = run_cli(capsys, "audit", str(ckpt / "best.pt"), "--out", str(ckpt), "-q")
    assert code == 2 and "holds a train run" in err


def test_cli_certify_adds_certified_accuracy(ckpt, tmp_path, capsys):
    out = tmp_path / "cert"
    code, _, err = run_cli(capsys, "audit", str(ckpt / "best.pt"), "--out", str(out), "-q",
                           "--certify", "--limit", "4")  # fmt: skip
    assert code == 0, err
    card = _card(out)
    validate_card(card)
    assert card["certified"]["n_images"] == 4 and card["certified"]["n"] == 50
    assert card["budget"]["certify"]["sigma"] == 0.25
    assert (out / "figures" / "certified.png").is_file()


@pytest.mark.slow
def test_done_when_exported_cards_audit_like_the_checkpoint(tmp_path, capsys, monkeypatch):
    """Train with `histoshield train`, export to ONNX and TorchScript, audit all three with the
    same seed: the same robust accuracies, attack by attack and in the worst case."""
    from histoshield import data

    monkeypatch.setitem(BUDGETS, "quick", SMALL)

    data.synthesize(tmp_path / "syn", n=80, size=48, seed=0)
    run = tmp_path / "run"
    code, _, err = run_cli(capsys, "train", "--data", str(tmp_path / "syn"), "--epochs", "6",
                           "--image-size", "48", "--batch-size", "16", "--lr", "0.003",
                           "--out", str(run), "--quiet")  # fmt: skip
    assert code == 0, err
    cards = {}
    for fmt in ("onnx", "torchscript"):
        code, _, err = run_cli(capsys, "export", "-c", str(run / "best.pt"), "--format", fmt,
                               "--out", str(tmp_path / "exported" / f"model.{fmt}"))  # fmt: skip
        assert code == 0, err
        cards[fmt] = tmp_path / "exported" / f"model.{fmt}.yaml"
    got = {}
    for name, source in {"checkpoint": run / "best.pt", **cards}.items():
        out = tmp_path / f"audit-{name}"
        code, _, err = run_cli(capsys, "audit", str(source), "--split", str(run / "split.csv"),
                               "--seed", "3", "--out", str(out), "-q")  # fmt: skip
        assert code == 0, err
        got[name] = _card(out)
        validate_card(got[name])
    assert got["onnx"]["model"]["format"] == "onnx"
    assert got["torchscript"]["model"]["format"] == "torchscript"
    assert got["checkpoint"]["degenerate"] is None  # a trained model, not a constant one
    assert got["checkpoint"]["robust_acc"] < got["checkpoint"]["clean_acc"]  # attacks bite
    assert _numbers(got["onnx"]) == _numbers(got["checkpoint"])
    assert _numbers(got["torchscript"]) == _numbers(got["checkpoint"])
    # Grad-CAM evidence: drawn for the checkpoint and the ONNX model (same maps' inputs); a
    # TorchScript model takes no hooks, which the card says instead of failing the audit
    for name in ("checkpoint", "onnx"):
        assert got[name]["gradcam"]["figure"] == "figures/gradcam.png"
        assert (tmp_path / f"audit-{name}" / "figures" / "gradcam.png").is_file()
    assert got["onnx"]["gradcam"]["adversarial_predictions"] == (
        got["checkpoint"]["gradcam"]["adversarial_predictions"]
    )
    assert got["torchscript"]["gradcam"]["figure"] is None
    assert "TorchScript" in got["torchscript"]["gradcam"]["note"]


def test_stain_attacks_are_a_separate_threat_model_in_the_card(toy, tmp_path) -> None:
    """Issue 14: the audit's stain section (budget a = b, not pixel eps) comes from the same
    harness, its worst case is never above any stain attack, and the headline stays L∞."""
    from dataclasses import replace

    from histoshield.report.audit import build_audit_report

    model, x, y = toy
    b = replace(TINY, stain=("hed:steps=2", "hed-random:steps=2"), stain_eps=(0.0, 0.1))
    card = histoshield.audit(model, x, y, budget=b, seed=0).to_dict()
    validate_card(card)
    st = card["stain"]
    assert card["budget"]["stain"] == list(b.stain) and st["eps"] == [0.0, 0.1]
    assert [(a["attack"], a["eps"]) for a in st["attacks"]] == [
        (s, e) for s in b.stain for e in b.stain_eps
    ]
    assert {a["norm"] for a in st["attacks"]} == {"stain"}
    assert all(a["eps_255"] is None for a in st["attacks"] + st["worst_case"])
    wrapped = histoshield.audit._as_histomodel(model, None)
    (o,) = run_attacks(wrapped, x, y, runs_for("hed:steps=2", [0.1]), seed=0)
    hed = next(a for a in st["attacks"] if a["attack"] == "hed:steps=2" and a["eps"] == 0.1)
    assert hed["adv_correct"] == o.row.adv_correct
    w = next(w for w in st["worst_case"] if w["eps"] == 0.1)
    assert w["adv_correct"] <= min(a["adv_correct"] for a in st["attacks"] if a["eps"] == 0.1)
    # the L∞ headline never mixes in a stain budget
    assert all(a["norm"] != "stain" for a in card["attacks"]) and card["threat_model"] == "Linf"
    assert {s["attack"] for s in card["sanity"]} >= set(b.stain)
    # and the report shows it
    (tmp_path / "card.json").write_text(json.dumps(card))
    md, _ = build_audit_report(tmp_path)
    text = md.read_text()
    assert "Stain-space attacks" in text and "stain 0.1" in text
    assert (tmp_path / "figures" / "stain.png").is_file()


def test_limit_keeps_every_class_and_one_class_data_prints_without_error() -> None:
    """--limit takes images round-robin over the classes (a split listed class by class would
    otherwise give one class only), and a one-class card prints n/a for balanced numbers."""
    from histoshield.audit import format_card
    from histoshield.data.records import Record
    from histoshield.evaluation.predict import filter_records

    recs = [Record(path=Path(f"{c}{i}.png"), label=c) for c in ("benign", "malignant")
            for i in range(10)]  # fmt: skip
    kept = filter_records(recs, ["benign", "malignant"], limit=8)
    assert [r.label for r in kept].count("benign") == 4 and len(kept) == 8
    assert kept == sorted(kept, key=recs.index)  # file order kept
    assert filter_records(recs, ["benign", "malignant"], limit=50) == recs
    card = {"warnings": [], "name": "m", "data": {"n": 8}, "eps_255": 2.0,
            "clean": {"accuracy": 1.0, "balanced_accuracy": None}, "worst_case": [],
            "robust_acc": 1.0, "robust_balanced_acc": None, "attack_forward_passes": 1,
            "attack_backward_passes": 1, "seconds": 1.0}  # fmt: skip
    assert "balanced n/a" in format_card(card)
