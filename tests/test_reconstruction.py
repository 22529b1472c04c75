"""BR / CR: training toward GP or local targets with fixed masks, window schedule, reproducibility."""

from __future__ import annotations

import contextlib
import copy
import warnings

import pytest
import torch
from conftest import QUIET, make_tiny_model

from optimum_recon import CalibrationSet, PruningConfig, prune_model
from optimum_recon.modeling import find_blocks, find_linear_layers
from optimum_recon.reconstruction import RECONSTRUCTIONS, BlockReconstruction, CrossBlockReconstruction

# uniform: these tests check every layer at exactly 50% (OWL's per-block shares: test_allocation.py)
FAST = dict(epochs=4, lr=1e-3, batch_size=4, allocation="uniform")


def _zeros_and_groups_ok(model, nm=None):
    _, blocks = find_blocks(model)
    for block in blocks:
        for layer in find_linear_layers(block):
            w = layer.weight
            if nm is None:
                assert float((w == 0).float().mean()) == pytest.approx(0.5, abs=0.02)
            else:
                assert int((w.reshape(w.shape[0], -1, nm[1]) != 0).sum(-1).max()) <= nm[0]


def test_br_lowers_the_error_against_lr_on_every_architecture(arch, calib_ids):
    lr_model, br_model = make_tiny_model(arch), make_tiny_model(arch)
    lr = prune_model(lr_model, PruningConfig(method="wanda", reconstruction="layer", **FAST), calib_ids, QUIET)
    br = prune_model(br_model, PruningConfig(method="wanda", reconstruction="block", **FAST), calib_ids, QUIET)
    for record in br.blocks:
        assert record.error < record.error_before  # training helped every block
    assert br.blocks[0].error_before == pytest.approx(lr.blocks[0].error, rel=1e-5)  # same masks, same start
    assert br.final_error < lr.final_error
    _zeros_and_groups_ok(br_model)


@pytest.mark.parametrize("reconstruction", ["block", "cross_block"])
def test_masks_stay_fixed_and_nm_groups_valid_after_training(reconstruction, calib_ids):
    model = make_tiny_model("gpt2")  # Conv1D: masks in the transposed layout
    config = PruningConfig(method="sparsegpt", pattern="2:4", reconstruction=reconstruction, **FAST)
    prune_model(model, config, calib_ids, QUIET)
    _zeros_and_groups_ok(model, (2, 4))


class _Spy(BlockReconstruction):
    """Records what each reconstruction step receives, then trains nothing."""

    name = "spy"
    calls: list = []
    window = 1

    def window_size(self, config):
        return self.window

    def reconstruct(self, task, config):
        _Spy.calls.append({"blocks": list(task.blocks), "inputs": task.inputs.clone(),
                           "targets": task.targets.clone(), "masks": dict(task.masks)})
        return {}


@pytest.fixture
def spy(monkeypatch):
    monkeypatch.setitem(RECONSTRUCTIONS, "spy", _Spy)
    _Spy.calls = []
    _Spy.window = 1
    return _Spy


def _dense_block_io(dense, ids):
    """Each dense block's (args, kwargs) and output from a plain forward pass."""
    _, blocks = find_blocks(dense)
    seen, handles = {}, []
    for i, block in enumerate(blocks):
        handles.append(block.register_forward_pre_hook(
            lambda m, a, k, i=i: seen.setdefault(i, {}).update(args=a, kwargs=k), with_kwargs=True))
        handles.append(block.register_forward_hook(
            lambda m, a, o, i=i: seen[i].update(out=o[0] if isinstance(o, tuple) else o)))
    with torch.no_grad():
        dense(input_ids=ids, use_cache=False)
    for handle in handles:
        handle.remove()
    return blocks, seen


