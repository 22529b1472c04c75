"""The state of one prune and its checkpoints: what `prune_model` holds between steps, what it saves after each
finished block, and how an interrupted run is brought back to that point (finished blocks, activations, and for
CR the window in flight).

The files themselves (format, fingerprint, atomic writes, the folder contract) are `checkpoint.py`'s; the steps that
change this state are `sequential.py`'s.
"""

from __future__ import annotations

import copy
import os
import time
import warnings
from dataclasses import asdict
from typing import Any

import torch
from torch import nn

from .. import distributed as dist
from ..masks import get_mask_method
from ..modeling.offload import execution_device, onload
from ..reconstruction import Reconstruction
from ..report import LayerRecord, PruningReport
from .activations import ActivationStore
from .capture import BlockInputs
from .checkpoint import Checkpointer, cpu_tensors, fingerprint, open_checkpoint_dir
from .steps import BlockPasses, ErrorMeter


class Split:
    """One data split (calibration or held-out): captured arguments and activations by depth."""

    def __init__(self, inputs: BlockInputs, store: ActivationStore, name: str):
        self.name = name  # "calibration" or "heldout": the key of its errors in the report
        self.passes = BlockPasses(inputs)
        hidden = store.adopt(inputs.hidden)
        inputs.hidden = []  # the store holds them now (on disk with activation_offload="disk")
        self.sparse: dict[int, Any] = {0: hidden}
        self.dense: dict[int, Any] = {0: hidden}  # the same list: x_0 == x̄_0
        self.local: dict[int, Any] = {}

    def drop(self, depth: int, kinds: tuple[str, ...] = ("sparse", "dense", "local")) -> None:
        """Forget the activations of ``kinds`` at ``depth``, deleting files no other depth still uses."""
        stores = (self.sparse, self.dense, self.local)
        gone = [getattr(self, kind).pop(depth, None) for kind in kinds]
        kept = [v for store in stores for v in store.values()]
        for value in {id(v): v for v in gone if v is not None}.values():
            if hasattr(value, "release") and not any(value is k for k in kept):
                value.release()


