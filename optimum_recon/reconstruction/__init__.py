"""Reconstruction strategies, looked up by name.

A strategy runs after the masks of a block are chosen and may adjust the remaining weights so that the
output matches the target hidden states. `layer` (LR) does nothing beyond the mask method itself
(SparseGPT's weight update *is* its layer-wise reconstruction); `block` (BR) trains each block alone;
`cross_block` (CR) trains sliding windows of `window` consecutive blocks jointly.
"""

from __future__ import annotations

from ..registry import Registry
from .base import LayerReconstruction, Reconstruction, WindowTask
from .training import BlockReconstruction, CrossBlockReconstruction, train_window

RECONSTRUCTIONS: Registry[Reconstruction] = Registry("reconstruction")


def register_reconstruction(cls: type[Reconstruction]) -> type[Reconstruction]:
    """Register a `Reconstruction` subclass under its ``name``. Usable as a decorator."""
    return RECONSTRUCTIONS.register(cls)


def get_reconstruction(name: str) -> Reconstruction:
    """An instance of the reconstruction registered as ``name``."""
    return RECONSTRUCTIONS.create(name)


def trains(config) -> bool:
    """Whether ``config`` (a `PruningConfig`) trains anything: a strategy that trains (BR, CR), for some epochs."""
    return get_reconstruction(config.reconstruction).trains and config.epochs > 0


def trained_window(config) -> int:
    """How many consecutive blocks one training fit sets (1 for BR; `window` for CR; 1 when nothing is trained)."""
    return get_reconstruction(config.reconstruction).window_size(config) if trains(config) else 1


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
