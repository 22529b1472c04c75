"""Compact in memory (`optimum_recon.packed_loading`): the same outputs as the dense load, less memory, errors named."""

from __future__ import annotations

import pytest
import torch
from test_compact_save import _pruned
from transformers import AutoModelForCausalLM

import optimum_recon
from optimum_recon.hub.packed import PackedLinear


def _linear_bytes(model) -> int:
    return sum(t.numel() * t.element_size() for name, module in model.named_modules()
               if isinstance(module, (torch.nn.Linear, PackedLinear)) and ".layers." in name
               for t in list(module.parameters(recurse=False)) + list(module.buffers(recurse=False)))


@pytest.mark.parametrize("pattern, dtype", [("unstructured", "float32"), ("2:4", "bfloat16"), ("4:8", "float16")])
def test_a_packed_model_gives_the_dense_models_outputs_in_less_memory(tmp_path, pattern, dtype):
    pruner = _pruned(pattern)
    pruner.save_pretrained(tmp_path / "compact", save_dtype=dtype, sparse_format="bitmask")
    dense = AutoModelForCausalLM.from_pretrained(tmp_path / "compact")
    with optimum_recon.packed_loading():
        packed = AutoModelForCausalLM.from_pretrained(tmp_path / "compact")
    layers = [m for m in packed.modules() if isinstance(m, PackedLinear)]
    assert len(layers) == 21 and not any(isinstance(m, PackedLinear) for m in dense.modules())
    assert packed.model.layers[0].mlp.up_proj.weight.dim() == 1  # the kept values, as stored
    # each expanded weight is the dense load's, bit for bit; and so are the logits and a greedy generation
    for name, module in packed.named_modules():
        if isinstance(module, PackedLinear):
            assert torch.equal(module.dense_weight(), dense.get_parameter(name + ".weight")), name
    ids = torch.randint(0, 100, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(packed(ids).logits, dense(ids).logits)
        kwargs = dict(max_new_tokens=6, do_sample=False, pad_token_id=0)
        assert torch.equal(packed.generate(ids, **kwargs), dense.generate(ids, **kwargs))
    assert _linear_bytes(packed) < 0.6 * _linear_bytes(dense)
    # outside the context the next load is dense again
    assert not any(isinstance(m, PackedLinear) for m in AutoModelForCausalLM.from_pretrained(
        tmp_path / "compact").modules())


def test_a_packed_model_saves_a_compact_folder_again(tmp_path):
    pruner = _pruned("2:4")
    pruner.save_pretrained(tmp_path / "compact", save_dtype="bfloat16", sparse_format="bitmask")
    with optimum_recon.packed_loading():
        packed = AutoModelForCausalLM.from_pretrained(tmp_path / "compact")
    packed.save_pretrained(tmp_path / "again")
    first = AutoModelForCausalLM.from_pretrained(tmp_path / "compact").state_dict()
    second = AutoModelForCausalLM.from_pretrained(tmp_path / "again").state_dict()
    assert first.keys() == second.keys()
    assert all(torch.equal(first[k], second[k]) for k in first)


def test_a_corrupted_weight_is_an_error_at_load_when_packed(tmp_path, caplog):
    from safetensors.torch import load_file, save_file

    pruner = _pruned()
    pruner.save_pretrained(tmp_path / "compact", save_dtype="float32", sparse_format="bitmask")
    path = tmp_path / "compact" / "model.safetensors"
    tensors = load_file(path)
    tensors["model.layers.1.self_attn.k_proj.weight"][3] += 1.0  # one kept value changed
    save_file(tensors, path, metadata={"format": "pt"})
    with optimum_recon.packed_loading(), pytest.raises(RuntimeError, match="conversion of the weights"):
        AutoModelForCausalLM.from_pretrained(tmp_path / "compact")
    # checked at load, as in a dense load: not left to the first forward pass
    assert "model.layers.1.self_attn.k_proj.weight: the checksum of its values and mask does not match" in caplog.text


@pytest.mark.parametrize("arch, packed_layers", [("opt", 18), ("gpt2", 0)])
def test_linear_layers_with_bias_are_packed_and_other_modules_expanded(tmp_path, arch, packed_layers):
    from conftest import QUIET, make_tiny_model

    from optimum_recon import CalibrationSet, PruningConfig, ReconPruner, prune_model

    model = make_tiny_model(arch)
    config = PruningConfig(method="magnitude", reconstruction="layer")
    prune_model(model, config, CalibrationSet(torch.randint(0, 100, (4, 16))), QUIET)
    ReconPruner(model, None, config).save_pretrained(tmp_path / "c", sparse_format="bitmask")
    dense = AutoModelForCausalLM.from_pretrained(tmp_path / "c")
    with optimum_recon.packed_loading():
        packed = AutoModelForCausalLM.from_pretrained(tmp_path / "c")
    layers = [m for m in packed.modules() if isinstance(m, PackedLinear)]
    assert len(layers) == packed_layers  # GPT-2's Conv1D weights are expanded at load, as without packing
    assert all(m.bias is not None for m in layers)
    ids = torch.randint(0, 100, (2, 10), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert torch.equal(packed(ids).logits, dense(ids).logits)


def test_gradients_through_a_packed_model_are_the_dense_models(tmp_path):
    # without autograd every layer expands into one reused scratch buffer; with it, each keeps its own memory (a
    # reused buffer would be overwritten by the next layer before the backward pass reads it)
    from optimum_recon.hub.packed import _SCRATCH

    pruner = _pruned()
    pruner.save_pretrained(tmp_path / "compact", save_dtype="float32", sparse_format="bitmask")
    dense = AutoModelForCausalLM.from_pretrained(tmp_path / "compact")
    with optimum_recon.packed_loading():
        packed = AutoModelForCausalLM.from_pretrained(tmp_path / "compact")
    ids = torch.randint(0, 100, (2, 12), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        assert torch.equal(packed(ids).logits, dense(ids).logits)
    largest = max(m.in_features * m.out_features for m in packed.modules() if isinstance(m, PackedLinear))
    assert _SCRATCH.buffers[torch.float32].numel() == largest  # one buffer, as large as the largest weight
    grads = []
    for model in (dense, packed):
        embeds = model.get_input_embeddings()(ids).detach().requires_grad_(True)
        model(inputs_embeds=embeds).logits.square().sum().backward()
        grads.append(embeds.grad)
    assert torch.allclose(grads[0], grads[1], rtol=1e-5, atol=1e-6) and grads[1].abs().sum() > 0
