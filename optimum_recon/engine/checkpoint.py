"""Resumable prunes: after every finished block, what is needed to continue from the next one is saved.

A checkpoint folder holds the finished blocks' weights (`block-<i>.safetensors`), the activations entering
the next block on the pruned and the dense path (calibration and held-out), the report so far, and a
`state.json` with a fingerprint of the recipe, the calibration tokens and the model. A run started with the
same folder and the same inputs skips the finished blocks and produces the same model as an uninterrupted
run; a folder written for other inputs is refused rather than mixed in. Files are replaced atomically, so
an interruption at any moment leaves the previous checkpoint usable.

Supported for windows of one block (LR and BR); CR keeps a partly trained block across steps and restarts.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from ..configuration import PruningConfig

STATE = "state.json"


def fingerprint(config: PruningConfig, model, input_ids: torch.Tensor, heldout_ids: torch.Tensor | None) -> str:
    digest = hashlib.sha256()
    data = config.to_dict()
    data.pop("optimum_recon_version", None)
    digest.update(json.dumps(data, sort_keys=True).encode())
    digest.update(str(getattr(model.config, "_name_or_path", type(model).__name__)).encode())
    for ids in (input_ids, heldout_ids):
        if ids is not None:
            digest.update(ids.cpu().numpy().tobytes())
    return digest.hexdigest()


def _atomic(path: Path, write) -> None:
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}-", dir=path.parent)
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


class Checkpointer:
    """Reads and writes one prune's checkpoint folder."""

    def __init__(self, folder: str | os.PathLike, key: str):
        self.folder = Path(folder).expanduser()
        self.key = key
        try:
            self.folder.mkdir(parents=True, exist_ok=True)
        except OSError as err:
            raise OSError(f"checkpoint_dir={str(folder)!r} cannot be created ({err}).") from err

    def load(self) -> dict[str, Any] | None:
        """The saved state, or None for a fresh folder. Raises when the folder belongs to another run."""
        path = self.folder / STATE
        if not path.is_file():
            return None
        state = json.loads(path.read_text())
        if state.get("key") != self.key:
            raise ValueError(
                f"checkpoint_dir={str(self.folder)!r} holds a run with another recipe, model or calibration data; "
                "use a new folder (or delete this one) to start over."
            )
        return state

    def save(self, next_block: int, block: torch.nn.Module, index: int, activations: dict[str, list[torch.Tensor]],
             report: dict[str, Any]) -> None:
        """Save block ``index``'s weights and the activations entering ``next_block``, then the state."""
        weights = {k: v.detach().to("cpu").contiguous() for k, v in block.state_dict().items()}
        _atomic(self.folder / f"block-{index}.safetensors", lambda tmp: save_file(weights, tmp))
        _atomic(self.folder / "activations.pt", lambda tmp: torch.save(activations, tmp))
        state = {"key": self.key, "next_block": next_block, "report": report}
        _atomic(self.folder / STATE, lambda tmp: Path(tmp).write_text(json.dumps(state)))

    def block_weights(self, index: int) -> dict[str, torch.Tensor]:
        return load_file(str(self.folder / f"block-{index}.safetensors"))

    def activations(self) -> dict[str, list[torch.Tensor]]:
        return torch.load(self.folder / "activations.pt", weights_only=True)
