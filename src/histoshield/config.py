"""Pydantic configs, loaded from YAML with CLI overrides on top; runs write the resolved one."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal, TypeVar

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from histoshield.errors import HistoshieldError
from histoshield.specs import parse_number

T = TypeVar("T", bound=BaseModel)


def shipped_configs() -> dict[str, Path]:
    """The YAML presets shipped inside the package: {name: path} (study and cv presets)."""
    from importlib import resources

    folder = resources.files("histoshield") / "configs"
    return {
        p.name.removesuffix(".yaml"): Path(str(p))
        for p in folder.iterdir()
        if p.name.endswith(".yaml")
    }


def preset_or_path(config: str | Path) -> Path:
    """`config` itself when it is a file, else the shipped preset of that name (`cpu`, ...)."""
    name = str(config).removesuffix(".yaml")
    if not Path(config).expanduser().is_file() and name in (presets := shipped_configs()):
        return presets[name]
    return Path(config).expanduser()


class Strict(BaseModel):
    """Base for configs: unknown keys are errors, so a typo never silently does nothing."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class AugmentConfig(Strict):
    """Training-time augmentation for H&E tiles (all off at evaluation)."""

    enabled: bool = True
    flip: bool = True
    rot90: bool = True
    crop_scale: tuple[float, float] | None = (0.8, 1.0)
    color_jitter: float = Field(0.05, ge=0, le=0.5)
    hed_sigma: float = Field(0.02, ge=0, le=0.5)


class TrainConfig(Strict):
    """Everything `histoshield train` needs; `configs/*.yaml` hold named presets."""

    data: str = "synthetic"
    split: str | None = None
    split_by: Literal["auto", "patient", "image"] = "auto"
    val: float = Field(0.1, gt=0, lt=0.5)
    test: float = Field(0.1, gt=0, lt=0.5)
    magnification: list[int] = Field(default_factory=list)
    skip_bad: bool = False
    classes: list[str] | None = None  # accepted labels; None: benign, malignant
    allow_patient_leak: bool = False  # a split CSV may put a patient in two splits
    model: str = "smallcnn"
    weights: str = "none"
    image_size: int = Field(96, ge=32, le=1024)
    stain_norm: Literal["none", "reinhard", "macenko"] = "none"
    epochs: int = Field(10, ge=1)
    batch_size: int = Field(32, ge=1)
    lr: float = Field(1e-3, gt=0, allow_inf_nan=False)
    optimizer: Literal["adam", "adamw", "sgd"] = "adam"
    weight_decay: float = Field(0.0, ge=0)
    scheduler: Literal["none", "cosine", "step"] = "none"
    early_stopping: int | None = Field(None, ge=1)
    # Class balancing (training/balance.py): none | loss (weighted CE) | sampler (weighted draw).
    balance: Literal["none", "loss", "sampler"] = "sampler"
    # Stop after this many consecutive degenerate (near-constant) validation epochs that
    # follow a non-degenerate one (None = warn and keep training).
    collapse_patience: int | None = Field(None, ge=1)
    augment: AugmentConfig = Field(default_factory=AugmentConfig)
    defense: str | None = None
    tta: bool = False  # average the logits over the 8 flips/rotations at evaluation (in-model)
    # Exponential moving average of the weights (and BatchNorm statistics), updated after every
    # step; validation, best.pt and every later use see the average (training/stepper.py).
    ema: float | None = Field(None, gt=0, lt=1)
    # Clean training only (a defense brings its own loss): label smoothing (Szegedy et al. 2016)
    # and mixup of image pairs with weights lambda ~ Beta(mixup, mixup) (Zhang et al. 2018);
    # 0 turns each off (training/mixup.py).
    label_smoothing: float = Field(0.0, ge=0, lt=0.5)
    mixup: float = Field(0.0, ge=0, le=10)
    # Also clean training only: sharpness-aware minimisation (Foret et al. 2021), each step
    # takes the gradient at the worst weights within L2 radius `sam` (2x the training cost;
    # training/stepper.py); 0 = off.
    sam: float = Field(0.0, ge=0, le=1)
    backbone_lr_scale: float = Field(1.0, ge=0, le=1)  # lr of all but the head = lr * this
    target_sensitivity: float | None = Field(None, gt=0, le=1)  # pick a threshold on val
    seed: int = 0
    device: str = "auto"
    amp: bool = True
    num_workers: int = Field(0, ge=0)
    cache_dir: str | None = None

    @field_validator("classes", mode="before")
    @classmethod
    def _classes(cls, v: Any) -> Any:
        from histoshield.data.layouts import parse_classes

        if v is None:
            return None
        try:
            return list(parse_classes(v))
        except HistoshieldError as e:
            raise ValueError(str(e)) from None

    @property
    def clean_only_set(self) -> list[str]:
        """The clean-training-only options this config turns on (a defense refuses them)."""
        return [k for k in ("mixup", "label_smoothing", "sam") if getattr(self, k)]

    @property
    def leak_allowed(self) -> bool:
        """Patient leakage across splits is accepted: asked for, or an image-level split."""
        return self.allow_patient_leak or self.split_by == "image"

    @field_validator("magnification", mode="before")
    @classmethod
    def _mags(cls, v: Any) -> Any:
        if v is None:
            return []
        if isinstance(v, (int, str)):
            v = [v]
        out = []
        for m in v:
            text = str(m).strip().upper().removesuffix("X")
            if not text.isdigit():
                raise ValueError(f"magnification {m!r} is not a number like 200 or 200X")
            out.append(int(text))
        return out


