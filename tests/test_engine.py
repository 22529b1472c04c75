"""The block-sequential engine on tiny models of every architecture in the matrix."""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import QUIET, make_tiny_model

from optimum_recon import CalibrationSet, PruningConfig, prune_model
from optimum_recon.engine import capture_block_inputs
from optimum_recon.engine.steps import BlockPasses
from optimum_recon.modeling import find_blocks, find_linear_layers


def block_outputs(model, ids):
    """Each block's output hidden states from a plain forward of ``model`` (reference, via hooks)."""
    _, blocks = find_blocks(model)
    outs = [None] * len(blocks)
    handles = []
    for i, block in enumerate(blocks):
        def hook(module, args, output, i=i):
            outs[i] = (output[0] if isinstance(output, tuple) else output).detach().clone()
        handles.append(block.register_forward_hook(hook))
    with torch.no_grad():
        model(input_ids=ids, use_cache=False)
    for h in handles:
        h.remove()
    return outs


def test_captured_inputs_reproduce_the_forward_pass(arch, calib_ids):
    """Running the blocks one by one on the captured arguments gives exactly the model's hidden states.

    The tiny Mistral/Qwen2/Gemma models use an 8-token sliding window on 24-token windows, so blocks
    that get the wrong attention mask or rotary table would differ.
    """
    model = make_tiny_model(arch)
    _, blocks = find_blocks(model)
    batches = list(calib_ids.split(5))  # uneven last batch on purpose
    inputs = capture_block_inputs(model, blocks, batches)
    expected = [block_outputs(model, b) for b in batches]
    passes = BlockPasses(inputs)
    for b, hidden in enumerate(inputs.hidden):
        x = hidden
        for i, block in enumerate(blocks):
            x = passes.run(block, i, b, x, torch.device("cpu"))
            torch.testing.assert_close(x, expected[b][i], rtol=0, atol=1e-5)


@pytest.mark.parametrize("method", ["sparsegpt", "wanda", "magnitude", "alps"])
@pytest.mark.parametrize("pattern", ["unstructured", "2:4"])
def test_prune_matrix(arch, method, pattern, calib_ids):
    model = make_tiny_model(arch)
    # uniform: every layer exactly 50% (OWL's per-block shares are tested in test_allocation.py)
    config = PruningConfig(method=method, pattern=pattern, reconstruction="layer", allocation="uniform")
    report = prune_model(model, config, calib_ids, QUIET)
    _, blocks = find_blocks(model)
    assert len(report.blocks) == len(blocks)
    for block in blocks:
        for layer in find_linear_layers(block):
            w = layer.weight
            if pattern == "2:4":
                nonzero = (w.reshape(w.shape[0], -1, 4) != 0).sum(-1)
                assert int(nonzero.max()) <= 2
            else:
                assert float((w == 0).float().mean()) == pytest.approx(0.5, abs=1 / w.numel() + 1e-3)
    assert report.model_sparsity == pytest.approx(0.5, abs=0.01)
    assert all(torch.isfinite(torch.tensor(b.error)) and b.error > 0 for b in report.blocks)
    # embeddings and the LM head stay dense
    assert float((model.get_input_embeddings().weight == 0).float().mean()) < 0.01


