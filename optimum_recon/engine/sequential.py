"""The block-sequential loop: the in-place core that prunes any model with discoverable blocks.

For block i, with x_i the pruned model's input to the block and x̄_i the dense model's:

1. dense pass: x̄_{i+1} = g_i(w̄; x̄_i)                       (skipped while x_i is x̄_i: step 2 gives it)
2. statistics pass: g_i(w̄; x_i) with hooks on the linear layers (the local target)
3. choose masks and apply them (SparseGPT also updates the kept weights)
4. reconstruct toward the target (``global``: x̄_{i+1}; ``local``: g_i(w̄; x_i))
5. pruned pass: x_{i+1} = g_i(m ⊙ w; x_i), and the reconstruction error against x̄_{i+1}

so LR costs three forward passes per block (two for magnitude). Activations stay on the CPU; only the
block being processed is on the execution device.
"""

from __future__ import annotations

import logging
import time
import warnings
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from ..configuration import PruningConfig
from ..masks import MaskMethod, get_mask_method
from ..modeling.blocks import LinearLayer, find_blocks, find_linear_layers
from ..modeling.offload import execution_device, onload
from ..reconstruction import Reconstruction, get_reconstruction
from ..report import BlockRecord, LayerRecord, PruningReport, peak_cuda_mib, peak_rss_mib
from .capture import BlockInputs, _to_device, capture_block_inputs

logger = logging.getLogger(__name__)


@dataclass
class _BlockRunner:
    """Runs one block on one captured batch: moves inputs to the device, the output back to the CPU."""

    block: nn.Module
    inputs: BlockInputs
    index: int
    device: torch.device
    _memo: dict[int, Any] = field(default_factory=dict)

    def __call__(self, batch: int, hidden: torch.Tensor, keep_on_device: bool = False) -> torch.Tensor:
        args = _to_device(self.inputs.args[self.index][batch], self.device, self._memo)
        kwargs = _to_device(self.inputs.kwargs[self.index][batch], self.device, self._memo)
        out = self.block(hidden.to(self.device, non_blocking=True), *args, **kwargs)
        if isinstance(out, (tuple, list)):
            out = out[0]
        return out if keep_on_device else out.to("cpu")


class _ErrorMeter:
    """Accumulates sum((y - t)^2) and sum(t^2) in float64 over batches."""

    def __init__(self) -> None:
        self.sse = 0.0
        self.target_sq = 0.0
        self.count = 0

    def update(self, output: torch.Tensor, target: torch.Tensor) -> None:
        diff = output.double() - target.double()
        self.sse += float(diff.pow(2).sum())
        self.target_sq += float(target.double().pow(2).sum())
        self.count += target.numel()

    @property
    def mse(self) -> float:
        return self.sse / max(self.count, 1)

    @property
    def normalized(self) -> float:
        return self.sse / self.target_sq if self.target_sq > 0 else 0.0


def validate_layers(plan: list[list[LinearLayer]], config: PruningConfig, blocks_path: str) -> None:
    """Fail before any heavy work when the chosen layers cannot be pruned as configured."""
    if not any(plan):
        raise ValueError(
            f"no linear layers to prune in {blocks_path}: targets={config.targets!r} ignore={config.ignore!r} "
            "leave nothing. Loosen them (targets=None prunes every linear layer of every block)."
        )
    nm = config.nm
    if nm is None:
        return
    for i, layers in enumerate(plan):
        for layer in layers:
            if layer.in_features % nm[1]:
                raise ValueError(
                    f"pattern={config.pattern!r} needs input widths divisible by {nm[1]}, but "
                    f"{blocks_path}.{i}.{layer.name} has {layer.in_features} inputs. Pick an M that divides it "
                    f"or leave the layer dense with ignore=[{layer.name!r}]."
                )


def _collect_statistics(
    layers: list[LinearLayer], method: MaskMethod, device: torch.device
) -> tuple[dict[str, Any], list[Any]]:
    stats: dict[str, Any] = {}
    handles = []
    if not method.needs_inputs:
        return stats, handles
    for layer in layers:
        stats[layer.name] = method.new_statistics(layer.in_features, device)

        def hook(module, args, output, _acc=stats[layer.name]):
            _acc.update(args[0].detach())

        handles.append(layer.module.register_forward_hook(hook))
    return stats, handles


def _apply_masks(
    layers: list[LinearLayer], stats: dict[str, Any], method: MaskMethod, config: PruningConfig, block_name: str
) -> tuple[dict[str, torch.Tensor], list[LayerRecord]]:
    masks, records = {}, []
    for layer in layers:
        result = method.prune(
            layer.weight,
            stats.get(layer.name),
            sparsity=config.sparsity,
            nm=config.nm,
            block_size=config.block_size,
            dampening=config.dampening,
        )
        layer.set_weight(result.weight)
        masks[layer.name] = result.mask
        used = result.info.get("dampening")
        if used is not None and used > config.dampening:
            warnings.warn(
                f"{block_name}.{layer.name}: the Hessian was not positive definite with dampening "
                f"{config.dampening:g}; used {used:g} instead. Consider more calibration samples.",
                stacklevel=2,
            )
        zeros = float((layer.weight == 0).float().mean())
        records.append(LayerRecord(f"{block_name}.{layer.name}", tuple(layer.weight.shape), zeros, used))
    return masks, records


