"""The pieces of one engine step: running blocks on captured batches, statistics hooks, masks, errors."""

from __future__ import annotations

import warnings
from typing import Any

import torch
from torch import nn

from ..configuration import PruningConfig
from ..distributed import (
    all_gather_objects,
    all_reduce_,
    all_reduce_numbers,
    broadcast_,
    exact_statistics,
    is_distributed,
    rank,
    world_size,
)
from ..masks import MaskMethod
from ..modeling.blocks import LinearLayer
from ..reconstruction.base import error_sum
from ..report import LayerRecord
from .capture import BlockInputs, _to_device


def _first(output: Any) -> torch.Tensor:
    return output[0] if isinstance(output, (tuple, list)) else output


class BlockPasses:
    """Runs blocks on captured batches with the arguments each block received during capture.

    Calibration windows are unpadded and of equal length, so a block's arguments depend only on the batch
    size: a training batch of any B samples reuses those of a captured batch of size B.
    """

    def __init__(self, inputs: BlockInputs):
        self.inputs = inputs
        # batch sizes of every captured batch (probes included), kept when the hidden states move to disk
        self.sizes = inputs.sizes or [h.shape[0] for h in inputs.hidden]
        # device -> {id of a captured CPU tensor: its copy there}. Blocks mostly share their arguments (one
        # rotary table, one mask per attention type), so each is copied to the device once per prune.
        self._moved: dict[str, dict[int, Any]] = {}

    def _arguments(self, index: int, batch: int, device: torch.device) -> tuple[tuple, dict]:
        memo = self._moved.setdefault(str(device), {})
        args = _to_device(self.inputs.args[index][batch], device, memo)
        kwargs = _to_device(self.inputs.kwargs[index][batch], device, memo)
        return args, kwargs

    def run(self, block: nn.Module, index: int, batch: int, x: torch.Tensor, device: torch.device) -> torch.Tensor:
        """Block ``index`` on captured batch ``batch`` with input ``x`` (CPU); the output on the CPU."""
        args, kwargs = self._arguments(index, batch, device)
        return _first(block(x.to(device, non_blocking=True), *args, **kwargs)).to("cpu")

    def map(self, block: nn.Module, index: int, batches, device, out: list | None = None):
        """Run the block on every batch; append the outputs to ``out`` (a new list by default)."""
        out = [] if out is None else out
        for b, x in enumerate(batches):
            out.append(self.run(block, index, b, x, device))
        return out

    def chain(self, modules: list[nn.Module], first: int, batch: int, x: torch.Tensor, device) -> torch.Tensor:
        """Run ``modules`` (blocks ``first``, ``first + 1``, ...) one after the other; CPU in, CPU out."""
        for offset, module in enumerate(modules):
            x = self.run(module, first + offset, batch, x, device)
        return x

    def chain_batch(self, modules: list[nn.Module], first: int, x: torch.Tensor, device) -> torch.Tensor:
        """Like `chain` for a batch already on ``device`` of any captured batch size; keeps autograd."""
        batch = self._batch_of_size(x.shape[0])
        for offset, module in enumerate(modules):
            args, kwargs = self._arguments(first + offset, batch, device)
            x = _first(module(x, *args, **kwargs))
        return x

    def _batch_of_size(self, size: int) -> int:
        if size in self.sizes:
            return self.sizes.index(size)
        raise ValueError(f"no captured batch of size {size}; sizes: {self.sizes}")


class ErrorMeter:
    """Accumulates sum((y - t)^2), sum(t^2) and each token's |y - t|^2 / |t|^2 in float64 over batches."""

    def __init__(self) -> None:
        self.sse = 0.0
        self.target_sq = 0.0
        self.count = 0
        self.relative_sum = 0.0
        self.tokens = 0

    def update(self, output: torch.Tensor, target: torch.Tensor) -> None:
        output, target = output.double(), target.double()
        self.sse += float(error_sum(output, target, "mse"))
        self.target_sq += float(target.pow(2).sum())
        self.count += target.numel()
        self.relative_sum += float(error_sum(output, target, "relative"))
        self.tokens += target.numel() // target.shape[-1]

    def all_reduce(self) -> "ErrorMeter":
        """Sum the meter over the ranks of a distributed run, so that the errors are global."""
        self.sse, self.target_sq, count, self.relative_sum, tokens = all_reduce_numbers(
            [self.sse, self.target_sq, self.count, self.relative_sum, self.tokens])
        self.count, self.tokens = int(count), int(tokens)
        return self

    def value(self, loss: str) -> float:
        """The error as the training loss ``loss`` measures it (`reconstruction.base.LOSSES`)."""
        return self.mse if loss == "mse" else self.relative

    @property
    def relative(self) -> float:
        """The mean over tokens of each token's squared error divided by its target's squared norm."""
        return self.relative_sum / max(self.tokens, 1)

    @property
    def mse(self) -> float:
        return self.sse / max(self.count, 1)

    @property
    def normalized(self) -> float:
        return self.sse / self.target_sq if self.target_sq > 0 else 0.0


