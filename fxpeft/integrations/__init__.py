"""Integrations with training libraries. Imported on demand (``from fxpeft.integrations import
Trainer``), not by ``import fxpeft``, because importing ``transformers.Trainer`` is slow."""
from .trainer import Trainer

__all__ = ["Trainer"]
