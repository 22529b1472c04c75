"""Model traversal (decoder blocks and their linear layers) and offload helpers."""

from .blocks import BLOCK_PATTERNS, LinearLayer, find_blocks, find_linear_layers

__all__ = ["BLOCK_PATTERNS", "LinearLayer", "find_blocks", "find_linear_layers"]
