"""Models: registry, offline weight sources, the [0,1] pixel-space wrapper and checkpoints.

>>> from histoshield import models
>>> m = models.create("smallcnn", num_classes=2)      # RGB [0,1] (N,3,H,W) -> logits (N,2)
>>> models.available()
['smallcnn', 'densenet121', 'efficientnet_lite0', 'efficientnet_lite1', 'efficientnet_lite2',
 'resnet18', 'resnet50', 'timm:<name>']
"""

from histoshield.models.card import ModelCard, from_card, load_model_or_card
from histoshield.models.checkpoint import load_checkpoint, read_checkpoint, save_checkpoint
from histoshield.models.ensemble import Ensemble, load_ensemble
from histoshield.models.registry import WEIGHTS, available, create
from histoshield.models.stain import StainNorm
from histoshield.models.wrapper import HistoModel

__all__ = [
    "Ensemble",
    "WEIGHTS",
    "HistoModel",
    "ModelCard",
    "StainNorm",
    "available",
    "create",
    "from_card",
    "load_checkpoint",
    "load_ensemble",
    "load_model_or_card",
    "read_checkpoint",
    "save_checkpoint",
]
