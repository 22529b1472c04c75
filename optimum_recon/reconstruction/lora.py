"""Parameter-efficient reconstruction: low-rank updates trained *through* the mask.

Each pruned linear weight W (with keep-mask M) is trained as W_eff = (W + (alpha / r) * B @ A) ⊙ M, with W
frozen and only A (r, in) and B (out, r) trainable; afterwards W_eff is written into the layer, so the
model keeps its sparsity and has no adapter left. The optimizer then holds state for r * (in + out)
numbers per layer instead of in * out.

Why not `peft`'s LoRA layers: they add B·A·x beside the frozen weight, so the function trained would use
a dense update that the mask then cuts at merge time (a train/deploy mismatch that grows with the rank).
A `torch.nn.utils.parametrize` parametrization applies the mask inside the trained function itself and
bakes the exact result on removal. Initialization follows the usual LoRA convention (A Kaiming-uniform,
B zero), so training starts from the pruned weights.

Memory: a linear layer saves its weight for the backward pass, here the merged W_eff, a full-size tensor per
layer: one block's weights again, which full-weight training does not pay (it saves the parameter itself).
`recomputed_merges` saves a recipe instead and rebuilds W_eff when the backward needs it (r * in * out
multiply-adds per layer, small beside the layer's own matmuls over a batch of windows). Under autocast the matmul
would save autocast's 16-bit copy of W_eff instead, which no recipe names; so the merge makes that copy itself
(the same rounding) and the recipe rebuilds it.
"""

from __future__ import annotations

import contextlib
import math
from typing import Iterator, NamedTuple

import torch
from torch import nn
from torch.nn.utils import parametrize


class MaskedLowRankUpdate(nn.Module):
    """Parametrization: weight -> (weight + scale * B @ A) * mask, in the parameter's own layout."""

    def __init__(self, weight: torch.Tensor, mask: torch.Tensor, rank: int, alpha: float,
                 generator: torch.Generator | None = None):
        super().__init__()
        rows, cols = weight.shape
        self.scale = alpha / rank
        self.lora_A = nn.Parameter(torch.empty(rank, cols, dtype=torch.float32, device=weight.device))
        self.lora_B = nn.Parameter(torch.zeros(rows, rank, dtype=torch.float32, device=weight.device))
        init = torch.empty(rank, cols, dtype=torch.float32)  # drawn on the CPU: same values on every device
        nn.init.kaiming_uniform_(init, a=math.sqrt(5), generator=generator)
        with torch.no_grad():
            self.lora_A.copy_(init)
        # kept boolean (1 byte per weight, not the weight's 4): (w + delta) * mask promotes to the weight's dtype
        self.register_buffer("mask", mask.to(device=weight.device, dtype=torch.bool), persistent=False)

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        merged = self.merge(weight)
        cast = _autocast_dtype(weight)
        if cast is not None:
            merged = merged.to(cast)  # what autocast would hand the matmul: the copy it saves for the backward
        merged._recon_merge = (self, weight, cast)  # how `recomputed_merges` rebuilds it
        return merged

    def merge(self, weight: torch.Tensor) -> torch.Tensor:
        delta = (self.lora_B @ self.lora_A) * self.scale
        return (weight + delta.to(weight.dtype)) * self.mask


def _autocast_dtype(weight: torch.Tensor) -> torch.dtype | None:
    """The dtype autocast casts ``weight`` to for a matmul here, or None (autocast off, or nothing to cast)."""
    device = weight.device.type
    if not torch.is_autocast_enabled(device):
        return None
    dtype = torch.get_autocast_dtype(device)
    return dtype if weight.dtype == torch.float32 and dtype != weight.dtype else None


class _Rebuild(NamedTuple):
    """What is saved for the backward instead of a merged weight: its update, and the view of it that was saved."""

    update: MaskedLowRankUpdate
    weight: torch.Tensor
    cast: torch.dtype | None
    size: torch.Size
    stride: tuple[int, ...]
    offset: int


def _pack(saved: torch.Tensor):
    """Saved for the backward: a merged weight (or a view of one, as ``linear`` saves ``weight.t()``) becomes
    the recipe to rebuild it; anything else is kept as it is."""
    base = saved if hasattr(saved, "_recon_merge") else saved._base
    recipe = getattr(base, "_recon_merge", None) if base is not None else None
    if recipe is None:
        return saved
    return _Rebuild(*recipe, saved.size(), saved.stride(), saved.storage_offset())


def _unpack(packed):
    if not isinstance(packed, _Rebuild):
        return packed
    # A and B are read now: the optimizer steps only after the backward, so they hold the forward's values, and
    # the same operations on them give a bit-identical tensor to the one not kept
    # (under the forward's autocast, which ran B @ A in 16 bits: the backward runs outside it)
    cast = packed.cast
    with torch.no_grad(), (contextlib.nullcontext() if cast is None else
                           torch.autocast(packed.weight.device.type, dtype=cast)):
        merged = packed.update.merge(packed.weight)
        if cast is not None:
            merged = merged.to(cast)
    return merged.as_strided(packed.size, packed.stride, packed.offset)


def recomputed_merges() -> contextlib.AbstractContextManager:
    """Around a forward pass: the merged LoRA weights are rebuilt for the backward instead of kept."""
    return torch.autograd.graph.saved_tensors_hooks(_pack, _unpack)


@contextlib.contextmanager
def masked_low_rank(
    masks: dict[nn.Parameter, torch.Tensor], modules: dict[nn.Parameter, nn.Module], rank: int, alpha: float,
    seed: int = 0,
) -> Iterator[list[nn.Parameter]]:
    """Attach a `MaskedLowRankUpdate` to every masked weight; yield the new trainable parameters.

    On exit the trained, masked weight is baked into each layer and the parametrization removed.
    """
    attached, params = [], []
    generator = torch.Generator().manual_seed(seed)  # initialization independent of the global RNG state
    try:
        for weight, mask in masks.items():
            module = modules[weight]
            update = MaskedLowRankUpdate(weight.detach(), mask, rank, alpha, generator)
            parametrize.register_parametrization(module, "weight", update, unsafe=True)
            attached.append(module)
            params += [update.lora_A, update.lora_B]
        yield params
    finally:
        for module in attached:
            with torch.no_grad():
                parametrize.remove_parametrizations(module, "weight", leave_parametrized=True)
