"""The allocation step: every pruned layer's number of zeros, decided once before the first block is pruned.

The numbers are `masks/allocation.py`'s; this module gathers what they need. ``uniform`` and a table need only the
layers' sizes. ``owl`` needs each block's outlier ratio on the *dense* model, and for block 0 the ratios of all
blocks, so it cannot come from the pruning loop's own statistics (those are of the pruned path, one block at a
time). It therefore costs one forward pass of the dense model over the calibration windows that feed the masks, one
block at a time like the loop (offloaded blocks are loaded one by one), with Wanda's column-norm statistics on every
pruned layer: the price of the first block's dense pass of LR, about a third of LR's time (LR runs three passes per
block), and a few percent of BR's. In a distributed run each rank runs its batches and the statistics are summed, so
every rank computes the same allocation.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any

import torch

from ..masks import get_mask_method
from ..masks.allocation import AllocationError, outlier_ratio, owl_sparsities, table_sparsities, zero_counts
from ..modeling.offload import execution_device, onload
from .steps import StatisticsHooks

if TYPE_CHECKING:  # pragma: no cover
    from .state import RunState


def allocate(run: "RunState") -> tuple[dict[str, int], dict[str, Any]]:
    """Zeros per pruned layer (by full module name), and what the report records about the allocation.

    Args:
        run: The prune's `RunState` (blocks, plan, config, calibration split), before any block is pruned.
    """
    config = run.config
    started = time.perf_counter()
    names, sizes, block_of = [], [], []
    for e, layers in enumerate(run.plan):
        for layer in layers:
            names.append(f"{run.path}.{e}.{layer.name}")
            sizes.append(layer.module.weight.numel())
            block_of.append(e)
    policy = config.allocation_policy
    record: dict[str, Any] = {"policy": policy}
    if config.allocation == "auto":
        record["requested"] = "auto"
    if policy == "uniform":
        sparsities = [config.sparsity] * len(names)
    elif policy == "table":
        sparsities = table_sparsities(config.allocation, names, sizes, config.sparsity)
    else:  # owl
        ratios = _outlier_ratios(run)
        block_sizes = [sum(n for n, b in zip(sizes, block_of) if b == e) for e in range(len(run.plan))]
        used = [e for e, n in enumerate(block_sizes) if n]  # blocks with something to prune
        per_block = dict(zip(used, owl_sparsities([ratios[e] for e in used], [block_sizes[e] for e in used],
                                                  config.sparsity, config.owl_lambda)))
        outside = {e: v for e, v in per_block.items() if not 0 <= v < 1}
        if outside:
            e, v = next(iter(outside.items()))
            raise AllocationError(f"allocation='owl' with owl_lambda={config.owl_lambda:g} would give block {e} a "
                                  f"sparsity of {v:.4g}, outside [0, 1) (sparsity={config.sparsity:g}): use an "
                                  f"owl_lambda below {min(config.sparsity, 1 - config.sparsity) / 2:g}.")
        sparsities = [per_block[b] for b in block_of]
        record.update(threshold=config.owl_threshold, owl_lambda=config.owl_lambda, outlier_ratios=ratios)
    counts = zero_counts(sparsities, sizes, config.sparsity)
    by_block: dict[int, list[int]] = {}
    for count, n, b in zip(counts, sizes, block_of):
        zeros_and_size = by_block.setdefault(b, [0, 0])
        zeros_and_size[0] += count
        zeros_and_size[1] += n
    record["block_sparsity"] = [by_block[e][0] / by_block[e][1] if e in by_block else 0.0
                                for e in range(len(run.plan))]
    record["seconds"] = time.perf_counter() - started
    return dict(zip(names, counts)), record


@torch.no_grad()
def _outlier_ratios(run: "RunState") -> list[float]:
    """Each block's OWL outlier ratio, on the dense model's calibration inputs (see the module docstring)."""
    wanda = get_mask_method("wanda")
    split, store = run.calib, run.store
    x = split.sparse[0]
    ratios = []
    for e, block in enumerate(run.blocks):
        layers = run.plan[e]
        # read only: an offloaded block is not written back (on disk that would rewrite the whole model once)
        with onload(block, execution_device(block, run.requested_device), keep_changes=False) as device:
            outputs = store.new()
            with StatisticsHooks(layers, wanda, device) as hooks:
                for b, batch in enumerate(x):
                    hooks.active = run.statistics_batches is None or b in run.statistics_batches
                    outputs.append(split.passes.run(block, e, b, batch, device))
            hooks.all_reduce()
            stats = hooks.take()
            scores = [layer.weight.abs().float() * stats[layer.name].sq_norms.float().sqrt().reshape(1, -1)
                      for layer in layers if layer.name in stats]
            ratios.append(outlier_ratio(scores, run.config.owl_threshold))
            del scores, stats
        if x is not split.sparse[0] and hasattr(x, "release"):
            x.release()
        x = outputs
    if hasattr(x, "release"):
        x.release()
    return ratios
