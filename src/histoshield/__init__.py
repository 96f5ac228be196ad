"""histoshield: attack, defend and honestly measure breast-cancer histopathology classifiers."""

__version__ = "0.1.0"
