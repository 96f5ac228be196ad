"""The one attack harness: every robustness number histoshield reports comes from `run_attacks`.

Given a model, labelled images and a list of `AttackRun`s (attack, params, eps), it crafts each
attack once, scores the adversarial images on the model (or on other "judge" models: transfer)
and yields typed `Outcome`s — a `ResultRow` (what results.json stores), the per-image
correctness masks and, on request, the adversarial images. `worst_case` turns the masks of all
attacks run at one eps into the headline number: an image counts as robust only if every
attack failed on it (as AutoAttack reports). `histoshield attack`, the study's Table 3, curves
and transfer stages (and cross-validation) all call it; image quality is `evaluation.quality`,
output writing stays with the callers.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import nn

from histoshield.errors import HistoshieldError
from histoshield.evaluation.metrics import balanced_rate, class_counts, class_rates, wilson_ci

# ---- requests -------------------------------------------------------------------------------


@dataclass
class AttackRun:
    """One attack to run: registry name, its parameters, eps, and how reports name it."""

    attack: str
    eps: float
    params: dict[str, Any] = field(default_factory=dict)
    label: str | None = None  # e.g. the study's spec 'pgd:steps=10'; defaults to `attack`

    @property
    def name(self) -> str:
        """The name reports use for this attack."""
        return self.label or self.attack


def parse_attack_spec(spec: str) -> tuple[str, dict[str, Any]]:
    """'pgd:steps=10,restarts=1' → ('pgd', {'steps': 10, 'restarts': 1}): the one typed spec
    parser (`attacks.parse_attack_spec`), imported when first used so this module stays light."""
    from histoshield.attacks import parse_attack_spec as parse

    return parse(spec)


def runs_for(spec: str, eps_values: Iterable[float]) -> list[AttackRun]:
    """One `AttackRun` per eps for an attack spec, labelled with the spec itself."""
    name, params = parse_attack_spec(spec)
    return [AttackRun(name, float(e), dict(params), label=spec) for e in eps_values]


# ---- results --------------------------------------------------------------------------------


@dataclass
class ResultRow:
    """One (attack, eps) on one image set, scored on one model: what results.json stores."""

    attack: str  # the label reports use (the study's spec, or the attack name)
    name: str  # the registry name
    description: str  # what the attack is, in words: "FGSM, single step (weak)"
    params: dict[str, Any]
    eps: float
    eps_255: float | None  # None for a stain budget (norm "stain")
    norm: str | None
    n: int
    clean_correct: int
    adv_correct: int
    clean_accuracy: float | None
    adversarial_accuracy: float | None
    adversarial_accuracy_ci: list[float] | None
    success_rate: float | None  # over initially correct images; targeted: reached the target
    class_accuracy: dict[str, float]  # adversarial accuracy per true class present
    balanced_adversarial_accuracy: float | None  # mean over classes of class_accuracy
    linf_max: float | None = None
    linf_mean: float | None = None
    l2_mean: float | None = None
    psnr_mean: float | None = None
    ssim_mean: float | None = None
    queries: float | None = None  # mean model queries per image (black-box attacks)
    seconds: float | None = None  # crafting time (None: adversarial images reused)
    images_per_second: float | None = None
    transfer_source: str | None = None  # set when scored on a model other than the one attacked
    target: str | None = None
    only: str | None = None
    n_excluded: int = 0
    seed: int = 0
    components: list[dict] | None = None  # per-component log of ensembles (autoattack-binary)
    early_stop: bool | None = None  # images left the attack once misclassified (None: eps 0)
    # crafting cost in image-passes (None, like `seconds`: not crafted here — eps 0 or reused)
    forward_passes: int | None = None  # forward only
    gradient_passes: int | None = None  # forward + input backward

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict (components dropped when absent)."""
        d = asdict(self)
        if d["components"] is None:
            del d["components"]
        return d


