"""Batched inference, and the checkpoint-level evaluate / predict behind the CLI."""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from histoshield.data.records import Record, positive_index
from histoshield.errors import HistoshieldError


@torch.no_grad()
def predict_proba(
    model: nn.Module,
    x: torch.Tensor,
    *,
    batch_size: int = 64,
    device: torch.device | str | None = None,
    dist: Any = None,
) -> torch.Tensor:
    """Softmax probabilities (N,C) on CPU, in eval mode; the model's mode is restored after.

    `dist` (a `training.distributed.DistContext` under torchrun) splits the batches over the
    ranks and gathers the rows back in order on every rank (the same batches as alone).
    """
    if dist is not None and dist.distributed:
        from histoshield.training.distributed import batch_shard, gather_rows

        mine = batch_shard(x.shape[0], batch_size, dist)
        part = predict_proba(model, x[mine.to(x.device)], batch_size=batch_size, device=device)
        return gather_rows(part, mine, x.shape[0], dist)
    if device is None:
        p = next(model.parameters(), None)
        device = p.device if p is not None else torch.device("cpu")
    was_training = model.training
    model.eval()
    try:
        out = []
        for i in range(0, x.shape[0], batch_size):
            xb = x[i : i + batch_size].to(device, non_blocking=True)
            if not xb.is_floating_point():
                xb = xb.float() / 255.0
            out.append(torch.softmax(model(xb).float(), dim=1).cpu())
        if not out:
            return torch.empty(0, len(getattr(model, "classes", None) or []) or 2)
        return torch.cat(out)
    finally:
        model.train(was_training)


# ---- loading a checkpoint and the images to evaluate it on ---------------------------------
# The one way evaluate, attack and certify get (model, x, y, records): same source rules, same
# errors, same decoding size.


@dataclass
class EvalData:
    """A checkpoint's model and the labelled images it is evaluated on (from `load_eval_data`)."""

    model: nn.Module  # eval mode, on `device`
    x: torch.Tensor  # float (N,3,S,S) in [0,1] on CPU, S = the model's input size
    y: torch.Tensor  # long (N,) indices into `classes`
    records: list[Record]
    classes: list[str]
    subset: str  # the subset actually used: train | val | test | all
    source: str  # the split CSV or data path the records came from
    device: torch.device


def load_model(checkpoint: str | Path, device: torch.device | str = "cpu") -> nn.Module:
    """Load a histoshield checkpoint in eval mode on `device` (a missing file is one clear line)."""
    from histoshield import models
    from histoshield.runtime import pick_device

    p = Path(checkpoint).expanduser()
    if not p.is_file():
        raise HistoshieldError(
            f"checkpoint not found: {p} (pass a best.pt/last.pt written by histoshield train)"
        )
    dev = pick_device(device) if isinstance(device, str) else device
    return models.load_checkpoint(p, map_location=dev).to(dev).eval()


def load_records(
    checkpoint: str | Path,
    *,
    data: str | None = None,
    split: str | Path | None = None,
    subset: str = "test",
    unsplit: str = "all",
    config: dict[str, Any] | None = None,
    skip_bad: bool = False,
    classes: list[str] | str | None = None,
    allow_patient_leak: bool = False,
) -> tuple[list[Record], str, str]:
    """Records of `subset` for a checkpoint, with the subset used and their source.

    Source, first match: `split` (a split CSV); `data` (a data set; a split CSV passed as data
    keeps its split); the run's `split.csv` beside the checkpoint. Data without a split is used
    whole (`unsplit="all"`, subset becomes "all") or split again with the training run's
    settings from `config` (`unsplit="resplit"`, which reproduces the run's split of that data).
    Bad image files stop the load unless `skip_bad`; skipped files are warned about on stderr.
    `classes` are the accepted labels (default: the checkpoint's, from `config`). A split CSV
    with a patient in two splits is refused unless `allow_patient_leak` or the training run
    allowed it (`allow_patient_leak` or `split_by: image` in `config`).
    """
    from histoshield import data as hd

    if subset not in ("train", "val", "test", "all"):
        raise HistoshieldError(f"unknown subset {subset!r}: use train, val, test or all")
    if unsplit not in ("all", "resplit"):
        raise HistoshieldError(f"unknown unsplit rule {unsplit!r}: use 'all' or 'resplit'")
    run_split = Path(checkpoint).expanduser().parent / "split.csv"
    cfg = config or {}
    kw = {
        "on_bad": "skip" if skip_bad else "raise",
        "classes": classes if classes is not None else cfg.get("classes"),
        "allow_patient_leak": bool(
            allow_patient_leak or cfg.get("allow_patient_leak") or cfg.get("split_by") == "image"
        ),
    }
    if split is not None:
        sp = Path(split).expanduser()
        if not sp.is_file():
            raise HistoshieldError(
                f"split file not found: {sp} (pass the split.csv of the training run)"
            )
        own = run_split.is_file() and sp.resolve() == run_split.resolve()
        iset = hd.read_split(sp, **{**kw, "allow_patient_leak": kw["allow_patient_leak"] or own})
        source = str(sp)
    elif data is not None:
        iset, source = hd.load_imageset(data, **kw), str(data)
        if unsplit == "resplit" and not any(r.split for r in iset.records):
            iset = hd.make_split(
                iset,
                by=cfg.get("split_by", "auto"),
                val=cfg.get("val", 0.1),
                test=cfg.get("test", 0.1),
                seed=cfg.get("seed", 0),
            )
    elif run_split.is_file():
        # The run's own split was accepted (or made) when it trained.
        iset = hd.read_split(run_split, **{**kw, "allow_patient_leak": True})
        source = str(run_split)
    else:
        raise HistoshieldError(
            f"no data to evaluate: pass --split (e.g. {run_split}) or --data PATH"
        )
    for problem in iset.problems:  # e.g. files skipped with --skip-bad: never silently
        print(f"warning: {problem}", file=sys.stderr)
    if subset == "all" or not any(r.split for r in iset.records):
        return list(iset.records), "all", source
    records = iset.subset(subset)
    if not records:
        raise HistoshieldError(
            f"no {subset!r} images in {source}: pick --subset train, val, test or all"
        )
    return records, subset, source


