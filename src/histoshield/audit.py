"""`histoshield audit` and `histoshield.audit(...)`: how robust is this model, in one card.

Any model histoshield can load — a histoshield checkpoint, or an external TorchScript / ONNX /
timm / torchvision model described by a model card (`models.card`) — is evaluated on labelled
images with one fixed budget: clean metrics; FGSM, PGD and autoattack-binary curves over eps;
Square (black box) at the headline eps; the self-checks (`evaluation.sanity`); optionally
randomized-smoothing certification. Every robustness number comes from the one harness
(`evaluation.harness.run_attacks`); the headline is its per-image worst case over every attack
at the headline eps. The result is a robustness card (`card.json`, schema in
`schemas/robustness_card.schema.json`, modelled on RobustBench's model_info entries) and a
report.html. Budgets and their measured costs: docs/audit.md.

`histoshield.audit(model, images, labels, budget="quick")` is the notebook API (this module is
callable: `import histoshield; histoshield.audit(...)`).
"""

from __future__ import annotations

import hashlib
import json
import sys
import time
import types
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from histoshield.errors import HistoshieldError
from histoshield.evaluation.harness import AttackRun, Outcome, ResultRow, runs_for, worst_case

SCHEMA = "histoshield-robustness-card/1"
SCHEMA_FILE = Path(__file__).parent / "schemas" / "robustness_card.schema.json"
STATE = "state.json"


@dataclass(frozen=True)
class Budget:
    """What one audit budget runs (costs measured in docs/audit.md)."""

    name: str
    eps: tuple[float, ...]  # the curve eps (0 = clean), pixel units, L∞
    headline: float  # eps of the headline robust accuracy and of Square
    attacks: tuple[str, ...]  # white-box curve attacks (harness specs)
    square: str  # the black-box attack at the headline eps
    sanity_limit: int  # images the self-checks attack
    certify: dict[str, Any] = field(default_factory=dict)  # smoothing settings (--certify)
    # stain-space attacks (docs/stain.md) over stain budgets a = b (not pixel eps); () = none
    stain: tuple[str, ...] = ()
    stain_eps: tuple[float, ...] = (0.0, 0.05, 0.1, 0.2)


BUDGETS: dict[str, Budget] = {
    "quick": Budget(
        "quick",
        tuple(e / 255 for e in (0, 1, 2, 4)),
        2 / 255,
        ("fgsm", "pgd:steps=10", "autoattack-binary:steps=10,max_queries=100"),
        "square:max_queries=200",
        16,
        {"sigma": 0.25, "n0": 20, "n": 100, "alpha": 0.001, "limit": 16},
        ("hed:steps=5", "hed-random:steps=5"),
        (0.0, 0.1, 0.2),
    ),
    "standard": Budget(
        "standard",
        tuple(e / 255 for e in (0, 0.5, 1, 2, 4, 8)),
        2 / 255,
        ("fgsm", "pgd:steps=20,restarts=1", "autoattack-binary:steps=50,max_queries=500"),
        "square:max_queries=1000",
        32,
        {"sigma": 0.25, "n0": 50, "n": 500, "alpha": 0.001, "limit": 50},
        ("hed:steps=10", "hed-random:steps=10", "color:steps=10"),
    ),
    "thorough": Budget(
        "thorough",
        tuple(e / 255 for e in (0, 0.5, 1, 2, 4, 8, 16)),
        2 / 255,
        ("fgsm", "pgd:steps=50,restarts=3", "autoattack-binary:steps=100,max_queries=1000"),
        "square:max_queries=5000",
        64,
        {"sigma": 0.25, "n0": 100, "n": 10_000, "alpha": 0.001, "limit": 100},
        (
            "hed:steps=20,restarts=3",
            "hed-random:steps=60",
            "color:steps=20,restarts=3",
            "color-random:steps=60",
        ),
    ),
}


def get_budget(name: str) -> Budget:
    """The budget called `name` (quick | standard | thorough)."""
    if name not in BUDGETS:
        raise HistoshieldError(f"unknown budget {name!r}: use one of {', '.join(BUDGETS)}")
    return BUDGETS[name]


def budget_runs(b: Budget) -> list[AttackRun]:
    """Every (attack, eps) the budget runs: the curves, then Square at the headline eps."""
    runs = [r for spec in b.attacks for r in runs_for(spec, b.eps)]
    return runs + runs_for(b.square, [b.headline])