class RunState:
    """The state of one prune, complete from construction: the schedule, the masks, the activations in flight, what
    is recorded per block, and the clock; it writes itself to a checkpoint folder and reads itself back.

    Args:
        statistics_batches: This rank's calibration batches that feed the masks.
        sample_rows: For every global calibration window, its row in this rank's data (-1: another rank's).
    """

    def __init__(self, model, blocks, path, plan, config, reconstruction: Reconstruction, calib: BlockInputs,
                 heldout: BlockInputs | None, device, store: ActivationStore, *, clock: float, progress: bool,
                 statistics_batches: set[int], sample_rows: torch.Tensor):
        self.model, self.blocks, self.path, self.plan, self.config = model, blocks, path, plan, config
        self.store = store
        self.method = get_mask_method(config.method)
        self.reconstruction = reconstruction
        self.trains = reconstruction.trains and config.epochs > 0
        self.window = min(self.reconstruction.window_size(config), len(blocks))
        self.calib = Split(calib, self.store, "calibration")
        self.heldout = Split(heldout, self.store, "heldout") if heldout is not None else None
        self.requested_device = device
        self.progress = progress
        self.statistics_batches = statistics_batches
        self.sample_rows = sample_rows
        self.masks: dict[int, dict[str, torch.Tensor]] = {}
        self.zero_counts: dict[str, int] | None = None  # zeros per pruned layer (`allocation.py`), set before the loop
        # The error "before" training, of the masked but untrained block on its final inputs. With a window of one
        # block (BR) those inputs are final when the block is masked, so it is measured then ("before_errors");
        # in CR the inputs still change while the previous block trains, so the untrained weights are kept on the
        # CPU ("snapshots") and measured when the block leaves the window. BR thus holds no snapshot (the guard's copy
        # of the best epoch's weights, one block's size on the CPU, lives only while the block trains).
        self.before_at_masking = self.trains and self.window == 1
        self.before_errors: dict[int, dict[str, ErrorMeter]] = {}
        self.snapshots: dict[int, dict[str, torch.Tensor]] = {}
        self.dense_copies: dict[int, nn.Module] = {}
        self.layer_records: dict[int, list] = {}
        self.train_info: dict[int, list[dict[str, Any]]] = {}
        self.started: dict[int, float] = {}
        self.clock = clock  # when this call began
        self.earlier_seconds = 0.0  # time spent by interrupted earlier calls, up to their last checkpoint

    def splits(self) -> list[Split]:
        return [self.calib] + ([self.heldout] if self.heldout is not None else [])

    def resume(self, report: PruningReport, folder, input_ids, heldout_ids) -> tuple[Checkpointer | None, int]:
        """Open the checkpoint folder; when it holds an interrupted run, restore its finished blocks, the activations
        and (CR) the window in flight. Returns the checkpointer and the number of finished blocks."""
        if folder is None:
            return None, 0
        if dist.is_distributed():  # each rank keeps its own activations (the weights are the same everywhere)
            dist.run_on_main(open_checkpoint_dir, folder)
            folder = os.path.join(folder, f"rank{dist.rank()}-of-{dist.world_size()}")
        checkpointer = Checkpointer(folder, fingerprint(self.config, self.model, input_ids, heldout_ids))
        state = checkpointer.load()
        start = 0 if state is None else state["next_block"]
        if dist.is_distributed():
            found = dist.all_gather_objects(start)
            if len(set(found)) > 1:
                raise dist.DistributedMismatchError(
                    f"the ranks' checkpoints stop at different blocks ({found}): an interrupted run left them out of "
                    f"step. Delete {os.path.dirname(folder)!r} to start over."
                )
        if state is None:
            return checkpointer, 0
        for j in range(start):
            block = self.blocks[j]
            with onload(block, execution_device(block, self.requested_device)):
                block.load_state_dict(checkpointer.block_weights(j))
        saved = checkpointer.activations(state)
        for split in self.splits():
            for depth in {*split.sparse, *split.dense, *split.local}:
                split.drop(depth)
            for kind in ("sparse", "dense", "local"):
                depths = saved.get(f"{split.name}/{kind}", {})
                setattr(split, kind, {int(d): self.store.adopt(v) for d, v in depths.items()})
        self._restore_window(state.get("window"), checkpointer.window_tensors(state))
        report.blocks = PruningReport.from_dict(state["report"]).blocks
        self.earlier_seconds = float(state.get("seconds", 0.0))
        # a warning, so that the report's notes say the run was resumed (its time includes the earlier calls')
        warnings.warn(f"resuming from {folder}: blocks 0-{start - 1} were finished by an earlier run "
                      f"({self.earlier_seconds:.0f} s up to its last checkpoint)", stacklevel=3)
        return checkpointer, start

    def _window_state(self, blocks: range) -> tuple[dict[str, Any], dict[str, Any]]:
        """What a CR step leaves for the next one about the blocks still in the window (partly trained)."""
        now = time.perf_counter()
        info = {
            "blocks": list(blocks),
            "layers": {j: [asdict(r) for r in self.layer_records[j]] for j in blocks},
            "train_info": {j: self.train_info.get(j, []) for j in blocks},
            "elapsed": {j: now - self.started[j] for j in blocks},
        }
        tensors = {
            "weights": {j: cpu_tensors(self.blocks[j].state_dict()) for j in blocks},
            "masks": {j: cpu_tensors(self.masks[j]) for j in blocks},
            "snapshots": {j: self.snapshots[j] for j in blocks if j in self.snapshots},
            "dense_copies": {j: self.dense_copies[j].state_dict() for j in blocks if j in self.dense_copies},
        }
        return info, tensors


    def _restore_window(self, info: dict[str, Any] | None, tensors: dict[str, Any]) -> None:
        if not info:
            return
        now = time.perf_counter()
        for j in info["blocks"]:
            key = str(j)  # JSON keys are strings
            block = self.blocks[j]
            with onload(block, execution_device(block, self.requested_device)):
                if j in tensors["dense_copies"]:
                    dense = copy.deepcopy(block).to("cpu")
                    dense.load_state_dict(tensors["dense_copies"][j])
                    self.dense_copies[j] = dense
                block.load_state_dict(tensors["weights"][j])
            self.masks[j] = tensors["masks"][j]
            if j in tensors["snapshots"]:
                self.snapshots[j] = tensors["snapshots"][j]
            self.layer_records[j] = [LayerRecord(**{**r, "shape": tuple(r["shape"])}) for r in info["layers"][key]]
            self.train_info[j] = info["train_info"][key]
            self.started[j] = now - info["elapsed"][key]


    def save_checkpoint(self, report: PruningReport, checkpointer: Checkpointer, s: int, e: int) -> None:
        """After the step that finished block ``s`` (the window was ``s..e``)."""
        activations = {}
        for split in self.splits():
            for kind in ("sparse", "dense", "local"):
                activations[f"{split.name}/{kind}"] = {d: list(v) for d, v in getattr(split, kind).items()}
        window, tensors = self._window_state(range(s + 1, e + 1)) if e > s else (None, None)
        seconds = self.earlier_seconds + time.perf_counter() - self.clock
        checkpointer.save(s + 1, self.blocks[s], s, activations, report.to_dict(), window, tensors, seconds)
