"""Where the calibration activations live between blocks: CPU memory (default) or files on disk.

The engine keeps, per data split, the activations entering the current block on the pruned and the dense
path (and the local targets): for a 7B model and 256 windows of 1,024 tokens that is 4 GiB per buffer in
fp32. With ``activation_offload="disk"`` every batch is a file in a scratch folder, read back when used, so
host memory holds one batch at a time (BR and CR still gather a window's training set in memory).
"""

from __future__ import annotations

import itertools
import os
import shutil
import tempfile
from pathlib import Path
from typing import Iterator

import torch

from ..data.default_model import cache_dir
from ..folders import nbytes, write_error


class DiskTensorList:
    """A list of tensors kept as files; supports append, len, iteration and integer indexing."""

    _ids = itertools.count()

    def __init__(self, folder: Path):
        self.folder = folder
        self._paths: list[Path] = []
        self._tag = next(self._ids)

    def append(self, tensor: torch.Tensor) -> None:
        path = self.folder / f"{self._tag}-{len(self._paths)}.pt"
        tensor = tensor.detach().contiguous()
        try:
            torch.save(tensor, path)
        except (OSError, RuntimeError) as err:
            path.unlink(missing_ok=True)
            raise write_error(err, path, nbytes(tensor), "activations",
                              "Free space or choose another activation folder.") from err
        self._paths.append(path)

    def __len__(self) -> int:
        return len(self._paths)

    def __getitem__(self, index: int) -> torch.Tensor:
        return torch.load(self._paths[index], weights_only=True)

    def __iter__(self) -> Iterator[torch.Tensor]:
        for index in range(len(self._paths)):
            yield self[index]

    def release(self) -> None:
        for path in self._paths:
            path.unlink(missing_ok=True)
        self._paths = []


class ActivationStore:
    """Makes the lists the engine keeps activations in: plain lists, or `DiskTensorList`s in a scratch folder."""

    def __init__(self, mode: str = "cpu", folder: str | os.PathLike | None = None):
        if mode not in ("cpu", "disk"):
            raise ValueError(f"activation_offload={mode!r} is not valid: choose 'cpu' or 'disk'.")
        self.mode = mode
        self.folder: Path | None = None
        self._owned = False
        if mode == "disk":
            root = Path(folder) if folder is not None else cache_dir() / "activations"
            try:
                root.mkdir(parents=True, exist_ok=True)
                self.folder = Path(tempfile.mkdtemp(prefix="run-", dir=root))
            except OSError as err:
                raise OSError(f"cannot create an activation folder under {root} ({err}): pass a writable "
                              "activation folder.") from err
            self._owned = True

    def new(self) -> list | DiskTensorList:
        return [] if self.mode == "cpu" else DiskTensorList(self.folder)

    def adopt(self, tensors) -> list | DiskTensorList:
        """A store-backed copy of an in-memory list (e.g. the captured inputs)."""
        if self.mode == "cpu":
            return list(tensors)
        out = self.new()
        for tensor in tensors:
            out.append(tensor)
        return out

    def close(self) -> None:
        if self._owned and self.folder is not None:
            shutil.rmtree(self.folder, ignore_errors=True)