@torch.no_grad()
def _process_block(
    runner: _BlockRunner,
    layers: list[LinearLayer],
    sparse: list[torch.Tensor],
    dense: list[torch.Tensor],
    method: MaskMethod,
    reconstruction: Reconstruction,
    config: PruningConfig,
    block_name: str,
) -> tuple[BlockRecord, list[torch.Tensor], list[torch.Tensor]]:
    start = time.perf_counter()
    same_inputs = dense is sparse  # nothing pruned upstream yet: x_i == x̄_i
    need_local = config.propagation == "local" or same_inputs
    stats, handles = _collect_statistics(layers, method, runner.device)
    local_out: list[torch.Tensor] = []
    try:
        if handles or need_local:
            for b, x in enumerate(sparse):
                out = runner(b, x)
                if need_local:
                    local_out.append(out)
    finally:
        for handle in handles:
            handle.remove()
    dense_out = local_out if same_inputs else [runner(b, x) for b, x in enumerate(dense)]

    masks, layer_records = _apply_masks(layers, stats, method, config, block_name)
    del stats
    targets = dense_out if config.propagation == "global" else local_out
    with torch.enable_grad():
        recon_info = reconstruction.reconstruct(runner.block, masks, runner, sparse, targets)

    meter, local_meter = _ErrorMeter(), _ErrorMeter()
    new_sparse = []
    for b, x in enumerate(sparse):
        y = runner(b, x)
        meter.update(y, dense_out[b])
        if local_out:
            local_meter.update(y, local_out[b])
        new_sparse.append(y)
    numel = sum(r.shape[0] * r.shape[1] for r in layer_records)
    record = BlockRecord(
        index=runner.index,
        error=meter.mse,
        error_normalized=meter.normalized,
        error_local=local_meter.mse if local_out else None,
        sparsity=sum(r.sparsity * r.shape[0] * r.shape[1] for r in layer_records) / max(numel, 1),
        seconds=time.perf_counter() - start,
        layers=layer_records,
        reconstruction=recon_info,
    )
    return record, new_sparse, dense_out


def prune_model(
    model: nn.Module,
    config: PruningConfig,
    input_ids: torch.Tensor,
    *,
    batch_size: int = 8,
    device: torch.device | str | None = None,
    blocks_path: str | None = None,
    progress: bool = True,
) -> PruningReport:
    """Prune ``model`` in place, block by block, on the calibration windows ``input_ids`` (N, T).

    Args:
        model: A causal LM whose decoder blocks can be found (see `optimum_recon.modeling.find_blocks`).
        config: What to prune and how.
        input_ids: Calibration token ids, one window per row.
        batch_size: Windows per forward pass (memory vs speed; results do not depend on it beyond
            floating-point summation order).
        device: Where blocks run; default: accelerate's choice, the block's GPU, else any GPU, else CPU.
        blocks_path: Attribute path of the decoder-block ``ModuleList`` when it cannot be discovered.
        progress: Show a progress bar.

    Returns:
        A `PruningReport` with per-block errors and sparsity.
    """
    if input_ids.ndim != 2 or input_ids.shape[0] == 0:
        raise ValueError(f"input_ids must be (num_samples, seq_len), got shape {tuple(input_ids.shape)}.")
    if batch_size <= 0:
        raise ValueError(f"batch_size={batch_size!r} must be a positive integer.")
    start = time.perf_counter()
    method = get_mask_method(config.method)
    reconstruction = get_reconstruction(config.reconstruction)
    path, blocks = find_blocks(model, blocks_path)
    plan = [find_linear_layers(b, config.targets, config.ignore, f"{path}.{i}") for i, b in enumerate(blocks)]
    validate_layers(plan, config, path)

    was_training = model.training
    model.eval()
    batches = list(input_ids.split(batch_size))
    inputs = capture_block_inputs(model, blocks, batches)
    sparse = dense = inputs.hidden
    report = PruningReport(config=config.to_dict(), num_calibration_tokens=int(input_ids.numel()))
    bar = tqdm(total=len(blocks), desc="Pruning blocks", unit="block", disable=not progress)
    try:
        for i, block in enumerate(blocks):
            with onload(block, execution_device(block, device)) as dev:
                runner = _BlockRunner(block, inputs, i, dev)
                record, sparse, dense = _process_block(
                    runner, plan[i], sparse, dense, method, reconstruction, config, f"{path}.{i}"
                )
            report.blocks.append(record)
            report.environment["device"] = str(dev)
            logger.info("block %d/%d: error %.4g (normalized %.4g)", i + 1, len(blocks), record.error,
                        record.error_normalized)
            bar.set_postfix(error=f"{record.error:.3g}", norm=f"{record.error_normalized:.3g}")
            bar.update(1)
    finally:
        bar.close()
        model.train(was_training)
    _finish_report(report, start)
    return report


def _finish_report(report: PruningReport, start: float) -> None:
    layers = [layer for block in report.blocks for layer in block.layers]
    total = sum(layer.shape[0] * layer.shape[1] for layer in layers)
    zeros = sum(layer.sparsity * layer.shape[0] * layer.shape[1] for layer in layers)
    report.pruned_parameters = total
    report.model_sparsity = zeros / max(total, 1)
    report.total_seconds = time.perf_counter() - start
    report.peak_rss_mib = peak_rss_mib()
    report.peak_cuda_mib = peak_cuda_mib()
    import transformers

    report.environment.update(torch=torch.__version__, transformers=transformers.__version__)
