"""The held-out guard and lr="auto": the best epoch is kept, training that only hurts is undone, early stopping, the
rule scales with the weights, a number is used as given, and the defaults are reproducible."""

from __future__ import annotations

import math
import warnings

import pytest
import torch
from conftest import QUIET, VOCAB, make_tiny_model
from torch import nn

from optimum_recon import CalibrationConfig, CalibrationSet, PruningConfig, prune_model
from optimum_recon.reconstruction import WindowTask, train_window
from optimum_recon.reconstruction.guard import AUTO_LR_PER_RMS, HeldoutGuard, auto_learning_rate


def _task(heldout_error=None, seed=0, scale=1.0):
    """A window of one linear 'block' (16 -> 16, half its weights masked) fitting random targets."""
    torch.manual_seed(seed)
    layer = nn.Linear(16, 16)
    with torch.no_grad():
        layer.weight.mul_(scale)
    mask = torch.rand(16, 16) > 0.5
    with torch.no_grad():
        layer.weight.mul_(mask)
    inputs, targets = torch.randn(8, 4, 16), torch.randn(8, 4, 16)
    return WindowTask([layer], layer, inputs, targets, {layer.weight: mask}, torch.device("cpu"), seed=seed,
                      modules={layer.weight: layer}, heldout_error=heldout_error), layer


def _scripted(errors, layer):
    """A held-out measure that returns ``errors`` in turn and records the weights it was asked about."""
    seen = []

    def heldout_error():
        seen.append(layer.weight.detach().clone())
        return errors[len(seen) - 1]

    return heldout_error, seen


def test_the_guard_keeps_the_best_epoch_and_stops_after_the_patience():
    errors = [1.0, 0.8, 0.5, 0.7, 0.9, 0.4, 0.3]  # epochs 0..6; the best before two worse epochs is epoch 2
    task, layer = _task()
    task.heldout_error, seen = _scripted(errors, layer)
    info = train_window(task, PruningConfig(epochs=8, lr=1e-2, batch_size=4, patience=2))
    assert info["epochs_run"] == 4 and info["stopped_early"] and info["epoch_kept"] == 2
    assert info["heldout_per_epoch"] == errors[:5]
    assert torch.equal(layer.weight, seen[2])  # the weights measured at epoch 2, bit for bit
    assert not torch.equal(seen[4], seen[2])  # (training did move them afterwards)
    assert not info["reverted"]


def test_a_window_whose_training_only_hurts_keeps_its_masked_only_weights():
    task, layer = _task()
    start = layer.weight.detach().clone()
    task.heldout_error, _ = _scripted([1.0, 1.5, 2.0, 3.0, 4.0], layer)
    info = train_window(task, PruningConfig(epochs=4, lr=1e-2, batch_size=4, patience=2))
    assert info["reverted"] and info["epoch_kept"] == 0
    assert torch.equal(layer.weight, start)


def test_end_to_end_no_block_ends_above_its_masked_only_heldout_error_and_overfitting_is_cut(calib_ids):
    """Overfitting on purpose: 4 calibration windows, a large fixed lr, many epochs; held-out windows elsewhere."""
    torch.manual_seed(5)
    heldout = torch.randint(0, VOCAB, (8, 24))
    calibration = CalibrationSet(calib_ids[:4], heldout)
    config = PruningConfig(method="magnitude", epochs=12, lr=5e-2, batch_size=2)
    report = prune_model(make_tiny_model("llama"), config, calibration, QUIET)
    for block in report.blocks:  # (in the measure of the default loss, "relative", which the guard judges by)
        assert block.heldout_error_relative <= block.heldout_error_before_relative * (1 + 1e-6)
        curve = block.training["heldout_per_epoch"]
        assert block.heldout_error_relative == pytest.approx(min(curve), rel=1e-5)  # the kept is the best measured
    assert any(b.training["epoch_kept"] < len(b.training["loss_per_epoch"]) for b in report.blocks)
    unguarded = prune_model(make_tiny_model("llama"), PruningConfig(**{**config.__dict__, "guard": False}),
                            calibration, QUIET)
    assert report.blocks[-1].heldout_error_relative < unguarded.blocks[-1].heldout_error_relative


