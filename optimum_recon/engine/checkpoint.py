"""Resumable prunes: after every finished block, what is needed to continue from the next one is saved.

A checkpoint folder holds the finished blocks' weights (`block-<i>.safetensors`), the activations the next
step needs on the pruned and the dense path (calibration and held-out), the report so far, and a
`state.json` with a fingerprint of the recipe, the calibration tokens and the model. With CR (windows of
several blocks) it also holds the window in flight: the partly trained blocks after the finished one, their
masks, their masked-but-untrained weights (for the "before" errors), their records so far and, with local
propagation, their dense copies. A run started with the same folder and the same inputs skips the finished
blocks and produces the same model as an uninterrupted run; a folder written for other inputs is refused
rather than mixed in.

Every save writes new files named by the step and only then replaces `state.json` (atomically), which names
them; the previous step's files are deleted after that. An interruption at any moment therefore leaves a
`state.json` whose files are all present and belong to it.

The folder follows the output-folder contract (`folders.py`): it must be new, empty, or a checkpoint folder this
tool wrote (marked, holding only the files named by `is_checkpoint_file`). `remove_checkpoint` deletes those
files, and the folder only when nothing else is left in it.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import tempfile
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from ..configuration import PruningConfig
from ..folders import MARKER, check_output_dir, nbytes, read_marker, write_error, write_marker

STATE = "state.json"
# every file a checkpoint folder can hold (per-rank sub-folders in distributed runs; .name-xxxx: an interrupted write)
_FILES = re.compile(r"^(rank\d+-of-\d+/)?(state\.json|block-\d+\.safetensors|activations-\d+\.pt|window-\d+\.pt"
                    r"|\.optimum-recon\.json|\.[\w.-]+-[\w]+)$")


def is_checkpoint_file(relative: str) -> bool:
    """Whether a path (relative to a checkpoint folder, POSIX separators) is one a checkpoint writes."""
    return bool(_FILES.match(relative))


def check_checkpoint_dir(folder: str | os.PathLike, protect=(), what: str = "checkpoint_dir") -> Path:
    """Refuse ``folder`` unless it is new, empty or a checkpoint of ours holding nothing else (`folders.py`); a
    checkpoint written by a version that wrote no marker is recognised by its files."""
    folder = Path(folder).expanduser()
    if folder.is_dir() and read_marker(folder) is None and (folder / STATE).is_file() and all(
            is_checkpoint_file(p.relative_to(folder).as_posix()) for p in folder.rglob("*") if p.is_file()):
        write_marker(folder, "checkpoint", files=[])
    return check_output_dir(folder, kind="checkpoint", protect=protect, what=what, flag=None,
                            owned=is_checkpoint_file)


def open_checkpoint_dir(folder: str | os.PathLike, protect=()) -> Path:
    """Check that ``folder`` may hold a checkpoint (`check_checkpoint_dir`) and mark it as one."""
    folder = Path(folder).expanduser()
    check_checkpoint_dir(folder, protect)
    try:
        folder.mkdir(parents=True, exist_ok=True)
        if read_marker(folder) is None:
            write_marker(folder, "checkpoint", files=[])
    except OSError as err:
        raise OSError(f"checkpoint_dir={str(folder)!r} cannot be created ({err}).") from err
    return folder


def remove_checkpoint(folder: str | os.PathLike) -> int:
    """Delete a finished run's checkpoint files (only those), then the folder if it is left empty; bytes freed."""
    folder = Path(folder).expanduser()
    marker = read_marker(folder)
    if marker is None or marker["kind"] != "checkpoint":
        return 0
    freed = 0
    files = [p for p in folder.rglob("*") if p.is_file() and is_checkpoint_file(p.relative_to(folder).as_posix())]
    for path in sorted(files, key=lambda p: p.name == MARKER):  # the marker last
        freed += path.stat().st_size
        path.unlink()
    for sub in sorted((p for p in folder.rglob("*") if p.is_dir()), key=lambda p: -len(p.parts)):
        with contextlib.suppress(OSError):
            sub.rmdir()  # only when empty
    with contextlib.suppress(OSError):
        folder.rmdir()
    return freed


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


