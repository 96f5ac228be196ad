"""Pydantic configs, loaded from YAML with CLI overrides on top; every run writes the resolved one."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal, TypeVar

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from histoshield.errors import HistoshieldError

T = TypeVar("T", bound=BaseModel)


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
    model: str = "smallcnn"
    weights: str = "none"
    image_size: int = Field(96, ge=32, le=1024)
    stain_norm: Literal["none", "reinhard", "macenko"] = "none"
    epochs: int = Field(10, ge=1)
    batch_size: int = Field(32, ge=1)
    lr: float = Field(1e-3, gt=0)
    optimizer: Literal["adam", "adamw", "sgd"] = "adam"
    weight_decay: float = Field(0.0, ge=0)
    scheduler: Literal["none", "cosine", "step"] = "none"
    early_stopping: int | None = Field(None, ge=1)
    augment: AugmentConfig = Field(default_factory=AugmentConfig)
    defense: str | None = None
    seed: int = 0
    device: str = "auto"
    amp: bool = True
    num_workers: int = Field(0, ge=0)
    cache_dir: str | None = None

    @field_validator("magnification", mode="before")
    @classmethod
    def _mags(cls, v: Any) -> Any:
        if v is None:
            return []
        if isinstance(v, (int, str)):
            v = [v]
        return [int(str(m).upper().rstrip("X")) for m in v]


def load_config(cls: type[T], path: str | Path | None = None, **overrides: Any) -> T:
    """Build `cls` from an optional YAML file, then apply non-None overrides (CLI flags)."""
    data: dict[str, Any] = {}
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise HistoshieldError(f"config file not found: {p} (pass an existing YAML file)")
        try:
            loaded = yaml.safe_load(p.read_text(encoding="utf-8"))
        except yaml.YAMLError as e:
            raise HistoshieldError(f"config {p} is not valid YAML: {str(e).splitlines()[0]}") from e
        if loaded is None:
            loaded = {}
        if not isinstance(loaded, dict):
            raise HistoshieldError(f"config {p} must be a YAML mapping of settings")
        data.update(loaded)
    data.update({k: v for k, v in overrides.items() if v is not None})
    try:
        return cls.model_validate(data)
    except ValidationError as e:
        err = e.errors()[0]
        where = ".".join(str(x) for x in err["loc"]) or "config"
        src = f" in {path}" if path else ""
        raise HistoshieldError(f"invalid setting {where}{src}: {err['msg']}") from e


def dump_config(cfg: BaseModel) -> str:
    """The resolved config as YAML (what goes into a run folder's config.yaml)."""
    return yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False)