def test_a_number_is_used_as_given_and_an_improving_guard_changes_nothing():
    """With a held-out error that keeps falling, guarded training at a fixed lr is the paper's schedule exactly."""
    plain, plain_layer = _task()
    train_window(plain, PruningConfig(epochs=5, lr=3e-3, batch_size=4))
    task, layer = _task()
    task.heldout_error, _ = _scripted([1.0 - 0.1 * k for k in range(6)], layer)
    info = train_window(task, PruningConfig(epochs=5, lr=3e-3, batch_size=4))
    assert torch.equal(layer.weight, plain_layer.weight)
    assert info["lr"] == 3e-3 and not info["lr_auto"] and "lr_halved_after" not in info
    # and a worsening held-out error never changes a number either (it stops; it does not halve)
    task, layer = _task()
    task.heldout_error, _ = _scripted([1.0, 2.0, 0.9, 3.0, 4.0, 5.0], layer)
    info = train_window(task, PruningConfig(epochs=5, lr=3e-3, batch_size=4, patience=3))
    assert info["lr"] == 3e-3 and "lr_final" not in info


def test_auto_halves_the_rate_when_an_epoch_raises_the_heldout_error():
    task, layer = _task()
    task.heldout_error, seen = _scripted([1.0, 2.0, 0.9, 0.8, 0.7], layer)
    info = train_window(task, PruningConfig(epochs=4, batch_size=4))
    assert info["lr_auto"] and info["lr_halved_after"] == [1]
    assert info["lr_final"] == pytest.approx(info["lr"] / 2)
    assert info["epoch_kept"] == 4 and not info["reverted"]
    assert not torch.equal(seen[2], seen[1])


def test_auto_lr_scales_with_the_weights():
    small, _ = _task(scale=1.0)
    large, _ = _task(scale=10.0)
    lr_small, lr_large = auto_learning_rate(small.masks), auto_learning_rate(large.masks)
    assert lr_large == pytest.approx(10 * lr_small, rel=1e-6)
    (weight, mask), = small.masks.items()
    assert lr_small == pytest.approx(AUTO_LR_PER_RMS * float(weight.detach()[mask].pow(2).mean().sqrt()), rel=1e-6)


def test_auto_lr_differs_between_models_whose_weights_differ_in_scale(calib_ids):
    rates = []
    for scale in (1.0, 4.0):
        model = make_tiny_model("llama")
        with torch.no_grad():
            for name, p in model.named_parameters():
                if "layers" in name and p.dim() == 2:
                    p.mul_(scale)
        # uniform: OWL's allocation moves with the activations, which a scaled model changes non-linearly
        report = prune_model(model, PruningConfig(method="magnitude", epochs=1, batch_size=4, allocation="uniform"),
                             CalibrationSet(calib_ids[:8], calib_ids[8:]), QUIET)
        rates.append([b.training["lr"] for b in report.blocks])
    for small, large in zip(*rates):
        assert large == pytest.approx(4 * small, rel=1e-3)


def test_the_defaults_are_reproducible(calib_ids):
    calibration = CalibrationSet(calib_ids[:8], calib_ids[8:])
    runs = []
    for _ in range(2):
        model = make_tiny_model("llama")
        report = prune_model(model, PruningConfig(method="wanda", epochs=3, batch_size=4), calibration, QUIET)
        runs.append(([p.detach().clone() for p in model.parameters()],
                     [b.training["heldout_per_epoch"] for b in report.blocks]))
    assert runs[0][1] == runs[1][1]
    assert all(torch.equal(a, b) for a, b in zip(runs[0][0], runs[1][0]))


def test_the_guard_copies_the_weights_only_when_they_improve():
    weights = [nn.Parameter(torch.ones(3))]
    values = iter([1.0, 0.5, 0.6])
    guard = HeldoutGuard(weights, lambda: next(values), patience=1)
    with torch.no_grad():
        weights[0].fill_(2.0)
    assert guard.check() and guard.best_epoch == 1
    with torch.no_grad():
        weights[0].fill_(3.0)
    assert not guard.check() and guard.exhausted and guard.turned_up
    guard.restore()
    assert torch.equal(weights[0].detach(), torch.full((3,), 2.0))
    assert guard.seconds >= 0 and math.isfinite(guard.seconds)


# --- bad input ---------------------------------------------------------------------------------------------------

def test_guard_asked_for_without_heldout_windows_is_an_error(calib_ids):
    with pytest.raises(ValueError, match="heldout_samples=0"):
        PruningConfig(guard=True, calibration=CalibrationConfig(heldout_samples=0))
    with pytest.raises(ValueError, match="has none"):
        prune_model(make_tiny_model("llama"), PruningConfig(guard=True, epochs=1), calib_ids, QUIET)


def test_without_heldout_windows_training_is_unguarded_and_says_so(calib_ids):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        report = prune_model(make_tiny_model("llama"), PruningConfig(epochs=1, batch_size=4), calib_ids, QUIET)
    assert any("unguarded" in str(w.message) and "scale alone" in str(w.message) for w in caught)
    assert "epoch_kept" not in report.blocks[0].training and report.blocks[0].training["lr_auto"]
    assert any("unguarded" in note for note in report.notes)
    # heldout_samples=0 is the user's choice: no notice
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        prune_model(make_tiny_model("llama"), PruningConfig(epochs=1, batch_size=4, calibration=CalibrationConfig(
            heldout_samples=0)), calib_ids, QUIET)
    assert not any("unguarded" in str(w.message) for w in caught)


