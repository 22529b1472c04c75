"""What reconstruction minimizes: `loss="mse"` (the paper's) and `loss="relative"` (each token's error relative to
its size), in training, in the guard and in the report."""

from __future__ import annotations

import pytest
import torch
from conftest import QUIET, VOCAB, make_tiny_model

from optimum_recon import CalibrationSet, PruningConfig, prune_model
from optimum_recon.engine.steps import ErrorMeter
from optimum_recon.reconstruction.base import error_sum, error_terms


def test_relative_error_is_each_tokens_error_over_its_norm_averaged_over_tokens():
    torch.manual_seed(0)
    target, output = torch.randn(2, 3, 5), torch.randn(2, 3, 5)
    by_hand = sum(float(((output[b, t] - target[b, t]) ** 2).sum() / (target[b, t] ** 2).sum())
                  for b in range(2) for t in range(3))
    assert float(error_sum(output, target, "relative")) == pytest.approx(by_hand, rel=1e-6)
    assert float(error_sum(output, target, "mse")) == pytest.approx(float(((output - target) ** 2).sum()), rel=1e-6)
    assert error_terms(target, "relative") == 3 and error_terms(target, "mse") == 15


def test_a_token_with_a_massive_activation_counts_once_under_the_relative_loss():
    """Scaling one token (its target and its output) by 1000 leaves its relative term alone, while it then makes up
    nearly all of the MSE: the case of the first token of every window in a real LLM."""
    torch.manual_seed(1)
    target = torch.randn(1, 4, 8)
    output = target + 0.1 * torch.randn(1, 4, 8)
    big_t, big_o = target.clone(), output.clone()
    big_t[0, 0] *= 1000
    big_o[0, 0] *= 1000
    assert float(error_sum(big_o, big_t, "relative")) == pytest.approx(float(error_sum(output, target, "relative")),
                                                                     rel=1e-5)
    first = float(((big_o[0, 0] - big_t[0, 0]) ** 2).sum())
    assert first / float(error_sum(big_o, big_t, "mse")) > 0.99


def test_the_error_meter_agrees_with_the_loss_and_sums_over_batches():
    torch.manual_seed(2)
    pairs = [(torch.randn(3, 4, 6), torch.randn(3, 4, 6)) for _ in range(2)]
    meter = ErrorMeter()
    for y, t in pairs:
        meter.update(y, t)
    relative = sum(float(error_sum(y.double(), t.double(), "relative")) for y, t in pairs) / 24
    mse = sum(float(error_sum(y.double(), t.double(), "mse")) for y, t in pairs) / (24 * 6)
    assert meter.value("relative") == pytest.approx(relative, rel=1e-12)
    assert meter.value("mse") == pytest.approx(mse, rel=1e-12) and meter.mse == meter.value("mse")


def _calibration(calib_ids):
    torch.manual_seed(5)
    return CalibrationSet(calib_ids[:8], torch.randint(0, VOCAB, (8, 24)))


def test_the_relative_loss_trains_and_is_what_the_guard_judges(calib_ids):
    calibration = _calibration(calib_ids)
    report = prune_model(make_tiny_model("llama"), PruningConfig(method="magnitude", epochs=3, batch_size=4,
                                                                 loss="relative"), calibration, QUIET)
    for block in report.blocks:
        curve = block.training["heldout_per_epoch"]
        # the guard's E_0 is the masked-only held-out error in the relative measure, its kept value the final one
        assert curve[0] == pytest.approx(block.heldout_error_before_relative, rel=1e-5)
        assert block.heldout_error_relative == pytest.approx(curve[block.training["epoch_kept"]], rel=1e-5)
        assert block.heldout_error_relative <= block.heldout_error_before_relative * (1 + 1e-6)
        assert block.error_relative < block.error_before_relative  # training cut the calibration error it minimizes
    mse = prune_model(make_tiny_model("llama"), PruningConfig(method="magnitude", epochs=3, batch_size=4, loss="mse"),
                      calibration, QUIET)
    assert mse.blocks[0].training["heldout_per_epoch"][0] == pytest.approx(mse.blocks[0].heldout_error_before,
                                                                          rel=1e-5)
    assert not torch.equal(torch.tensor(mse.blocks[-1].error), torch.tensor(report.blocks[-1].error))


def test_the_losses_differ_in_what_they_train_toward(calib_ids):
    """Each loss ends lower in its own measure than the other loss does (same masks, same data, same steps)."""
    calibration = _calibration(calib_ids)
    runs = {loss: prune_model(make_tiny_model("llama"), PruningConfig(method="magnitude", epochs=6, batch_size=2,
                                                                      lr=1e-2, guard=False, loss=loss,
                                                                      allocation="uniform"),
                              calibration, QUIET) for loss in ("mse", "relative")}
    first = {loss: r.blocks[0] for loss, r in runs.items()}
    assert first["relative"].error_relative < first["mse"].error_relative
    assert first["mse"].error < first["relative"].error


def test_a_bad_loss_lists_the_valid_ones():
    with pytest.raises(ValueError, match="'mse', 'relative'"):
        PruningConfig(loss="l1")


def test_the_default_is_relative_and_a_recipe_written_before_the_setting_keeps_mse():
    assert PruningConfig().loss == "relative"
    old = PruningConfig().to_dict()
    del old["loss"], old["guard"]  # a pruning_config.json written before these settings existed
    recipe = PruningConfig.from_dict(old)
    assert recipe.loss == "mse" and recipe.guard is False
    by_hand = {"sparsity": 0.5}  # not written by optimum-recon: today's defaults
    assert PruningConfig.from_dict(by_hand).loss == "relative"
