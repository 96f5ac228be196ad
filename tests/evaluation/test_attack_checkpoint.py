"""Checkpoint-level attack runs: the public loader, `--purify` (BPDA / EOT), and real tiles."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from histoshield.errors import HistoshieldError
from histoshield.evaluation.predict import load_eval_data, load_records
from tests.helpers_cli import run_cli


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A seeded untrained smallcnn 'run folder' with a split.csv, on 24 synthetic 32 px tiles."""
    from histoshield import data, models

    root = tmp_path_factory.mktemp("attack-ckpt")
    iset = data.make_split(
        data.synthesize(root / "syn", n=24, size=32, seed=0), by="image", val=0.25, test=0.25
    )
    data.write_split(root / "split.csv", iset)
    torch.manual_seed(0)
    model = models.create("smallcnn", classes=iset.classes, image_size=32)
    models.save_checkpoint(root / "best.pt", model)
    return root, iset


def test_load_eval_data_sources_and_filters(run):
    root, iset = run
    ckpt = root / "best.pt"
    # Default source: the run's split.csv beside the checkpoint, test subset.
    ev = load_eval_data(ckpt, device="cpu")
    test = iset.subset("test")
    assert [r.path for r in ev.records] == [r.path for r in test]
    assert ev.subset == "test" and ev.source.endswith("split.csv")
    assert ev.x.shape == (len(test), 3, 32, 32) and 0 <= float(ev.x.min()) <= float(ev.x.max()) <= 1
    assert ev.y.tolist() == [ev.classes.index(r.label) for r in test]
    assert not ev.model.training
    # A data set without a split is used whole, or split again like the run ("resplit").
    whole = load_eval_data(ckpt, data=str(root / "syn"), device="cpu")
    assert whole.subset == "all" and len(whole.records) == len(iset.records)
    again, used, _ = load_records(
        ckpt, data=str(root / "syn"), unsplit="resplit",
        config={"split_by": "image", "val": 0.25, "test": 0.25, "seed": 0},
    )  # fmt: skip
    assert used == "test" and [r.path for r in again] == [r.path for r in test]
    # only / exclude / limit act before decoding.
    mal = load_eval_data(ckpt, subset="all", only="malignant", limit=3, device="cpu")
    assert len(mal.records) == 3 and all(r.label == "malignant" for r in mal.records)
    ben = load_eval_data(ckpt, subset="all", exclude="malignant", device="cpu")
    assert {r.label for r in ben.records} == {"benign"}


@pytest.mark.parametrize(
    "kwargs,needle",
    [
        ({"only": "tumour"}, "tumour"),
        ({"subset": "holdout"}, "holdout"),
        ({"limit": 0}, "--limit"),
        ({"split": "/nonexistent/split.csv"}, "split file not found"),
    ],
)
def test_load_eval_data_errors_are_one_line(run, kwargs, needle):
    root, _ = run
    with pytest.raises(HistoshieldError) as e:
        load_eval_data(root / "best.pt", device="cpu", **kwargs)
    assert needle in str(e.value) and "\n" not in str(e.value)
    with pytest.raises(HistoshieldError, match="checkpoint not found"):
        load_eval_data(root / "missing.pt")


def _attack_cli(args: list[str]) -> tuple[list[dict], dict]:
    from histoshield.cli import app

    res = CliRunner().invoke(app, ["attack", *args, "--json"])
    assert res.exit_code == 0, res.output
    out = args[args.index("--out") + 1]
    with open(f"{out}/results.json") as f:
        return json.loads(res.stdout[res.stdout.index("[") :]), json.load(f)


def test_cli_attack_purify_bitdepth_goes_through_bpda(run, tmp_path):
    root, _ = run
    base = ["-c", str(root / "best.pt"), "--subset", "all", "--attack", "fgsm"]
    base += ["--eps", "0,24/255"]
    rows, res = _attack_cli([*base, "--purify", "bitdepth:bits=5", "--out", str(tmp_path / "a")])
    naive, res_naive = _attack_cli(
        [*base, "--purify", "bitdepth:bits=5,bpda=false", "--out", str(tmp_path / "b")]
    )
    assert rows[0]["clean_correct"] == naive[0]["clean_correct"] > 0
    # Straight-through gradient: the attack moves every image by eps and fools some.
    assert rows[1]["linf_max"] == pytest.approx(24 / 255, abs=1e-6)
    assert rows[1]["adv_correct"] < rows[1]["clean_correct"]
    # Blocked gradient (no BPDA): sign(0) = 0, nothing moves — robustness is overstated, and
    # the self-checks say so; BPDA is never reported more robust than the naive attack.
    assert naive[1]["linf_max"] == 0 and naive[1]["adv_correct"] == naive[1]["clean_correct"]
    assert rows[1]["adversarial_accuracy"] <= naive[1]["adversarial_accuracy"]
    grad_check = {c["check"]: c["passed"] for c in res["sanity"]}["gradients_nonzero_finite"]
    naive_check = {c["check"]: c["passed"] for c in res_naive["sanity"]}
    assert grad_check and not naive_check["gradients_nonzero_finite"]


