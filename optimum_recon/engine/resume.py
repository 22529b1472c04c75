"""Checkpoints of a running prune: what `prune_model` saves after each finished block, and how an interrupted
run is brought back to that point (finished blocks, activations, and for CR the window in flight).

The files themselves (format, fingerprint, atomic writes) are `checkpoint.py`'s; this module maps a run's state
onto them.
"""

from __future__ import annotations

import copy
import os
import time
import warnings
from dataclasses import asdict
from typing import TYPE_CHECKING, Any

from .. import distributed as dist
from ..modeling.offload import execution_device, onload
from ..report import LayerRecord, PruningReport
from .checkpoint import Checkpointer, cpu_tensors, fingerprint, open_checkpoint_dir

if TYPE_CHECKING:  # pragma: no cover
    from .sequential import _Run


def resume_run(run: "_Run", report: PruningReport, folder, input_ids, heldout_ids) -> tuple[Checkpointer | None, int]:
    """Open the checkpoint folder; when it holds an interrupted run, restore its finished blocks, the activations
    and (CR) the window in flight. Returns the checkpointer and the number of finished blocks."""
    if folder is None:
        return None, 0
    if dist.is_distributed():  # each rank keeps its own activations (the weights are the same everywhere)
        dist.run_on_main(open_checkpoint_dir, folder)
        folder = os.path.join(folder, f"rank{dist.rank()}-of-{dist.world_size()}")
    checkpointer = Checkpointer(folder, fingerprint(run.config, run.model, input_ids, heldout_ids))
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
        block = run.blocks[j]
        with onload(block, execution_device(block, run.requested_device)):
            block.load_state_dict(checkpointer.block_weights(j))
    saved = checkpointer.activations(state)
    for split in run.splits():
        for depth in {*split.sparse, *split.dense, *split.local}:
            split.drop(depth)
        for kind in ("sparse", "dense", "local"):
            setattr(split, kind, {int(d): run.store.adopt(v) for d, v in saved.get(f"{split.name}/{kind}", {}).items()})
    _restore_window(run, state.get("window"), checkpointer.window_tensors(state))
    report.blocks = PruningReport.from_dict(state["report"]).blocks
    run.earlier_seconds = float(state.get("seconds", 0.0))
    # a warning, so that the report's notes say the run was resumed (its time includes the earlier calls')
    warnings.warn(f"resuming from {folder}: blocks 0-{start - 1} were finished by an earlier run "
                  f"({run.earlier_seconds:.0f} s up to its last checkpoint)", stacklevel=3)
    return checkpointer, start


def _window_state(run: "_Run", blocks: range) -> tuple[dict[str, Any], dict[str, Any]]:
    """What a CR step leaves for the next one about the blocks still in the window (partly trained)."""
    now = time.perf_counter()
    info = {
        "blocks": list(blocks),
        "layers": {j: [asdict(r) for r in run.layer_records[j]] for j in blocks},
        "train_info": {j: run.train_info.get(j, []) for j in blocks},
        "elapsed": {j: now - run.started[j] for j in blocks},
    }
    tensors = {
        "weights": {j: cpu_tensors(run.blocks[j].state_dict()) for j in blocks},
        "masks": {j: cpu_tensors(run.masks[j]) for j in blocks},
        "snapshots": {j: run.snapshots[j] for j in blocks if j in run.snapshots},
        "dense_copies": {j: run.dense_copies[j].state_dict() for j in blocks if j in run.dense_copies},
    }
    return info, tensors


def _restore_window(run: "_Run", info: dict[str, Any] | None, tensors: dict[str, Any]) -> None:
    if not info:
        return
    now = time.perf_counter()
    for j in info["blocks"]:
        key = str(j)  # JSON keys are strings
        block = run.blocks[j]
        with onload(block, execution_device(block, run.requested_device)):
            if j in tensors["dense_copies"]:
                dense = copy.deepcopy(block).to("cpu")
                dense.load_state_dict(tensors["dense_copies"][j])
                run.dense_copies[j] = dense
            block.load_state_dict(tensors["weights"][j])
        run.masks[j] = tensors["masks"][j]
        if j in tensors["snapshots"]:
            run.snapshots[j] = tensors["snapshots"][j]
        run.layer_records[j] = [LayerRecord(**{**r, "shape": tuple(r["shape"])}) for r in info["layers"][key]]
        run.train_info[j] = info["train_info"][key]
        run.started[j] = now - info["elapsed"][key]


def save_checkpoint(run: "_Run", report: PruningReport, checkpointer: Checkpointer, s: int, e: int) -> None:
    """After the step that finished block ``s`` (the window was ``s..e``)."""
    activations = {}
    for split in run.splits():
        for kind in ("sparse", "dense", "local"):
            activations[f"{split.name}/{kind}"] = {d: list(v) for d, v in getattr(split, kind).items()}
    window, tensors = _window_state(run, range(s + 1, e + 1)) if e > s else (None, None)
    seconds = run.earlier_seconds + time.perf_counter() - run.clock
    checkpointer.save(s + 1, run.blocks[s], s, activations, report.to_dict(), window, tensors, seconds)
