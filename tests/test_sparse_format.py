"""The compact sparse encoding of one weight: bit-identical round trips, its size, and every damage detected."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from optimum_recon.hub.sparse_format import (
    BITMASK,
    FORMAT_VERSION,
    NM,
    SparseFormatError,
    code_bits,
    decode,
    encode,
    pack_bits,
    worth_compressing,
)

DTYPES = (torch.float32, torch.bfloat16, torch.float16)
_INT = {torch.float32: torch.int32, torch.bfloat16: torch.int16, torch.float16: torch.int16}


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.view(_INT[t.dtype])


def _unstructured(dtype, rows=12, cols=40, sparsity=0.5, seed=0):
    torch.manual_seed(seed)
    w = torch.randn(rows, cols)
    w[torch.rand(rows, cols) < sparsity] = 0
    return w.to(dtype)


def _nm(dtype, n, m, rows=6, cols=32, seed=0):
    torch.manual_seed(seed)
    w = torch.randn(rows, cols)
    groups = w.view(rows, -1, m)
    groups.scatter_(-1, groups.abs().topk(m - n, dim=-1, largest=False).indices, 0)
    w[0, :m] = 0  # a group with fewer than n nonzeros
    w[1, m:m + n - 1] = 0
    return w.to(dtype)


def test_bits_round_trip():
    torch.manual_seed(0)
    for count in (1, 7, 8, 9, 100):
        bits = torch.rand(count) < 0.5
        packed = pack_bits(bits)
        assert packed.dtype == torch.uint8 and packed.numel() == math.ceil(count / 8)
        # read back as decoding reads it
        unpacked = np.unpackbits(packed.numpy(), count=count, bitorder="little").view(bool)
        assert torch.equal(torch.from_numpy(unpacked), bits)


@pytest.mark.parametrize("dtype", DTYPES)
def test_unstructured_round_trip_is_bit_identical(dtype):
    w = _unstructured(dtype)
    parts = encode(w)
    assert int(parts["meta"][1]) == BITMASK
    assert parts["values"].numel() == int((w != 0).sum()) and parts["values"].dtype == dtype
    assert torch.equal(_bits(decode(parts["values"], parts["mask"], parts["meta"])), _bits(w))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n,m", [(2, 4), (4, 8), (1, 4)])
def test_nm_round_trip_is_bit_identical_and_smaller_than_a_bitmask(dtype, n, m):
    w = _nm(dtype, n, m)
    parts = encode(w, (n, m))
    assert int(parts["meta"][1]) == NM
    assert parts["values"].numel() == w.numel() * n // m  # exactly n per group, zeros included where fewer
    assert parts["mask"].numel() == math.ceil(w.numel() // m * code_bits(n, m) / 8)
    assert parts["mask"].numel() < encode(w)["mask"].numel()  # fewer bits than one per weight
    assert torch.equal(_bits(decode(parts["values"], parts["mask"], parts["meta"])), _bits(w))


def test_a_weight_that_breaks_its_pattern_is_stored_as_a_bitmask():
    w = _nm(torch.float32, 2, 4)
    w[2, :4] = 1.0  # four nonzeros in one group of 4
    parts = encode(w, (2, 4))
    assert int(parts["meta"][1]) == BITMASK
    assert torch.equal(decode(parts["values"], parts["mask"], parts["meta"]), w)


def test_code_widths():
    assert code_bits(2, 4) == 3 and code_bits(4, 8) == 7 and code_bits(1, 4) == 2


def test_bytes_at_half_sparsity_in_bfloat16():
    """The goals of the format: 50% unstructured within 0.57 of the dense bytes, 2:4 within 0.56."""
    for pattern, w, goal in ((None, _unstructured(torch.bfloat16, 256, 512), 0.57),
                             ((2, 4), _nm(torch.bfloat16, 2, 4, 256, 512), 0.56)):
        parts = encode(w, pattern)
        ratio = sum(t.numel() * t.element_size() for t in parts.values()) / (w.numel() * 2)
        assert ratio <= goal, (pattern, ratio)


def test_worth_compressing_needs_zeros_enough_to_pay_for_the_mask():
    dense = torch.randn(8, 64, dtype=torch.bfloat16)
    assert not worth_compressing(dense)
    dense[:, :8] = 0  # 1/8 zeros: 2 bytes saved per zero pay for 1 bit per entry
    assert worth_compressing(dense)
    assert not worth_compressing(torch.zeros(8))  # not a matrix


def test_negative_zero_decodes_as_zero():
    w = torch.tensor([[0.0, -0.0, 1.0, -2.0]])
    parts = encode(w)
    assert parts["values"].numel() == 2
    assert torch.equal(decode(parts["values"], parts["mask"], parts["meta"]), w)  # -0.0 == 0.0 in value


@pytest.mark.parametrize("damage", ["flip_mask_bit", "flip_value", "drop_value", "truncate_mask", "meta_fields",
                                    "bad_kind"])
@pytest.mark.parametrize("pattern", [None, (2, 4)])
def test_damage_is_an_error_that_names_the_tensor(damage, pattern):
    w = _nm(torch.float32, 2, 4) if pattern else _unstructured(torch.float32)
    parts = {k: v.clone() for k, v in encode(w, pattern).items()}
    values, mask, meta = parts["values"], parts["mask"], parts["meta"]
    if damage == "flip_mask_bit":
        mask[1] ^= 4
    elif damage == "flip_value":
        values.view(torch.int32)[0] ^= 1
    elif damage == "drop_value":
        values = values[:-1]
    elif damage == "truncate_mask":
        mask = mask[:-1]
    elif damage == "meta_fields":
        meta = meta[:5]
    else:
        meta[1] = 7
    with pytest.raises(SparseFormatError, match="model.layers.3.mlp.up_proj.weight"):
        decode(values, mask, meta, name="model.layers.3.mlp.up_proj.weight")


def test_a_format_version_from_the_future_says_to_upgrade():
    parts = encode(_unstructured(torch.float32))
    meta = parts["meta"].clone()
    meta[0] = FORMAT_VERSION + 1
    with pytest.raises(SparseFormatError, match="pip install -U optimum-recon"):
        decode(parts["values"], parts["mask"], meta, name="w")


@pytest.fixture
def small_chunks(monkeypatch):
    """Decode in chunks of 64 entries on 3 threads, so that small weights take the chunked, threaded path."""
    from optimum_recon.hub import sparse_format

    monkeypatch.setattr(sparse_format, "_CHUNK", 64)
    monkeypatch.setattr(sparse_format, "_MIN_CHUNK", 64)
    monkeypatch.setattr(sparse_format, "_workers", lambda: 3)


@pytest.mark.parametrize("pattern", [None, (2, 4), (4, 8), (8, 16)])
@pytest.mark.parametrize("dtype", DTYPES)
def test_decoding_in_chunks_is_bit_identical(small_chunks, pattern, dtype):
    # 13 x 48 entries: 10 chunks of 64 with a short last one (and for N:M a last chunk of fewer groups); 13 x 47
    # unstructured: the mask's last byte is part padding
    w = _nm(dtype, *pattern, rows=13, cols=48) if pattern else _unstructured(dtype, rows=13, cols=47)
    parts = encode(w, pattern)
    assert int(parts["meta"][1]) == (NM if pattern else BITMASK)
    assert torch.equal(_bits(decode(parts["values"], parts["mask"], parts["meta"])), _bits(w))


def test_a_bad_group_code_in_a_later_chunk_is_an_error(small_chunks):
    from optimum_recon.hub.sparse_format import _checksum

    parts = {k: v.clone() for k, v in encode(_nm(torch.float32, 2, 4, rows=13, cols=48), (2, 4)).items()}
    parts["mask"][-2] |= 0b111000  # the code of a group in the last chunk becomes 7: 2:4 has codes 0-5
    parts["meta"][7] = _checksum(parts["values"], parts["mask"])  # a consistent checksum: only the code is wrong
    with pytest.raises(SparseFormatError, match="lm.weight: a group code is out of range"):
        decode(parts["values"], parts["mask"], parts["meta"], name="lm.weight")


@pytest.mark.parametrize("change", [+1, -1])
def test_a_mask_that_keeps_more_or_fewer_entries_than_values_is_an_error(small_chunks, change):
    from optimum_recon.hub.sparse_format import _checksum

    parts = {k: v.clone() for k, v in encode(_unstructured(torch.float32, rows=13, cols=48)).items()}
    mask = parts["mask"]
    byte = int(torch.nonzero(mask != (255 if change > 0 else 0))[-1])  # a byte in the last chunk with room for it
    bit = next(b for b in range(8) if bool(mask[byte] >> b & 1) != (change > 0))
    mask[byte] ^= 1 << bit  # one entry more (or fewer) kept than there are values
    parts["meta"][7] = _checksum(parts["values"], mask)  # a consistent checksum: only the count is wrong
    with pytest.raises(SparseFormatError, match="lm.weight: its mask keeps"):
        decode(parts["values"], mask, parts["meta"], name="lm.weight")


@pytest.mark.parametrize("width", range(1, 15))
def test_fields_are_read_back_from_the_packed_stream(width):
    from optimum_recon.hub.sparse_format import _codes, _fields_to_bits

    count = 8 * 5 + 3  # a last run of 8 fields that is not full
    fields = torch.randint(0, 1 << width, (count,), generator=torch.Generator().manual_seed(width))
    packed = pack_bits(_fields_to_bits(fields, width))
    assert torch.equal(torch.from_numpy(_codes(packed.numpy(), count, width).astype("int64")), fields)


def _vm_flags(address: int) -> list[str] | None:
    """The kernel's VmFlags of the mapping holding ``address`` (Linux: /proc/self/smaps), None elsewhere."""
    try:
        smaps = open("/proc/self/smaps").read().split("\n")
    except OSError:
        return None
    inside = False
    for line in smaps:
        head = line.split()[0] if line else ""
        if "-" in head and all(c in "0123456789abcdef-" for c in head):
            low, high = (int(x, 16) for x in head.split("-"))
            inside = low <= address < high
        elif inside and line.startswith("VmFlags:"):
            return line.split()[1:]
    return None


