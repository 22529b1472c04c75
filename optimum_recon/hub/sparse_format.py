"""The compact sparse checkpoint: each pruned weight stored as its kept values plus a packed record of where they go.

Why our own format: in 2026 no maintained sparse checkpoint format is left for the Hugging Face stack
(compressed-tensors dropped its sparse compressors, vLLM its 2:4 kernels, torchao its sparsity module), and
safetensors stores dense tensors only. The tensors are plain safetensors; transformers reloads them through its
quantizer registry (`hub/quantizer.py`), which expands every weight back to the dense tensor it was.

A compressed weight W (rows R, columns C, in the checkpoint's dtype) becomes three tensors beside its name:

- ``weight``: the kept values, 1-D, in W's dtype, in row-major order;
- ``weight_sparse_mask``: uint8, where they go:
  - ``bitmask``: one bit per entry of W (1: kept), row-major, least significant bit first. R·C/8 bytes.
  - ``N:M`` (at most N nonzeros in every M consecutive entries of a row): each group of M stores exactly N values
    (a group with fewer nonzeros keeps some zeros, so the values are N/M of W), and *which* N of the M positions,
    as the index of that combination among the C(M, N) possible ones, in ceil(log2 C(M, N)) bits: 3 bits per 4
    entries for 2:4 (0.75 bit per weight, against 1 for a bitmask: 2:4 in bfloat16 is 0.547 of its dense bytes
    instead of 0.5625), 7 bits per 8 for 4:8;
- ``weight_sparse_meta``: int64 [FORMAT_VERSION, kind (0 bitmask, 1 N:M), R, C, N, M, number of values, CRC-32 of
  the values' and the mask's bytes]. The shape makes every tensor decodable alone; the count and the checksum make
  a truncated or corrupted tensor an error that names it, never a silently wrong weight.

A weight whose zeros do not pay for their record (fewer than 1/16 of its entries zero in bfloat16) is stored
dense, unchanged. Encoding and decoding are pure tensor code; a decoded weight is bit-identical to the encoded one.
"""

from __future__ import annotations

import math
import mmap
import os
import threading
import zlib
from concurrent.futures import ThreadPoolExecutor, wait
from functools import lru_cache

import numpy as np
import torch

FORMAT_VERSION = 1
# config.json's quantization_config.quant_method of a compact checkpoint (see `quantizer.py` for why it reads as an
# instruction), and what this version reads: today's name, and the first one
QUANT_METHOD = "optimum-recon (pip install optimum-recon, then import optimum_recon)"
QUANT_METHODS = (QUANT_METHOD, "optimum_recon")
MASK_SUFFIX = "_sparse_mask"
META_SUFFIX = "_sparse_meta"
BITMASK, NM = 0, 1
_KINDS = {BITMASK: "bitmask", NM: "N:M"}
MAX_GROUP = 16  # N:M with M above this is stored as a bitmask (the combination table has 2**M entries)


class SparseFormatError(ValueError):
    """A compact sparse tensor that cannot be decoded: truncated, corrupted, or from a newer optimum-recon."""


# --- bits ------------------------------------------------------------------------------------------------------

def pack_bits(bits: torch.Tensor) -> torch.Tensor:
    """A flat bool/0-1 tensor -> uint8, 8 bits per byte, least significant first; the last byte is zero-padded."""
    bits = bits.reshape(-1).to(torch.uint8)
    pad = (-bits.numel()) % 8
    if pad:
        bits = torch.cat([bits, bits.new_zeros(pad)])
    weights = torch.tensor([1, 2, 4, 8, 16, 32, 64, 128], dtype=torch.uint8, device=bits.device)
    return (bits.view(-1, 8) * weights).sum(1, dtype=torch.int32).to(torch.uint8)


def _fields_to_bits(codes: torch.Tensor, width: int) -> torch.Tensor:
    shifts = torch.arange(width, dtype=torch.int64, device=codes.device)
    return (codes.view(-1, 1) >> shifts) & 1


