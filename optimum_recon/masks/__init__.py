"""Mask methods, looked up by name.

A method is a `MaskMethod` subclass registered with `register_mask_method`; `get_mask_method(name)`
returns an instance. The pure functions (`magnitude_prune`, `wanda_prune`, `sparsegpt_prune`, `alps_prune`) can be
used on their own.
"""

from __future__ import annotations

from ..registry import Registry
from .alps import ALPS, alps_prune
from .base import InputStatistics, MaskMethod, PruneResult
from .magnitude import Magnitude, magnitude_prune
from .sparsegpt import SparseGPT, sparsegpt_prune
from .wanda import Wanda, wanda_prune

MASK_METHODS: Registry[MaskMethod] = Registry("mask method")


def register_mask_method(cls: type[MaskMethod]) -> type[MaskMethod]:
    """Register a `MaskMethod` subclass under its ``name`` (lower-case, unique). Usable as a decorator."""
    return MASK_METHODS.register(cls)


def get_mask_method(name: str) -> MaskMethod:
    """An instance of the mask method registered as ``name``."""
    return MASK_METHODS.create(name)


for _cls in (Magnitude, SparseGPT, Wanda, ALPS):
    register_mask_method(_cls)

__all__ = [
    "MASK_METHODS",
    "InputStatistics",
    "MaskMethod",
    "PruneResult",
    "alps_prune",
    "get_mask_method",
    "magnitude_prune",
    "register_mask_method",
    "sparsegpt_prune",
    "wanda_prune",
]