@pytest.mark.parametrize("propagation", ["global", "local"])
def test_targets_match_an_independent_reference(spy, propagation, calib_ids):
    dense = make_tiny_model("qwen2")
    model = copy.deepcopy(dense)
    config = PruningConfig(method="magnitude", reconstruction="spy", propagation=propagation, batch_size=12)
    prune_model(model, config, calib_ids, QUIET)
    dense_blocks, dense_io = _dense_block_io(dense, calib_ids)
    for i, call in enumerate(spy.calls):
        if propagation == "global":  # the dense model's own hidden state after block i
            expected = dense_io[i]["out"]
        else:  # the dense block applied to the pruned model's input to block i
            with torch.no_grad():
                out = dense_blocks[i](call["inputs"], *dense_io[i]["args"][1:], **dense_io[i]["kwargs"])
            expected = out[0] if isinstance(out, tuple) else out
        torch.testing.assert_close(call["targets"], expected, rtol=1e-5, atol=1e-5)
    # GP and local targets really differ past the first block
    last = len(spy.calls) - 1
    assert torch.allclose(spy.calls[last]["targets"], dense_io[last]["out"]) == (propagation == "global")


def test_cross_block_windows_and_masks_chosen_once(spy, calib_ids, monkeypatch):
    from optimum_recon.masks.wanda import Wanda

    spy.window = 2
    calls = []
    real = Wanda.prune
    monkeypatch.setattr(Wanda, "prune", lambda self, w, s, **kw: calls.append(1) or real(self, w, s, **kw))
    model = make_tiny_model("llama", num_hidden_layers=4)
    report = prune_model(model, PruningConfig(method="wanda", reconstruction="spy"), calib_ids, QUIET)
    _, blocks = find_blocks(model)
    windows = [[list(blocks).index(b) for b in call["blocks"]] for call in spy.calls]
    assert windows == [[0], [0, 1], [1, 2], [2, 3], [3]]  # the paper's schedule: L + 1 windows, stride 1
    assert len(calls) == 4 * 7  # every linear layer of every block masked exactly once
    assert [r.index for r in report.blocks] == [0, 1, 2, 3]
    # every mask of a window's blocks is handed to training
    assert len(spy.calls[1]["masks"]) == 14


@pytest.mark.parametrize("propagation", ["global", "local"])
def test_cross_block_keeps_only_the_dense_activations_still_needed(propagation, calib_ids, monkeypatch):
    """After block s is finished, the blocks left in its window, s+1..s+w-1, still need their dense outputs
    x̄_{s+2}..x̄_{s+w} (the targets of their errors), never x̄_{s+1}: holding it was one depth of activations
    per split for nothing."""
    from optimum_recon.engine.sequential import _Run

    depths = []
    real = _Run.finalize

    def finalize(self, s, device):
        record = real(self, s, device)
        depths.append(sorted(self.calib.dense))
        return record

    monkeypatch.setattr(_Run, "finalize", finalize)
    model = make_tiny_model("llama", num_hidden_layers=5)
    prune_model(model, PruningConfig(method="wanda", reconstruction="cross_block", window=3, epochs=1, batch_size=4,
                                     propagation=propagation), calib_ids, QUIET)
    # after finishing s (window s..s+2) the targets x̄_{s+2}, x̄_{s+3} of the blocks left; x̄_5 is the run's end
    assert depths == [[2, 3], [3, 4], [4, 5], [5], [5]]


def test_br_measures_the_error_before_at_masking_without_a_snapshot(calib_ids, monkeypatch):
    """BR's inputs are final when a block is masked, so its "before" error is measured then and no copy of the
    untrained block is held through training; the numbers are those of the snapshot route CR needs."""
    from optimum_recon.engine.sequential import _Run

    torch.manual_seed(3)
    heldout = torch.randint(0, 128, (4, 24))
    config = PruningConfig(method="wanda", reconstruction="block", epochs=2, lr=1e-3, batch_size=4)
    held = []
    real_reconstruct = _Run.reconstruct

    def reconstruct(self, s, e, step, device):
        held.append(len(self.snapshots))
        return real_reconstruct(self, s, e, step, device)

    monkeypatch.setattr(_Run, "reconstruct", reconstruct)
    now = prune_model(make_tiny_model("qwen2"), config, CalibrationSet(calib_ids, heldout=heldout), QUIET)
    assert held == [0] * len(now.blocks) and now.blocks[1].error < now.blocks[1].error_before

    real_init = _Run.__init__

    def snapshot_route(self, *args, **kwargs):
        real_init(self, *args, **kwargs)
        self.before_at_masking = False

    monkeypatch.setattr(_Run, "__init__", snapshot_route)
    held.clear()
    later = prune_model(make_tiny_model("qwen2"), config, CalibrationSet(calib_ids, heldout=heldout), QUIET)
    assert held == [1] * len(later.blocks)
    for a, b in zip(now.blocks, later.blocks):
        assert (a.error_before, a.heldout_error_before, a.error) == (b.error_before, b.heldout_error_before, b.error)