@pytest.mark.parametrize("lr", ["fast", 0.0, -1e-3, float("nan"), 2.0])
def test_bad_learning_rates_are_refused(lr):
    with pytest.raises(ValueError, match="lr="):
        PruningConfig(lr=lr)


@pytest.mark.parametrize("value", [-1, 1.5, "8", True])
def test_bad_heldout_counts_are_refused(value):
    with pytest.raises(ValueError, match="heldout_samples"):
        CalibrationConfig(heldout_samples=value)


def test_the_default_heldout_count_is_a_quarter_within_bounds():
    assert CalibrationConfig(num_samples=64).num_heldout == 16
    assert CalibrationConfig(num_samples=16).num_heldout == 8
    assert CalibrationConfig(num_samples=1024).num_heldout == 32
    assert CalibrationConfig(num_samples=64, heldout_samples=3).num_heldout == 3


def test_heldout_windows_when_no_document_is_left(tiny_tokenizer):
    from optimum_recon.data.calibration import sample_calibration_windows

    docs = ["one short document " * 40]  # a single document: the calibration windows use it
    with pytest.warns(UserWarning, match="no document"):
        ids, heldout = sample_calibration_windows(tiny_tokenizer, CalibrationConfig(num_samples=4, seq_len=16), docs,
                                                  with_heldout=True)
    assert heldout is None and ids.shape == (4, 16)
    with pytest.raises(ValueError, match="held-out windows"):
        sample_calibration_windows(tiny_tokenizer, CalibrationConfig(num_samples=4, seq_len=16, heldout_samples=4),
                                   docs, with_heldout=True)


def test_guard_with_layer_reconstruction_is_a_warning(calib_ids):
    with pytest.warns(UserWarning, match="nothing is trained"):
        prune_model(make_tiny_model("llama"), PruningConfig(reconstruction="layer", guard=True), calib_ids, QUIET)


def test_cross_block_windows_are_guarded_each(calib_ids):
    report = prune_model(make_tiny_model("llama"), PruningConfig(reconstruction="cross_block", epochs=3, batch_size=4),
                         CalibrationSet(calib_ids[:8], calib_ids[8:]), QUIET)
    windows = [w for b in report.blocks for w in b.reconstruction["windows"]]
    assert len({tuple(w["window"]) for w in windows}) == len(report.blocks) + 1  # [0], [0,1], [1,2], [2]
    for w in windows:
        curve = w["heldout_per_epoch"]
        assert curve[w["epoch_kept"]] <= curve[0] and len(curve) == w["epochs_run"] + 1


def test_the_defaults_on_every_architecture_never_end_a_block_above_its_masked_only_heldout_error(arch, calib_ids):
    torch.manual_seed(7)
    calibration = CalibrationSet(calib_ids[:8], torch.randint(0, VOCAB, (4, 24)))
    report = prune_model(make_tiny_model(arch), PruningConfig(method="wanda", epochs=3, batch_size=4), calibration,
                         QUIET)
    for block in report.blocks:  # in the guard's measure (the default loss's)
        assert block.heldout_error_relative <= block.heldout_error_before_relative * (1 + 1e-6)
        assert block.training["lr_auto"] and block.training["lr"] > 0 and "epoch_kept" in block.training


def test_lora_training_is_guarded_too(calib_ids):
    """The guard copies and restores the low-rank factors (the trainable tensors), and the merged weights keep the
    masks."""
    torch.manual_seed(8)
    calibration = CalibrationSet(calib_ids[:4], torch.randint(0, VOCAB, (4, 24)))
    model = make_tiny_model("llama")
    report = prune_model(model, PruningConfig(method="magnitude", epochs=6, lr=5e-2, batch_size=2, lora_rank=2,
                                                    allocation="uniform"),
                         calibration, QUIET)
    for block in report.blocks:
        assert block.heldout_error_relative <= block.heldout_error_before_relative * (1 + 1e-6)
        assert block.heldout_error_relative == pytest.approx(min(block.training["heldout_per_epoch"]), rel=1e-5)
    assert not any("lora" in name for name, _ in model.named_parameters())  # merged, nothing left behind
    for name, param in model.named_parameters():
        if "layers." in name and param.dim() == 2:  # the masks survived training and restoring
            assert float((param == 0).float().mean()) == pytest.approx(0.5, abs=0.02), name