def test_recorded_errors_match_an_independent_computation(arch, calib_ids):
    """error = MSE(pruned model's block output, dense model's block output); error_local uses the dense block
    applied to the pruned model's inputs. Both recomputed here from plain forward passes."""
    dense = make_tiny_model(arch)
    model = copy.deepcopy(dense)
    config = PruningConfig(method="wanda", propagation="local", reconstruction="layer")
    report = prune_model(model, config, calib_ids, QUIET)
    dense_out = block_outputs(dense, calib_ids)
    pruned_out = block_outputs(model, calib_ids)
    _, dense_blocks = find_blocks(dense)
    _, pruned_blocks = find_blocks(model)
    captured = {}
    for i, block in enumerate(pruned_blocks):
        def pre(module, args, kwargs, i=i):
            captured[i] = (args, kwargs)
        block.register_forward_pre_hook(pre, with_kwargs=True)
    with torch.no_grad():
        model(input_ids=calib_ids, use_cache=False)
    for i, record in enumerate(report.blocks):
        expected = float((pruned_out[i].double() - dense_out[i].double()).pow(2).mean())
        assert record.error == pytest.approx(expected, rel=1e-4, abs=1e-9)
        args, kwargs = captured[i]
        with torch.no_grad():
            local = dense_blocks[i](*args, **kwargs)
        local = local[0] if isinstance(local, tuple) else local
        expected_local = float((pruned_out[i].double() - local.double()).pow(2).mean())
        assert record.error_local == pytest.approx(expected_local, rel=1e-4, abs=1e-9)


def test_batch_size_does_not_change_the_result(calib_ids):
    a, b = make_tiny_model("llama"), make_tiny_model("llama")
    ra = prune_model(a, PruningConfig(reconstruction="layer", batch_size=1), calib_ids, QUIET)
    rb = prune_model(b, PruningConfig(reconstruction="layer", batch_size=12), calib_ids, QUIET)
    for pa, pb in zip(a.parameters(), b.parameters()):
        assert torch.equal(pa == 0, pb == 0)
        torch.testing.assert_close(pa, pb, rtol=1e-4, atol=1e-5)
    assert ra.final_error == pytest.approx(rb.final_error, rel=1e-3)


def test_pruning_is_deterministic(calib_ids):
    a, b = make_tiny_model("qwen2"), make_tiny_model("qwen2")
    prune_model(a, PruningConfig(reconstruction="layer"), calib_ids, QUIET)
    report = prune_model(b, PruningConfig(reconstruction="layer"), calib_ids, QUIET)
    for pa, pb in zip(a.parameters(), b.parameters()):
        assert torch.equal(pa, pb)
    # bit-identity also needs the same CPU thread count: the report records it
    assert report.environment["torch_threads"] == str(torch.get_num_threads())


def test_sparsegpt_beats_magnitude_on_block_error(calib_ids):
    errors = {}
    for method in ("sparsegpt", "magnitude"):
        model = make_tiny_model("llama")
        config = PruningConfig(method=method, reconstruction="layer")
        errors[method] = prune_model(model, config, calib_ids, QUIET).final_error
    assert errors["sparsegpt"] < errors["magnitude"]


def test_targets_and_ignore_choose_the_layers(calib_ids):
    model = make_tiny_model("llama")
    dense = copy.deepcopy(model)
    config = PruningConfig(method="magnitude", targets=["mlp"], ignore=["layers.1"], reconstruction="layer")
    report = prune_model(model, config, calib_ids, QUIET)
    pruned_names = {layer.name for block in report.blocks for layer in block.layers}
    assert pruned_names == {f"model.layers.{i}.mlp.{p}_proj" for i in (0, 2) for p in ("gate", "up", "down")}
    for name, param in model.named_parameters():
        if name.removesuffix(".weight") not in pruned_names:
            assert torch.equal(param, dict(dense.named_parameters())[name]), name


def test_nm_width_error_names_the_layer_before_any_work(calib_ids):
    model = make_tiny_model("llama", hidden_size=30, num_attention_heads=3, num_key_value_heads=3, head_dim=10)
    with pytest.raises(ValueError, match=r"pattern='2:3'.*divisible by 3.*model\.layers\.0\.mlp\.down_proj"):
        prune_model(model, PruningConfig(pattern="2:3", targets=["down_proj"]), calib_ids, QUIET)
    model = make_tiny_model("llama")
    with pytest.raises(ValueError, match="divisible by 3"):
        prune_model(model, PruningConfig(pattern="2:3"), calib_ids, QUIET)


def test_no_layers_left_is_an_error(calib_ids):
    with pytest.raises(ValueError, match="no linear layers to prune"):
        prune_model(make_tiny_model("llama"), PruningConfig(targets=["nothing"]), calib_ids, QUIET)


