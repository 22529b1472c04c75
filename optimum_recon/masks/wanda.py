"""Wanda (Sun et al., 2023): score |W_ij| * ||X_j||_2, compared within each output row."""

from __future__ import annotations

from typing import Any

import torch

from .base import MaskMethod, PruneResult, select_mask
from .statistics import ColumnNormStatistics


def wanda_prune(
    weight: torch.Tensor, input_sq_norms: torch.Tensor, sparsity: float, nm: tuple[int, int] | None = None,
    num_prune: int | None = None,
) -> PruneResult:
    """Prune ``weight`` (out, in) given the squared L2 norm of each input feature over the calibration tokens.

    Unstructured: ``int(in * sparsity)`` weights pruned in every output row (with ``num_prune``: that many in all,
    spread over the rows as `row_keep_mask` says). N:M: top-N per group of M.
    """
    # scores: (out, in) = |W| * ||X_j|| broadcast over rows
    scores = weight.abs().float() * input_sq_norms.float().sqrt().reshape(1, -1)
    mask = select_mask(scores, sparsity, nm, per_row=True, num_prune=num_prune)
    return PruneResult(weight=weight * mask, mask=mask)


class Wanda(MaskMethod):
    name = "wanda"

    def new_statistics(self, in_features: int, device: torch.device, *, exact: bool = False) -> ColumnNormStatistics:
        return ColumnNormStatistics(in_features, device, exact=exact)

    def prune(self, weight, stats, *, sparsity, nm, num_prune=None, **options: Any) -> PruneResult:
        return wanda_prune(weight, stats.sq_norms, sparsity, nm, num_prune)