@pytest.mark.parametrize("numel, dtype, hinted", [(3 << 20, torch.bfloat16, True),
                                                  ((1 << 20) - 256, torch.float32, False),
                                                  (1000, torch.float16, False)])
def test_fresh_memory_for_a_decoded_weight_is_zero_and_large_weights_ask_for_huge_pages(numel, dtype, hinted):
    from optimum_recon.hub import sparse_format

    tensor, zeroed = sparse_format._fresh(numel, dtype)
    assert tensor.shape == (numel,) and tensor.dtype == dtype and zeroed
    assert not tensor.view(torch.uint8).any()  # an anonymous map: zero without a pass over it
    flags = _vm_flags(tensor.data_ptr())
    if flags is not None and mmap_has_hugepage_hint():
        assert ("hg" in flags) == hinted  # under 4 MiB: at most one huge page to gain, no system call
    if flags is not None:
        assert "sh" not in flags  # private: a forked child's writes must not reach its parent's weights
    tensor.fill_(1)  # writable, and its own memory
    assert bool((tensor == 1).all())
    empty, zeroed = sparse_format._fresh(0, dtype)  # no zero-length map: torch's memory, not known to be zero
    assert empty.numel() == 0 and not zeroed


def mmap_has_hugepage_hint() -> bool:
    import mmap

    return hasattr(mmap, "MADV_HUGEPAGE") and hasattr(mmap.mmap, "madvise")