def test_cli_attack_spec_takes_the_loss(run, tmp_path, capsys):
    root, _ = run
    base = ["-c", str(root / "best.pt"), "--subset", "all", "--eps", "0,8/255"]
    rows, res = _attack_cli(
        [*base, "--attack", "pgd:loss=ce,steps=2", "--out", str(tmp_path / "ce")]
    )
    assert rows[1]["attack"] == "pgd" and rows[1]["params"] == {"loss": "ce", "steps": 2}
    checks = {c["check"]: c for c in res["sanity"]}
    assert "pgd's ce loss" in checks["attack_loss_gradient_nonzero"]["detail"]
    assert checks["unbounded_eps_accuracy_near_zero"]["loss"] == "ce"
    code, _, err = run_cli(capsys, "attack", *base, "--attack", "pgd:loss=dlr")
    assert code == 2 and err.startswith("error: attack 'pgd': loss must be one of margin, ce")


def test_randomized_purifier_eot_reaches_the_attack(run, tmp_path, monkeypatch):
    from histoshield.attacks.base import Attack
    from histoshield.defenses.purify import RandPad
    from histoshield.evaluation.robustness import attack_checkpoint

    root, _ = run
    draws, seen = [0], []
    fwd, call = RandPad.forward, Attack.__call__

    def counting_forward(self, x):
        draws[0] += 1
        return fwd(self, x)

    def spy(self, images, labels):
        before = draws[0]
        adv = call(self, images, labels)
        seen.append((self.name, self.eot, draws[0] - before))
        return adv

    monkeypatch.setattr(RandPad, "forward", counting_forward)
    monkeypatch.setattr(Attack, "__call__", spy)
    res = attack_checkpoint(
        root / "best.pt", attack="fgsm", eps="4/255", subset="all",
        purify="randpad:scale=1.2,eot=3", batch_size=64, out=tmp_path / "r", progress=False,
    )  # fmt: skip
    # One batch, EOT 3: three random draws averaged into the single FGSM gradient.
    assert seen == [("fgsm", 3, 3)]
    assert res["results"][0]["linf_max"] <= 4 / 255 + 1e-6


@pytest.mark.shared_data
def test_attack_harness_on_real_tiles(shared_tiles, tmp_path):
    """8 real BreakHis tiles through the manifest layout at 64 px: eps-ball, monotone accuracy."""
    from histoshield import data, models
    from histoshield.evaluation.robustness import attack_checkpoint

    manifest = shared_tiles / "manifest.csv" if shared_tiles.is_dir() else shared_tiles
    iset = data.load_imageset(manifest)
    picked = [r for r in iset.records if r.label == "malignant"][:6]
    picked += [r for r in iset.records if r.label == "benign"][:2]
    sub = data.ImageSet(iset.root, iset.layout, [r.with_split("test") for r in picked], [])
    data.write_split(tmp_path / "split.csv", sub)
    torch.manual_seed(0)
    model = models.create("smallcnn", classes=iset.classes, image_size=64)
    models.save_checkpoint(tmp_path / "best.pt", model)
    eps = [2 / 255, 8 / 255]
    res = attack_checkpoint(
        tmp_path / "best.pt", attack="fgsm", eps=eps, data=str(manifest),
        split=str(tmp_path / "split.csv"), only="malignant", out=tmp_path / "r", progress=False,
    )  # fmt: skip
    rows = res["results"]
    assert [r["n"] for r in rows] == [6, 6]
    for r, e in zip(rows, eps, strict=True):
        assert r["linf_max"] <= e + 1e-6 and r["clean_correct"] >= r["adv_correct"]
    assert rows[1]["adv_correct"] <= rows[0]["adv_correct"]
    assert {c["check"] for c in res["sanity"]} >= {"accuracy_non_increasing"}