def stain_runs(b: Budget) -> list[AttackRun]:
    """The budget's stain-space attacks at every stain budget (a separate threat model)."""
    return [r for spec in b.stain for r in runs_for(spec, b.stain_eps)]


def run_key(run: AttackRun) -> str:
    """The key of one run in state.json (spec @ eps)."""
    return f"{run.name}@{run.eps!r}"


# ---- counting the model's forward and backward passes ---------------------------------------


class PassCounter:
    """Counts images through a model's forward (and backward: gradients reaching its output)
    while installed; attacks, scoring and checks all call the model's forward."""

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self.forward = 0
        self.backward = 0
        self._handle: Any = None

    def _hook(self, module: nn.Module, args: tuple, out: Any) -> None:
        if not torch.is_tensor(out):
            return
        n = int(out.shape[0]) if out.ndim else 1
        self.forward += n
        if out.requires_grad:
            out.register_hook(self._count_backward(n))

    def _count_backward(self, n: int) -> Callable[[torch.Tensor], None]:
        def hook(grad: torch.Tensor) -> None:
            self.backward += n

        return hook

    def __enter__(self) -> PassCounter:
        self._handle = self.model.register_forward_hook(self._hook)
        return self

    def __exit__(self, *exc: Any) -> None:
        self._handle.remove()

    def snapshot(self) -> tuple[int, int]:
        """(forward, backward) image passes so far."""
        return self.forward, self.backward


# ---- the audit on tensors -------------------------------------------------------------------


def _evenly_by_class(y: torch.Tensor, limit: int) -> torch.Tensor:
    """At most `limit` indices, taken round-robin over the classes (every class represented)."""
    per = [(y == c).nonzero()[:, 0].tolist() for c in sorted(set(y.tolist()))]
    out: list[int] = []
    while len(out) < min(limit, len(y)):
        for idx in per:
            if idx and len(out) < limit:
                out.append(idx.pop(0))
    return torch.tensor(sorted(out), dtype=torch.long)


def _outcome_of(run: AttackRun, saved: dict[str, Any]) -> Outcome:
    """An Outcome rebuilt from state.json (what worst_case needs: row and masks)."""
    row = ResultRow(**saved["row"])
    ok = torch.tensor(saved["clean_ok"], dtype=torch.bool)
    adv = torch.tensor(saved["adv_ok"], dtype=torch.bool)
    empty = torch.empty(0)
    return Outcome(row, run, None, ok, adv, empty, empty)


def _checks(model, x, y, rows, b: Budget, classes, batch_size, seed) -> list[dict[str, Any]]:
    from histoshield.evaluation.harness import parse_attack_spec
    from histoshield.evaluation.sanity import run_checks

    idx = _evenly_by_class(y, b.sanity_limit)
    out = []
    for spec in (*b.attacks, *b.stain):
        mine = [r for r in rows if r["attack"] == spec]
        if len(mine) < 2:
            continue
        attack, params = parse_attack_spec(spec)
        for c in run_checks(model, x[idx], y[idx], mine, attack=attack, params=params,
                            classes=classes, batch_size=batch_size, seed=seed):  # fmt: skip
            out.append({"attack": spec, **c})
    return out


