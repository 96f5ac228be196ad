"""`resolve_cv_config`: the train and cv settings of a cross-validation."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from histoshield.config import CVConfig, StudyConfig, TrainConfig, settings_error


def resolve_cv_config(
    config: str | Path | None = None, *, cv_overrides: dict[str, Any] | None = None, **train_over
) -> tuple[TrainConfig, CVConfig]:
    """(TrainConfig, CVConfig) from a flat train YAML or a study config (its `train:` and `cv:`
    sections; a study's table3_eps/only fill the cv eps/only it does not set), CLI on top."""
    from pydantic import ValidationError

    from histoshield.config import preset_or_path, read_yaml
    from histoshield.training import resolve_config

    if config is not None:
        config = preset_or_path(config)
    tcfg = resolve_config(config, **train_over)
    raw = read_yaml(config) if config is not None else {}
    section: dict[str, Any] = {}
    if isinstance(raw.get("train"), dict):  # a study config
        defaults = StudyConfig.model_fields
        section["eps"] = raw.get("table3_eps", defaults["table3_eps"].default)
        section["only"] = raw.get("only", defaults["only"].default)
    section.update(raw.get("cv") or {})
    section.update({k: v for k, v in (cv_overrides or {}).items() if v is not None})
    try:
        return tcfg, CVConfig.model_validate(section)
    except ValidationError as e:
        raise settings_error(e, config) from None