# --- N:M combinations ---------------------------------------------------------------------------------------

def code_bits(n: int, m: int) -> int:
    """Bits that name one choice of n positions out of m."""
    return max(1, math.ceil(math.log2(math.comb(m, n))))


@lru_cache(maxsize=None)
def _combinations(n: int, m: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(positions, index): the C(m, n) choices of n positions out of m as rows of an (C(m, n), m) bool table, in
    increasing order of their m-bit pattern, and the inverse table from a pattern (0 .. 2**m - 1) to its row (-1
    for patterns without exactly n ones)."""
    values = torch.arange(2**m, dtype=torch.int64)
    bits = _fields_to_bits(values, m)
    patterns = values[bits.sum(1) == n]
    index = torch.full((2**m,), -1, dtype=torch.int64)
    index[patterns] = torch.arange(patterns.numel())
    return bits[patterns].bool(), index


def _nm_positions(weight: torch.Tensor, n: int, m: int) -> torch.Tensor | None:
    """(R, C/m, m) bool: n positions per group that hold every nonzero (the first zeros fill a group with fewer),
    or None when some group has more than n nonzeros."""
    groups = weight.reshape(weight.shape[0], -1, m) != 0
    if int(groups.sum(-1).max()) > n:
        return None
    # rank: nonzeros first, then the leftmost zeros; keep the n best
    order = torch.arange(m, 0, -1, device=weight.device)
    score = groups.long() * (m + 1) + order
    keep = torch.zeros_like(groups)
    keep.scatter_(-1, score.topk(n, dim=-1).indices, True)
    return keep


# --- encode / decode ----------------------------------------------------------------------------------------

def _checksum(values: torch.Tensor, mask: torch.Tensor) -> int:
    # zlib reads the arrays' memory directly (no bytes copy) and releases the GIL while it does
    crc = zlib.crc32(values.contiguous().view(torch.uint8).numpy())
    return zlib.crc32(mask.contiguous().numpy(), crc)


def worth_compressing(weight: torch.Tensor) -> bool:
    """Whether storing ``weight`` compact saves bytes: its zeros outweigh a one-bit mask."""
    if weight.dim() != 2 or not weight.is_floating_point():
        return False
    zeros = int((weight == 0).sum())
    return zeros * weight.element_size() * 8 > weight.numel()


def encode(weight: torch.Tensor, pattern: tuple[int, int] | None = None) -> dict[str, torch.Tensor]:
    """``weight`` (R, C) -> {"values", "mask", "meta"}: N:M codes when ``pattern`` = (n, m) holds for every group of
    the weight (and m <= MAX_GROUP, C divisible by m), a bitmask otherwise."""
    weight = weight.detach().cpu().contiguous()
    rows, cols = weight.shape
    keep = None
    if pattern is not None:
        n, m = pattern
        if m <= MAX_GROUP and cols % m == 0:
            keep = _nm_positions(weight, n, m)
    if keep is not None:
        kind = NM
        group_pattern = (keep.long() << torch.arange(m)).sum(-1).reshape(-1)  # (G,) the m-bit pattern of each group
        codes = _combinations(n, m)[1][group_pattern]
        mask = pack_bits(_fields_to_bits(codes, code_bits(n, m)))
        values = weight.reshape(rows, -1, m)[keep].reshape(-1)
    else:
        kind, n, m = BITMASK, 0, 0
        keep = weight != 0
        mask = pack_bits(keep)
        values = weight[keep]
    meta = torch.tensor([FORMAT_VERSION, kind, rows, cols, n, m, values.numel(), _checksum(values, mask)],
                        dtype=torch.int64)
    return {"values": values, "mask": mask, "meta": meta}


def decode(values: torch.Tensor, mask: torch.Tensor, meta: torch.Tensor, name: str = "weight",
           verify: bool = True, out: torch.Tensor | None = None) -> torch.Tensor:
    """The dense weight that `encode` compressed; `SparseFormatError` naming ``name`` when the tensors do not fit
    together (truncated, corrupted, or written by a newer format version). ``verify=False`` skips only the checksum
    (for weights already verified once, expanded again at every forward pass: `packed.py`); every size and code is
    still checked. ``out``: a contiguous CPU tensor of the weight's dtype and number of entries to decode into (its
    memory reused instead of fresh memory, which costs page faults); the result is then a view of it."""
    meta = meta.reshape(-1).tolist()
    if len(meta) < 2:
        raise SparseFormatError(f"{name}: its sparse record is truncated ({len(meta)} of 8 fields).")
    version = int(meta[0])
    if version > FORMAT_VERSION:
        raise SparseFormatError(f"{name} was written in sparse format version {version}; this optimum-recon reads "
                                f"version {FORMAT_VERSION} and older. Upgrade: pip install -U optimum-recon.")
    if len(meta) != 8:
        raise SparseFormatError(f"{name}: its sparse record has {len(meta)} fields instead of 8 (corrupted).")
    _, kind, rows, cols, n, m, count, crc = (int(v) for v in meta)
    if kind not in _KINDS or rows < 0 or cols < 0:
        raise SparseFormatError(f"{name}: unknown sparse encoding {kind} or shape ({rows}, {cols}) (corrupted).")
    values, mask = values.reshape(-1).cpu(), mask.reshape(-1).cpu()
    if values.numel() != count:
        raise SparseFormatError(f"{name}: {values.numel()} stored values where its record says {count} "
                                "(truncated or corrupted file).")
    if mask.dtype != torch.uint8:
        raise SparseFormatError(f"{name}: its mask is stored as {mask.dtype}, not uint8 (corrupted).")
    # the checksum runs beside the decoding, submitted first to the pool the chunks run on (zlib releases the GIL),
    # and is checked before the decoded weight is returned: a corrupted tensor is still an error, never a weight, and
    # a mismatch is the error reported even when the damaged mask also fails a check of the decoding
    if out is not None and (out.device.type != "cpu" or out.dtype != values.dtype or out.numel() != rows * cols
                            or not out.is_contiguous()):
        raise ValueError(f"decode(out=...): {name} needs a contiguous CPU {values.dtype} tensor of {rows * cols} "
                         f"entries, not {out.dtype} {tuple(out.shape)} on {out.device}.")
    pool = _pool()
    checksum = pool.submit(_checksum, values, mask) if verify else None
    try:
        dense, failure = _expand(values, mask, name, kind, rows, cols, n, m, count, pool, out), None
    except SparseFormatError as err:
        dense, failure = None, err
    matches = checksum is None or checksum.result() == crc
    if not matches:
        raise SparseFormatError(f"{name}: the checksum of its values and mask does not match (corrupted file).")
    if failure is not None:
        raise failure
    return dense


def _expand(values: torch.Tensor, mask: torch.Tensor, name: str, kind: int, rows: int, cols: int, n: int, m: int,
            count: int, pool: ThreadPoolExecutor, into: torch.Tensor | None = None) -> torch.Tensor:
    """The dense (rows, cols) weight from checked-in-size values and mask (`decode`'s second half), in chunks that
    run on ``pool``'s threads, written into ``into`` when given."""
    # not zeroed here: fresh memory is zero already (`_fresh`), and memory given to reuse is zeroed chunk by chunk,
    # each chunk its own slice on its thread
    dense, zeroed = _fresh(rows * cols, values.dtype) if into is None else (into.view(-1), False)
    # the bits are moved, never converted: every dtype is read and written as the integer type of its size
    out, kept_values, packed = _as_bits(dense), _as_bits(values), mask.numpy()
    total = rows * cols
    if kind == BITMASK:
        expected = (total + 7) // 8
        if mask.numel() != expected:
            raise SparseFormatError(f"{name}: its mask has {mask.numel()} bytes, {expected} expected (corrupted).")
        size = _chunk(total)
        starts = list(range(0, total, size))
        # each chunk's values follow those of the chunks before it: a popcount of the mask bytes before it (the
        # padding bits after the last entry do not count). Checked in full before anything is written.
        kept = [_popcount(packed[first // 8:(first + size) // 8]) for first in starts]
        if total % 8:
            kept[-1] -= _popcount(packed[-1:] >> (total % 8))
        firsts = np.concatenate([[0], np.cumsum(kept)]).tolist()
        if firsts[-1] != count:
            raise SparseFormatError(f"{name}: its mask keeps {firsts[-1]} entries for {count} values (corrupted).")

        def bitmask_chunk(index: int) -> None:
            first, last = starts[index], min(starts[index] + size, total)
            keep = np.unpackbits(packed[first // 8:(last + 7) // 8], count=last - first, bitorder="little")
            _place(out[first:last], np.flatnonzero(keep.view(bool)), kept_values[firsts[index]:firsts[index + 1]],
                   zeroed)

        _run(pool, bitmask_chunk, len(starts))
        return dense.view(rows, cols)
    if not (0 < n <= m <= MAX_GROUP) or cols % m:
        raise SparseFormatError(f"{name}: pattern {n}:{m} does not fit {cols} columns (corrupted).")
    groups = total // m
    width = code_bits(n, m)
    expected = (groups * width + 7) // 8
    if mask.numel() != expected or count != groups * n:
        raise SparseFormatError(f"{name}: {mask.numel()} mask bytes and {count} values do not fit {groups} groups "
                                f"of {n}:{m} (corrupted).")
    positions = _combinations(n, m)[0].numpy()  # (C(m, n), m) bool
    per_chunk = max(8, _chunk(total) // m // 8 * 8)  # groups per chunk: a multiple of 8, so it starts on a mask byte

    def group_chunk(index: int) -> None:
        first = index * per_chunk
        last = min(first + per_chunk, groups)
        codes = _codes(packed[first * width // 8:(last * width + 7) // 8], last - first, width)
        if codes.size and int(codes.max()) >= positions.shape[0]:
            raise SparseFormatError(f"{name}: a group code is out of range for {n}:{m} (corrupted).")
        keep = np.take(positions, codes, axis=0)  # (g, m) bool: where each group's n values go
        _place(out[first * m:last * m], np.flatnonzero(keep), kept_values[first * n:last * n], zeroed)

    _run(pool, group_chunk, -(-groups // per_chunk))
    return dense.view(rows, cols)


def _place(out: np.ndarray, positions: np.ndarray, values: np.ndarray, zeroed: bool) -> None:
    """``out[:] = 0`` (unless ``zeroed``: it holds zeros already), then ``out[positions] = values``, the assignment
    through torch's ``scatter_``, which is about 1.5x numpy's integer-index assignment here (0.36 against 0.56 ms for
    1M positions; decoding the 1.2B benchmark model's weights: 1.76-1.80 s against 1.91-2.05 s at 50%, 1.80-1.98 s
    against 2.21-2.25 s at 2:4)."""
    if not zeroed:
        out.fill(0)
    torch.from_numpy(out).scatter_(0, torch.from_numpy(positions), torch.from_numpy(values))


_ONES = np.array([bin(byte).count("1") for byte in range(256)], dtype=np.uint8)  # set bits of every byte value


def _popcount(packed: np.ndarray) -> int:
    """Set bits in a uint8 array. numpy >= 2 counts them in one vectorized pass (``bitwise_count``: the whole mask of a
    1.2B-parameter model in 0.06 s on this machine's CPU); a table lookup (0.5 s for the same, serial before any
    chunk can start) is the fallback for older numpy."""
    if hasattr(np, "bitwise_count"):
        return int(np.bitwise_count(packed).sum(dtype=np.int64))
    return int(_ONES[packed].sum(dtype=np.int64))


def _run(pool: ThreadPoolExecutor, work, count: int) -> None:
    """``work(0) ... work(count - 1)`` on ``pool`` (a single chunk on the calling thread); the first failure is
    raised."""
    if count == 1:
        work(0)
        return
    futures = [pool.submit(work, index) for index in range(count)]
    wait(futures)  # all of them, even after a failure: no chunk may still be writing once this returns
    for future in futures:
        future.result()


def _codes(packed: np.ndarray, count: int, width: int) -> np.ndarray:
    """The first ``count`` ``width``-bit fields of a packed little-endian bit stream that starts on a field, as
    integers. Up to 8 bits wide, 8 fields fill exactly ``width`` bytes: each run of ``width`` bytes is read as one
    integer (32-bit up to 4 bytes, else 64-bit: the narrower the word, the less memory each pass moves) and its 8
    fields are cut out one pass each, straight into the uint8 result; wider fields go bit by bit."""
    if width <= 8:
        runs = -(-count // 8)
        stream = packed
        if packed.size != runs * width:  # only a last chunk of fewer than 8 fields: pad it to whole runs
            stream = np.zeros(runs * width, np.uint8)
            stream[:packed.size] = packed
        stream = stream.reshape(runs, width)
        word_type = np.uint32 if width <= 4 else np.uint64
        word = stream[:, 0].astype(word_type)
        for byte in range(1, width):
            word |= stream[:, byte].astype(word_type) << word_type(8 * byte)
        fields = np.empty((runs, 8), np.uint8)
        low = word_type((1 << width) - 1)
        for field in range(8):
            np.bitwise_and(word >> word_type(field * width), low, out=fields[:, field], casting="unsafe")
        return fields.reshape(-1)[:count]
    bits = np.unpackbits(packed, count=count * width, bitorder="little").reshape(-1, width)
    codes = bits[:, 0].astype(np.uint16)
    for bit in range(1, width):  # one strided pass per bit: width <= 14
        codes |= bits[:, bit].astype(np.uint16) << bit
    return codes


_SAME_SIZE_INT = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


def _as_bits(tensor: torch.Tensor) -> np.ndarray:
    """A numpy view of a contiguous CPU tensor's memory as integers of its element size (numpy has no bfloat16)."""
    return tensor.view(_SAME_SIZE_INT[tensor.element_size()]).numpy()


# Decoding runs in numpy, chunk by chunk, with torch only for the final assignment (`_place`). Why not torch
# throughout: the expansion is the bulk of a compact load, and torch's CPU `masked_scatter_` is a serial loop
# (measured: about 200M weights/s, the same on 1 and 2 threads), while numpy's `unpackbits` (a table lookup) and
# `flatnonzero` with an index assignment take a third of its time on one thread (16.8M bfloat16 weights at 50%: 0.023
# s against 0.076 s; 2:4 0.05 s against 0.14 s). Chunks of at most _CHUNK entries (a multiple of 8: every chunk starts
# on a mask byte) keep the temporaries (the kept positions as int64: 4 MB at 50%) near the cores' 2 MB L2 caches; a
# weight is cut into at least one chunk per thread, and the chunks (each zeroing its own slice first where the memory
# is not fresh), run on as many threads as torch uses (numpy releases the GIL in these calls). Measured on 2 cores, a
# whole 1.2B-parameter bfloat16 load until ready: 50% 5.1 -> 4.1 s, 2:4 6.0-6.3 -> 4.3 s against one serial chunk loop
# after one zero pass (transformers' loader threads have read the files by then: they no longer compete). Chunks of 1M
# entries instead of 4M decoded the 1.2B model's 50% weights about 15% faster on a later machine (an Intel Xeon with
# AMX; 256K: no better once fresh memory is written, 64K: slower, Python's share per chunk grows).
_CHUNK = 1 << 20
_MIN_CHUNK = 1 << 18


def _workers() -> int:
    return max(1, min(torch.get_num_threads(), 8))


# One pool per thread count, shared by every decoding: a compact load decodes hundreds of weights, and a packed model
# (`packed.py`) every weight at every forward pass, where starting threads for each one was a measurable part of the
# cost. Its threads only ever run chunks and checksums, never `decode` itself, so waiting on them cannot deadlock.
_POOLS: dict[int, ThreadPoolExecutor] = {}
_POOLS_LOCK = threading.Lock()


def _pool() -> ThreadPoolExecutor:
    workers = _workers()
    with _POOLS_LOCK:
        if workers not in _POOLS:
            _POOLS[workers] = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="optimum-recon-decode")
        return _POOLS[workers]


def _forget_pools() -> None:
    """In a forked child, which has none of the parent's threads (nor a lock that one of them held): new pools."""
    global _POOLS_LOCK
    _POOLS_LOCK = threading.Lock()
    _POOLS.clear()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_forget_pools)


def _chunk(total: int) -> int:
    """Entries per chunk for a weight of ``total`` entries: about one chunk per thread, within bounds, a multiple of
    64 (so bitmask chunks start on a mask byte and N:M chunks on a group)."""
    per_thread = -(-total // _workers())
    return max(_MIN_CHUNK, min(_CHUNK, -(-per_thread // 64) * 64))


def _fresh(numel: int, dtype: torch.dtype) -> tuple[torch.Tensor, bool]:
    """An uninitialized CPU tensor for a decoded weight and whether it is known to hold zeros.

    Why not ``torch.empty``: the decoded weight is fresh memory, paid for twice: the kernel zeroes every page it
    faults in, and decoding then zeroed it again before placing the kept values. An anonymous memory map is zero by
    definition, so its weights skip that second pass (decoding the 1.2B benchmark model's 147 weights outside a
    load: 2.07 against 2.30 s, median of 4 fresh processes, 2 cores; inside a load it pays with `decode_ahead.py`).
    It is also marked for transparent huge pages (MADV_HUGEPAGE; this machine's THP mode is `madvise`, so torch's
    allocator never got them: a 32 MiB weight took 9.7 ms to fault in with 4 KiB pages, 3.4 ms with 2 MiB ones), a
    hint the kernel ignores where THP is off. The tensor keeps the map alive and unmaps it when freed, as torch's
    own memory would be. Where no anonymous map can be made (an empty weight), torch's memory, not known to be zero."""
    nbytes = numel * dtype.itemsize
    # private: Python's default anonymous map is shared, which a forked child would write through to its parent
    private = {"flags": mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS} if hasattr(mmap, "MAP_PRIVATE") else {}
    try:
        memory = mmap.mmap(-1, nbytes, **private)
    except (OSError, ValueError):  # (a zero-length map is an error)
        return torch.empty(numel, dtype=dtype), False
    if hasattr(memory, "madvise") and hasattr(mmap, "MADV_HUGEPAGE") and nbytes >= 4 << 20:
        try:
            memory.madvise(mmap.MADV_HUGEPAGE)
        except OSError:
            pass  # only 4 KiB pages, as without it
    return torch.frombuffer(memory, dtype=dtype), True


def stored_compact(names: set[str]) -> list[str]:
    """The weights a checkpoint file with tensor ``names`` stores compact: each that has a mask beside it."""
    return [name.removesuffix(MASK_SUFFIX) for name in names
            if name.endswith(MASK_SUFFIX) and name.removesuffix(MASK_SUFFIX) in names]


def decode_stored(name: str, weight: torch.Tensor, mask: torch.Tensor | None, meta: torch.Tensor | None
                  ) -> torch.Tensor:
    """A tensor as a checkpoint stores it: ``weight`` itself when it has no compact record beside it, else decoded;
    a record found only in part is an error naming the tensor."""
    if mask is None and meta is None:
        return weight
    if mask is None or meta is None:
        raise SparseFormatError(f"{name}: the checkpoint holds only part of its compact record (the "
                                f"{'mask' if mask is None else 'meta'} tensor is missing); the file is truncated or "
                                "corrupted.")
    return decode(weight, mask, meta, name=name)
