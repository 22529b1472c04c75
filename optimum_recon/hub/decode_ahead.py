"""Decoding a compact checkpoint's weights ahead of transformers' loader, two at a time.

Why: transformers' loader converts one weight at a time on its main thread, so a compact load decoded one weight,
handed it over, then started the next. Each decoding has serial parts (counting the mask's ones before its chunks
can start, the checksum that runs beside the chunks) during which the other cores wait, and the last chunks of a
weight leave cores idle too. Decoding two weights at once fills those gaps: loading the 1.2B benchmark model at 50%
in a process that has imported transformers' modules already took 1.92 s instead of 2.01 s (medians of 12 loads,
2 cores), and 1.67 s together with decoding into memory known to be zero (`sparse_format._fresh`), which alone
gained nothing inside a load (`docs/benchmarks.md` has the fresh-process benchmark).

How: when the model skeleton is built (`SparseCheckpointQuantizer._process_model_before_weight_loading`, which is
given the checkpoint files) a `DecodeAhead` opens the files with safetensors (memory-mapped: nothing is read twice
into memory) and decodes their compact weights, in the loader's order, on ``depth`` threads, at most ``depth + 1``
weights ahead of what the loader has taken: the decoded weights it holds beyond the model are bounded by that, not
by the model's size. The load operation (`SparseDecompress.convert`) takes a weight from it when its stored record
is the one the loader read (equal 8-field records, checksum included: the same tensor of the same file), and
decodes what the loader gave it otherwise, so every error a damaged file raises is raised as before, by the
loader's own tensors.
"""

from __future__ import annotations

import threading
from concurrent.futures import Future, ThreadPoolExecutor

import torch
from transformers.core_model_loading import dot_natural_key

from .sparse_format import MASK_SUFFIX, META_SUFFIX, decode, stored_compact


class DecodeAhead:
    """Compact weights of ``checkpoint_files`` decoded ahead of the loader; ``take(name, meta)`` hands one over."""

    def __init__(self, checkpoint_files: list[str], depth: int = 2):
        from safetensors import safe_open

        self._readers, self._where = [], {}
        for file in checkpoint_files or []:
            if not str(file).endswith(".safetensors"):
                continue
            try:
                reader = safe_open(str(file), framework="pt")
            except Exception:  # noqa: BLE001 (an unreadable file is the loader's to report, with its own error)
                continue
            names = set(reader.keys())
            compact = [n for n in stored_compact(names) if n + META_SUFFIX in names]
            if compact:
                self._readers.append(reader)
                self._where.update((name, reader) for name in compact)
        self._order = sorted(self._where, key=dot_natural_key)  # the order transformers' loader converts in
        self._next = 0
        self._pending: dict[str, Future] = {}
        self._taken: set[str] = set()
        self._limit = depth + 1
        self._lock = threading.Lock()
        self._threads = ThreadPoolExecutor(max_workers=depth, thread_name_prefix="optimum-recon-ahead") \
            if self._order else None
        with self._lock:
            self._refill()

    def __deepcopy__(self, memo) -> DecodeAhead:
        """Itself: transformers deep-copies the load operation (and the quantizer it holds) for every weight, and
        all of those copies must take from this one."""
        return self

    def __len__(self) -> int:
        return len(self._order)

    def _decode(self, name: str) -> tuple[torch.Tensor, torch.Tensor]:
        reader = self._where[name]
        meta = reader.get_tensor(name + META_SUFFIX)
        return decode(reader.get_tensor(name), reader.get_tensor(name + MASK_SUFFIX), meta, name=name), meta

    def _refill(self) -> None:
        """(lock held) submit the next weights in order until ``depth + 1`` are pending."""
        while self._threads is not None and len(self._pending) < self._limit and self._next < len(self._order):
            name = self._order[self._next]
            self._next += 1
            if name not in self._taken:
                self._pending[name] = self._threads.submit(self._decode, name)

    def take(self, name: str, meta: torch.Tensor) -> torch.Tensor | None:
        """The decoded weight ``name`` when it is the one whose record is ``meta``; None when it is not one of the
        files' compact weights, when its record differs, or when decoding it failed (the caller then decodes its own
        tensors and raises what is wrong with them). Each weight is handed over once."""
        with self._lock:
            future = self._pending.pop(name, None)
            self._taken.add(name)
            self._refill()
        if future is None:
            return None
        try:
            weight, stored = future.result()
        except Exception:  # noqa: BLE001 (the loader's own tensors are decoded next and raise the error)
            return None
        if not torch.equal(stored.to(meta.device), meta):  # (False for another shape too)
            return None
        return weight

    def close(self) -> None:
        """Stop decoding ahead; drop what was not taken and the files' memory maps. Waits for the weights being
        decoded (no thread writes once this returns)."""
        with self._lock:
            pending, self._pending = list(self._pending.values()), {}
            self._next = len(self._order)
            threads, self._threads = self._threads, None
        for future in pending:
            future.cancel()
        if threads is not None:
            threads.shutdown(wait=True)
        self._readers.clear()
        self._where.clear()
