"""Capturing what every decoder block receives: its input hidden states and every other argument.

Each block is swapped for a small recorder that notes its arguments and passes the hidden states
through unchanged; the recorder in the last block stops the forward pass. One pass over the calibration
batches therefore costs the embeddings plus mask/rotary preparation, not a full forward. Blocks can get
different keyword arguments (Gemma 2/3 and Qwen 2 alternate sliding-window and full attention masks and
rotary tables), so arguments are kept per block; identical tensors are stored once.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from ..modeling.offload import input_device


class _StopForward(Exception):
    pass


@dataclass
class BlockInputs:
    """Per batch: the hidden states entering block 0; per block and batch: the other arguments (CPU)."""

    hidden: list[torch.Tensor]  # [batch] (B, T, H)
    args: list[list[tuple]]  # [block][batch] positional arguments after hidden_states
    kwargs: list[list[dict[str, Any]]]  # [block][batch] keyword arguments
    sizes: list[int] = field(default_factory=list)  # [batch] batch sizes, probes (arguments only) included


def _to_device(obj: Any, device: torch.device | str, memo: dict[int, Any]) -> Any:
    """Move every tensor in a nested structure to ``device``; shared tensors are moved once."""
    if isinstance(obj, torch.Tensor):
        key = id(obj)
        if key not in memo:
            memo[key] = (obj, obj.to(device, non_blocking=True))  # keep obj alive so its id stays unique
        return memo[key][1]
    if isinstance(obj, tuple):
        return tuple(_to_device(o, device, memo) for o in obj)
    if isinstance(obj, list):
        return [_to_device(o, device, memo) for o in obj]
    if isinstance(obj, dict):
        return {k: _to_device(v, device, memo) for k, v in obj.items()}
    return obj


def _same(a: Any, b: Any) -> bool:
    """Structural equality, with exact tensor comparison."""
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        return (
            isinstance(a, torch.Tensor)
            and isinstance(b, torch.Tensor)
            and a.shape == b.shape
            and a.dtype == b.dtype
            and bool(torch.equal(a, b))
        )
    if isinstance(a, (tuple, list)) and isinstance(b, (tuple, list)):
        return type(a) is type(b) and len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    return type(a) is type(b) and a == b


class _Recorder(nn.Module):
    """Stands in for block ``index`` during capture: records its arguments, returns the hidden states."""

    def __init__(self, block: nn.Module, index: int, is_last: bool, store: "_Store"):
        super().__init__()
        self.__dict__["_block"] = block  # not a submodule: the model's parameters stay untouched
        self.index, self.is_last, self.store = index, is_last, store

    def __getattr__(self, name: str) -> Any:  # models may read attributes such as `attention_type`
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(self.__dict__["_block"], name)

    def forward(self, hidden_states: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        self.store.record(self.index, hidden_states, args, kwargs)
        if self.is_last:
            raise _StopForward
        return hidden_states


class _Store:
    def __init__(self, num_blocks: int):
        self.hidden: list[torch.Tensor] = []
        self.args: list[list[tuple]] = [[] for _ in range(num_blocks)]
        self.kwargs: list[list[dict]] = [[] for _ in range(num_blocks)]
        self._memo: dict[int, Any] = {}

    def new_batch(self) -> None:
        self._memo = {}

    def record(self, index: int, hidden: torch.Tensor, args: tuple, kwargs: dict) -> None:
        if index == 0:
            self.hidden.append(hidden.detach().to("cpu"))
        kwargs = {k: v for k, v in kwargs.items() if k not in ("past_key_values", "past_key_value", "use_cache")}
        args = _to_device(tuple(args), "cpu", self._memo)
        kwargs = _to_device(kwargs, "cpu", self._memo)
        # Calibration batches share their shape, so their masks and rotary tables are usually equal:
        # keep one copy instead of one per batch.
        if self.args[index] and _same(args, self.args[index][-1]):
            args = self.args[index][-1]
        if self.kwargs[index] and _same(kwargs, self.kwargs[index][-1]):
            kwargs = self.kwargs[index][-1]
        self.args[index].append(args)
        self.kwargs[index].append(kwargs)


@torch.no_grad()
def capture_block_inputs(
    model: nn.Module, blocks: nn.ModuleList, batches: list[torch.Tensor], probe_sizes: tuple[int, ...] = ()
) -> BlockInputs:
    """Run ``model`` on each batch of token ids up to its blocks and record what each block receives.

    ``probe_sizes``: batch sizes whose block arguments are wanted too (training batches of a size no data
    batch has); they are captured from the first windows and keep no hidden states.
    """
    sizes = [b.shape[0] for b in batches]
    probes = [torch.cat(batches)[:n] for n in probe_sizes if n not in sizes]
    batches = list(batches) + probes
    store = _Store(len(blocks))
    originals = list(blocks)
    device = input_device(model)
    try:
        for i, block in enumerate(originals):
            blocks[i] = _Recorder(block, i, i == len(originals) - 1, store)
        for batch in batches:
            store.new_batch()
            try:
                model(input_ids=batch.to(device), use_cache=False)
            except _StopForward:
                pass
            else:  # pragma: no cover - only for models that skip their last block
                raise RuntimeError("the forward pass never reached the last decoder block")
    finally:
        for i, block in enumerate(originals):
            blocks[i] = block
    hidden = store.hidden[: len(store.hidden) - len(probes)]
    return BlockInputs(hidden=hidden, args=store.args, kwargs=store.kwargs, sizes=[b.shape[0] for b in batches])
