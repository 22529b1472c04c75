"""Input statistics the mask methods accumulate over calibration batches (on the layer's device).

Sums are kept in float32, or in float64 with ``exact=True`` (the engine asks for it in a distributed run, see
`optimum_recon.distributed.exact_statistics`): each batch's contribution is computed in float32 as usual and added
to a float64 sum, so the result no longer depends on the order in which batches (and ranks) are added, and every
rank picks the masks a single-process run would pick. `sums()` names the tensors the engine adds over ranks before
a mask is chosen; nothing here knows of processes.
"""

from __future__ import annotations

import torch

from .base import InputStatistics


class ColumnNormStatistics(InputStatistics):
    """Per input feature, the sum over tokens of x_j^2 (Wanda's squared column norm of X)."""

    def __init__(self, in_features: int, device: torch.device, *, exact: bool = False):
        dtype = torch.float64 if exact else torch.float32
        self.sq_norms = torch.zeros(in_features, dtype=dtype, device=device)
        self.num_tokens = 0

    def update(self, x: torch.Tensor) -> None:
        x = x.reshape(-1, x.shape[-1]).float()  # (tokens, in)
        self.sq_norms += x.pow(2).sum(dim=0)
        self.num_tokens += x.shape[0]

    def sums(self) -> list[torch.Tensor]:
        return [self.sq_norms]


class HessianStatistics(InputStatistics):
    """SparseGPT's layer Hessian H = 2/n * sum_t x_t x_t^T over the n calibration tokens seen."""

    def __init__(self, in_features: int, device: torch.device, *, exact: bool = False):
        self.exact = exact
        dtype = torch.float64 if self.exact else torch.float32
        self.xtx = torch.zeros(in_features, in_features, dtype=dtype, device=device)
        self.num_tokens = 0

    def update(self, x: torch.Tensor) -> None:
        x = x.reshape(-1, x.shape[-1]).float()  # (tokens, in)
        if self.exact:
            self.xtx += x.t() @ x  # the batch's product in float32, added to the float64 sum
        else:
            self.xtx.addmm_(x.t(), x)
        self.num_tokens += x.shape[0]

    def sums(self) -> list[torch.Tensor]:
        return [self.xtx]

    @property
    def hessian(self) -> torch.Tensor:
        """H as a new float32 tensor."""
        return (self.xtx * (2.0 / max(self.num_tokens, 1))).float()

    def take_hessian(self) -> torch.Tensor:
        """H for the caller to keep (and overwrite). On the statistics' last use (``last_use``) the sums' own memory
        is handed over (float32) or freed (float64), so that a wide layer's Hessian does not exist twice; the
        statistics are empty afterwards."""
        if not self.last_use:
            return self.hessian
        xtx, self.xtx = self.xtx, None
        return xtx.mul_(2.0 / max(self.num_tokens, 1)).float()
