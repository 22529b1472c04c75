"""Input statistics the mask methods accumulate over calibration batches (fp32, on the layer's device)."""

from __future__ import annotations

import torch

from .base import InputStatistics


class ColumnNormStatistics(InputStatistics):
    """Per input feature, the sum over tokens of x_j^2 (Wanda's squared column norm of X)."""

    def __init__(self, in_features: int, device: torch.device):
        self.sq_norms = torch.zeros(in_features, dtype=torch.float32, device=device)
        self.num_tokens = 0

    def update(self, x: torch.Tensor) -> None:
        x = x.reshape(-1, x.shape[-1]).float()  # (tokens, in)
        self.sq_norms += x.pow(2).sum(dim=0)
        self.num_tokens += x.shape[0]


class HessianStatistics(InputStatistics):
    """SparseGPT's layer Hessian H = 2/n * sum_t x_t x_t^T over the n calibration tokens seen."""

    def __init__(self, in_features: int, device: torch.device):
        self.xtx = torch.zeros(in_features, in_features, dtype=torch.float32, device=device)
        self.num_tokens = 0

    def update(self, x: torch.Tensor) -> None:
        x = x.reshape(-1, x.shape[-1]).float()  # (tokens, in)
        self.xtx.addmm_(x.t(), x)
        self.num_tokens += x.shape[0]

    @property
    def hessian(self) -> torch.Tensor:
        return self.xtx * (2.0 / max(self.num_tokens, 1))