def run_audit(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    *,
    budget: str | Budget = "quick",
    classes: Sequence[str] | None = None,
    seed: int = 0,
    certify: bool = False,
    batch_size: int = 32,
    device: torch.device | str | None = None,
    progress: bool = False,
    state: dict[str, Any] | None = None,
    save: Callable[[dict[str, Any]], Any] | None = None,
    echo: Callable[[str], Any] | None = None,
) -> dict[str, Any]:
    """Clean metrics, every budget run through the harness, worst case, self-checks and
    (optionally) certification on (x, y): the measurements of a robustness card.

    `state` holds finished runs (from state.json) and is updated in place; `save(state)` is
    called after each run, so an interrupted audit resumes where it stopped (pass counts and
    seconds then add up over the processes).
    """
    from histoshield.data.records import positive_index
    from histoshield.evaluation.harness import run_attacks
    from histoshield.evaluation.metrics import classification_metrics, degenerate_reason
    from histoshield.evaluation.predict import predict_proba

    b = get_budget(budget) if isinstance(budget, str) else budget
    classes = list(classes) if classes is not None else list(model.classes)
    y = torch.as_tensor(y).long().reshape(-1).cpu()
    state = state if state is not None else {}
    done = state.setdefault("runs", {})
    say = echo or (lambda s: None)
    t0, spent = time.perf_counter(), float(state.get("seconds", 0.0))  # earlier processes' time

    def keep() -> None:
        state["seconds"] = round(spent + time.perf_counter() - t0, 3)
        if save is not None:
            save(state)

    with PassCounter(model) as counter:
        prob = predict_proba(model, x, batch_size=batch_size, device=device)
        pred = prob.argmax(1)
        pos = positive_index(classes)
        clean = classification_metrics(y.numpy(), pred.numpy(), prob.numpy(), positive=pos)
        degenerate = degenerate_reason(y, pred, classes)
        clean_passes = _delta(counter, (0, 0))
        linf, stain = budget_runs(b), stain_runs(b)
        runs = linf + stain
        todo = [r for r in runs if run_key(r) not in done]
        if len(todo) < len(runs):
            say(f"resuming: {len(runs) - len(todo)} of {len(runs)} attack runs already done")
        before = counter.snapshot()
        for o in run_attacks(model, x, y, todo, classes=classes, batch_size=batch_size,
                             seed=seed, device=device, progress=progress):  # fmt: skip
            done[run_key(o.run)] = {
                "row": o.row.to_dict(),
                "clean_ok": o.clean_ok.tolist(),
                "adv_ok": o.adv_ok.tolist(),
                **_delta(counter, before),
            }
            before = counter.snapshot()
            keep()

        def measured(group: list[AttackRun]) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
            outcomes = [_outcome_of(r, done[run_key(r)]) for r in group]
            rows = [{**done[run_key(r)]["row"], **_passes(done[run_key(r)])} for r in group]
            return rows, [w.to_dict() for w in worst_case(outcomes, y, classes)] if group else []

        rows, worst = measured(linf)
        stain_rows, stain_worst = measured(stain)
        if "sanity" not in state:
            before = counter.snapshot()
            state["sanity"] = _checks(model, x, y, rows + stain_rows, b, classes, batch_size,
                                      seed)  # fmt: skip
            state["sanity_passes"] = _delta(counter, before)
            keep()
        certified = None
        if certify:
            if "certified" not in state:
                before = counter.snapshot()
                state["certified"] = _certify(model, x, y, b, seed, device, progress)
                state["certify_passes"] = _delta(counter, before)
                keep()
            certified = state["certified"]
    # totals over every phase, also those a resumed audit finished in an earlier process
    phases = [
        clean_passes,
        *(_passes(done[run_key(r)]) for r in runs),
        state.get("sanity_passes"),
        state.get("certify_passes") if certify else None,
    ]
    total = {k: sum(p[k] for p in phases if p) for k in ("forward_passes", "backward_passes")}
    return {
        "budget": b,
        "classes": classes,
        "positive": classes[pos],
        "clean": clean,
        "degenerate": degenerate,
        "results": rows,
        "worst_case": worst,
        "stain": {"rows": stain_rows, "worst_case": stain_worst} if stain else None,
        "sanity": state["sanity"],
        "certified": certified,
        **total,
        "seconds": round(spent + time.perf_counter() - t0, 3),
        "resumed": len(todo) < len(runs),
    }


def _delta(counter: PassCounter, before: tuple[int, int]) -> dict[str, int]:
    now = counter.snapshot()
    return {"forward_passes": now[0] - before[0], "backward_passes": now[1] - before[1]}


def _passes(saved: dict[str, Any]) -> dict[str, int]:
    return {k: saved[k] for k in ("forward_passes", "backward_passes")}


def _certify(model, x, y, b: Budget, seed, device, progress) -> dict[str, Any]:
    from histoshield.evaluation.certify import certify_images

    c = dict(b.certify)
    idx = _evenly_by_class(y, c.pop("limit"))
    res = certify_images(model, x[idx], y[idx], seed=seed, device=device, progress=progress, **c)
    return {k: v for k, v in res.items() if k != "rows"}


# ---- the card -------------------------------------------------------------------------------


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


