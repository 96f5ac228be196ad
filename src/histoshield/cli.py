"""The `histoshield` command line: thin Typer commands that parse, call one function, print."""

from __future__ import annotations

import sys

import typer

from histoshield.errors import HistoshieldError

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    help="Attack, defend and honestly measure breast-cancer histopathology classifiers.",
)
data_app = typer.Typer(no_args_is_help=True, help="Inspect, split and synthesise image data.")
app.add_typer(data_app, name="data")


# ---- data commands ------------------------------------------------------------------------

_MAG_HELP = "Keep only this magnification (40, 100, 200, 400; repeatable)."
_CLASSES_HELP = "Accepted labels, comma-separated (default benign,malignant)."
_LEAK_HELP = "Accept a split CSV that puts a patient in two splits (image-level protocol)."


@data_app.command("inspect")
def data_inspect(
    path: str = typer.Argument(..., help="Folder, manifest/split CSV, or 'synthetic'."),
    json_out: bool = typer.Option(False, "--json", help="Print one JSON object."),
    magnification: list[str] = typer.Option([], "--magnification", "-m", help=_MAG_HELP),
    classes: str | None = typer.Option(None, "--classes", help=_CLASSES_HELP),
) -> None:
    """Count images per class, subtype, magnification and patients; list problems."""
    import json

    from histoshield.data import format_inspection, inspect_imageset, load_imageset

    ims = load_imageset(path, magnifications=magnification, on_bad="report", classes=classes)
    info = inspect_imageset(ims)
    typer.echo(json.dumps(info) if json_out else format_inspection(info))


@data_app.command("split")
def data_split(
    path: str = typer.Argument(..., help="Folder, manifest CSV, or 'synthetic'."),
    out: str = typer.Option(..., "--out", "-o", help="Split CSV to write."),
    by: str = typer.Option("auto", "--by", help="patient | image | auto (patient when known)."),
    val: float = typer.Option(0.1, "--val", help="Validation fraction."),
    test: float = typer.Option(0.1, "--test", help="Test fraction."),
    seed: int = typer.Option(0, "--seed", help="Random seed."),
    magnification: list[str] = typer.Option([], "--magnification", "-m", help=_MAG_HELP),
    skip_bad: bool = typer.Option(False, "--skip-bad", help="Skip bad files instead of stopping."),
    classes: str | None = typer.Option(None, "--classes", help=_CLASSES_HELP),
) -> None:
    """Split into train/val/test (by patient by default) and print a Table-1-style summary."""
    from histoshield.data import format_split_summary, load_imageset, make_split, write_split

    on_bad = "skip" if skip_bad else "raise"
    ims = load_imageset(path, magnifications=magnification, on_bad=on_bad, classes=classes)
    split = make_split(ims, by=by, val=val, test=test, seed=seed)
    write_split(out, split)
    typer.echo(format_split_summary(split))
    for p in split.problems:
        typer.echo(f"warning: {p}", err=True)
    typer.echo(f"wrote {out}")


@data_app.command("synth")
def data_synth(
    out: str = typer.Option(..., "--out", "-o", help="New folder for the tiles."),
    n: int = typer.Option(400, "--n", help="Number of tiles (half benign, half malignant)."),
    size: int = typer.Option(96, "--size", help="Tile size in pixels."),
    seed: int = typer.Option(0, "--seed", help="Random seed."),
) -> None:
    """Write synthetic H&E-like benign/malignant tiles and a manifest.csv."""
    from histoshield.data import synthesize

    ims = synthesize(out, n=n, size=size, seed=seed)
    typer.echo(f"wrote {len(ims.records)} tiles of {size}px to {ims.root}")


# ---- torchrun -------------------------------------------------------------------------------


class _Ranks:
    """Under torchrun (WORLD_SIZE > 1): this rank's group and device; alone: nothing."""

    def __init__(self, device: str) -> None:
        import os

        self.ctx = None
        self.device = device
        if int(os.environ.get("WORLD_SIZE", "1")) > 1:
            from histoshield.training.distributed import setup

            self.ctx = setup(device)
            self.device = str(self.ctx.device)

    @property
    def main(self) -> bool:
        """True on rank 0 (or alone): the one process that prints."""
        return self.ctx is None or self.ctx.is_main

    def __enter__(self) -> _Ranks:
        return self

    def __exit__(self, *exc: object) -> None:
        if self.ctx is not None:
            self.ctx.close()


