"""The mask-method interface and the selection rules shared by every method.

Everything here is pure tensor math: tensors in, tensors out, no hooks, devices or logging.
Masks are boolean and mean *keep* (True = the weight survives).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch


@dataclass
class PruneResult:
    """What a mask method returns for one linear layer."""

    weight: torch.Tensor  # (out, in), pruned (and, for SparseGPT, updated): exactly zero where ~mask
    mask: torch.Tensor  # (out, in) bool, True = kept
    info: dict[str, Any] = field(default_factory=dict)  # e.g. the dampening SparseGPT ended up using


class InputStatistics(ABC):
    """Accumulates what a method needs to know about a layer's inputs, one batch at a time.

    ``last_use`` is set by the engine before the last layer sharing these statistics is pruned: they may then
    hand their memory over instead of copying it.
    """

    last_use: bool = False
    #: How many input tokens (rows of x) were added.
    num_tokens: int = 0

    @abstractmethod
    def update(self, x: torch.Tensor) -> None:
        """Add a batch of inputs ``x`` of shape (..., in_features)."""

    def sums(self) -> list[torch.Tensor]:
        """The tensors that are sums over tokens: a distributed run adds every rank's into each rank's copy (and
        ``num_tokens`` likewise) before a mask is chosen. The reduction itself is the engine's; statistics are
        plain tensors and know nothing of processes."""
        return []


class MaskMethod(ABC):
    """One way of choosing masks. Subclasses are registered by name in `optimum_recon.masks`."""

    name: ClassVar[str]
    #: Whether the method needs the layer inputs at all (magnitude does not).
    needs_inputs: ClassVar[bool] = True

    def new_statistics(self, in_features: int, device: torch.device, *, exact: bool = False
                       ) -> InputStatistics | None:
        """A fresh accumulator for a layer with ``in_features`` inputs, or None if no inputs are needed. With
        ``exact``, sums are kept in float64 so that they do not depend on the order batches are added in."""
        return None

    @abstractmethod
    def prune(
        self,
        weight: torch.Tensor,
        stats: InputStatistics | None,
        *,
        sparsity: float,
        nm: tuple[int, int] | None,
        num_prune: int | None = None,
        **options: Any,
    ) -> PruneResult:
        """Choose the mask of ``weight`` (out, in) and return the pruned weight with it. Unstructured: exactly
        ``num_prune`` weights are pruned when it is given (the engine always gives it: `allocation.py`), else each
        comparison group loses ``int(size * sparsity)``."""


def _keep_top(scores: torch.Tensor, num_keep: int) -> torch.Tensor:
    """Bool mask keeping the ``num_keep`` largest entries of each row of ``scores`` (stable on ties)."""
    # scores: (rows, k)
    order = torch.sort(scores, dim=-1, descending=True, stable=True).indices
    keep = torch.zeros_like(scores, dtype=torch.bool)
    keep.scatter_(-1, order[..., :num_keep], True)
    return keep


def nm_keep_mask(scores: torch.Tensor, n: int, m: int) -> torch.Tensor:
    """Keep the ``n`` highest scores in every group of ``m`` consecutive inputs of each row."""
    # scores: (out, in) -> groups: (out, in // m, m)
    out_features, in_features = scores.shape
    if in_features % m:
        raise ValueError(f"an N:M pattern with M={m} needs an input width divisible by {m}, got {in_features}.")
    groups = scores.reshape(out_features, in_features // m, m)
    return _keep_top(groups, n).reshape(out_features, in_features)


def row_keep_mask(scores: torch.Tensor, sparsity: float, num_prune: int | None = None) -> torch.Tensor:
    """Prune the lowest scores of each output row (Wanda's comparison group): ``int(in * sparsity)`` per row, or with
    ``num_prune`` exactly that many in all, ``num_prune // rows`` per row plus one more in the ``num_prune % rows``
    rows whose next-lowest score is the lowest."""
    rows, cols = scores.shape
    if num_prune is None:
        return _keep_top(scores, cols - int(cols * sparsity))
    per_row, extra = divmod(int(num_prune), rows)
    keep = _keep_top(scores, cols - per_row)
    if extra:
        lowest, where = torch.where(keep, scores, torch.inf).min(dim=1)  # (rows,) each row's lowest kept score
        chosen = torch.sort(lowest, stable=True).indices[:extra]
        keep[chosen, where[chosen]] = False
    return keep


def global_keep_mask(scores: torch.Tensor, sparsity: float, num_prune: int | None = None) -> torch.Tensor:
    """Prune exactly ``num_prune`` (default ``int(numel * sparsity)``) lowest scores over the whole matrix."""
    flat = scores.reshape(1, -1)
    num_prune = int(flat.shape[1] * sparsity) if num_prune is None else int(num_prune)
    return _keep_top(flat, flat.shape[1] - num_prune).reshape(scores.shape)


def select_mask(scores: torch.Tensor, sparsity: float, nm: tuple[int, int] | None, per_row: bool,
                num_prune: int | None = None) -> torch.Tensor:
    """The keep-mask for ``scores`` under an N:M pattern, or unstructured per row / over the matrix (``num_prune``:
    the exact number of weights to prune, see `allocation.py`)."""
    if nm is not None:
        return nm_keep_mask(scores, *nm)
    return row_keep_mask(scores, sparsity, num_prune) if per_row else global_keep_mask(scores, sparsity, num_prune)
