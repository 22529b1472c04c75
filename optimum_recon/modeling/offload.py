"""Where a block runs, bringing it there while it is processed, and writing its new weights back.

All device placement and accelerate-hook handling lives here; nothing else moves weights between devices
or touches accelerate's hooks. Models dispatched by accelerate with CPU or disk offload (parameters on the
``meta`` device, weights held in the hooks' weights maps) are onloaded through those hooks, and pruned or
reconstructed weights are written back into the weights maps so that later forwards, `generate`,
evaluation and `save_pretrained` see them.
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import os
import sys
import tempfile
from pathlib import Path
from typing import Any, Iterator

import torch
from torch import nn


@functools.lru_cache(maxsize=1)
def _libc_malloc_trim():
    if not sys.platform.startswith("linux"):
        return None
    try:
        return ctypes.CDLL("libc.so.6").malloc_trim
    except (OSError, AttributeError):  # not glibc (e.g. musl)
        return None


def release_host_memory() -> None:
    """Give memory freed while a block was processed back to the operating system.

    A block leaves many freed buffers below glibc's mmap threshold (Hessians, weight copies, activations of a
    few MB each) in the heap, where they fragment and keep the resident size growing block after block;
    ``malloc_trim(0)`` returns free heap pages to the OS. Called once per block (under a millisecond); a no-op
    outside glibc. (No ``gc.collect()``: tensors are freed by reference counting, and a full collection costs
    about 0.2 s with transformers loaded.)
    """
    trim = _libc_malloc_trim()
    if trim is not None:
        trim(0)


def default_device() -> torch.device:
    """The accelerator when there is one, else the CPU."""
    if torch.cuda.is_available():
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def check_device(device: torch.device | str | None) -> torch.device | None:
    """``device`` as a `torch.device`, refused with the fix when it is not a device name or is not on this machine."""
    if device is None or isinstance(device, torch.device) and device.type == "cpu":
        return None if device is None else device
    try:
        parsed = torch.device(device)
    except (RuntimeError, TypeError):
        raise ValueError(f"device={device!r} is not a device: use cpu, cuda, cuda:N or mps.") from None
    available = {"cpu": True, "meta": False, "cuda": torch.cuda.is_available(),
                 "mps": getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available()}
    if not available.get(parsed.type, False):
        found = ("no GPU is visible (torch.cuda.is_available() is False)" if parsed.type == "cuda"
                 else f"{parsed.type} is not available here")
        raise ValueError(f"device={device!r} cannot be used: {found}. Use --device cpu, or leave it unset.")
    if parsed.type == "cuda" and parsed.index is not None and parsed.index >= torch.cuda.device_count():
        raise ValueError(f"device={device!r} does not exist: this machine has {torch.cuda.device_count()} GPU(s) "
                         f"(cuda:0 to cuda:{torch.cuda.device_count() - 1}).")
    return parsed


@contextlib.contextmanager
def weights_on(module: nn.Module, device: torch.device) -> Iterator[None]:
    """Read access to ``module``'s own weights on ``device``, offloaded ones included (accelerate's weights map is
    read, nothing is written back)."""
    from accelerate.utils import align_module_device

    with align_module_device(module, device):
        yield


def hook_execution_device(module: nn.Module) -> torch.device | None:
    """The execution device accelerate assigned to ``module``, if it is dispatched."""
    hook = getattr(module, "_hf_hook", None)
    device = getattr(hook, "execution_device", None)
    if device is None:
        return None
    return torch.device("cuda", device) if isinstance(device, int) else torch.device(device)


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


def _offloaded_modules(block: nn.Module) -> list[nn.Module]:
    """Sub-modules whose weights accelerate keeps in a weights map (CPU RAM or disk), not on a device."""
    from accelerate.utils import has_offloaded_params

    return [m for m in block.modules() if has_offloaded_params(m)]


def write_back(module: nn.Module) -> None:
    """Store ``module``'s current (on-device) parameters into its accelerate weights map.

    CPU offload keeps tensors in a dict: they are replaced. Disk offload reads memory-mapped ``.dat`` files in the
    offload folder, or the original checkpoint's safetensors files: the new values are written as ``.dat`` files
    into the offload folder and the index is pointed at them, so the checkpoint itself is never modified.
    """
    from accelerate.utils import OffloadedWeightsLoader, PrefixedDataset, offload_weight

    hook = module._hf_hook
    weights_map = hook.weights_map
    prefix = weights_map.prefix if isinstance(weights_map, PrefixedDataset) else ""
    store = weights_map.dataset if isinstance(weights_map, PrefixedDataset) else weights_map
    to_files: list[tuple[str, torch.Tensor]] = []
    for name, param in module.named_parameters(recurse=hook.place_submodules):
        key, value = prefix + name, param.detach().to("cpu")
        if isinstance(store, OffloadedWeightsLoader):
            if key in store.state_dict:
                store.state_dict[key] = value
            elif store.save_folder is None:
                raise NotImplementedError(f"cannot write {key} back: its offload map has no folder to write to")
            else:
                to_files.append((key, value))
        elif isinstance(store, dict):
            store[key] = value
        else:
            raise NotImplementedError(f"cannot write {key} back into a weights map of type {type(store).__name__}")
    if to_files:
        _write_offloaded_files(store, to_files, offload_weight)


def _write_offloaded_files(store, tensors: list[tuple[str, torch.Tensor]], offload_weight) -> None:
    """Write new ``.dat`` files for ``tensors``; the weights map is pointed at them only when all were written."""
    import errno
    import shutil

    need = sum(t.numel() * t.element_size() for _, t in tensors)
    free = shutil.disk_usage(store.save_folder).free

    def full() -> OSError:
        return OSError(errno.ENOSPC, f"the offload folder {store.save_folder!r} needs {human_size(need)} for this "
                       f"block's new weights but has {human_size(free)} free. Free space or choose an "
                       "offload_folder on a larger disk; blocks already finished are intact (with checkpoint_dir, "
                       "rerun to continue).")

    if need > free:
        raise full()
    written: dict[str, Any] = {}
    try:
        for key, value in tensors:
            offload_weight(value, key, store.save_folder, index=written)
    except OSError as err:
        if err.errno == errno.ENOSPC:
            raise full() from err
        raise
    store.index.update(written)


@contextlib.contextmanager
def onload(block: nn.Module, device: torch.device, keep_changes: bool = True) -> Iterator[torch.device]:
    """Keep ``block`` on ``device`` for the duration of the context, then put it back where it was.

    Offloaded blocks (accelerate ``device_map`` with CPU or disk offload) are materialized once, their hooks are
    told not to reload weights while the block is processed (so changes are not overwritten), and on a clean
    exit the new weights are written back into accelerate's weights map before the block is offloaded again.
    ``keep_changes=False`` is for read-only passes (OWL's statistics): nothing is written back, which for a
    disk-offloaded model saves writing every block's weights to disk again.
    """
    offloaded = _offloaded_modules(block)
    if offloaded:
        yield from _onload_offloaded(offloaded, device, keep_changes)
        return
    params = list(block.parameters())
    original = params[0].device if params else device
    if original != device:
        block.to(device)
    try:
        yield device
    finally:
        if original != device:
            block.to(original)


def _onload_offloaded(modules: list[nn.Module], device: torch.device, keep_changes: bool
                      ) -> Iterator[torch.device]:
    hooks = [m._hf_hook for m in modules]
    saved = [(h.execution_device, h.offload) for h in hooks]
    try:
        for module, hook in zip(modules, hooks):
            hook.execution_device = device
            hook.pre_forward(module)  # loads the weights from the map onto the device
            hook.offload = False  # forwards inside the context must not reload (and undo) our changes
        yield device
        for module in modules if keep_changes else ():  # only after success: a failed block keeps its weights
            write_back(module)
    finally:
        for module, hook, (execution, offload) in zip(modules, hooks, saved):
            hook.offload = offload
            hook.post_forward(module, None)  # back to the meta device
            hook.execution_device = execution


def input_device(model: nn.Module) -> torch.device:
    """Where a model's token ids must go: its embeddings' (execution) device."""
    embeddings = model.get_input_embeddings()
    return hook_execution_device(embeddings) or embeddings.weight.device


def check_offload_folder(folder: str | os.PathLike) -> None:
    """Fail early, with the fix, when accelerate could not write offloaded weights into ``folder``."""
    path = Path(folder).expanduser()
    try:
        path.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=path):
            pass
    except OSError as err:
        raise OSError(f"offload_folder={str(folder)!r} cannot be written to ({err.strerror or err}): choose a "
                      "writable folder on a disk with room for the offloaded weights.") from err


def _bytes(value: int | str) -> int:
    from accelerate.utils import convert_file_size_to_int

    return convert_file_size_to_int(value)


def human_size(size: int) -> str:
    """``size`` bytes as GiB, MiB or KiB with one decimal (plain bytes below 1 KiB)."""
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if size >= scale:
            return f"{size / scale:,.1f} {unit}"
    return f"{size} bytes"


def check_max_memory(max_memory: dict | None, block: nn.Module, dtype: torch.dtype) -> None:
    """Fail early when every accelerator in ``max_memory`` is too small to hold one decoder block."""
    accelerators = {k: v for k, v in (max_memory or {}).items() if k not in ("cpu", "disk")}
    if not accelerators:
        return
    need = sum(p.numel() for p in block.parameters()) * torch.finfo(dtype).bits // 8
    if all(_bytes(v) < need for v in accelerators.values()):
        raise ValueError(
            f"max_memory={max_memory!r} leaves no accelerator room for one decoder block: each block needs at least "
            f"{human_size(need)} for its weights in {str(dtype).replace('torch.', '')} (plus activations and, "
            "for BR/CR, gradients and optimizer state). Raise the limit for one device."
        )


def is_offloaded(model: nn.Module) -> bool:
    """Whether some of ``model``'s weights live in accelerate weights maps (CPU RAM or disk) instead of on a device."""
    return bool(_offloaded_modules(model))


@contextlib.contextmanager
def offload_visible_to_save(model: nn.Module) -> Iterator[None]:
    """Make transformers' `save_pretrained` fetch offloaded weights from accelerate's weights maps.

    transformers looks for offloaded weights only when ``hf_device_map`` names "cpu" or "disk", which
    `from_pretrained(device_map=...)` sets but `accelerate.cpu_offload` / `disk_offload` do not; without it the
    save would try to write the ``meta`` placeholders. The attribute is set for the duration of the save only.
    """
    device_map = getattr(model, "hf_device_map", None)
    if not is_offloaded(model) or (device_map and {"cpu", "disk"} & set(device_map.values())):
        yield
        return
    model.hf_device_map = {"": "cpu"}
    try:
        yield
    finally:
        if device_map is None:
            del model.hf_device_map
        else:
            model.hf_device_map = device_map


def _nbytes(params) -> int:
    return sum(p.numel() * p.element_size() for p in params)  # works on meta tensors too


def offloaded_shard_size(model: nn.Module, requested: int | str, blocks_path: str | None = None) -> int:
    """The shard size for saving ``model``: for an offloaded model, at most one decoder block.

    transformers' `save_pretrained` brings every tensor of a shard into CPU memory before writing it, so with
    its default shard size an offloaded model would be materialized whole. Bounding the shard by the largest
    block (a single larger tensor, such as the embedding, still gets a shard of its own) keeps the save's peak
    memory at about one block, whatever the model's size.
    """
    from .blocks import BlocksNotFoundError, find_blocks

    requested = _bytes(requested)
    if not is_offloaded(model):
        return requested
    try:
        _, blocks = find_blocks(model, blocks_path)
        bound = max(_nbytes(b.parameters()) for b in blocks)
    except BlocksNotFoundError:
        bound = max(_nbytes([p]) for p in model.parameters())
    return max(1, min(requested, bound))