def test_decoding_a_weight_large_enough_for_huge_pages_is_bit_identical():
    w = _unstructured(torch.bfloat16, rows=1024, cols=3072)  # 6 MiB: the decoded weight is marked for huge pages
    parts = encode(w)
    assert torch.equal(_bits(decode(parts["values"], parts["mask"], parts["meta"])), _bits(w))


def test_decoding_into_given_memory(small_chunks):
    w = _unstructured(torch.bfloat16, rows=13, cols=47)
    parts = encode(w)
    memory = torch.full((13 * 47,), 7.0, dtype=torch.bfloat16)  # not zeroed first: decoding must write every entry
    out = decode(parts["values"], parts["mask"], parts["meta"], out=memory)
    assert out.data_ptr() == memory.data_ptr() and torch.equal(_bits(out), _bits(w))
    for wrong in (torch.empty(13 * 47), torch.empty(13 * 47 - 1, dtype=torch.bfloat16)):
        with pytest.raises(ValueError, match="needs a contiguous CPU torch.bfloat16 tensor of 611 entries"):
            decode(parts["values"], parts["mask"], parts["meta"], out=wrong)


def test_a_forked_child_decodes_with_threads_of_its_own(small_chunks):
    # the decoding threads are shared between calls; a child forked after they started has none of them, and
    # submitting to the parent's pool there would wait forever
    import multiprocessing

    if "fork" not in multiprocessing.get_all_start_methods():
        pytest.skip("no fork on this platform")
    w = _unstructured(torch.float32, rows=13, cols=47)
    parts = encode(w)
    assert torch.equal(decode(parts["values"], parts["mask"], parts["meta"]), w)  # the parent's threads start
    child = multiprocessing.get_context("fork").Process(target=_decode_and_check, args=(parts, w))
    child.start()
    child.join(timeout=60)
    if child.is_alive():
        child.kill()
        pytest.fail("the forked child's decoding did not finish")
    assert child.exitcode == 0


def _decode_and_check(parts, w):
    raise SystemExit(0 if torch.equal(decode(parts["values"], parts["mask"], parts["meta"]), w) else 1)
