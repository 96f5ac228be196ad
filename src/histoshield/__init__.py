"""histoshield: attack, defend and honestly measure breast-cancer histopathology classifiers."""

from typing import Any

__version__ = "0.1.0"


def __getattr__(name: str) -> Any:
    """`histoshield.audit(model, images, labels)` imports torch only when first used."""
    if name == "audit":
        import importlib

        return importlib.import_module("histoshield.audit")  # a callable package
    raise AttributeError(f"module 'histoshield' has no attribute {name!r}")