def test_cross_block_trains_windows_jointly(calib_ids):
    model = make_tiny_model("llama")
    report = prune_model(model, PruningConfig(method="wanda", reconstruction="cross_block", **FAST), calib_ids, QUIET)
    assert [w["window"] for w in report.blocks[1].reconstruction["windows"]] == [[0, 1], [1, 2]]
    assert all(len(w["loss_per_epoch"]) == 4 for w in report.blocks[1].reconstruction["windows"])
    _zeros_and_groups_ok(model)


def test_training_is_reproducible(calib_ids):
    a, b = make_tiny_model("mistral"), make_tiny_model("mistral")
    config = PruningConfig(method="wanda", reconstruction="block", **FAST)
    prune_model(a, config, calib_ids, QUIET)
    prune_model(b, config, calib_ids, QUIET)
    for pa, pb in zip(a.parameters(), b.parameters()):
        assert torch.equal(pa, pb)


def test_loss_curve_goes_down_and_epochs_zero_is_lr(calib_ids):
    report = prune_model(make_tiny_model("llama"), PruningConfig(method="magnitude", **FAST), calib_ids, QUIET)
    losses = report.blocks[-1].reconstruction["windows"][0]["loss_per_epoch"]
    assert losses[-1] < losses[0]
    a, b = make_tiny_model("llama"), make_tiny_model("llama")
    prune_model(a, PruningConfig(method="sparsegpt", epochs=0), calib_ids, QUIET)
    prune_model(b, PruningConfig(method="sparsegpt", reconstruction="layer"), calib_ids, QUIET)
    for pa, pb in zip(a.parameters(), b.parameters()):
        assert torch.equal(pa, pb)


def test_gradient_checkpointing_gives_the_same_weights(calib_ids):
    a, b = make_tiny_model("gemma2"), make_tiny_model("gemma2")
    prune_model(a, PruningConfig(method="wanda", **FAST), calib_ids, QUIET)
    prune_model(b, PruningConfig(method="wanda", gradient_checkpointing=True, **FAST), calib_ids, QUIET)
    for pa, pb in zip(a.parameters(), b.parameters()):
        torch.testing.assert_close(pa, pb, rtol=1e-4, atol=1e-6)
    # the checkpointing wrappers are gone afterwards
    _, blocks = find_blocks(b)
    assert "forward" not in blocks[0].self_attn.__dict__


def test_bf16_autocast_trains(calib_ids):
    model = make_tiny_model("llama")
    report = prune_model(model, PruningConfig(method="wanda", train_dtype="bfloat16", **FAST), calib_ids, QUIET)
    assert all(torch.isfinite(torch.tensor(r.error)) for r in report.blocks)
    assert next(model.parameters()).dtype == torch.float32  # master weights stay fp32
    _zeros_and_groups_ok(model)


