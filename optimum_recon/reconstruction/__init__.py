"""Reconstruction strategies, looked up by name.

A strategy runs after the masks of a block are chosen and may adjust the remaining weights so that the
output matches the target hidden states. `layer` (LR) does nothing beyond the mask method itself
(SparseGPT's weight update *is* its layer-wise reconstruction); `block` (BR) trains each block alone;
`cross_block` (CR) trains sliding windows of `window` consecutive blocks jointly.
"""

from __future__ import annotations

from .base import LayerReconstruction, Reconstruction, WindowTask
from .training import BlockReconstruction, CrossBlockReconstruction, train_window

RECONSTRUCTIONS: dict[str, type[Reconstruction]] = {}


def register_reconstruction(cls: type[Reconstruction]) -> type[Reconstruction]:
    """Register a `Reconstruction` subclass under its ``name``. Usable as a decorator."""
    name = getattr(cls, "name", None)
    if not isinstance(name, str) or not name:
        raise ValueError(f"{cls.__name__}.name must be a non-empty string, got {name!r}.")
    if name in RECONSTRUCTIONS and RECONSTRUCTIONS[name] is not cls:
        raise ValueError(f"a reconstruction named {name!r} is already registered.")
    RECONSTRUCTIONS[name] = cls
    return cls


def get_reconstruction(name: str) -> Reconstruction:
    try:
        return RECONSTRUCTIONS[name]()
    except KeyError:
        raise ValueError(
            f"unknown reconstruction {name!r}: choose one of {', '.join(sorted(RECONSTRUCTIONS))}."
        ) from None


for _cls in (LayerReconstruction, BlockReconstruction, CrossBlockReconstruction):
    register_reconstruction(_cls)

__all__ = [
    "RECONSTRUCTIONS",
    "BlockReconstruction",
    "CrossBlockReconstruction",
    "LayerReconstruction",
    "Reconstruction",
    "WindowTask",
    "get_reconstruction",
    "register_reconstruction",
    "train_window",
]
