"""Finding decoder blocks and linear layers."""

from __future__ import annotations

import pytest
import torch
from conftest import QUIET, make_tiny_model
from torch import nn

from optimum_recon.modeling import find_blocks, find_linear_layers
from optimum_recon.modeling.blocks import BlocksNotFoundError

EXPECTED = {"llama": "model.layers", "mistral": "model.layers", "qwen2": "model.layers", "gemma2": "model.layers",
            "gemma3": "model.layers", "opt": "model.decoder.layers", "gpt2": "transformer.h"}


def test_blocks_are_found(arch):
    model = make_tiny_model(arch)
    path, blocks = find_blocks(model)
    assert path == EXPECTED[arch]
    assert len(blocks) == model.config.num_hidden_layers


def test_pattern_table_when_no_split_modules_is_missing(monkeypatch):
    model = make_tiny_model("opt")
    monkeypatch.setattr(type(model), "_no_split_modules", None)
    assert find_blocks(model)[0] == "model.decoder.layers"


class _Custom(nn.Module):
    def __init__(self):
        super().__init__()
        self.stack = nn.Module()
        self.stack.items = nn.ModuleList([nn.Linear(4, 4) for _ in range(3)])


def test_unfindable_blocks_say_how_to_name_them():
    with pytest.raises(BlocksNotFoundError, match=r"Pass blocks_path=.*ModuleLists in this model: stack\.items"):
        find_blocks(_Custom())
    path, blocks = find_blocks(_Custom(), "stack.items")
    assert path == "stack.items" and len(blocks) == 3
    with pytest.raises(BlocksNotFoundError, match="does not name"):
        find_blocks(_Custom(), "stack.nothing")


def test_conv1d_weights_are_seen_as_out_by_in():
    model = make_tiny_model("gpt2")
    _, blocks = find_blocks(model)
    layers = {layer.name: layer for layer in find_linear_layers(blocks[0])}
    assert set(layers) == {"attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj"}
    fc = layers["mlp.c_fc"]
    assert fc.transposed and fc.weight.shape == (128, 32) and fc.in_features == 32
    new = torch.zeros(128, 32)
    new[5, 7] = 1.0
    fc.set_weight(new)
    assert fc.module.weight[7, 5] == 1.0 and fc.module.weight.sum() == 1.0


def test_targets_and_ignore_filters():
    _, blocks = find_blocks(make_tiny_model("llama"))
    names = [layer.name for layer in find_linear_layers(blocks[1], targets=["self_attn"], ignore=["o_proj"])]
    assert names == ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"]
    full = find_linear_layers(blocks[1], ignore=["model.layers.1.mlp"], block_name="model.layers.1")
    assert all(not layer.name.startswith("mlp") for layer in full)


def test_entries_match_on_dot_boundaries_or_as_whole_regexes():
    from optimum_recon.modeling.blocks import layer_matches

    assert layer_matches("q_proj", "self_attn.q_proj") and layer_matches("self_attn.q_proj", "self_attn.q_proj")
    assert layer_matches("mlp", "mlp.down_proj") and not layer_matches("proj", "self_attn.q_proj")
    # an unanchored regex search took block 10 for block 1; dotted names do not
    assert layer_matches("model.layers.1", "mlp.up_proj", "model.layers.1.mlp.up_proj")
    assert not layer_matches("model.layers.1", "mlp.up_proj", "model.layers.10.mlp.up_proj")
    assert layer_matches("re:self_attn\\.[qk]_proj", "self_attn.k_proj")
    assert not layer_matches("re:[qk]_proj", "self_attn.k_proj")  # a regex must match the whole name
    assert layer_matches("layers\\.1\\.", "x", "model.layers.1.x")  # an older recipe's regex: searched, as then


def test_an_entry_that_matches_nothing_is_warned_about(calib_ids):
    from optimum_recon import PruningConfig, prune_model

    with pytest.warns(UserWarning, match="ignore entry 'q_porj' matches no linear layer"):
        prune_model(make_tiny_model("llama"), PruningConfig(method="magnitude", reconstruction="layer",
                                                            ignore=["q_porj"]), calib_ids, QUIET)
    with pytest.warns(UserWarning, match="looks like a regular expression"):
        PruningConfig(targets=["mlp\\."])
