"""Saving pruned models, their model cards, and uploading them to the Hub."""

from .card import build_model_card
from .save import atomic_directory, save_pruned_model

__all__ = ["atomic_directory", "build_model_card", "save_pruned_model"]