@pytest.mark.parametrize(
    "extra,needle",
    [
        (["--attack", "nosuch"], "nosuch"),
        (["--attack", "fgsm", "--steps", "3"], "steps"),
        (["--attack", "pgd", "--steps", "0"], "steps"),
        (["--attack", "pgd", "--alpha", "xyz"], "--alpha 'xyz'"),
        (["--attack", "pgd", "--alpha", "-1/255"], "--alpha"),
        (["--eps", "abc"], "abc"),
        (["--batch-size", "0"], "--batch-size"),
    ],
)
def test_cli_attack_bad_request_fails_before_loading_data(run, capsys, monkeypatch, extra, needle):
    import histoshield.evaluation.predict as predict

    def never(*args, **kwargs):
        raise AssertionError("data loaded before the attack request was checked")

    monkeypatch.setattr(predict, "load_eval_data", never)
    root, _ = run
    code, _, err = run_cli(capsys, "attack", "-c", str(root / "best.pt"), *extra)
    assert code == 2 and err.startswith("error: ") and err.count("\n") == 1, err
    assert needle in err
    if "--alpha" in extra:  # parsed like eps, but the message names the flag given
        assert "eps" not in err


def test_evaluate_and_attack_skip_bad(run, tmp_path, capsys):
    root, iset = run
    data = tmp_path / "data"
    for label in ("benign", "malignant"):
        (data / label).mkdir(parents=True)
        for r in [r for r in iset.records if r.label == label][:2]:
            shutil.copy(r.path, data / label / Path(r.path).name)
    (data / "benign" / "zero.png").write_bytes(b"")
    base = ["-c", str(root / "best.pt"), "--data", str(data), "--subset", "all"]
    code, _, err = run_cli(capsys, "evaluate", *base)
    assert code == 2 and "zero.png" in err and "--skip-bad" in err
    code, out, err = run_cli(capsys, "evaluate", *base, "--skip-bad", "--json")
    assert code == 0 and json.loads(out)["n"] == 4
    assert err.startswith("warning: ") and "zero.png" in err
    args = [*base, "--skip-bad", "--eps", "2/255", "--json", "--out", str(tmp_path / "a")]
    code, out, err = run_cli(capsys, "attack", *args)
    assert code == 0 and [r["n"] for r in json.loads(out)] == [4]
    assert "zero.png" in err


def test_constant_model_is_flagged_in_evaluate_attack_and_certify(run, tmp_path, capsys):
    """A model that says "malignant" for every image is 100% "robust" on malignant images:
    evaluate, attack (even with --only malignant) and certify say its numbers mean nothing."""
    from histoshield import models

    root, iset = run
    model = models.create("smallcnn", classes=iset.classes, image_size=32)
    last = [m for m in model.modules() if isinstance(m, torch.nn.Linear)][-1]
    with torch.no_grad():
        last.weight.zero_()
        last.bias.copy_(torch.tensor([0.0, 10.0]))
    ckpt = root / "constant.pt"  # beside the run's own split.csv
    models.save_checkpoint(ckpt, model)
    split = ["--subset", "all"]

    code, out, err = run_cli(capsys, "evaluate", "-c", str(ckpt), *split)
    assert code == 0 and out.startswith("warning: the model predicts malignant for 100%"), err
    code, out, _ = run_cli(capsys, "evaluate", "-c", str(ckpt), *split, "--json")
    assert "not meaningful" in json.loads(out)["degenerate"]

    args = ["attack", "-c", str(ckpt), *split, "--only", "malignant", "--eps", "0,2/255"]
    code, out, _ = run_cli(capsys, *args, "--out", str(tmp_path / "a"))
    assert code == 0 and out.startswith("warning: the model predicts malignant for 100%")
    saved = json.loads((tmp_path / "a" / "results.json").read_text())
    assert "not meaningful" in saved["degenerate"]
    assert all(r["adversarial_accuracy"] == 1.0 for r in saved["results"])  # the trap itself
    assert saved["worst_case"][-1]["balanced_adversarial_accuracy"] == 1.0  # one class only

    code, out, _ = run_cli(capsys, "certify", "-c", str(ckpt), *split, "--n0", "4", "--n", "8",
                           "--out", str(tmp_path / "c"))  # fmt: skip
    assert code == 0 and out.startswith("warning: the model predicts malignant")