class _UniqueKeyLoader(yaml.SafeLoader):
    """SafeLoader that refuses a key repeated in one mapping (plain YAML keeps the last)."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: set[Any] = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if key in seen:
                line = key_node.start_mark.line + 1
                raise yaml.constructor.ConstructorError(
                    None, None, f"duplicate key {key!r} (line {line})", key_node.start_mark
                )
            seen.add(key)
        return super().construct_mapping(node, deep=deep)


def read_yaml(path: str | Path, what: str = "config") -> dict[str, Any]:
    """A YAML file's top-level mapping; one-line errors for missing, unreadable or bad files."""
    p = Path(path).expanduser()
    if not p.is_file():
        raise HistoshieldError(f"{what} file not found: {p} (pass an existing YAML file)")
    try:
        loaded = yaml.load(p.read_text(encoding="utf-8"), Loader=_UniqueKeyLoader)
    except yaml.constructor.ConstructorError as e:
        if e.problem and e.problem.startswith("duplicate key"):
            raise HistoshieldError(
                f"{what} {p} has a {e.problem}: keep one of them (YAML would silently use the last)"
            ) from None
        raise HistoshieldError(f"{what} {p} is not valid YAML: {str(e).splitlines()[0]}") from None
    except yaml.YAMLError as e:
        raise HistoshieldError(f"{what} {p} is not valid YAML: {str(e).splitlines()[0]}") from None
    except UnicodeDecodeError:
        raise HistoshieldError(f"{what} {p} is not a UTF-8 text file; pass a YAML file") from None
    except OSError as e:
        raise HistoshieldError(f"cannot read {what} {p}: {e.strerror or e}") from None
    if loaded is None:  # an empty file is a mistake, not "use every default"
        raise HistoshieldError(
            f"{what} {p} is empty: put settings in it, or leave out --config for the defaults"
        )
    if not isinstance(loaded, dict):
        raise HistoshieldError(f"{what} {p} must be a YAML mapping of settings")
    return loaded


def settings_error(e: ValidationError, source: str | Path | None = None) -> HistoshieldError:
    """One line naming the first invalid setting, the value given and the file it came from."""
    err = e.errors()[0]
    where = ".".join(str(x) for x in err["loc"]) or "config"
    got = err.get("input")
    value = f" (got {got!r})" if isinstance(got, (str, int, float, bool)) else ""
    at = f" in {source}" if source else ""
    if err["type"] == "extra_forbidden":  # a typo must not silently do nothing
        return HistoshieldError(f"unknown setting {where}{at}: check its spelling and section")
    return HistoshieldError(f"invalid setting {where}{at}: {err['msg']}{value}")