def _atomic(path: Path, write, content: Any = None) -> None:
    """Write ``path`` through a temporary sibling that replaces it only once complete; a failed write (a full disk)
    raises an `OSError` naming the file and the space it needs (``content``: what is being written)."""
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}-", dir=path.parent)
    os.close(fd)
    try:
        try:
            write(tmp)
        except (OSError, RuntimeError) as err:
            raise write_error(err, path, nbytes(content), "a checkpoint file",
                              "Free space or pass another checkpoint_dir; the checkpoint as of the last finished "
                              "block is intact.") from err
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def cpu_tensors(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Detached, contiguous CPU copies (or the tensors themselves when already so) for saving."""
    return {k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}


class Checkpointer:
    """Reads and writes one prune's checkpoint folder."""

    def __init__(self, folder: str | os.PathLike, key: str):
        self.folder = Path(folder).expanduser()
        self.key = key
        self.files: set[str] = set()  # the files state.json names (deleted once a newer save replaces them)
        open_checkpoint_dir(self.folder)

    def load(self) -> dict[str, Any] | None:
        """The saved state, or None for a fresh folder. Raises when the folder belongs to another run."""
        path = self.folder / STATE
        if not path.is_file():
            return None
        try:
            state = json.loads(path.read_text())
        except (ValueError, OSError) as err:
            raise ValueError(f"checkpoint_dir={str(self.folder)!r}: {STATE} cannot be read ({err}); delete the "
                             "folder to start over.") from None
        if state.get("key") != self.key:
            raise ValueError(
                f"checkpoint_dir={str(self.folder)!r} holds a run with another recipe, model or calibration data; "
                "use a new folder (or delete this one) to start over. Nothing was changed in it."
            )
        if "activations" not in state:
            raise ValueError(f"checkpoint_dir={str(self.folder)!r} was written by an older optimum-recon; delete it "
                             "to start over.")
        self.files = {state[k] for k in ("activations", "window_tensors") if state.get(k)}
        return state

    def save(self, next_block: int, block: torch.nn.Module, index: int,
             activations: dict[str, dict[int, list[torch.Tensor]]], report: dict[str, Any],
             window: dict[str, Any] | None = None, window_tensors: dict[str, Any] | None = None,
             seconds: float = 0.0) -> None:
        """Save block ``index``'s final weights, the activations by kind and depth (``{"calibration/sparse":
        {depth: [batch, ...]}}``), the report, and (CR) the window in flight: JSON-able ``window`` and
        ``window_tensors`` (nested dicts of tensors), and the ``seconds`` the run has taken so far. Then point the
        state at them."""
        weights = cpu_tensors(block.state_dict())
        _atomic(self.folder / f"block-{index}.safetensors", lambda tmp: save_file(weights, tmp), weights)
        files = {"activations": f"activations-{next_block}.pt"}
        _atomic(self.folder / files["activations"], lambda tmp: torch.save(activations, tmp), activations)
        if window_tensors is not None:
            files["window_tensors"] = f"window-{next_block}.pt"
            _atomic(self.folder / files["window_tensors"], lambda tmp: torch.save(window_tensors, tmp),
                    window_tensors)
        state = {"key": self.key, "next_block": next_block, "report": report, "window": window, "seconds": seconds,
                 **files}
        _atomic(self.folder / STATE, lambda tmp: Path(tmp).write_text(json.dumps(state)))
        for name in self.files - set(files.values()):
            (self.folder / name).unlink(missing_ok=True)
        self.files = set(files.values())

    def block_weights(self, index: int) -> dict[str, torch.Tensor]:
        return load_file(str(self.folder / f"block-{index}.safetensors"))

    def activations(self, state: dict[str, Any]) -> dict[str, dict[int, list[torch.Tensor]]]:
        return torch.load(self.folder / state["activations"], weights_only=True)

    def window_tensors(self, state: dict[str, Any]) -> dict[str, Any]:
        if not state.get("window_tensors"):
            return {}
        return torch.load(self.folder / state["window_tensors"], weights_only=True)