def test_auto_train_dtype_is_bf16_only_where_native(monkeypatch):
    from optimum_recon.reconstruction import training

    cpu = torch.device("cpu")
    monkeypatch.setattr(torch.cpu, "get_capabilities", lambda: {"amx_bf16": True})
    assert training.resolve_train_dtype("auto", cpu) == torch.bfloat16
    assert training.resolve_train_dtype("auto", cpu, torch.bfloat16) == torch.float32  # 16-bit weights: no autocast
    assert training.resolve_train_dtype("float32", cpu) == torch.float32  # a dtype given is used as given
    monkeypatch.setattr(torch.cpu, "get_capabilities", lambda: {"amx_bf16": False, "avx512_bf16": True})
    assert training.resolve_train_dtype("auto", cpu) == torch.float32  # emulated bf16 is slower than fp32
    assert training.resolve_train_dtype("bfloat16", cpu) == torch.bfloat16
    assert training.resolve_train_dtype("auto", torch.device("meta")) == torch.float32


@pytest.mark.parametrize("native", [True, False])
def test_auto_train_dtype_is_recorded_and_keeps_fp32_weights(calib_ids, monkeypatch, native):
    from optimum_recon.reconstruction import training

    monkeypatch.setattr(training, "native_bf16", lambda device: native)
    model = make_tiny_model("llama")
    report = prune_model(model, PruningConfig(method="wanda", **FAST), calib_ids, QUIET)
    assert {b.training["train_dtype"] for b in report.blocks} == {"bfloat16" if native else "float32"}
    assert {b.training["autocast"] for b in report.blocks} == {native}
    assert next(model.parameters()).dtype == torch.float32
    _zeros_and_groups_ok(model)


@pytest.mark.parametrize("train_dtype", ["auto", "bfloat16"])
def test_a_16_bit_model_trains_and_is_recorded_in_its_own_dtype(calib_ids, train_dtype):
    model = make_tiny_model("llama").to(torch.bfloat16)  # 16-bit weights: no autocast, whatever the hardware
    report = prune_model(model, PruningConfig(method="wanda", train_dtype=train_dtype, **FAST), calib_ids, QUIET)
    assert {(b.training["train_dtype"], b.training["autocast"]) for b in report.blocks} == {("bfloat16", False)}


def test_heldout_errors_are_reported_and_do_not_change_the_result(calib_ids):
    torch.manual_seed(5)
    heldout = torch.randint(0, 128, (6, 24))
    a, b = make_tiny_model("opt"), make_tiny_model("opt")
    config = PruningConfig(method="sparsegpt", **FAST)
    ra = prune_model(a, config, calib_ids, QUIET)
    rb = prune_model(b, config, CalibrationSet(calib_ids, heldout=heldout), QUIET)
    for pa, pb in zip(a.parameters(), b.parameters()):
        assert torch.equal(pa, pb)  # held-out windows never influence masks or training
    assert ra.blocks[-1].heldout_error is None
    assert rb.blocks[-1].heldout_error > 0 and rb.blocks[-1].heldout_error_before > 0


def test_bad_sizes_warn_with_what_was_done(calib_ids):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        prune_model(make_tiny_model("llama"), PruningConfig(reconstruction="cross_block", window=9, epochs=1,
                                                            batch_size=64), calib_ids, QUIET)
    messages = " ".join(str(w.message) for w in caught)
    assert "window=9 is larger than the model's 3 blocks; using 3" in messages
    assert "batch_size=64 is larger than the 12 calibration windows" in messages


@pytest.mark.parametrize("kwargs, message", [({"lr": 0}, "lr=0"), ({"epochs": -1}, "epochs=-1"),
                                             ({"window": 0}, "window=0"), ({"train_dtype": "fp8"}, "train_dtype")])
def test_bad_training_settings(kwargs, message):
    with pytest.raises(ValueError, match=message):
        PruningConfig(**kwargs)


def test_registry_names():
    assert RECONSTRUCTIONS["block"] is BlockReconstruction
    assert RECONSTRUCTIONS["cross_block"] is CrossBlockReconstruction


