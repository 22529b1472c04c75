"""The reconstruction interface."""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, ClassVar

import torch
from torch import nn

if TYPE_CHECKING:  # pragma: no cover
    from ..configuration import PruningConfig


@dataclass
class WindowTask:
    """One reconstruction problem: a window of consecutive blocks, its data and its masks.

    ``forward(x)`` runs the window's blocks in order on a batch ``x`` (B, T, H) already on ``device`` and
    returns the output on the device (with autograd when enabled). ``inputs`` and ``targets`` are
    (N, T, H) CPU tensors: the pruned model's inputs to the window and the outputs it should produce (in a
    distributed run, for this rank's windows only; see ``sample_rows``).
    ``masks`` maps each pruned weight parameter to its keep-mask in the parameter's own layout, ``modules``
    to the layer that owns it.
    """

    blocks: list[nn.Module]
    forward: Callable[[torch.Tensor], torch.Tensor]
    inputs: torch.Tensor
    targets: torch.Tensor
    masks: dict[nn.Parameter, torch.Tensor]
    device: torch.device
    seed: int
    modules: dict[nn.Parameter, nn.Module]  # the layer owning each masked weight
    progress: bool = False  # show an epoch progress bar
    # Distributed runs: for each global calibration window, its row in ``inputs``/``targets`` on this rank, or
    # -1 when another rank holds it. None: ``inputs`` holds every window (a single process).
    sample_rows: torch.Tensor | None = None
    label: str = "window"  # how messages name it, e.g. "block 3" or "blocks 3-4"
    # The window's error on the held-out windows with its weights as they are (the same on every rank), or None
    # without held-out windows; training is judged by it (`guard.py`).
    heldout_error: Callable[[], float] | None = None

    @property
    def num_samples(self) -> int:
        """The number of calibration windows over all ranks (training batches are drawn from these)."""
        return self.inputs.shape[0] if self.sample_rows is None else self.sample_rows.numel()


# What reconstruction minimizes, on every (B, T, H) batch of outputs y and targets t:
#   "mse":      sum over entries of (y - t)^2, averaged over entries (the paper's loss);
#   "relative": sum over tokens of |y - t|^2 / |t|^2, averaged over tokens.
# Why "relative": plain MSE weighs each token by its squared norm, and decoder LLMs carry "massive activations"
# (Sun et al., 2024) on a few tokens, the first of each window above all: on the bundled SmolLM2 that token's
# hidden state has a squared norm 3e4 times the median token's from block 12 to 28, so 95-98% of the MSE there is
# one token per window. Every layer reads the residual stream through a norm that divides each token by its own
# RMS, and perplexity averages over tokens, so the error that matters is each token's error relative to its own
# size, with every token counting once. Measured there (SparseGPT 50%, 64 x 512 C4 windows, docs/benchmarks.md):
# WikiText-2 40.43 against 40.79 with MSE, and even the held-out MSE is lower (119.1 against 121.1).
LOSSES = ("mse", "relative")


def error_sum(output: torch.Tensor, target: torch.Tensor, loss: str) -> torch.Tensor:
    """The sum of ``loss``'s terms over a batch (see LOSSES); float32, or the inputs' dtype when float64."""
    dtype = torch.float64 if target.dtype == torch.float64 else torch.float32
    squared = (output.to(dtype) - target.to(dtype)).pow(2)
    if loss == "mse":
        return squared.sum()
    # a hidden state is never exactly zero; the floor only keeps a degenerate target from dividing by zero
    return (squared.sum(-1) / target.to(dtype).pow(2).sum(-1).clamp_min(1e-12)).sum()


def error_terms(target: torch.Tensor, loss: str) -> int:
    """How many terms ``error_sum`` adds up for each window of ``target`` (B, T, H): entries or tokens."""
    return target[0].numel() if loss == "mse" else target[0].numel() // target.shape[-1]


class Reconstruction(ABC):
    """Adjusts a pruned window of blocks so that its outputs match the targets.

    ``window_size(config)`` says how many consecutive blocks are trained together (1: block-wise);
    ``trains`` whether anything is trained at all (LR trains nothing).
    """

    name: ClassVar[str]
    trains: ClassVar[bool] = True

    def window_size(self, config: "PruningConfig") -> int:
        return 1

    @abstractmethod
    def reconstruct(self, task: WindowTask, config: "PruningConfig") -> dict[str, Any]:
        """Train the window in place; return what to record (e.g. the loss per epoch)."""


class LayerReconstruction(Reconstruction):
    """LR: the mask method alone; nothing is trained."""

    name = "layer"
    trains = False

    def reconstruct(self, task: WindowTask, config: "PruningConfig") -> dict[str, Any]:
        return {}
