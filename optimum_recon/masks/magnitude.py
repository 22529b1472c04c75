"""Magnitude pruning: drop the weights with the smallest |W|."""

from __future__ import annotations

from typing import Any

import torch

from .base import MaskMethod, PruneResult, select_mask


def magnitude_prune(weight: torch.Tensor, sparsity: float, nm: tuple[int, int] | None = None,
                    num_prune: int | None = None) -> PruneResult:
    """Prune ``weight`` (out, in) by magnitude.

    Unstructured: one threshold over the whole matrix (exactly ``num_prune``, default ``int(numel * sparsity)``,
    zeros).
    N:M: the N largest |W| of every M consecutive inputs in each row are kept.
    """
    mask = select_mask(weight.abs().float(), sparsity, nm, per_row=False, num_prune=num_prune)
    return PruneResult(weight=weight * mask, mask=mask)


class Magnitude(MaskMethod):
    name = "magnitude"
    needs_inputs = False

    def prune(self, weight, stats, *, sparsity, nm, num_prune=None, **options: Any) -> PruneResult:
        return magnitude_prune(weight, sparsity, nm, num_prune)