# ---- train / evaluate / predict -----------------------------------------------------------

_RESUME_HELP = "Continue the run in RUN (or --out) from its last.pt, with its config.yaml."
_SKIP_BAD_HELP = "Skip bad image files (with a warning) instead of stopping."
_OVERWRITE_HELP = "Replace a finished run of this kind in --out (another kind is always refused)."


@app.command("train")
def train_cmd(
    run: str | None = typer.Argument(None, help="Run folder to continue (with --resume)."),
    data: str | None = typer.Option(None, "--data", help="Folder, manifest CSV or 'synthetic'."),
    split: str | None = typer.Option(None, "--split", help="A split.csv to train on."),
    model: str | None = typer.Option(None, "--model", help="Model name (smallcnn, densenet121…)."),
    weights: str | None = typer.Option(None, "--weights", help="none | imagenet | xrv | PATH."),
    epochs: int | None = typer.Option(None, "--epochs", help="Number of epochs."),
    batch_size: int | None = typer.Option(None, "--batch-size", help="Images per step."),
    lr: float | None = typer.Option(None, "--lr", help="Learning rate."),
    optimizer: str | None = typer.Option(None, "--optimizer", help="adam | adamw | sgd."),
    scheduler: str | None = typer.Option(None, "--scheduler", help="none | cosine | step."),
    image_size: int | None = typer.Option(None, "--image-size", help="Side in pixels (>= 32)."),
    seed: int | None = typer.Option(None, "--seed", help="Seed for split, init, order, aug."),
    out: str | None = typer.Option(None, "--out", help="Run folder (default runs/MODEL-TIME)."),
    config: str | None = typer.Option(None, "--config", help="YAML (flat or a `train:` section)."),
    resume: bool = typer.Option(False, "--resume", help=_RESUME_HELP),
    defense: str | None = typer.Option(None, "--defense", help="e.g. gaussian:sigma=0.1."),
    stain_norm: str | None = typer.Option(None, "--stain-norm", help="none|reinhard|macenko."),
    early_stopping: int | None = typer.Option(None, "--early-stopping", help="Patience."),
    tta: bool | None = typer.Option(None, "--tta/--no-tta", help="8 flips/rotations in-model."),
    backbone_lr_scale: float | None = typer.Option(
        None, "--backbone-lr-scale", help="lr of all but the head = lr * this (0 freezes)."
    ),
    target_sensitivity: float | None = typer.Option(
        None, "--target-sensitivity", help="Pick the threshold on val for this sensitivity."
    ),
    balance: str | None = typer.Option(None, "--balance", help="none | loss | sampler."),
    ema: float | None = typer.Option(None, "--ema", help="Weight-average decay, e.g. 0.95."),
    mixup: float | None = typer.Option(None, "--mixup", help="Mixup Beta alpha (0 = off)."),
    label_smoothing: float | None = typer.Option(
        None, "--label-smoothing", help="Label smoothing in [0, 0.5)."
    ),
    sam: float | None = typer.Option(None, "--sam", help="SAM radius rho, e.g. 0.05 (0 = off)."),
    skip_bad: bool | None = typer.Option(None, "--skip-bad/--no-skip-bad", help="Skip bad files."),
    magnification: list[str] | None = typer.Option(None, "--magnification", "-m", help=_MAG_HELP),
    classes: str | None = typer.Option(None, "--classes", help=_CLASSES_HELP),
    allow_patient_leak: bool | None = typer.Option(None, "--allow-patient-leak", help=_LEAK_HELP),
    device: str | None = typer.Option(None, "--device", help="auto | cpu | cuda | cuda:N."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress output."),
) -> None:
    """Train a classifier; writes config, split, metrics.csv, accuracy.png, best/last.pt."""
    import time

    from histoshield.report.training import training_figures
    from histoshield.training import resolve_config, train

    if run is not None and not resume:
        raise HistoshieldError(f"unexpected argument {run!r}: did you mean --resume {run}?")
    folder = run or out
    if resume and folder is None:
        raise HistoshieldError("--resume needs the run folder: histoshield train --resume RUN")
    cfg = resolve_config(
        config,
        resume=folder if resume else None,
        data=data, split=split, model=model, weights=weights, epochs=epochs,
        batch_size=batch_size, lr=lr, optimizer=optimizer, scheduler=scheduler,
        image_size=image_size, seed=seed, defense=defense, stain_norm=stain_norm,
        early_stopping=early_stopping, skip_bad=skip_bad, magnification=magnification or None,
        classes=classes, allow_patient_leak=allow_patient_leak, device=device, tta=tta,
        backbone_lr_scale=backbone_lr_scale, target_sensitivity=target_sensitivity,
        balance=balance, ema=ema, mixup=mixup, label_smoothing=label_smoothing,
        sam=sam,
    )  # fmt: skip
    if folder is None:
        folder = f"runs/{cfg.model.replace(':', '-')}-{time.strftime('%Y%m%d-%H%M%S')}"
    hook = None
    if cfg.defense:
        from histoshield.defenses import create as create_defense

        hook = create_defense(cfg.defense)
    res = train(cfg, folder, resume=resume, defense=hook, progress=not quiet,
                figures=training_figures)  # fmt: skip
    if res:  # only rank 0 returns results
        t = res["test"]
        acc = "n/a" if t["accuracy"] is None else f"{t['accuracy']:.4f}"
        bal = "n/a" if t["balanced_accuracy"] is None else f"{t['balanced_accuracy']:.4f}"
        typer.echo(
            f"run {folder}: best epoch {res['best_epoch']}/{res['epochs_run']}, test accuracy "
            f"{acc} (balanced {bal}, n={t['n']}); {res['train_seconds']:.1f} s training"
        )


@app.command("evaluate")
def evaluate_cmd(
    checkpoint: str = typer.Option(..., "--checkpoint", "-c", help="best.pt / last.pt."),
    data: str | None = typer.Option(None, "--data", help="Data set or split CSV to evaluate."),
    split: str | None = typer.Option(None, "--split", help="split.csv (default: the run's)."),
    subset: str = typer.Option("test", "--subset", help="train | val | test | all."),
    only: str | None = typer.Option(None, "--only", help="Only images of this class."),
    purify: str | None = typer.Option(None, "--purify", help="e.g. jpeg:quality=75."),
    skip_bad: bool = typer.Option(False, "--skip-bad", help=_SKIP_BAD_HELP),
    classes: str | None = typer.Option(None, "--classes", help="Labels (default: the model's)."),
    allow_patient_leak: bool = typer.Option(False, "--allow-patient-leak", help=_LEAK_HELP),
    json_out: bool = typer.Option(False, "--json", help="Print one JSON object."),
    device: str = typer.Option("auto", "--device", help="auto | cpu | cuda."),
) -> None:
    """Accuracy (Wilson CI), TP/TN/FP/FN, sensitivity, specificity, AUC, patient accuracy."""
    import json

    from histoshield.evaluation.predict import evaluate_checkpoint, format_metrics
    from histoshield.runtime import _json_safe

    with _Ranks(device) as ranks:
        m = evaluate_checkpoint(
            checkpoint,
            data=data,
            split=split,
            subset=subset,
            only=only,
            purify=purify,
            skip_bad=skip_bad,
            device=ranks.device,
            classes=classes,
            allow_patient_leak=allow_patient_leak,
            dist=ranks.ctx,
        )
    if ranks.main:
        typer.echo(json.dumps(_json_safe(m)) if json_out else format_metrics(m))


@app.command("predict")
def predict_cmd(
    images: list[str] = typer.Argument(..., help="Image files or folders of images."),
    checkpoint: str = typer.Option(..., "--checkpoint", "-c", help="best.pt / last.pt."),
    json_out: bool = typer.Option(False, "--json", help="Print one JSON list."),
    device: str = typer.Option("auto", "--device", help="auto | cpu | cuda."),
    skip_bad: bool = typer.Option(False, "--skip-bad", help=_SKIP_BAD_HELP),
) -> None:
    """Predicted class and its probability for each image."""
    import json

    from histoshield.evaluation.predict import predict_images

    res = predict_images(images, checkpoint, device=device, skip_bad=skip_bad)
    if json_out:
        typer.echo(json.dumps(res))
    else:
        for r in res:
            typer.echo(f"{r['image']}\t{r['class']}\t{r['probability']:.4f}")


@app.command("explain")
def explain_cmd(
    images: list[str] = typer.Argument(..., help="Image files or folders of images."),
    checkpoint: str = typer.Option(..., "--checkpoint", "-c", help="best.pt / last.pt."),
    attack: str = typer.Option("pgd", "--attack", "-a", help="Attack spec, e.g. pgd:steps=20."),
    eps: str = typer.Option("2/255", "--eps", help="Pixel units, e.g. 2/255."),
    seed: int = typer.Option(0, "--seed", help="Seed for the attack's random start."),
    layer: str | None = typer.Option(None, "--layer", help="Module name (default: automatic)."),
    label: str | None = typer.Option(
        None, "--label", help="True class of the images (default: attack the prediction)."
    ),
    out: str | None = typer.Option(None, "--out", help="Folder (default runs/explain-…)."),
    device: str = typer.Option("auto", "--device", help="auto | cpu | cuda."),
    overwrite: bool = typer.Option(False, "--overwrite", help=_OVERWRITE_HELP),
) -> None:
    """Clean vs adversarial Grad-CAM of each image: gradcam.png and explain.json."""
    from histoshield.attacks import parse_value
    from histoshield.evaluation.explain import explain_images
    from histoshield.evaluation.harness import parse_attack_spec
    from histoshield.report.explain import evidence_panel

    name, params = parse_attack_spec(attack)
    res = explain_images(
        checkpoint,
        images,
        attack=name,
        params=params,
        eps=parse_value(eps, "--eps"),
        seed=seed,
        layer=layer,
        label=label,
        out=out,
        device=device,
        overwrite=overwrite,
        figure=evidence_panel,
    )
    for r in res["images"]:
        c, a = r["clean"], r["adversarial"]
        typer.echo(
            f"{r['image']}\tclean {c['class']} {c['probability']:.4f}"
            f"\tadversarial {a['class']} {a['probability']:.4f}"
        )
    typer.echo(f"layer: {res['layer']}\npanel: {res['panel']}\nresults: {res['out']}/explain.json")


# ---- attack -------------------------------------------------------------------------------


@app.command("attack")
def attack_cmd(
    checkpoint: str = typer.Option(..., "--checkpoint", "-c", help="Model to attack (best.pt)."),
    data: str | None = typer.Option(None, "--data", help="Data set or split CSV."),
    split: str | None = typer.Option(None, "--split", help="split.csv (default: the run's)."),
    subset: str = typer.Option("test", "--subset", help="train | val | test | all."),
    attack: str = typer.Option(
        "fgsm", "--attack", "-a",
        help="fgsm, pgd:loss=ce, autoattack-binary… (`histoshield attacks` lists parameters)",
    ),
    eps: str | None = typer.Option(
        None, "--eps", help="Pixel units: 0,1/255,...,8/255 (default); stain attacks: 0,...,0.2."
    ),
    steps: int | None = typer.Option(None, "--steps", help="Iterations (iterative attacks)."),
    alpha: str | None = typer.Option(None, "--alpha", help="Step size, e.g. 1/255."),
    restarts: int | None = typer.Option(None, "--restarts", help="Random restarts."),
    max_queries: int | None = typer.Option(None, "--max-queries", help="Square's budget."),
    seed: int = typer.Option(0, "--seed", help="Seed for random starts and noise."),
    only: str | None = typer.Option(None, "--only", help="Attack only this class."),
    target: str | None = typer.Option(None, "--target", help="Targeted attack to this class."),
    transfer_to: str | None = typer.Option(None, "--transfer-to", help="Score on OTHER.ckpt."),
    save_examples: str | None = typer.Option(None, "--save-examples", help="PNG folder."),
    out: str | None = typer.Option(None, "--out", help="Run folder (default runs/attack-…)."),
    purify: str | None = typer.Option(None, "--purify", help="e.g. jpeg:quality=75."),
    batch_size: int = typer.Option(32, "--batch-size", help="Images per attack batch."),
    limit: int | None = typer.Option(None, "--limit", help="Attack at most N images."),
    skip_bad: bool = typer.Option(False, "--skip-bad", help=_SKIP_BAD_HELP),
    json_out: bool = typer.Option(False, "--json", help="Print the result rows as JSON."),
    device: str = typer.Option("auto", "--device", help="auto | cpu | cuda."),
    overwrite: bool = typer.Option(False, "--overwrite", help=_OVERWRITE_HELP),
) -> None:
    """Accuracy under attack per eps (Wilson CI), success rate, L∞/L2, PSNR/SSIM, self-checks."""
    from histoshield.attacks import parse_value
    from histoshield.evaluation.harness import parse_attack_spec
    from histoshield.evaluation.robustness import attack_checkpoint, format_rows, rows_json
    from histoshield.report.attack import write_attack_figures

    attack, params = parse_attack_spec(attack)  # 'pgd:loss=ce,steps=20' as in study specs
    flags = {"steps": steps, "restarts": restarts, "max_queries": max_queries}
    params.update({k: v for k, v in flags.items() if v is not None})
    if alpha is not None:
        params["alpha"] = parse_value(alpha, "--alpha")
    with _Ranks(device) as ranks:
        res = attack_checkpoint(
            checkpoint,
            attack=attack,
            eps=eps,
            data=data,
            split=split,
            subset=subset,
            params=params,
            only=only,
            target=target,
            transfer_to=transfer_to,
            purify=purify,
            save_examples=save_examples,
            out=out,
            batch_size=batch_size,
            limit=limit,
            seed=seed,
            skip_bad=skip_bad,
            device=ranks.device,
            progress=not json_out,
            overwrite=overwrite,
            figures=lambda r: write_attack_figures(r, r["out"], save_examples),
            dist=ranks.ctx,
        )
    if not ranks.main:
        return
    if json_out:
        if res["degenerate"]:
            typer.echo(f"warning: {res['degenerate']}", err=True)
        typer.echo(rows_json(res["results"]))
        for c in res["sanity"]:
            if not c["passed"]:
                typer.echo(f"warning: {c['detail']}", err=True)
    else:
        typer.echo(format_rows(res["results"], res["sanity"], degenerate=res["degenerate"]))
        typer.echo(f"results: {res['out']}/results.json")


@app.command("attacks")
def attacks_cmd(
    name: str | None = typer.Argument(None, help="One attack (default: every attack)."),
) -> None:
    """Attacks and their spec parameters (type, range, default), read from their schemas."""
    from histoshield import attacks

    names = [attacks.REGISTRY.get(name).name] if name else attacks.available()
    for n in names:
        cls = attacks.REGISTRY.get(n)
        doc = (cls.__doc__ or n).strip().splitlines()[0]
        typer.echo(f"{n} ({cls.norm or 'no'} norm): {doc}")
        for line in attacks.describe(n):
            typer.echo(f"  {line}")


# ---- certify ------------------------------------------------------------------------------


@app.command("certify")
def certify_cmd(
    checkpoint: str = typer.Option(..., "--checkpoint", "-c", help="Base classifier (best.pt)."),
    sigma: float = typer.Option(0.25, "--sigma", help="Noise std in (0,1] pixel units."),
    n0: int = typer.Option(100, "--n0", help="Samples to pick the top class."),
    n: int = typer.Option(10_000, "--n", help="Samples to bound its probability."),
    alpha: float = typer.Option(0.001, "--alpha", help="Failure probability of each bound."),
    batch: int = typer.Option(256, "--batch", help="Noisy copies per forward pass."),
    data: str | None = typer.Option(None, "--data", help="Data set (split with the run's seed)."),
    split: str | None = typer.Option(None, "--split", help="split.csv (default: the run's)."),
    subset: str = typer.Option("test", "--subset", help="train | val | test."),
    limit: int | None = typer.Option(None, "--limit", help="Certify at most N images."),
    seed: int = typer.Option(0, "--seed", help="Seed for the noise."),
    out: str | None = typer.Option(None, "--out", help="Folder for certify.json/csv/png."),
    json_out: bool = typer.Option(False, "--json", help="Print the result as JSON."),
    device: str = typer.Option("auto", "--device", help="auto | cpu | cuda."),
    overwrite: bool = typer.Option(False, "--overwrite", help=_OVERWRITE_HELP),
) -> None:
    """Randomized smoothing (Cohen et al. 2019): certified L2 radius per image and the curve."""
    import json

    from histoshield.evaluation.certify import certify_checkpoint, format_certify
    from histoshield.report.certify import certify_figures

    with _Ranks(device) as ranks:
        res = certify_checkpoint(
            checkpoint,
            sigma=sigma,
            data=data,
            split=split,
            subset=subset,
            limit=limit,
            n0=n0,
            n=n,
            alpha=alpha,
            batch=batch,
            seed=seed,
            device=ranks.device,
            out=out,
            progress=not json_out,
            overwrite=overwrite,
            dist=ranks.ctx,
            figures=certify_figures,
        )
    if not ranks.main:
        return
    if json_out:
        typer.echo(json.dumps(res, indent=2))
    else:
        typer.echo(format_certify(res))


# ---- audit / export -----------------------------------------------------------------------


@app.command("audit")
def audit_cmd(
    model: str = typer.Argument(..., help="Model card (.yaml) or a histoshield best.pt."),
    data: str | None = typer.Option(None, "--data", help="Data set or split CSV."),
    split: str | None = typer.Option(None, "--split", help="split.csv (default: beside MODEL)."),
    subset: str = typer.Option("test", "--subset", help="train | val | test | all."),
    budget: str = typer.Option("quick", "--budget", help="quick | standard | thorough."),
    out: str | None = typer.Option(None, "--out", help="Run folder (default runs/audit-…)."),
    seed: int = typer.Option(0, "--seed", help="Seed for random starts, Square and noise."),
    certify: bool = typer.Option(
        False, "--certify", help="Add randomized-smoothing certification."
    ),
    limit: int | None = typer.Option(None, "--limit", help="Audit at most N images."),
    batch_size: int = typer.Option(32, "--batch-size", help="Images per attack batch."),
    skip_bad: bool = typer.Option(False, "--skip-bad", help=_SKIP_BAD_HELP),
    device: str = typer.Option("auto", "--device", help="auto | cpu | cuda."),
    resume: bool = typer.Option(False, "--resume", help="Continue an interrupted audit."),
    overwrite: bool = typer.Option(False, "--overwrite", help=_OVERWRITE_HELP),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress output."),
) -> None:
    """How robust is this model: clean metrics, attack curves, Square, self-checks, card.json."""
    from histoshield.audit import audit_path, format_card

    res = audit_path(
        model, data=data, split=split, subset=subset, budget=budget, out=out, seed=seed,
        certify=certify, limit=limit, batch_size=batch_size, skip_bad=skip_bad, device=device,
        resume=resume, overwrite=overwrite, progress=not quiet,
        echo=None if quiet else typer.echo,
    )  # fmt: skip
    typer.echo(format_card(res["card"]))
    typer.echo(f"card: {res['out']}/card.json  report: {res['out']}/report.html")


@app.command("export")
def export_cmd(
    checkpoint: str = typer.Option(..., "--checkpoint", "-c", help="best.pt / last.pt."),
    fmt: str = typer.Option(..., "--format", help="onnx | torchscript."),
    out: str = typer.Option(..., "--out", help="File to write; its card goes to OUT.yaml."),
) -> None:
    """Export a checkpoint to ONNX or TorchScript, with a model card for `histoshield audit`."""
    from histoshield.models.export import export_checkpoint

    path, card = export_checkpoint(checkpoint, fmt, out)
    typer.echo(f"wrote {path} and its model card {card}")


# ---- study --------------------------------------------------------------------------------


@app.command("study")
def study(
    config: str = typer.Option(
        None, "--config", "-c", help="Study YAML, or a shipped preset: default, cpu, paper."
    ),
    data: str = typer.Option(None, "--data", help="Override the config's data path."),
    out: str = typer.Option("runs/study", "--out", help="Run folder."),
    resume: bool = typer.Option(False, "--resume", help="Continue an interrupted study."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Start the folder again."),
    seed: int = typer.Option(None, "--seed", help="Override the config's seed."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress bars or tables."),
) -> None:
    """The paper's protocol end to end: split, train, attack, defend, certify, report."""
    from histoshield.study import load_study_config, run_study

    cfg = load_study_config(config, data=data, seed=seed)
    with _Ranks(cfg.train.device) as ranks:  # torchrun: DDP training, sharded evaluation
        echo = None if quiet or not ranks.main else typer.echo
        res = run_study(cfg, out, resume=resume, overwrite=overwrite,
                        progress=not quiet and ranks.main, echo=echo, dist=ranks.ctx)  # fmt: skip
    if not ranks.main:
        return
    for name, info in res.get("models", {}).items():
        if info.get("degenerate"):
            typer.echo(f"warning: model {name}: {info['degenerate']}", err=True)
    if quiet:
        typer.echo(f"report: {out}/report.html")


# ---- serve --------------------------------------------------------------------------------


@app.command("serve")
def serve_cmd(
    checkpoint: list[str] = typer.Option(
        ..., "--checkpoint", "-c", help="Model to serve (repeatable): best.pt, defended.pt …"
    ),
    host: str = typer.Option("127.0.0.1", "--host", help="Bind address (local only by default)."),
    port: int = typer.Option(8000, "--port", help="TCP port."),
    device: str = typer.Option("cpu", "--device", help="cpu | cuda | auto."),
    max_jobs: int = typer.Option(4, "--max-jobs", help="Attack/certify jobs queued at most."),
    job_seconds: float = typer.Option(120.0, "--job-seconds", help="Wall-clock limit per job."),
) -> None:
    """A local web app + JSON API: predict, attack (with Grad-CAM) and certify one tile."""
    from histoshield.serve import Limits, create_app, load_models

    if not 0 < port < 65536:
        raise HistoshieldError(f"--port must be 1-65535, got {port}")
    if max_jobs < 1 or not job_seconds > 0:
        raise HistoshieldError("--max-jobs must be >= 1 and --job-seconds > 0")
    limits = Limits(max_jobs=max_jobs, job_seconds=job_seconds)
    app_ = create_app(load_models(checkpoint, device), limits)
    import socket

    import uvicorn

    try:  # one line instead of uvicorn's log when the address is taken or not ours
        with socket.create_server((host, port)):
            pass
    except OSError as e:
        raise HistoshieldError(f"cannot listen on {host}:{port} ({e.strerror or e}): "
                               "choose another --port or --host") from None  # fmt: skip

    typer.echo(f"histoshield serve: http://{host}:{port}/ ({len(checkpoint)} model(s))")
    uvicorn.run(app_, host=host, port=port, log_level="warning")


# ---- cross-validation ---------------------------------------------------------------------


@app.command("cv")
def cv_cmd(
    data: str | None = typer.Option(None, "--data", help="Folder or manifest CSV."),
    folds: int | None = typer.Option(None, "--folds", help="Number of folds (default 5)."),
    config: str | None = typer.Option(
        None, "--config", "-c", help="Train or study YAML (its train: and cv:), or a preset."
    ),
    out: str = typer.Option("runs/cv", "--out", help="Run folder."),
    resume: bool = typer.Option(False, "--resume", help="Continue an interrupted CV."),
    seed: int | None = typer.Option(None, "--seed", help="Seed for folds, training, attacks."),
    group_by: str | None = typer.Option(
        None, "--group-by", help="patient | image | both (both: the leak, side by side)."
    ),
    folds_file: str | None = typer.Option(None, "--folds-file", help="Reuse a folds.csv."),
    epochs: int | None = typer.Option(None, "--epochs", help="Override the epochs."),
    image_size: int | None = typer.Option(None, "--image-size", help="Override the input side."),
    target_sensitivity: float | None = typer.Option(
        None, "--target-sensitivity", help="Pick each fold's threshold on its validation split."
    ),
    robustness: bool | None = typer.Option(
        None, "--robustness/--no-robustness", help="Attack each fold's held-out images."
    ),
    extra_train: str | None = typer.Option(
        None, "--extra-train", help="More training images (folder or manifest) for every fold."
    ),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress output."),
) -> None:
    """K-fold cross-validation grouped by patient: pooled metrics with CIs, per-patient table."""
    from histoshield.cv import resolve_cv_config, run_cv, run_leak_comparison

    both = group_by == "both"
    if both and folds_file:
        raise HistoshieldError("--folds-file fixes one grouping; not with --group-by both")
    tcfg, cv = resolve_cv_config(
        config,
        cv_overrides={"folds": folds, "group_by": None if both else group_by,
                      "robustness": robustness, "extra_train": extra_train},
        data=data, seed=seed, epochs=epochs, image_size=image_size,
        target_sensitivity=target_sensitivity,
    )  # fmt: skip
    with _Ranks(tcfg.device) as ranks:  # torchrun: DDP training, sharded evaluation
        echo = (lambda s: None) if quiet or not ranks.main else typer.echo
        kw = {"resume": resume, "progress": not quiet and ranks.main, "echo": echo,
              "dist": ranks.ctx}  # fmt: skip
        if both:
            page = run_leak_comparison(tcfg, cv, out, **kw)
        else:
            run_cv(tcfg, cv, out, folds_file=folds_file, **kw)
    if not ranks.main:
        return
    if both:
        typer.echo(f"comparison: {page}")
    elif quiet:
        typer.echo(f"report: {out}/report.html")


def _fail(message: str, code: int) -> None:
    import os

    # under torchrun every rank prints: say which one failed
    where = f"rank {os.environ['RANK']}: " if int(os.environ.get("WORLD_SIZE", "1")) > 1 else ""
    typer.echo(f"error: {where}{' '.join(message.split())}", err=True)
    sys.exit(code)


def _peer_failure(e: Exception) -> bool:
    """A collective broken by another rank's exit or a timeout (under torchrun only)."""
    import os

    if int(os.environ.get("WORLD_SIZE", "1")) <= 1 or "torch" not in sys.modules:
        return False
    import torch.distributed as dist

    if isinstance(e, getattr(dist, "DistError", ())):
        return True
    text = str(e)
    return isinstance(e, RuntimeError) and any(
        k in text for k in ("Connection closed by peer", "Connection reset", "Timed out", "gloo")
    )


def main(argv: list[str] | None = None) -> None:
    """Console entry point: bad input prints one line and exits 2, never a traceback."""
    try:
        # Not standalone, so usage errors reach us as exceptions and print as one line too.
        code = app(args=argv, prog_name="histoshield", standalone_mode=False)
    except HistoshieldError as e:
        _fail(str(e), e.exit_code)
    except OSError as e:  # a write that failed outside the atomic helpers: still one line
        from histoshield.runfolder import os_error

        _fail(str(os_error(e, verb="use")), 2)
    except typer.TyperException as e:  # click's usage errors: unknown option, bad value, ...
        if type(e).__name__ == "NoArgsIsHelpError":  # bare command: its help is the answer
            typer.echo(e.format_message(), nl=False)
            sys.exit(2)
        ctx = getattr(e, "ctx", None)
        hint = f" (see: {ctx.command_path} --help)" if ctx is not None else ""
        _fail(e.format_message() + hint, getattr(e, "exit_code", 2))
    except (typer.Abort, KeyboardInterrupt):
        code = 130
    except Exception as e:
        if not _peer_failure(e):
            raise
        _fail(f"stopped: another torchrun rank failed or timed out ({type(e).__name__}); see "
              "its error above", 1)  # fmt: skip
    if code == 130:  # Typer turns Ctrl-C inside a command into exit code 130
        _fail("interrupted (Ctrl-C); finished outputs are kept, train/study can --resume", 130)
    sys.exit(code if isinstance(code, int) else 0)  # like standalone Typer: always SystemExit