def load_config(cls: type[T], path: str | Path | None = None, **overrides: Any) -> T:
    """Build `cls` from an optional YAML file, then apply non-None overrides (CLI flags)."""
    data: dict[str, Any] = read_yaml(path) if path is not None else {}
    data.update({k: v for k, v in overrides.items() if v is not None})
    try:
        return cls.model_validate(data)
    except ValidationError as e:
        raise settings_error(e, path) from None


def dump_config(cfg: BaseModel) -> str:
    """The resolved config as YAML (what goes into a run folder's config.yaml)."""
    return yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False)


# ---- study ----------------------------------------------------------------------------------


def parse_eps_value(v: Any) -> float:
    """One eps in pixel units from a number or a string such as '2/255' or '0.0078'."""
    if isinstance(v, bool):
        raise ValueError(f"eps must be a number or 'a/b', got {v!r}")
    try:
        f = parse_number(v, "eps")
    except HistoshieldError:  # pydantic validators report ValueErrors
        raise ValueError(f"eps {v!r} is not a number or 'a/b' such as '2/255'") from None
    if not 0 <= f <= 1:
        raise ValueError(f"eps {v!r} must lie in [0, 1] (pixel units)")
    return f


class CertifyConfig(Strict):
    """Randomized-smoothing certification of the gaussian model (Cohen et al. 2019)."""

    enabled: bool = True
    sigma: float | None = Field(None, gt=0, le=1)  # None → the study's gaussian_sigma
    n0: int = Field(100, ge=1)
    n: int = Field(1000, ge=1)
    alpha: float = Field(0.001, gt=0, lt=1)
    batch: int = Field(256, ge=1)
    limit: int | None = Field(100, ge=1)  # at most this many test images (None = all)


class CVConfig(Strict):
    """Patient-level K-fold cross-validation (`histoshield cv`; a study config's `cv:` section)."""

    folds: int = Field(5, ge=2)
    group_by: Literal["patient", "image"] = "patient"
    inner_val: float | None = Field(None, gt=0, lt=0.5)  # None → the train section's `val`
    robustness: bool = True
    eps: float = 2 / 255
    attacks: list[str] = Field(default_factory=lambda: ["fgsm", "pgd:steps=7,restarts=1"])
    only: str | None = "malignant"  # attack only this class's held-out images (Table 3)
    batch_size: int = Field(64, ge=1)
    # more images for every fold's training set (never its validation or test): patients also
    # in the CV data are dropped, so they cannot leak into a held-out fold
    extra_train: str | None = None

    @field_validator("eps", mode="before")
    @classmethod
    def _one_eps(cls, v: Any) -> Any:
        return parse_eps_value(v)


STAIN_CV_ATTACKS = [
    "pgd:steps=5,restarts=1",
    "hed:a=0.2,b=0.2,steps=5",
    "hed-random:a=0.2,b=0.2,steps=5",
]


class StainCVConfig(CVConfig):
    """The study's optional `stain_cv` stage (docs/stain.md): one patient-level CV per variant
    of the study's train section, compared on held-out patients. Each variant is a mapping of
    train-section overrides (e.g. `{defense: "hed-at:a=0.2,b=0.2,steps=3"}` or
    `{stain_norm: reinhard}`); the other keys are the cv settings for every variant."""

    variants: dict[str, dict[str, Any]] = Field(min_length=1)
    folds: int = Field(3, ge=2)
    # stain attacks carry their box in the spec (a, b / factor, hue); eps is the L∞ attacks'
    attacks: list[str] = Field(default_factory=lambda: list(STAIN_CV_ATTACKS), min_length=1)
    only: str | None = None  # attack every held-out tile: balanced robust accuracy per fold

    @field_validator("variants")
    @classmethod
    def _slugs(cls, v: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
        import re

        for name, over in v.items():
            if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]*", name):
                raise ValueError(f"stain_cv variant name {name!r} must be a folder name such "
                                 "as hed-at (letters, digits, '-', '_', '.')")  # fmt: skip
            if not isinstance(over, dict):
                raise ValueError(f"stain_cv variant {name!r} must map train keys to values, "
                                 "e.g. {defense: 'hed-at:a=0.2,b=0.2,steps=3'}")  # fmt: skip
            bad = sorted(set(over) & {"data", "split", "seed"})
            if bad:
                raise ValueError(f"stain_cv variant {name!r} sets {', '.join(bad)}: every "
                                 "variant uses the study's data and seed")  # fmt: skip
        return v


