"""Calibration and evaluation data, and the bundled default model."""

from .calibration import sample_calibration_windows
from .sources import DataSourceError, load_documents, load_eval_text

__all__ = ["DataSourceError", "load_documents", "load_eval_text", "sample_calibration_windows"]
