"""Saving pruned models, their model cards, and uploading them to the Hub."""

from ..folders import atomic_directory
from .card import base_model_license, build_model_card
from .push import HubUploadError, push_folder
from .save import save_pruned_model

__all__ = ["HubUploadError", "atomic_directory", "base_model_license", "build_model_card", "push_folder",
           "save_pruned_model"]
