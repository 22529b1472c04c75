"""The block-sequential pruning engine."""

from .capture import BlockInputs, capture_block_inputs
from .sequential import prune_model

__all__ = ["BlockInputs", "capture_block_inputs", "prune_model"]