def _as_histomodel(model: nn.Module, classes: Sequence[str] | None) -> nn.Module:
    """Any nn.Module taking [0,1] images, behind the HistoModel contract (no extra scaling)."""
    from histoshield.models.wrapper import HistoModel

    if isinstance(model, HistoModel):
        return model
    names = list(classes) if classes is not None else ["benign", "malignant"]
    wrapped = HistoModel(model, name=type(model).__name__, weights="user", classes=names,
                         scale=(1.0, 1.0, 1.0), shift=(0.0, 0.0, 0.0))  # fmt: skip
    wrapped.meta = {"format": None, "warnings": []}
    return wrapped.eval()


def _as_inputs(images: Any, labels: Any, classes: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
    x = torch.as_tensor(images)
    if x.dtype == torch.uint8:
        x = x.float() / 255.0
    if x.ndim != 4 or x.shape[1] != 3:
        raise HistoshieldError(f"images must be (N,3,H,W) RGB, got shape {tuple(x.shape)}")
    x = x.float()
    if len(x) and (float(x.min()) < 0 or float(x.max()) > 1):
        raise HistoshieldError(
            f"images must lie in [0, 1] (got {float(x.min()):.3g}..{float(x.max()):.3g}): pass "
            "pixels / 255, before any normalisation (put that inside the model)"
        )
    if isinstance(labels, (list, tuple)) and labels and isinstance(labels[0], str):
        unknown = sorted(set(labels) - set(classes))
        if unknown:
            raise HistoshieldError(f"labels {unknown} are not among the classes {classes}")
        labels = [classes.index(v) for v in labels]
    y = torch.as_tensor(labels).long().reshape(-1)
    if len(y) != len(x):
        raise HistoshieldError(f"{len(x)} images but {len(y)} labels")
    if len(y) and (int(y.min()) < 0 or int(y.max()) >= len(classes)):
        raise HistoshieldError(f"labels must be class indices 0..{len(classes) - 1}")
    return x, y


def audit(
    model: nn.Module,
    images: Any,
    labels: Any,
    budget: str = "quick",
    *,
    classes: Sequence[str] | None = None,
    seed: int = 0,
    certify: bool = False,
    batch_size: int = 32,
    device: str = "auto",
    progress: bool = False,
) -> Card:
    """Audit any nn.Module taking RGB (N,3,H,W) images in [0,1] (returning logits) on labelled
    images: the same measurements as `histoshield audit`, as a `Card`."""
    from histoshield.runtime import environment, pick_device, seed_everything

    model = _as_histomodel(model, classes)
    names = list(model.classes)
    x, y = _as_inputs(images, labels, names)
    dev = pick_device(device)
    model = model.to(dev).eval()
    seed_everything(seed)
    m = run_audit(model, x.to(dev), y, budget=budget, classes=names, seed=seed, certify=certify,
                  batch_size=batch_size, device=dev, progress=progress)  # fmt: skip
    data = {"source": "in-memory tensors", "subset": None, **_data_counts(y, names)}
    return Card(make_card(m, model, data=data, seed=seed, env=environment(dev)))


def _data_counts(y: torch.Tensor, classes: list[str], patients: list | None = None
                 ) -> dict[str, Any]:  # fmt: skip
    counts = {c: int((y == i).sum()) for i, c in enumerate(classes)}
    known = [p for p in (patients or []) if p is not None]
    return {"n": len(y), "class_counts": counts, "patients": len(set(known)) if known else None}


# ---- the command: load, claim, resume, write ------------------------------------------------


def _digest(config: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(config, sort_keys=True).encode()).hexdigest()[:16]


def audit_path(
    model_path: str | Path,
    *,
    data: str | None = None,
    split: str | None = None,
    subset: str = "test",
    budget: str = "quick",
    out: str | Path | None = None,
    seed: int = 0,
    certify: bool = False,
    limit: int | None = None,
    batch_size: int = 32,
    skip_bad: bool = False,
    device: str = "auto",
    resume: bool = False,
    overwrite: bool = False,
    progress: bool = True,
    echo: Callable[[str], Any] | None = None,
) -> dict[str, Any]:
    """`histoshield audit`: audit a model card or checkpoint on a subset of labelled data and
    write config.yaml, env.json, state.json (finished runs, for --resume), card.json and
    report.html into `out` (held with `runfolder.claim(out, "audit")`)."""
    from histoshield.models.card import load_model_or_card
    from histoshield.runfolder import claim
    from histoshield.runtime import pick_device

    get_budget(budget)  # before anything is loaded
    if subset not in ("train", "val", "test", "all"):
        raise HistoshieldError(f"unknown subset {subset!r}: use train, val, test or all")
    if limit is not None and limit < 1:
        raise HistoshieldError(f"--limit must be >= 1, got {limit}")
    dev = pick_device(device)
    model = load_model_or_card(model_path, dev)  # a bad card fails before the folder exists
    if out is None:
        out = Path("runs") / f"audit-{Path(model_path).stem}-{time.strftime('%Y%m%d-%H%M%S')}"
    out = Path(out)
    with claim(out, "audit", resume=resume, overwrite=overwrite):
        return _audit_run(model, model_path, data=data, split=split, subset=subset,
                          budget=budget, out=out, seed=seed, certify=certify, limit=limit,
                          batch_size=batch_size, skip_bad=skip_bad, device=dev, resume=resume,
                          overwrite=overwrite, progress=progress, echo=echo)  # fmt: skip


def _audit_run(model, model_path, *, data, split, subset, budget, out, seed, certify, limit,
               batch_size, skip_bad, device, resume, overwrite, progress, echo
               ) -> dict[str, Any]:  # fmt: skip
    import yaml

    from histoshield.evaluation.predict import load_eval_data
    from histoshield.report.audit import build_audit_report
    from histoshield.runtime import environment, seed_everything, write_json, write_text

    config = {
        "model": str(model_path),
        "data": data,
        "split": split,
        "subset": subset,
        "budget": budget,
        "seed": seed,
        "certify": certify,
        "limit": limit,
        "batch_size": batch_size,
    }
    digest = _digest(config)
    state_file = out / STATE
    state: dict[str, Any] = {"config_digest": digest}
    if state_file.is_file() and not overwrite:
        old = json.loads(state_file.read_text(encoding="utf-8"))
        if not resume:
            raise HistoshieldError(
                f"{out} holds an unfinished audit: pass --resume to continue it, --overwrite "
                "to start again, or choose another --out"
            )
        if old.get("config_digest") != digest:
            raise HistoshieldError(
                f"{out} holds an audit with other settings (config.yaml): --resume needs the "
                "same model, data, budget and seed; pass --overwrite to start again"
            )
        state = old
    if overwrite:
        for name in (STATE, "card.json", "results.json", "report.html", "report.md"):
            (out / name).unlink(missing_ok=True)
    ev = load_eval_data(model_path, data=data, split=split, subset=subset, limit=limit,
                        skip_bad=skip_bad, device=device, progress=progress,
                        model=model)  # fmt: skip
    write_text(out / "config.yaml", yaml.safe_dump(config, sort_keys=False))
    env = environment(device)
    write_json(out / "env.json", env)
    seed_everything(seed)
    m = run_audit(ev.model, ev.x.to(device), ev.y, budget=budget, classes=ev.classes, seed=seed,
                  certify=certify, batch_size=batch_size, device=device, progress=progress,
                  state=state, save=lambda s: write_json(state_file, s), echo=echo)  # fmt: skip
    data_info = {"source": ev.source, "subset": ev.subset,
                 **_data_counts(ev.y, ev.classes, [r.patient for r in ev.records])}  # fmt: skip
    layer = ((getattr(ev.model, "meta", None) or {}).get("card") or {}).get("gradcam_layer")
    explained = gradcam_section(
        ev.model, ev.x.to(device), ev.y, ev.classes, eps=m["budget"].headline, seed=seed,
        layer=layer, out=out,
    )  # fmt: skip
    card = make_card(m, ev.model, data=data_info, seed=seed, source=str(model_path), env=env,
                     gradcam=explained)  # fmt: skip
    results = {"degenerate": m["degenerate"], "results": m["results"],
               "worst_case": m["worst_case"], "stain": m["stain"], "sanity": m["sanity"],
               "certified": m["certified"]}  # fmt: skip
    write_json(out / "results.json", results)
    write_json(out / "card.json", card)
    build_audit_report(out)
    write_json(out / "env.json", {**env, "end_time": time.strftime("%Y-%m-%dT%H:%M:%S%z")})
    return {"out": str(out), "card": card}


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


class _CallableModule(types.ModuleType):
    """`histoshield.audit` is this module; calling it runs `audit(...)` (the notebook API),
    so the function and the module of the same name never shadow each other."""

    def __call__(self, *args: Any, **kwargs: Any) -> Card:
        return audit(*args, **kwargs)


sys.modules[__name__].__class__ = _CallableModule