class StatisticsHooks:
    """Forward hooks feeding each linear layer's inputs to its mask method's accumulator while ``active``.

    Layers that receive the very same input tensor (q/k/v projections, gate/up projections) share one
    accumulator: their statistics are identical, and SparseGPT's Hessian costs as much as the layer itself.
    """

    def __init__(self, layers: list[LinearLayer], method: MaskMethod, device: torch.device):
        self.layers, self.method, self.device = layers, method, device
        self.needed = method.needs_inputs
        self.exact = exact_statistics()  # float64 sums in a distributed run: masks independent of the order
        self.active = True
        self._own: dict[str, Any] = {}
        self._alias: dict[str, str] = {}
        self._last: tuple[Any, str] | None = None  # (input tensor, layer name) of the previous hook call
        self._handles: list[Any] = []

    @property
    def stats(self) -> dict[str, Any]:
        return {layer.name: self._own[self._alias.get(layer.name, layer.name)] for layer in self.layers
                if self._alias.get(layer.name, layer.name) in self._own}

    def take(self) -> dict[str, Any]:
        """The statistics by layer name; the hooks keep no reference, so they are freed once used."""
        stats = self.stats
        self._own.clear()
        return stats

    def _hook(self, name: str, in_features: int, x: torch.Tensor) -> None:
        # Accumulators and aliases are set up on every hooked batch, active or not, so that every rank of a
        # distributed run ends with the same accumulators (some with nothing added) to sum.
        if self._last is not None and self._last[0] is x and name not in self._own:
            self._alias[name] = self._alias.get(self._last[1], self._last[1])
        elif name not in self._alias:
            if name not in self._own:
                self._own[name] = self.method.new_statistics(in_features, self.device, exact=self.exact)
            if self.active:
                self._own[name].update(x.detach())
        self._last = (x, name)

    def all_reduce(self) -> None:
        """Sum every accumulator over the ranks of a distributed run (a no-op in a single process)."""
        for layer in self.layers:  # the plan's order: the same on every rank
            stats = self._own.get(layer.name)
            if stats is not None and is_distributed():
                for tensor in stats.sums():
                    all_reduce_(tensor)
                stats.num_tokens = int(all_reduce_numbers([stats.num_tokens])[0])

    def __enter__(self) -> "StatisticsHooks":
        if not self.needed:
            return self
        for layer in self.layers:
            def hook(module, args, output, _name=layer.name, _in=layer.in_features):
                self._hook(_name, _in, args[0])

            self._handles.append(layer.module.register_forward_hook(hook))
        return self

    def __exit__(self, *exc: Any) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        self._last = None


def apply_masks(
    layers: list[LinearLayer], stats: dict[str, Any], method: MaskMethod, config: PruningConfig, block_name: str,
    zero_counts: dict[str, int] | None = None,
) -> tuple[dict[str, torch.Tensor], list[LayerRecord]]:
    """Choose and apply every layer's mask; return the keep-masks (out, in) and per-layer records. ``zero_counts``
    (by full layer name, from `allocation.py`) says how many weights each layer loses; without it each comparison
    group loses ``int(size * config.sparsity)``.

    ``stats`` is consumed: each layer's statistics leave it (and are freed) once the layer is pruned. In a
    distributed run the layers' solves are shared out (layer ``i`` on rank ``i % world``) and each result is
    broadcast from the rank that computed it: the same masks and weights everywhere, at a fraction of the work."""
    world, me = world_size(), rank()
    masks: dict[str, torch.Tensor] = {}
    used: dict[str, float | None] = {}
    for i, layer in enumerate(layers):
        # popped: statistics shared by several layers (q/k/v) are freed once the last of them is pruned
        layer_stats = stats.pop(layer.name, None)
        if layer_stats is not None:
            layer_stats.last_use = not any(other is layer_stats for other in stats.values())
        if i % world == me:
            count = None if zero_counts is None else zero_counts.get(f"{block_name}.{layer.name}")
            sparsity = config.sparsity if count is None else count / layer.weight.numel()
            result = method.prune(layer.weight, layer_stats, sparsity=sparsity, nm=config.nm, num_prune=count,
                                  block_size=config.block_size, dampening=config.dampening)
            layer.set_weight(result.weight)
            masks[layer.name] = result.mask
            used[layer.name] = result.info.get("dampening")
        del layer_stats
    if world > 1:
        for i, layer in enumerate(layers):
            owner = i % world
            broadcast_(layer.module.weight.data, src=owner)  # in the module's own layout
            mask = masks[layer.name].to(torch.uint8) if owner == me else torch.empty(
                tuple(layer.weight.shape), dtype=torch.uint8, device=layer.weight.device)
            masks[layer.name] = broadcast_(mask, src=owner).bool()
        used = {k: v for part in all_gather_objects(used) for k, v in part.items()}
    records = []
    for layer in layers:
        damp = used.get(layer.name)
        if damp is not None and damp > config.dampening:
            warnings.warn(
                f"{block_name}.{layer.name}: the Hessian was not positive definite with dampening "
                f"{config.dampening:g}; used {damp:g} instead. Consider more calibration samples.",
                stacklevel=2,
            )
        zeros = int((layer.weight == 0).sum()) / layer.weight.numel()  # exact: a float32 mean drifts by 1e-7
        records.append(LayerRecord(f"{block_name}.{layer.name}", tuple(layer.weight.shape), zeros, damp))
    return masks, records


def param_masks(
    layers: list[LinearLayer], masks: dict[str, torch.Tensor]
) -> tuple[dict[nn.Parameter, torch.Tensor], dict[nn.Parameter, nn.Module]]:
    """Keep-masks keyed by weight parameter, in the parameter's own layout (Conv1D is (in, out)), and the
    layer owning each weight."""
    out, owners = {}, {}
    for layer in layers:
        mask = masks[layer.name]
        weight = layer.module.weight
        out[weight] = (mask.t() if layer.transposed else mask).to(weight.device)
        owners[weight] = layer.module
    return out, owners
