"""Mask methods, looked up by name.

A method is a `MaskMethod` subclass registered with `register_mask_method`; `get_mask_method(name)`
returns an instance. The pure functions (`magnitude_prune`, `wanda_prune`, `sparsegpt_prune`) can be
used on their own.
"""

from __future__ import annotations

from .base import InputStatistics, MaskMethod, PruneResult
from .magnitude import Magnitude, magnitude_prune
from .sparsegpt import SparseGPT, sparsegpt_prune
from .wanda import Wanda, wanda_prune

MASK_METHODS: dict[str, type[MaskMethod]] = {}


def register_mask_method(cls: type[MaskMethod]) -> type[MaskMethod]:
    """Register a `MaskMethod` subclass under its ``name`` (lower-case, unique). Usable as a decorator."""
    name = getattr(cls, "name", None)
    if not isinstance(name, str) or not name or name != name.lower():
        raise ValueError(f"{cls.__name__}.name must be a non-empty lower-case string, got {name!r}.")
    if name in MASK_METHODS and MASK_METHODS[name] is not cls:
        raise ValueError(f"a mask method named {name!r} is already registered ({MASK_METHODS[name].__name__}).")
    MASK_METHODS[name] = cls
    return cls


def get_mask_method(name: str) -> MaskMethod:
    """An instance of the mask method registered as ``name``."""
    try:
        return MASK_METHODS[name]()
    except KeyError:
        raise ValueError(
            f"unknown mask method {name!r}: choose one of {', '.join(sorted(MASK_METHODS))}."
        ) from None


for _cls in (Magnitude, SparseGPT, Wanda):
    register_mask_method(_cls)

__all__ = [
    "MASK_METHODS",
    "InputStatistics",
    "MaskMethod",
    "PruneResult",
    "get_mask_method",
    "magnitude_prune",
    "register_mask_method",
    "sparsegpt_prune",
    "wanda_prune",
]