def load_eval_data(
    checkpoint: str | Path,
    *,
    data: str | None = None,
    split: str | Path | None = None,
    subset: str = "test",
    only: str | None = None,
    exclude: str | None = None,
    limit: int | None = None,
    unsplit: str = "all",
    skip_bad: bool = False,
    device: torch.device | str = "auto",
    progress: bool = False,
    classes: list[str] | str | None = None,
    allow_patient_leak: bool = False,
    model: nn.Module | None = None,
) -> EvalData:
    """Model, images and labels for evaluating a checkpoint on a subset of its data.

    `model`, when given, is used instead of loading `checkpoint` (e.g. a model card's model;
    `checkpoint` then only locates a split.csv beside it).

    `only` keeps one class, `exclude` drops one (e.g. an attack's target class), `limit` keeps
    the first N after that; only the kept images are decoded (at the model's input size, 224
    for size-agnostic models). Source rules as in `load_records`; accepted labels default to
    the model's classes.
    """
    from histoshield.runtime import pick_device

    if limit is not None and limit < 1:
        raise HistoshieldError(f"--limit must be >= 1, got {limit}")
    dev = pick_device(device) if isinstance(device, str) else device
    model = load_model(checkpoint, dev) if model is None else model.to(dev).eval()
    model_classes = list(model.classes)
    config = (getattr(model, "meta", None) or {}).get("config") or {}
    records, used, source = load_records(
        checkpoint,
        data=data,
        split=split,
        subset=subset,
        unsplit=unsplit,
        config=config,
        skip_bad=skip_bad,
        classes=classes if classes is not None else model_classes,
        allow_patient_leak=allow_patient_leak,
    )
    classes = model_classes
    unknown = sorted({r.label for r in records} - set(classes))
    if unknown:
        raise HistoshieldError(
            f"labels {unknown} in {source} are not classes of {checkpoint} ({classes}): use "
            "data with the model's classes"
        )
    records = filter_records(records, classes, only=only, exclude=exclude, limit=limit)
    if not records:
        what = f" with label {only!r}" if only else ""
        what += f" not of class {exclude!r}" if exclude else ""
        raise HistoshieldError(f"no images to evaluate in subset {used!r} of {source}{what}")
    size = getattr(model, "image_size", None) or 224  # None: any size works; decode at 224
    x, y = image_tensors(records, classes, size, progress=progress)
    return EvalData(model, x, y, records, classes, used, source, dev)


def filter_records(
    records: list[Record],
    classes: list[str],
    *,
    only: str | None = None,
    exclude: str | None = None,
    limit: int | None = None,
) -> list[Record]:
    """Keep class `only`, drop class `exclude`, then at most `limit` records taken round-robin
    over the labels in file order (the one rule for all): a split listed class by class would
    otherwise give a `--limit` subset of one class only."""
    for flag, value in (("--only", only), ("--target", exclude)):
        if value is not None and value not in classes:
            raise HistoshieldError(f"{flag} {value!r} is not a class of the model ({classes})")
    if only is not None:
        records = [r for r in records if r.label == only]
    if exclude is not None:
        records = [r for r in records if r.label != exclude]
    if limit is None or len(records) <= limit:
        return records
    by_label: dict[str, list[int]] = {}
    for i, r in enumerate(records):
        by_label.setdefault(r.label, []).append(i)
    queues = list(by_label.values())
    keep: list[int] = []
    while len(keep) < limit:
        for q in queues:
            if q and len(keep) < limit:
                keep.append(q.pop(0))
    return [records[i] for i in sorted(keep)]