@dataclass
class Outcome:
    """A result row with the per-image data behind it."""

    row: ResultRow
    run: AttackRun
    judge: str | None  # the scoring model's name (None: the attacked model itself)
    clean_ok: torch.Tensor  # bool (N,): correct on the clean image
    adv_ok: torch.Tensor  # bool (N,): correct on the adversarial image
    p_clean: torch.Tensor  # (N,C) probabilities, clean
    p_adv: torch.Tensor  # (N,C) probabilities, adversarial
    adv: torch.Tensor | None = None  # the adversarial images when asked for (keep_adv)


@dataclass
class WorstCase:
    """Robust accuracy at one eps: an image is robust only if every attack failed on it."""

    eps: float
    eps_255: float | None  # None for a stain budget
    attacks: list[str]
    n: int
    clean_correct: int
    adv_correct: int
    adversarial_accuracy: float | None
    adversarial_accuracy_ci: list[float] | None
    class_n: dict[str, int]
    class_correct: dict[str, int]
    class_accuracy: dict[str, float]
    balanced_adversarial_accuracy: float | None
    robust: torch.Tensor = field(repr=False)  # bool (N,) per image

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict without the per-image mask."""
        d = {k: v for k, v in asdict(self).items() if k != "robust"}
        return d


STAIN = "stain"  # the `norm` of stain-space attacks: their eps is a stain budget, not pixels


def eps_255(eps: float, norm: str | None = None) -> float | None:
    """eps in grey levels, rounded so that 2/255 is stored as 2.0 rather than 1.9999999;
    None for a stain budget, which is no pixel distance."""
    return None if norm == STAIN else round(float(eps) * 255.0, 4)


def budget_label(eps: float, norm: str | None = None) -> str:
    """How reports write one budget: '2/255' for pixel attacks, 'stain 0.2' (a = b = 0.2)."""
    return f"stain {float(eps):g}" if norm == STAIN else f"{float(eps) * 255:g}/255"


def _ci(k: int, n: int) -> list[float] | None:
    ci = wilson_ci(k, n)
    return None if ci is None else [float(ci[0]), float(ci[1])]


def _named(rates: Mapping[int, Any], classes: Sequence[str] | None) -> dict[str, Any]:
    return {(classes[c] if classes else str(c)): v for c, v in rates.items()}


def describe(atk: Any) -> str:
    """What an attack object is, in words, from its capabilities and budget."""
    title = atk.name.upper() if len(atk.name) <= 4 else atk.name
    steps, queries = getattr(atk, "steps", None), getattr(atk, "max_queries", None)
    parts = getattr(atk, "components", None)
    if parts:
        return f"worst case of {' → '.join(parts)}, {steps} steps, {queries} queries (strongest)"
    if getattr(atk, "norm", None) == STAIN:
        search = "random search" if getattr(atk, "random_search", False) else "gradient"
        return f"{title} stain, {steps} steps × {getattr(atk, 'restarts', 1)} ({search})"
    if atk.black_box:
        return f"{title}, {queries} queries (black box)" if queries else f"{title} (black box)"
    if steps is None:
        return f"{title}, single step (weak)"
    restarts = getattr(atk, "restarts", 1) or 1
    return f"{title}-{steps}" + (f", {restarts} restarts" if restarts > 1 else "") + " (iterative)"


# ---- checks before any image is touched -----------------------------------------------------


def check_attack(
    attack: str,
    eps_values: Sequence[float],
    params: dict[str, Any] | None = None,
    *,
    batch_size: int = 32,
    model: nn.Module | None = None,
    **kwargs: Any,
) -> Any:
    """Fail fast, before any image is decoded or attacked, on a bad attack name, parameter,
    eps or batch size (a stand-in model when the real one is not loaded yet); returns the
    attack object built at the first eps."""
    from histoshield.attacks import create
    from histoshield.attacks.base import check_steps

    check_steps(batch_size, "--batch-size")
    stand_in = model if model is not None else nn.Identity()
    atk = create(
        attack, stand_in, eps=eps_values[0], batch_size=batch_size, **(params or {}), **kwargs
    )
    if atk.norm == STAIN and len(eps_values) > 1:  # the constructor bounds the stain budget
        create(attack, stand_in, eps=max(eps_values), batch_size=batch_size, **(params or {}),
               **kwargs)  # fmt: skip
    big = [e for e in eps_values if e > 1]
    if big and atk.norm == "linf":  # an L2 radius may exceed 1; an L∞ one never can
        raise HistoshieldError(
            f"eps {big[0]:g} is above 1 for the L∞ attack {attack!r}: eps is in pixel units "
            f"[0, 1]; did you mean {big[0]:g}/255?"
        )
    return atk


def select(
    y: torch.Tensor,
    classes: Sequence[str] | None,
    *,
    only: int | str | None = None,
    target: int | str | None = None,
) -> tuple[torch.Tensor, int | None, int | None]:
    """Indices to attack (the `only` class, minus images already of the target class)."""
    from histoshield.attacks import resolve_class

    keep = torch.ones(len(y), dtype=torch.bool)
    only_i = None if only is None else resolve_class(only, classes, "--only")
    target_i = None if target is None else resolve_class(target, classes, "--target")
    if only_i is not None:
        keep &= y == only_i
        if not bool(keep.any()):
            raise HistoshieldError(f"no images of class {only!r} to attack: check --only / --data")
    if target_i is not None:
        if only_i is not None and only_i == target_i:
            raise HistoshieldError(
                f"--target {target!r} equals the true label of every --only {only!r} image: "
                "pick another target"
            )
        keep &= y != target_i
        if not bool(keep.any()):
            raise HistoshieldError(f"every image is already of target class {target!r}")
    return keep.nonzero()[:, 0], only_i, target_i


# ---- the harness ----------------------------------------------------------------------------


def _probs(model: nn.Module, x: torch.Tensor, batch_size: int, device) -> torch.Tensor:
    from histoshield.evaluation.predict import predict_proba

    return predict_proba(model, x, batch_size=batch_size, device=device)


class _Shard:
    """This rank's whole batches of the images and the way back to all of them (alone: all)."""

    def __init__(self, n: int, batch_size: int, dist: Any) -> None:
        from histoshield.training.distributed import batch_shard

        self.n, self.dist = n, dist
        self.on = dist is not None and dist.distributed
        self.mine = batch_shard(n, batch_size, dist) if self.on else None

    def take(self, t: torch.Tensor | None) -> torch.Tensor | None:
        """This rank's rows of a tensor over all images."""
        if t is None or self.mine is None:
            return t
        return t[self.mine.to(t.device)]

    def full(self, t: torch.Tensor) -> torch.Tensor:
        """All images' rows, in index order, from this rank's (every rank gets them)."""
        if self.mine is None:
            return t
        from histoshield.training.distributed import gather_rows

        return gather_rows(t.cpu(), self.mine, self.n, self.dist).to(t.device)

    def passes(self, counts: dict[str, int]) -> dict[str, int]:
        """Pass counters summed over ranks."""
        if not self.on:
            return dict(counts)
        from histoshield.training.distributed import sum_over_ranks

        return sum_over_ranks(counts, self.dist)

    def seconds(self, value: float) -> float:
        """Wall seconds of the slowest rank."""
        if not self.on:
            return value
        from histoshield.training.distributed import max_over_ranks

        return max_over_ranks(value, self.dist)

    def batches(self, per_batch: list) -> list:
        """Per-batch logs in global batch order (batch b ran on rank b % world)."""
        if not self.on:
            return per_batch
        from histoshield.training.distributed import gather_json

        logs, world, out = gather_json(per_batch, self.dist), self.dist.world, []
        while len(out) // world < len(logs[len(out) % world]):
            out.append(logs[len(out) % world][len(out) // world])
        return out


def run_attacks(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    runs: Iterable[AttackRun],
    *,
    classes: Sequence[str] | None = None,
    target: int | None = None,
    only: str | None = None,
    n_excluded: int = 0,
    judges: Mapping[str, nn.Module] | None = None,
    source: str = "source",
    crafted: Mapping[tuple[str, float], torch.Tensor] | None = None,
    batch_size: int = 32,
    seed: int = 0,
    device: torch.device | str | None = None,
    keep_adv: bool = False,
    quality: bool = True,
    progress: bool = False,
    early_stop: bool | None = None,
    index: torch.Tensor | None = None,
    dist: Any = None,
) -> Iterator[Outcome]:
    """Attack (x, y) with every run on `model` and yield one `Outcome` per run and judge.

    `early_stop` (default: on, unless the model is randomized — `default_eot` > 1 — where one
    misclassified draw proves nothing) stops attacking an image once it is misclassified; an
    attack's `early_stop` param (spec `pgd:early_stop=false`) overrides it. It only ever finds
    more adversarial images than the full run, at a fraction of the passes (`forward_passes`,
    `gradient_passes` in the row). `index` names the images globally (per-image randomness
    derives from seed and index; default 0..N-1).

    `judges` ({name: model}) score the images crafted on `model` (named `source`); a judge that
    is not `model` itself marks its rows as transfer. `crafted` ({(run.name, eps): images})
    supplies adversarial images made earlier (e.g. by the curves stage) instead of crafting
    again. `target` is a class index (targeted attack), `only` and `n_excluded` are recorded
    in the rows. Each attack is seeded with `seed` (params may override it).

    `dist` (a `training.distributed.DistContext` under torchrun) shards the images by whole
    batches of `batch_size` over the ranks; per-image results are gathered back in index order
    on every rank, so the outcomes (and rows) equal a one-process run's, on every rank.
    """
    from histoshield.attacks import create

    y = torch.as_tensor(y).long().reshape(-1).cpu()
    classes = list(classes) if classes is not None else getattr(model, "classes", None)
    scorers = dict(judges) if judges is not None else {None: model}
    shard = _Shard(len(y), batch_size, dist)
    xs, ys = shard.take(x), shard.take(y)
    if shard.on:  # the attack must know each image's global index (its randomness)
        index = shard.mine if index is None else shard.take(torch.as_tensor(index))
    clean: dict[Any, torch.Tensor] = {}  # clean probabilities per judge, computed once
    runs = list(runs)
    if progress:
        from tqdm.auto import tqdm

        runs = tqdm(runs, desc="attacks", unit="run", leave=False)
    if early_stop is None:
        early_stop = getattr(model, "default_eot", 1) <= 1
    for run in runs:
        kw: dict[str, Any] = {
            "seed": seed,
            "batch_size": batch_size,
            "early_stop": early_stop,
            **run.params,
        }
        atk = create(run.attack, model, eps=run.eps, target=target, classes=classes, **kw)
        seconds: float | None = None
        reused = crafted.get((run.name, run.eps)) if crafted is not None else None
        if reused is not None:
            adv = shard.take(reused)
        else:
            t0 = time.perf_counter()
            by = () if index is None else (index,)
            adv = xs.clone() if run.eps == 0 else atk(xs, ys.to(x.device), *by)
            seconds = shard.seconds(time.perf_counter() - t0)
        ran = reused is None and run.eps > 0
        qual = _quality_of(xs, adv, shard) if quality else {}
        queries = _queries_of(atk, len(ys), shard)
        passes = shard.passes(atk.passes) if ran else None
        log = shard.batches(list(getattr(atk, "log", None) or [])) if ran else []
        kept = shard.full(adv) if keep_adv else None  # every rank's images (memory: all of them)
        for judge, scorer in scorers.items():
            if judge not in clean:
                clean[judge] = shard.full(_probs(scorer, xs, batch_size, device))
            p_clean = clean[judge]
            p_adv = shard.full(_probs(scorer, adv, batch_size, device))
            pred = p_adv.argmax(1)
            clean_ok, adv_ok = p_clean.argmax(1) == y, pred == y
            n, k_clean, k_adv = len(y), int(clean_ok.sum()), int(adv_ok.sum())
            hit = (pred == target) & clean_ok if target is not None else clean_ok & ~adv_ok
            row = ResultRow(
                attack=run.name,
                name=atk.name,
                description=describe(atk),
                params=dict(run.params),
                eps=run.eps,
                eps_255=eps_255(run.eps, atk.norm),
                norm=atk.norm,
                n=n,
                clean_correct=k_clean,
                adv_correct=k_adv,
                clean_accuracy=k_clean / n if n else None,
                adversarial_accuracy=k_adv / n if n else None,
                adversarial_accuracy_ci=_ci(k_adv, n),
                success_rate=int(hit.sum()) / k_clean if k_clean else None,
                class_accuracy=_named(class_rates(adv_ok, y), classes) if n else {},
                balanced_adversarial_accuracy=balanced_rate(adv_ok, y) if n else None,
                **qual,
                queries=queries,
                seconds=seconds,
                images_per_second=n / seconds if seconds and run.eps > 0 else None,
                transfer_source=None if scorer is model else source,
                target=None if target is None else (classes[target] if classes else str(target)),
                only=only,
                n_excluded=n_excluded,
                seed=int(kw["seed"]),
                components=log or None,
                early_stop=atk.early_stop if run.eps > 0 else None,
                forward_passes=passes["forward"] if passes else None,
                gradient_passes=passes["forward_backward"] if passes else None,
            )
            yield Outcome(row, run, judge, clean_ok, adv_ok, p_clean, p_adv, kept)


def _quality_of(x: torch.Tensor, adv: torch.Tensor, shard: _Shard) -> dict[str, float | None]:
    from histoshield.evaluation.quality import per_image_quality, summarize_quality

    return summarize_quality(shard.full(per_image_quality(x, adv)))


def _queries_of(atk: Any, n: int, shard: _Shard) -> float | None:
    """Mean model queries per image over all ranks (None: the attack does not count them)."""
    if not shard.on:
        return float(atk.queries.float().mean()) if atk.queries is not None else None
    q = atk.queries.float().cpu() if atk.queries is not None else torch.full((n,), float("nan"))
    q = shard.full(q)
    return None if bool(q.isnan().all()) or len(q) == 0 else float(q.mean())


def worst_case(
    outcomes: Iterable[Outcome], y: torch.Tensor, classes: Sequence[str] | None = None
) -> list[WorstCase]:
    """Per eps, the per-image AND of "still correct" over every white-box attack run on the
    same images (transfer rows are left out): the robust accuracy every report headlines."""
    y = torch.as_tensor(y).long().reshape(-1).cpu()
    by_eps: dict[float, list[Outcome]] = {}
    for o in outcomes:
        if o.row.transfer_source is None:
            by_eps.setdefault(float(o.row.eps), []).append(o)
    out = []
    for eps in sorted(by_eps):
        group = by_eps[eps]
        if any(len(o.adv_ok) != len(y) for o in group):
            raise ValueError("worst_case needs every attack run on the same images as y")
        robust = torch.ones(len(y), dtype=torch.bool)
        clean = torch.ones(len(y), dtype=torch.bool)
        for o in group:
            robust &= o.adv_ok
            clean &= o.clean_ok
        n, k = len(y), int(robust.sum())
        counts = class_counts(robust, y)
        class_n = {c: nc for c, (nc, _) in counts.items()}
        class_k = {c: kc for c, (_, kc) in counts.items()}
        stain = any(o.row.norm == STAIN for o in group)
        out.append(
            WorstCase(
                eps=eps,
                eps_255=eps_255(eps, STAIN if stain else None),
                attacks=list(dict.fromkeys(o.row.attack for o in group)),
                n=n,
                clean_correct=int(clean.sum()),
                adv_correct=k,
                adversarial_accuracy=k / n if n else None,
                adversarial_accuracy_ci=_ci(k, n),
                class_n=_named(class_n, classes),
                class_correct=_named(class_k, classes),
                class_accuracy=_named(class_rates(robust, y), classes) if n else {},
                balanced_adversarial_accuracy=balanced_rate(robust, y) if n else None,
                robust=robust,
            )
        )
    return out
