"""The training loop, its run folder, resume and DDP (takes a defense as a duck-typed hook)."""

from histoshield.training.loop import resolve_config, train

__all__ = ["resolve_config", "train"]
