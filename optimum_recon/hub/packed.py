"""Compact in memory too: linear weights kept as the checkpoint stores them and expanded inside ``forward``.

Why: the compact format (`sparse_format.py`) saves disk and download, but a model loaded from it is dense in memory.
For a user whose limit is RAM rather than speed, `packed_loading` keeps every compressed linear weight as its kept
values, packed positions and record (0.5625 of its dense bytes at 50% unstructured) and expands it only for the
duration of its own layer's forward pass, into scratch memory that every layer reuses (as large as the largest
weight), so about one expanded weight exists at a time beside the packed model.
The price is the expansion at every forward pass, about what decoding that weight costs at load (measured in
docs/benchmarks.md):

    import optimum_recon
    from transformers import AutoModelForCausalLM

    with optimum_recon.packed_loading():
        model = AutoModelForCausalLM.from_pretrained("my-org/llama-50-compact")

How: the folder loads through our quantizer (`quantizer.py`), which inside `packed_loading` replaces, before any
weight is read, each ``nn.Linear`` whose weight the files store compact (found from their headers) by a
`PackedLinear` whose tensors have the stored names, shapes and dtypes; the load operation checks each weight once
(checksum, sizes, codes: a full decoding, then dropped) and hands the three stored tensors over unchanged. A compact
weight of any other kind of module is expanded to a dense weight as in a normal load. The model keeps its
``quantization_config``, so its own ``save_pretrained`` writes a compact folder again. Inference only: the packed
values are not trainable.
"""

from __future__ import annotations

import contextlib
import contextvars
import threading
from typing import Iterator

import torch
import torch.nn.functional as F
from torch import nn

from .sparse_format import MASK_SUFFIX, META_SUFFIX, decode, stored_compact

_PACKED = contextvars.ContextVar("optimum_recon_packed_loading", default=False)
# safetensors' dtype names -> torch (what a compact weight's values may be stored as)
_STORED_DTYPES = {"F32": torch.float32, "BF16": torch.bfloat16, "F16": torch.float16, "F64": torch.float64}


@contextlib.contextmanager
def packed_loading() -> Iterator[None]:
    """Inside it, `from_pretrained` of a compact folder keeps the linear weights packed (see the module docstring)."""
    token = _PACKED.set(True)
    try:
        yield
    finally:
        _PACKED.reset(token)


def is_packed_loading() -> bool:
    return _PACKED.get()


class PackedLinear(nn.Module):
    """A linear layer whose weight is held as a compact record: ``weight`` (the kept values, 1-D),
    ``weight_sparse_mask`` and ``weight_sparse_meta``, named as the checkpoint stores them; ``forward`` expands the
    dense (out_features, in_features) weight, uses it and lets it go."""

    def __init__(self, in_features: int, out_features: int, bias: bool, values: tuple[torch.Size, torch.dtype],
                 mask_bytes: int, name: str = "weight", device: torch.device | str | None = None):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        shape, dtype = values
        self.weight = nn.Parameter(torch.empty(shape, dtype=dtype, device=device), requires_grad=False)
        self.register_buffer("weight_sparse_mask", torch.empty(mask_bytes, dtype=torch.uint8, device=device))
        self.register_buffer("weight_sparse_meta", torch.empty(8, dtype=torch.int64, device=device))
        self.bias = nn.Parameter(torch.empty(out_features, dtype=dtype, device=device)) if bias else None
        self.weight_name = name  # the weight's full name, for errors

    def dense_weight(self, out: torch.Tensor | None = None) -> torch.Tensor:
        """The expanded (out_features, in_features) weight, on the values' device (verified once, at load), in fresh
        memory or in ``out`` (CPU). The expansion runs on the CPU (`sparse_format.py`); on an accelerator the dense
        weight is copied over after it."""
        dense = decode(self.weight.detach(), self.weight_sparse_mask, self.weight_sparse_meta, self.weight_name,
                       verify=False, out=out)
        return dense.to(self.weight.device)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # into this thread's scratch memory, reused by every layer (see `_scratch`), unless autograd keeps the weight
        # for the backward pass: then memory of its own
        keeps = torch.is_grad_enabled() and x.requires_grad
        weight = self.dense_weight(None if keeps else _scratch(self.out_features * self.in_features, self.weight.dtype))
        return F.linear(x, weight.to(x.dtype), None if self.bias is None else self.bias.to(x.dtype))

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
                f"packed={self.weight.numel()} values")


_SCRATCH = threading.local()


def _scratch(numel: int, dtype: torch.dtype) -> torch.Tensor:
    """``numel`` entries of this thread's scratch memory for ``dtype``: the first entries of one buffer, grown to the
    largest weight seen. Why: expanding every weight into fresh memory at every forward pass paid that memory's page
    faults each time (measured in docs/benchmarks.md). A layer's expanded weight is dead once its ``F.linear`` has
    run (autograd, which would keep it, gets fresh memory instead), so the next layer can reuse the same memory. Cost:
    one dense weight of the largest shape per dtype and per thread that runs the model, kept while the thread lives."""
    buffers = _SCRATCH.__dict__.setdefault("buffers", {})
    buffer = buffers.get(dtype)
    if buffer is None or buffer.numel() < numel:
        buffer = buffers[dtype] = torch.empty(numel, dtype=dtype)
    return buffer[:numel]


def compressed_weights(checkpoint_files: list[str]) -> dict[str, tuple[tuple[torch.Size, torch.dtype], int]]:
    """Every weight the files store compact: its name -> ((values' shape, dtype), mask bytes), from the headers only."""
    from safetensors import safe_open

    found = {}
    for file in checkpoint_files or []:
        if not str(file).endswith(".safetensors"):
            continue
        with safe_open(file, framework="pt") as reader:
            names = set(reader.keys())
            for base in stored_compact(names):
                values = reader.get_slice(base)
                dtype = _STORED_DTYPES.get(values.get_dtype())
                if dtype is None:
                    continue  # not a float: left to the normal (expanding) load, which names the problem
                found[base] = ((torch.Size(values.get_shape()), dtype),
                               int(reader.get_slice(base + MASK_SUFFIX).get_shape()[0]))
    return found


def pack_linear_layers(model: nn.Module, checkpoint_files: list[str]) -> int:
    """Replace (on the meta device, before loading) each nn.Linear whose weight the files store compact by a
    `PackedLinear` shaped as stored; returns how many."""
    replaced = 0
    for name, (values, mask_bytes) in compressed_weights(checkpoint_files).items():
        path, _, leaf = name.rpartition(".")
        try:
            module = model.get_submodule(path)
        except AttributeError:
            continue  # not a weight of this model: the loader reports it as unexpected
        if leaf != "weight" or type(module) is not nn.Linear:
            continue  # expanded dense at load, as without packed_loading
        parent_path, _, child = path.rpartition(".")
        packed = PackedLinear(module.in_features, module.out_features, module.bias is not None, values, mask_bytes,
                              name=name, device=module.weight.device)
        model.get_submodule(parent_path).register_module(child, packed)
        replaced += 1
    return replaced


def keep_packed(name: str, values: torch.Tensor, mask: torch.Tensor, meta: torch.Tensor) -> dict[str, torch.Tensor]:
    """The load operation for a `PackedLinear`: the stored record checked once in full (a corrupted one is an error
    naming the weight, as in a normal load), then kept as stored."""
    decode(values, mask, meta, name)  # the expansion is dropped: only its checks are wanted
    return {name: values.reshape(-1), name + MASK_SUFFIX: mask.reshape(-1), name + META_SUFFIX: meta.reshape(-1)}
