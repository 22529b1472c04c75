"""Decoding a compact checkpoint's weights ahead of transformers' loader (`hub/decode_ahead.py`)."""

from __future__ import annotations

import copy
import threading

import torch
from safetensors import safe_open
from test_compact_save import _assert_bit_identical, _pruned, _state
from transformers.core_model_loading import dot_natural_key

from optimum_recon.hub.decode_ahead import DecodeAhead
from optimum_recon.hub.sparse_format import MASK_SUFFIX, META_SUFFIX, decode


def _compact(tmp_path, pattern="unstructured"):
    pruner = _pruned(pattern)
    pruner.save_pretrained(tmp_path / "dense", save_dtype="bfloat16")
    pruner.save_pretrained(tmp_path / "compact", save_dtype="bfloat16", sparse_format="bitmask")
    return tmp_path / "compact", sorted((tmp_path / "compact").glob("*.safetensors"))


def _stored(files, name):
    for file in files:
        with safe_open(str(file), "pt") as reader:
            if name in reader.keys():
                return (reader.get_tensor(name), reader.get_tensor(name + MASK_SUFFIX),
                        reader.get_tensor(name + META_SUFFIX))
    raise KeyError(name)


def _ahead_threads():
    return [t for t in threading.enumerate() if t.name.startswith("optimum-recon-ahead")]


def test_a_compact_load_takes_every_weight_decoded_ahead_and_is_bit_identical(tmp_path, monkeypatch):
    folder, files = _compact(tmp_path)
    taken, made = [], []
    real_take, real_init = DecodeAhead.take, DecodeAhead.__init__

    def take(self, name, meta):
        weight = real_take(self, name, meta)
        taken.append((name, weight is not None))
        return weight

    def init(self, *args, **kwargs):
        real_init(self, *args, **kwargs)
        made.append(self)

    monkeypatch.setattr(DecodeAhead, "take", take)
    monkeypatch.setattr(DecodeAhead, "__init__", init)
    _, loaded = _state(folder)
    (ahead,) = made
    assert len(ahead) > 0 and len(taken) == len(ahead)
    assert all(hit for _, hit in taken), taken  # every one decoded ahead, none again by the load operation
    assert sorted(name for name, _ in taken) == sorted(ahead._order)
    _, dense = _state(tmp_path / "dense")
    _assert_bit_identical(dense, loaded)
    # closed once loaded: no thread left, nothing held, no file kept open
    assert _ahead_threads() == [] and ahead._pending == {} and ahead._readers == []


def test_it_decodes_in_the_loaders_order_at_most_depth_plus_one_ahead(tmp_path, monkeypatch):
    _, files = _compact(tmp_path)
    release = threading.Event()
    started = []
    real_decode = DecodeAhead._decode

    def slow(self, name):
        started.append(name)
        release.wait(10)
        return real_decode(self, name)

    monkeypatch.setattr(DecodeAhead, "_decode", slow)
    ahead = DecodeAhead([str(f) for f in files], depth=2)
    try:
        names = ahead._order
        assert names == sorted(names, key=dot_natural_key) and len(names) > 3
        # numbered parts by number, as transformers loads: layer 2 before layer 10
        order = sorted(["m.layers.10.q.weight", "m.layers.2.q.weight"], key=dot_natural_key)
        assert order == ["m.layers.2.q.weight", "m.layers.10.q.weight"]
        assert len(ahead._pending) == 3 and list(ahead._pending) == names[:3]  # bounded: never the whole model
        release.set()
        for name in names:
            values, mask, meta = _stored(files, name)
            weight = ahead.take(name, meta)
            assert weight is not None and torch.equal(weight, decode(values, mask, meta))
            assert len(ahead._pending) <= 3
        assert started == names  # each decoded once, in order
    finally:
        release.set()
        ahead.close()
    assert _ahead_threads() == []


def test_a_weight_whose_record_differs_or_is_unknown_is_left_to_the_load_operation(tmp_path):
    _, files = _compact(tmp_path)
    ahead = DecodeAhead([str(f) for f in files])
    try:
        first, second = ahead._order[:2]
        _, _, meta = _stored(files, first)
        other = meta.clone()
        other.view(-1)[-1] += 1  # another checksum: not the tensor this reader decoded
        assert ahead.take(first, other) is None
        assert ahead.take(first, meta) is None  # handed over (or refused) once only
        assert ahead.take("model.not_a_weight", meta) is None
        assert ahead.take(second, _stored(files, second)[2]) is not None
    finally:
        ahead.close()


def test_a_weight_that_fails_to_decode_ahead_is_left_to_the_load_operation(tmp_path, monkeypatch):
    _, files = _compact(tmp_path)

    def broken(self, name):
        raise ValueError("damaged")

    monkeypatch.setattr(DecodeAhead, "_decode", broken)
    ahead = DecodeAhead([str(f) for f in files])
    try:
        name = ahead._order[0]
        assert ahead.take(name, _stored(files, name)[2]) is None  # the loader's own tensors then raise the error
    finally:
        ahead.close()


def test_copies_share_it_and_files_without_compact_weights_start_nothing(tmp_path):
    _, files = _compact(tmp_path)
    ahead = DecodeAhead([str(f) for f in files])
    try:
        assert copy.deepcopy({"op": ahead})["op"] is ahead  # transformers deep-copies the load operation per weight
    finally:
        ahead.close()
    assert ahead.take(ahead._order[0] if ahead._order else "x", torch.zeros(8)) is None  # closed: nothing more
    dense = sorted((tmp_path / "dense").glob("*.safetensors"))
    (tmp_path / "broken.safetensors").write_bytes(b"not a safetensors file")  # the loader's to report
    idle = DecodeAhead([str(f) for f in dense] + [str(tmp_path / "pytorch_model.bin"),
                                                  str(tmp_path / "broken.safetensors")])
    assert len(idle) == 0 and idle._threads is None
    idle.close()


def test_a_packed_load_decodes_nothing_ahead(tmp_path, monkeypatch):
    import optimum_recon

    folder, _ = _compact(tmp_path)
    made = []
    real_init = DecodeAhead.__init__

    def init(self, *args, **kwargs):
        made.append(self)
        real_init(self, *args, **kwargs)

    monkeypatch.setattr(DecodeAhead, "__init__", init)
    with optimum_recon.packed_loading():
        from transformers import AutoModelForCausalLM

        AutoModelForCausalLM.from_pretrained(folder)
    assert made == []  # packed weights are kept as stored: there is nothing to decode ahead
