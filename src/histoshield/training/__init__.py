"""The training loop, its run folder, resume and DDP (takes a defense as a duck-typed hook)."""

from histoshield.config import resolve_config
from histoshield.training.loop import train

__all__ = ["resolve_config", "train"]
