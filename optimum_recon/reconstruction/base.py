"""The reconstruction interface."""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Any, Callable, ClassVar, Sequence

import torch


class Reconstruction(ABC):
    """Adjusts a pruned block's weights so that its outputs match the targets.

    ``run_block(batch_index, hidden_states)`` runs the block on one batch with the right keyword
    arguments; ``inputs`` and ``targets`` are per-batch CPU tensors (the pruned model's inputs to the
    block and the outputs it should produce). Returns a dict of what to record (e.g. loss curves).
    """

    name: ClassVar[str]

    @abstractmethod
    def reconstruct(
        self,
        block: torch.nn.Module,
        keep_masks: dict[str, torch.Tensor],
        run_block: Callable[[int, torch.Tensor], torch.Tensor],
        inputs: Sequence[torch.Tensor],
        targets: Sequence[torch.Tensor],
        **options: Any,
    ) -> dict[str, Any]:
        ...


class LayerReconstruction(Reconstruction):
    """LR: the mask method alone; nothing is trained."""

    name = "layer"

    def reconstruct(self, block, keep_masks, run_block, inputs, targets, **options):
        return {}