# The training settings a study may change per model (`defense_train`): optimisation, and the
# in-model stain normalisation (it sits inside forward, so the [0,1] input contract holds);
# the split, input size and architecture stay shared, so every model meets the same test images.
DEFENSE_TRAIN_KEYS = (
    "epochs", "batch_size", "lr", "optimizer", "weight_decay", "scheduler", "early_stopping",
    "balance", "collapse_patience", "augment", "backbone_lr_scale", "stain_norm",
    "ema", "label_smoothing", "mixup", "sam",
)  # fmt: skip


def defense_name(spec: str) -> str:
    """A defense spec's model name in a study (`pgd-at:eps=2/255` -> `pgd-at`), before numbering."""
    return spec.split(":", 1)[0].strip().lower()


def with_model_overrides(train: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    """`train` settings with one model's `defense_train` entries on top (a partial `augment`
    section changes only the keys it names)."""
    out = dict(train)
    for key, value in over.items():
        merge = key == "augment" and isinstance(value, dict)
        out[key] = {**(out.get("augment") or {}), **value} if merge else value
    return out


class StudyConfig(Strict):
    """The paper's protocol end to end (`histoshield study`); `configs/*.yaml` hold presets."""

    name: str = "study"
    seed: int = 0
    data: str = "synthetic"
    split_by: Literal["auto", "patient", "image"] = "auto"
    train: TrainConfig = Field(default_factory=TrainConfig)
    gaussian_sigma: float = Field(0.1, gt=0, le=1)
    table3_attack: str = "fgsm"
    table3_eps: float = 2 / 255
    only: str | None = "malignant"
    curve_eps: list[float] = Field(default_factory=lambda: [e / 255 for e in (0, 0.5, 1, 2, 4, 8)])
    curve_attacks: list[str] = Field(
        default_factory=lambda: ["fgsm", "pgd:steps=10,restarts=1"], min_length=1
    )
    extra_attacks: list[str] = Field(default_factory=list)
    extra_defenses: list[str] = Field(default_factory=list)
    # Per-model training overrides, keyed by model name (`gaussian`, or an extra defense's name
    # such as `pgd-at`): an adversarial loss may need another learning rate or epoch count than
    # the clean recipe. Optimisation settings and the in-model stain_norm (DEFENSE_TRAIN_KEYS):
    # the data, split, architecture and input size stay shared.
    defense_train: dict[str, dict[str, Any]] = Field(default_factory=dict)
    # Stain-space attacks (docs/stain.md) over stain budgets (a = b = eps, not pixel units);
    # an empty list skips the study's stain stage.
    stain_attacks: list[str] = Field(
        default_factory=lambda: ["hed:steps=10", "hed-random:steps=10"]
    )
    stain_eps: list[float] = Field(default_factory=lambda: [0.0, 0.05, 0.1, 0.2])
    transfer: bool = True
    certify: CertifyConfig = Field(default_factory=CertifyConfig)
    sanity: bool = True
    sanity_limit: int | None = Field(32, ge=1)  # test images the self-checks attack (None = all)
    batch_size: int = Field(64, ge=1)  # evaluation / attack batch
    cv: CVConfig = Field(default_factory=CVConfig)  # used by `histoshield cv`, not by `study`
    stain_cv: StainCVConfig | None = None  # the optional `stain_cv` stage (off by default)

    @field_validator("table3_eps", mode="before")
    @classmethod
    def _one_eps(cls, v: Any) -> Any:
        return parse_eps_value(v)

    def train_for(self, name: str) -> TrainConfig:
        """The `train:` section with model `name`'s `defense_train` overrides applied."""
        over = self.defense_train.get(name)
        if not over:
            return self.train
        try:
            return TrainConfig.model_validate(with_model_overrides(self.train.model_dump(), over))
        except ValidationError as e:
            err = settings_error(e)
            raise HistoshieldError(f"defense_train.{name}: {err}") from None

    @field_validator("defense_train")
    @classmethod
    def _defense_train(cls, v: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
        for name, over in v.items():
            bad = sorted(set(over) - set(DEFENSE_TRAIN_KEYS))
            if bad:
                raise ValueError(
                    f"defense_train.{name}: {', '.join(bad)} cannot differ between models "
                    f"(allowed: {', '.join(DEFENSE_TRAIN_KEYS)})"
                )
        return v

    @field_validator("stain_eps", mode="before")
    @classmethod
    def _stain_eps(cls, v: Any) -> Any:
        if isinstance(v, str):
            v = [s for s in v.split(",") if s.strip()]
        if not isinstance(v, (list, tuple)) or not v:
            raise ValueError("stain_eps must be a non-empty list such as [0, 0.1, 0.2]")
        try:
            out = sorted({float(parse_number(e, "stain_eps")) for e in v})
        except HistoshieldError:  # pydantic validators report ValueErrors
            raise ValueError(f"stain_eps {v!r} must be numbers such as [0, 0.1, 0.2]") from None
        if out[0] < 0 or out[-1] > 1:
            raise ValueError("stain_eps values are stain budgets in [0, 1], e.g. [0, 0.1, 0.2]")
        return out

    @field_validator("curve_eps", mode="before")
    @classmethod
    def _eps_list(cls, v: Any) -> Any:
        if isinstance(v, str):
            v = [s for s in v.split(",") if s.strip()]
        if not isinstance(v, (list, tuple)) or not v:
            raise ValueError("curve_eps must be a non-empty list such as [0, 1/255, 2/255]")
        return sorted({parse_eps_value(e) for e in v})


def resolve_config(
    config: str | Path | None = None, *, resume: str | Path | None = None, **overrides: Any
) -> TrainConfig:
    """TrainConfig from a YAML file or shipped preset name (flat, or a study config's `train:`
    section), a run folder being resumed (its config.yaml), and CLI overrides on top (None =
    not given)."""
    base: dict[str, Any] = {}
    src: Path | None = None
    if resume is not None:
        src = Path(resume) / "config.yaml"
        if not src.is_file():
            raise HistoshieldError(f"cannot resume: {src} does not exist (is {resume} a run?)")
    elif config is not None:
        src = preset_or_path(config)
    if src is not None:
        loaded = read_yaml(src)
        if isinstance(loaded.get("train"), dict):
            # A study config: its `train:` section, plus the study-wide settings that are also
            # training settings (data, seed, split_by, ...) so the run matches the study's.
            shared = {k: v for k, v in loaded.items() if k in TrainConfig.model_fields}
            per_model = loaded.get("defense_train") or {}
            loaded = {**shared, **loaded["train"]}
            # `--defense pgd-at:...` with a study config trains what the study's `pgd-at` does
            defense = overrides.get("defense") or loaded.get("defense")
            name = defense_name(str(defense)) if defense else None
            if isinstance(per_model, dict) and isinstance(per_model.get(name), dict):
                loaded = with_model_overrides(loaded, per_model[name])
        base.update(loaded)
    base.update({k: v for k, v in overrides.items() if v is not None})
    try:
        return TrainConfig.model_validate(base)
    except ValidationError as e:
        raise settings_error(e, src) from None