def test_bad_calibration_shape(calib_ids):
    with pytest.raises(ValueError, match="num_samples, seq_len"):
        prune_model(make_tiny_model("llama"), PruningConfig(), calib_ids[0], QUIET)


def test_token_ids_outside_the_vocabulary(calib_ids):
    with pytest.raises(ValueError, match="outside the model's vocabulary of 128"):
        prune_model(make_tiny_model("llama"), PruningConfig(), calib_ids + 128, QUIET)


def test_layers_sharing_an_input_share_their_statistics(calib_ids):
    from optimum_recon.engine.steps import StatisticsHooks
    from optimum_recon.masks import get_mask_method

    model = make_tiny_model("llama")
    _, blocks = find_blocks(model)
    layers = find_linear_layers(blocks[0])
    method = get_mask_method("sparsegpt")
    seen = {}
    for layer in layers:
        layer.module.register_forward_hook(lambda m, a, o, n=layer.name: seen.setdefault(n, []).append(a[0]))
    with StatisticsHooks(layers, method, torch.device("cpu")) as hooks, torch.no_grad():
        model(input_ids=calib_ids[:6], use_cache=False)
        model(input_ids=calib_ids[6:], use_cache=False)
    stats = hooks.stats
    assert stats["self_attn.k_proj"] is stats["self_attn.q_proj"] is stats["self_attn.v_proj"]
    assert stats["mlp.up_proj"] is stats["mlp.gate_proj"]
    assert len({id(v) for v in stats.values()}) == 4
    for name, inputs in seen.items():  # each equals the Hessian of that layer's own inputs
        x = torch.cat([i.reshape(-1, i.shape[-1]) for i in inputs[:2]])
        torch.testing.assert_close(stats[name].hessian, 2 * x.t() @ x / x.shape[0], rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("reconstruction", ["layer", "block"])
def test_statistics_come_from_the_pruned_models_inputs_only(reconstruction, calib_ids, monkeypatch):
    """The Hessian of each block's first layer equals X^T X of the pruned model's own inputs to it: no dense-path
    or held-out activations leak in (checked on q_proj, whose input is unaffected by pruning block i itself)."""
    from optimum_recon.masks.sparsegpt import SparseGPT

    recorded = []
    real = SparseGPT.prune
    monkeypatch.setattr(SparseGPT, "prune", lambda self, w, st, **kw: recorded.append(st.hessian.clone())
                        or real(self, w, st, **kw))
    model = make_tiny_model("llama")
    config = PruningConfig(method="sparsegpt", reconstruction=reconstruction, epochs=0, batch_size=5)
    prune_model(model, config, CalibrationSet(calib_ids, heldout=calib_ids.flip(0)[:3]), QUIET)
    _, blocks = find_blocks(model)
    inputs = {}
    for i, block in enumerate(blocks):
        block.self_attn.q_proj.register_forward_hook(lambda m, a, o, i=i: inputs.setdefault(i, []).append(a[0]))
    with torch.no_grad():
        model(input_ids=calib_ids, use_cache=False)
    for i in range(len(blocks)):
        x = inputs[i][0].reshape(-1, inputs[i][0].shape[-1])
        torch.testing.assert_close(recorded[7 * i], 2 * x.t() @ x / x.shape[0], rtol=1e-4, atol=1e-5)


def test_the_engine_writes_the_notes_of_the_data_and_of_the_run(calib_ids):
    calibration = CalibrationSet(calib_ids, notes=("c4 came from the bundled copy",))
    with pytest.warns(UserWarning, match="batch_size=64 is larger"):
        report = prune_model(make_tiny_model("llama"), PruningConfig(method="wanda", epochs=1, batch_size=64),
                             calibration, QUIET)
    assert report.notes[0] == "c4 came from the bundled copy" and "batch_size=64 is larger" in report.notes[1]
    assert report.calibration == calibration.describe() and report.calibration["for_masks"] == len(calib_ids)