def image_tensors(
    records: list[Record],
    classes: list[str],
    size: int,
    *,
    cache_dir: str | Path | None = None,
    progress: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The one route from records to a model's input: float (N,3,S,S) in [0,1] and long labels
    in `classes` order (decoded once through the array cache)."""
    from histoshield.data import labels_of, load_arrays, to_float

    x = to_float(load_arrays(records, size, cache_dir=cache_dir, progress=progress))
    return x, torch.as_tensor(labels_of(records, classes)).long()


def degenerate_check(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    classes: list[str] | None = None,
    *,
    batch_size: int = 64,
    device: torch.device | str | None = None,
    dist: Any = None,
) -> str | None:
    """Why `model`'s robustness numbers on (x, y) are not meaningful (near-constant or
    near-chance clean predictions), or None; every evaluation reports it at the top."""
    from histoshield.evaluation.metrics import degenerate_reason

    prob = predict_proba(model, x, batch_size=batch_size, device=device, dist=dist)
    pred = prob.argmax(1)
    return degenerate_reason(torch.as_tensor(y).cpu(), pred, classes)


def evaluate_checkpoint(
    checkpoint: str | Path,
    *,
    data: str | None = None,
    split: str | None = None,
    subset: str = "test",
    only: str | None = None,
    purify: str | None = None,
    batch_size: int = 64,
    skip_bad: bool = False,
    device: str = "auto",
    classes: list[str] | str | None = None,
    allow_patient_leak: bool = False,
    dist: Any = None,
) -> dict[str, Any]:
    """Clinical metrics of a checkpoint on one subset of a split (or all of a data set);
    `dist` shards the predictions over torchrun ranks (every rank returns the metrics)."""
    from histoshield.evaluation.metrics import classification_metrics, degenerate_reason

    ev = load_eval_data(
        checkpoint,
        data=data,
        split=split,
        subset=subset,
        only=only,
        skip_bad=skip_bad,
        device=device,
        classes=classes,
        allow_patient_leak=allow_patient_leak,
    )
    model, x, y, classes, dev = ev.model, ev.x, ev.y.numpy(), ev.classes, ev.device
    if purify:
        from histoshield.defenses import purify as purify_mod

        model = purify_mod.wrap(model, purify)
    prob = predict_proba(model, x, batch_size=batch_size, device=dev, dist=dist)
    _require_finite(prob, checkpoint, [str(r.path) for r in ev.records])
    degenerate = degenerate_reason(y, prob.argmax(1), classes)
    patients = [r.patient for r in ev.records]
    pos = positive_index(classes)
    m = classification_metrics(
        y,
        prob.argmax(1),
        prob,
        patients=patients if all(p is not None for p in patients) else None,
        positive=pos,
    )
    out = {
        "checkpoint": str(checkpoint),
        "subset": ev.subset,
        "only": only,
        "purify": purify,
        "classes": classes,
        "positive": classes[pos],
        # None when fine, or when one class only (--only): then it cannot be judged here
        "degenerate": degenerate,
        **m,
    }
    threshold = (getattr(ev.model, "meta", {}).get("extra") or {}).get("threshold")
    if threshold is not None:  # chosen on validation for a target sensitivity (train)
        from histoshield.evaluation.operating import metrics_at

        out["at_threshold"] = metrics_at(
            y, prob[:, pos], threshold, pos, patients if all(patients) else None
        )
    return out


def _image_paths(images: list[str | Path], skip_bad: bool) -> list[Path]:
    """Files as given and the image files inside given folders (sorted); missing ones refused
    (or skipped with a warning under `skip_bad`)."""
    from histoshield.data.images import is_image_file

    paths: list[Path] = []
    for item in images:
        p = Path(item).expanduser()
        if p.is_dir():
            found = sorted(f for f in p.rglob("*") if f.is_file() and is_image_file(f))
            if not found:
                raise HistoshieldError(f"{p} is a folder with no image files; pass images")
            paths += found
        elif p.is_file():
            paths.append(p)
        elif skip_bad:
            print(f"warning: skipped {p}: image not found", file=sys.stderr)
        else:
            raise HistoshieldError(f"image not found: {p} (pass existing image files or folders)")
    return paths


def predict_images(
    images: list[str | Path],
    checkpoint: str | Path,
    *,
    device: str = "auto",
    skip_bad: bool = False,
) -> list[dict[str, Any]]:
    """Class and probability for each image file (folders: every image inside). With
    `skip_bad`, unreadable files are skipped with a warning on stderr instead of stopping."""
    from histoshield.data.images import read_rgb
    from histoshield.runtime import pick_device

    dev = pick_device(device)
    paths = _image_paths(images, skip_bad)
    model = load_model(checkpoint, dev)
    size = model.image_size or 224
    arrays, kept = [], []
    for p in paths:
        try:
            arrays.append(read_rgb(p, size))
        except HistoshieldError as e:
            if not skip_bad:
                raise
            print(f"warning: skipped {p}: {e}", file=sys.stderr)
            continue
        kept.append(p)
    if not kept:
        raise HistoshieldError("no readable image to predict: every file was skipped")
    paths = kept
    arr = np.stack(arrays)
    x = torch.from_numpy(arr).permute(0, 3, 1, 2).float().div_(255.0)
    prob = predict_proba(model, x, device=dev)
    _require_finite(prob, checkpoint, [str(p) for p in paths])
    out = []
    for p, pr in zip(paths, prob, strict=True):
        k = int(pr.argmax())
        out.append(
            {
                "image": str(p),
                "class": model.classes[k],
                "probability": float(pr[k]),
                "probabilities": {c: float(v) for c, v in zip(model.classes, pr, strict=True)},
            }
        )
    return out


def _require_finite(prob: torch.Tensor, checkpoint: str | Path, names: list[str]) -> None:
    """A NaN probability is not a prediction: refuse instead of printing 'benign nan'."""
    bad = (~torch.isfinite(prob).all(dim=1)).nonzero().flatten().tolist() if prob.numel() else []
    if bad:
        raise HistoshieldError(
            f"{checkpoint} gives NaN or infinite outputs for {len(bad)} of {len(names)} images "
            f"(first: {names[bad[0]]}): its weights overflow; retrain with a lower --lr"
        )


def _fmt(v: Any) -> str:
    if v is None:
        return "n/a"
    if isinstance(v, float):
        return f"{v:.4f}"
    return str(v)


def format_metrics(m: dict[str, Any]) -> str:
    """A small human-readable table of `evaluate_checkpoint`'s result, with confusion matrix."""
    lines = [f"warning: {m['degenerate']}"] if m.get("degenerate") else []
    lines.append(f"{m.get('checkpoint', '')}  subset={m.get('subset')}  n={m['n']}")
    ci = m.get("accuracy_ci")
    acc = _fmt(m.get("accuracy"))
    if ci:
        acc += f"  (95% CI {ci[0]:.4f}-{ci[1]:.4f})"
    rows = [
        ("accuracy", acc),
        ("balanced accuracy", _fmt(m.get("balanced_accuracy"))),
        (f"sensitivity ({m.get('positive', 'positive')})", _fmt(m.get("sensitivity"))),
        ("specificity", _fmt(m.get("specificity"))),
        ("precision", _fmt(m.get("precision"))),
        ("F1", _fmt(m.get("f1"))),
        ("ROC AUC", _fmt(m.get("auc"))),
        ("TP / TN / FP / FN", f"{m['tp']} / {m['tn']} / {m['fp']} / {m['fn']}"),
    ]
    if m.get("patient_accuracy") is not None:
        rows.append((f"patient accuracy ({m['n_patients']} patients)", _fmt(m["patient_accuracy"])))
    t = m.get("at_threshold")
    if t:
        rows += [
            (f"at threshold {t['threshold']:.4f}: sensitivity", _fmt(t.get("sensitivity"))),
            ("  specificity", _fmt(t.get("specificity"))),
            ("  balanced accuracy", _fmt(t.get("balanced_accuracy"))),
            ("  TP / TN / FP / FN", f"{t['tp']} / {t['tn']} / {t['fp']} / {t['fn']}"),
        ]
    w = max(len(k) for k, _ in rows)
    lines += [f"  {k:<{w}}  {v}" for k, v in rows]
    cm, classes = m.get("confusion_matrix") or [], m.get("classes") or []
    labels = [classes[i] if i < len(classes) else str(i) for i in m.get("confusion_labels", [])]
    if cm and labels:
        cw = max(max(len(c) for c in labels), 6)
        lines.append("  confusion matrix (rows = true, columns = predicted):")
        lines.append("    " + " " * cw + "  " + "  ".join(f"{c:>{cw}}" for c in labels))
        for c, row in zip(labels, cm, strict=True):
            lines.append(f"    {c:>{cw}}  " + "  ".join(f"{v:>{cw}}" for v in row))
    return "\n".join(lines)
