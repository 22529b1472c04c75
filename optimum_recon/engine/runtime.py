"""How a prune runs, as opposed to what it computes: devices, progress bars, checkpoints, where activations live.

None of these settings changes a number of the result (a run resumed from a checkpoint, or with activations on
disk, gives the same model), so none is saved with the recipe. One definition shared by `ReconPruner.prune` and
`prune_model`.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Runtime:
    """Runtime settings of `prune_model`.

    Args:
        device: Where blocks run; default: accelerate's choice, the block's GPU, else any GPU, else CPU.
        progress: Show progress bars (on rank 0 only in a distributed run).
        checkpoint_dir: Save progress here after every block, and resume from it when it holds an interrupted run
            with the same recipe, model and calibration data (CR too: the partly trained window is saved).
        activation_offload: Keep the activations between blocks in CPU memory (``"cpu"``) or in files (``"disk"``,
            under ``activation_folder`` or the optimum-recon cache; deleted at the end).
        activation_folder: Where ``"disk"`` activations go.
        blocks_path: Attribute path of the decoder-block ``ModuleList`` when it cannot be discovered.
    """

    device: torch.device | str | None = None
    progress: bool = True
    checkpoint_dir: str | os.PathLike | None = None
    activation_offload: str = "cpu"
    activation_folder: str | os.PathLike | None = None
    blocks_path: str | None = None

    def __post_init__(self) -> None:
        if self.activation_offload not in ("cpu", "disk"):
            raise ValueError(f"activation_offload={self.activation_offload!r} is not valid: choose 'cpu' or 'disk'.")
