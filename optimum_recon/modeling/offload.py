"""Where a block runs, and bringing it there while it is processed.

All device placement and accelerate-hook handling lives here; nothing else moves weights between
devices. Models dispatched by accelerate with CPU/disk offload (parameters on the ``meta`` device,
weights held by the hook) are handled by onloading through accelerate's own helpers.
"""

from __future__ import annotations

import contextlib
from typing import Iterator

import torch
from torch import nn


def default_device() -> torch.device:
    """The accelerator when there is one, else the CPU."""
    if torch.cuda.is_available():
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def hook_execution_device(module: nn.Module) -> torch.device | None:
    """The execution device accelerate assigned to ``module``, if it is dispatched."""
    hook = getattr(module, "_hf_hook", None)
    device = getattr(hook, "execution_device", None)
    if device is None:
        return None
    return torch.device("cuda", device) if isinstance(device, int) else torch.device(device)


def is_offloaded(module: nn.Module) -> bool:
    """True when accelerate keeps some of ``module``'s weights off-device (CPU RAM or disk)."""
    return any(p.device.type == "meta" for p in module.parameters())


def execution_device(block: nn.Module, requested: torch.device | str | None = None) -> torch.device:
    """Where ``block`` should run: the requested device, accelerate's choice, its own GPU, else the default."""
    if requested is not None:
        return torch.device(requested)
    hooked = hook_execution_device(block)
    if hooked is not None:
        return hooked
    for param in block.parameters():
        if param.device.type not in ("cpu", "meta"):
            return param.device
        break
    return default_device()


@contextlib.contextmanager
def onload(block: nn.Module, device: torch.device) -> Iterator[torch.device]:
    """Keep ``block`` on ``device`` for the duration of the context, then put it back where it was."""
    if is_offloaded(block):
        raise NotImplementedError(
            "this block's weights are offloaded by accelerate (device_map with CPU/disk offload); pruning "
            "offloaded models is not supported yet. Load the model without offloading (device_map=None or a "
            "map that keeps every block on a device)."
        )
    params = list(block.parameters())
    original = params[0].device if params else device
    if original != device:
        block.to(device)
    try:
        yield device
    finally:
        if original != device:
            block.to(original)


def input_device(model: nn.Module) -> torch.device:
    """Where a model's token ids must go: its embeddings' (execution) device."""
    embeddings = model.get_input_embeddings()
    return hook_execution_device(embeddings) or embeddings.weight.device