@pytest.mark.parametrize("arch_name", ["llama", "gpt2"])
def test_lora_merges_through_the_mask(arch_name, calib_ids):
    full_model, lora_model = make_tiny_model(arch_name), make_tiny_model(arch_name)
    full = prune_model(full_model, PruningConfig(method="wanda", pattern="2:4", **FAST), calib_ids, QUIET)
    lora = prune_model(lora_model, PruningConfig(method="wanda", pattern="2:4", lora_rank=2, **FAST), calib_ids, QUIET)
    _zeros_and_groups_ok(lora_model, (2, 4))
    for record in lora.blocks:
        assert record.error < record.error_before
    # no adapter is left behind: the model has exactly its original parameters
    assert sorted(n for n, _ in lora_model.named_parameters()) == sorted(n for n, _ in full_model.named_parameters())
    full_state = full.blocks[0].reconstruction["windows"][0]["optimizer_state_bytes"]
    lora_state = lora.blocks[0].reconstruction["windows"][0]["optimizer_state_bytes"]
    assert lora_state < full_state / 3


@pytest.mark.parametrize("arch_name", ["llama", "gpt2"])
@pytest.mark.parametrize("train_dtype", ["float32", "bfloat16"])
def test_lora_rebuilds_merged_weights_for_the_backward_instead_of_keeping_them(arch_name, calib_ids, monkeypatch,
                                                                               train_dtype):
    """Each layer's merged weight (W + B·A) ⊙ M (under autocast: its 16-bit copy) is what its matmul saves for the
    backward; it is saved as a recipe and rebuilt (nothing weight-sized is kept), with bit-identical training to
    keeping it."""
    from optimum_recon.reconstruction import lora as lora_module
    from optimum_recon.reconstruction import training

    # batches of 2 windows of 24 tokens: 48 rows, no layer's width (a 96-row activation would look like a weight)
    config = PruningConfig(method="wanda", lora_rank=2, epochs=2, lr=1e-3, batch_size=2, train_dtype=train_dtype)
    kept = make_tiny_model(arch_name)
    with monkeypatch.context() as patch:
        patch.setattr(training, "recomputed_merges", contextlib.nullcontext)
        prune_model(kept, config, calib_ids, QUIET)

    weight_shapes = {tuple(layer.weight.shape) for _, blocks in [find_blocks(kept)] for block in blocks
                     for layer in find_linear_layers(block)}
    packed, real_pack = [], lora_module._pack

    def pack(saved):
        result = real_pack(saved)
        if isinstance(result, lora_module._Rebuild) or result.is_floating_point():  # (the boolean masks are kept)
            packed.append(result if isinstance(result, lora_module._Rebuild) else tuple(result.shape))
        return result

    monkeypatch.setattr(lora_module, "_pack", pack)
    rebuilt = make_tiny_model(arch_name)
    prune_model(rebuilt, config, calib_ids, QUIET)
    rebuilds = [p for p in packed if isinstance(p, lora_module._Rebuild)]
    kept_shapes = {p for p in packed if not isinstance(p, lora_module._Rebuild)}
    assert rebuilds and not weight_shapes & (kept_shapes | {s[::-1] for s in kept_shapes if len(s) == 2})
    for a, b in zip(kept.parameters(), rebuilt.parameters()):
        assert torch.equal(a, b)


def test_plot_of_block_errors(calib_ids, tmp_path):
    pytest.importorskip("matplotlib")
    from optimum_recon.plotting import plot_block_errors

    heldout = calib_ids.flip(0)[:4]
    reports = {name: prune_model(make_tiny_model("llama"), PruningConfig(method="wanda", reconstruction=name, **FAST),
                                 CalibrationSet(calib_ids, heldout=heldout), QUIET) for name in ("layer", "block")}
    path = plot_block_errors(reports, tmp_path / "errors.png")
    data = (tmp_path / "errors.png").read_bytes()
    assert path.endswith("errors.png") and data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 10_000


def test_training_batches_of_a_size_no_data_batch_has(calib_ids):
    """12 windows split 6 + 6 (masks from the first 6) with batch_size 8: training batches of 8 get their
    block arguments from a probe captured for that size."""
    model = make_tiny_model("gemma2")
    report = prune_model(model, PruningConfig(method="wanda", epochs=2, batch_size=8),
                         CalibrationSet(calib_ids, for_masks=6), QUIET)
    assert all(w["steps"] == 2 for b in report.blocks for w in b.reconstruction["windows"])
