"""Sparsity allocation: uniform, OWL and a user's table; the model's fraction of zeros is exact under each."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import QUIET, VOCAB, make_tiny_model

from optimum_recon import PruningConfig, prune_model
from optimum_recon.masks import magnitude_prune, sparsegpt_prune, wanda_prune
from optimum_recon.masks.allocation import (
    AllocationError,
    outlier_ratio,
    owl_sparsities,
    split_count,
    table_sparsities,
    zero_counts,
)
from optimum_recon.masks.base import row_keep_mask

# --- the numbers --------------------------------------------------------------------------------------------------

def test_zero_counts_make_the_total_exact_and_each_layer_within_one_weight():
    generator = torch.Generator().manual_seed(0)
    for _ in range(50):
        sizes = torch.randint(1, 5000, (7,), generator=generator).tolist()
        target = float(torch.rand((), generator=generator)) * 0.9
        # sparsities around the target whose weighted mean is the target
        noise = (torch.rand(7, generator=generator) - 0.5) * 0.1
        noise -= (noise * torch.tensor(sizes)).sum() / sum(sizes)
        sparsities = [min(max(target + float(d), 0.0), 0.99) for d in noise]
        total = sum(s * n for s, n in zip(sparsities, sizes)) / sum(sizes)
        counts = zero_counts(sparsities, sizes, total)
        assert sum(counts) == round(total * sum(sizes))
        for count, s, n in zip(counts, sparsities, sizes):
            assert abs(count - s * n) < 1 + 1e-9 and 0 <= count <= n


def test_zero_counts_refuse_a_sparsity_outside_0_1():
    with pytest.raises(AllocationError, match="layer 1 a sparsity of 1.1"):
        zero_counts([0.5, 1.1], [10, 10], 0.8)


def test_split_count_spreads_exactly_and_evenly():
    assert split_count(10, [4, 4, 4]) == [3, 3, 4]
    assert sum(split_count(12345, [128] * 7 + [17])) == 12345
    assert split_count(64, [128, 128]) == [32, 32]  # an even split stays as it was


def test_outlier_ratio_counts_scores_above_m_times_the_mean_over_the_whole_block():
    a = torch.ones(4, 5)  # 20 ones
    b = torch.ones(2, 5)
    b[0, 0] = 100.0  # mean of the 30 scores = (29 + 100) / 30 = 4.3; 5 x mean = 21.5: one outlier
    assert outlier_ratio([a, b], 5.0) == pytest.approx(1 / 30)
    assert outlier_ratio([a, b], 30.0) == 0.0


def test_owl_gives_the_blocks_with_more_outliers_less_sparsity_around_the_mean():
    ratios, sizes = [0.01, 0.05, 0.03, 0.02], [100, 100, 100, 100]
    s = owl_sparsities(ratios, sizes, 0.7, 0.08)
    assert sum(x * n for x, n in zip(s, sizes)) / sum(sizes) == pytest.approx(0.7)
    assert max(s) - min(s) == pytest.approx(0.16)  # the span is 2 lambda
    assert s[1] == min(s) and s[0] == max(s)  # most outliers: least sparsity
    assert owl_sparsities([0.02, 0.02], [5, 5], 0.5, 0.1) == [0.5, 0.5]  # nothing to tell the blocks apart
    assert owl_sparsities(ratios, sizes, 0.5, 0.0) == [0.5] * 4


def test_owl_weights_the_mean_by_block_size():
    s = owl_sparsities([0.0, 1.0], [300, 100], 0.5, 0.1)
    assert (s[0] * 300 + s[1] * 100) / 400 == pytest.approx(0.5)


def test_a_table_is_applied_as_given_and_the_rest_share_the_remainder():
    names = ["m.0.q", "m.0.mlp.up", "m.1.q", "m.1.mlp.up"]
    sizes = [100, 200, 100, 200]
    s = table_sparsities({"m.0": 0.3, "m.1.mlp.up": 0.8}, names, sizes, 0.5)
    assert s[:2] == [0.3, 0.3] and s[3] == 0.8
    assert sum(x * n for x, n in zip(s, sizes)) == pytest.approx(0.5 * 600)  # m.1.q takes the rest: 0.4
    assert table_sparsities({"m": 0.9, "m.0.q": 0.1}, names, sizes, 460 / 600)[0] == 0.1  # the longest key wins


@pytest.mark.parametrize("table,message", [
    ({"m.2": 0.5}, "'m.2', which is no pruned layer"),
    ({"m.0.q": 0.5, "m.0.mlp": 0.9, "m.1.mlp.up": 0.9}, "the 1 layer it does not name would need a sparsity of -1.1"),
    ({"m": 0.6}, "its overall sparsity is 0.6, not sparsity=0.5"),
    ({"m.0.ml": 0.5}, "no pruned layer"),  # a prefix must end on a dot boundary
])
def test_a_table_that_cannot_be_applied_says_why(table, message):
    names, sizes = ["m.0.q", "m.0.mlp.up", "m.1.q", "m.1.mlp.up"], [100, 200, 100, 200]
    with pytest.raises(AllocationError, match=message):
        table_sparsities(table, names, sizes, 0.5)


# --- exact counts in the mask methods -----------------------------------------------------------------------------

def test_row_masks_with_a_count_give_the_extra_zeros_to_the_rows_with_the_lowest_next_score():
    scores = torch.tensor([[1.0, 2.0, 3.0], [1.0, 9.0, 9.5], [1.0, 1.5, 9.0]])
    keep = row_keep_mask(scores, 0.0, num_prune=4)  # one per row, plus one in the row whose 2nd score is lowest
    assert (~keep).sum() == 4
    assert keep.tolist() == [[False, True, True], [False, True, True], [False, False, True]]


@pytest.mark.parametrize("method", ["magnitude", "wanda", "sparsegpt"])
def test_every_method_prunes_exactly_the_count_it_is_given(method):
    torch.manual_seed(0)
    weight = torch.randn(24, 300)
    x = torch.randn(400, 300)
    for count in (0, 1, 2161, 3600, 24 * 300 - 1):
        if method == "magnitude":
            result = magnitude_prune(weight, 0.5, num_prune=count)
        elif method == "wanda":
            result = wanda_prune(weight, x.pow(2).sum(0), 0.5, num_prune=count)
        else:
            result = sparsegpt_prune(weight, 2 * x.t() @ x / 400, 0.5, num_prune=count)
        assert int((~result.mask).sum()) == count
        assert torch.equal(result.weight == 0, ~result.mask) or count == 0


def test_without_a_count_the_methods_prune_as_before():
    torch.manual_seed(1)
    weight, x = torch.randn(8, 64), torch.randn(50, 64)
    h = 2 * x.t() @ x / 50
    for prune in (lambda c: magnitude_prune(weight, 0.5, num_prune=c), lambda c: sparsegpt_prune(weight, h, 0.5,
                  num_prune=c), lambda c: wanda_prune(weight, x.pow(2).sum(0), 0.5, num_prune=c)):
        assert torch.equal(prune(None).mask, prune(8 * 32).mask)


# --- through the engine -------------------------------------------------------------------------------------------

def _zeros_per_layer(model):
    out = {}
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear) and ".layers." in name:
            out[name] = (int((module.weight == 0).sum()), module.weight.numel())
    return out


def _ids(n=8, seq=16, seed=0):
    return torch.randint(0, VOCAB, (n, seq), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("allocation", ["uniform", "owl", {"model.layers.0": 0.5, "model.layers.2.mlp": 0.9}])
@pytest.mark.parametrize("method", ["magnitude", "wanda", "sparsegpt"])
def test_the_models_fraction_of_zeros_is_exact_under_every_policy(allocation, method):
    model = make_tiny_model("llama", num_hidden_layers=3)
    config = PruningConfig(method=method, sparsity=0.7, allocation=allocation, owl_lambda=0.1,
                           reconstruction="layer")
    report = prune_model(model, config, _ids(), QUIET)
    zeros = _zeros_per_layer(model)
    total = sum(n for _, n in zeros.values())
    assert sum(z for z, _ in zeros.values()) == round(0.7 * total)
    assert report.model_sparsity == pytest.approx(round(0.7 * total) / total, abs=1e-12)
    assert report.allocation["policy"] == (allocation if isinstance(allocation, str) else "table")
    assert [b.sparsity for b in report.blocks] == pytest.approx(report.allocation["block_sparsity"], abs=1e-12)
    if isinstance(allocation, dict):  # applied as given, to within a weight
        for name, (z, n) in zeros.items():
            expected = 0.5 if name.startswith("model.layers.0.") else 0.9 if name.startswith(
                "model.layers.2.mlp") else None
            if expected is not None:
                assert abs(z - expected * n) <= 1, name


def test_owl_gives_the_block_with_planted_outliers_the_lowest_sparsity():
    model = make_tiny_model("llama", num_hidden_layers=4)
    # a few very large weights in the last block's MLP: Wanda scores far above its mean (in the last block, so that
    # the larger activations they cause reach no later block's inputs)
    with torch.no_grad():
        model.model.layers[3].mlp.down_proj.weight[:, :2] *= 40.0
        model.model.layers[3].mlp.up_proj.weight[:3] *= 40.0
    config = PruningConfig(method="wanda", sparsity=0.6, allocation="owl", owl_lambda=0.08, reconstruction="layer")
    report = prune_model(model, config, _ids(), QUIET)
    ratios, sparsity = report.allocation["outlier_ratios"], report.allocation["block_sparsity"]
    assert ratios[3] == max(ratios)
    assert sparsity[3] == min(sparsity) and sparsity[3] < 0.6 - 0.05
    assert max(sparsity) - min(sparsity) == pytest.approx(0.16, abs=0.01)


def test_owl_with_lambda_too_large_for_the_sparsity_names_the_block_and_a_bound():
    model = make_tiny_model("llama", num_hidden_layers=3)
    config = PruningConfig(method="wanda", sparsity=0.9, allocation="owl", owl_lambda=0.3, reconstruction="layer")
    with pytest.raises(AllocationError, match=r"owl_lambda=0.3 would give block \d a sparsity of .*owl_lambda below"):
        prune_model(model, config, _ids(), QUIET)


def test_a_table_naming_a_layer_that_does_not_exist_is_an_error_before_any_block_is_pruned():
    model = make_tiny_model("llama", num_hidden_layers=3)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    config = PruningConfig(method="wanda", allocation={"model.layers.7": 0.5}, reconstruction="layer")
    with pytest.raises(AllocationError, match="'model.layers.7', which is no pruned layer.*model.layers.0"):
        prune_model(model, config, _ids(), QUIET)
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())


def test_owl_is_reproducible_and_the_same_with_activations_on_disk(tmp_path):
    from optimum_recon import Runtime

    reports = []
    for runtime in (QUIET, QUIET, Runtime(progress=False, activation_offload="disk", activation_folder=tmp_path)):
        model = make_tiny_model("llama", num_hidden_layers=3)
        config = PruningConfig(method="sparsegpt", sparsity=0.6, allocation="owl", reconstruction="layer")
        reports.append(prune_model(model, config, _ids(), runtime).allocation)
    assert reports[0]["block_sparsity"] == reports[1]["block_sparsity"] == reports[2]["block_sparsity"]


@pytest.mark.parametrize("bad,message", [
    (dict(allocation="owl", pattern="2:4"), "needs unstructured sparsity"),
    (dict(allocation="outlier"), "choose one of 'auto', 'uniform', 'owl'"),
    (dict(owl_lambda=0.5), "owl_lambda=0.5 is not valid"),
    (dict(owl_lambda=-0.1), "owl_lambda=-0.1 is not valid"),
    (dict(owl_threshold=0), "owl_threshold=0 is not valid"),
    (dict(allocation={"model.layers.0": 1.0}), r"allocation\['model.layers.0'\]=1.0 is not valid"),
    (dict(allocation={"": 0.5}), "allocation table key '' is not valid"),
])
def test_bad_allocation_settings_are_refused_with_the_reason(bad, message):
    with pytest.raises(ValueError, match=message):
        PruningConfig(**bad)


def test_the_allocation_survives_the_recipe_round_trip():
    config = PruningConfig(allocation={"model.layers.0": 0.3}, owl_lambda=0.05)
    again = PruningConfig.from_dict(config.to_dict())
    assert again.allocation == {"model.layers.0": 0.3} and again.owl_lambda == 0.05
    assert math.isclose(PruningConfig.from_dict({**config.to_dict(), "allocation": "owl"}).owl_lambda, 0.05)


def test_sparsegpt_leaves_the_callers_hessian_alone_unless_told_to_overwrite_it():
    torch.manual_seed(2)
    x = torch.randn(50, 16)
    h = 2 * x.t() @ x / 50
    h[3, 3] = 0.0  # a dead input, which the solve marks in the Hessian
    before = h.clone()
    sparsegpt_prune(torch.randn(4, 16), h, 0.5)
    assert torch.equal(h, before)


def test_the_card_says_how_the_sparsity_was_spread_and_each_blocks_share():
    from optimum_recon.hub import build_model_card

    model = make_tiny_model("llama", num_hidden_layers=3)
    config = PruningConfig(method="wanda", sparsity=0.6, allocation="owl", reconstruction="layer")
    report = prune_model(model, config, _ids(), QUIET)
    card = str(build_model_card(config, report))
    low, high = min(report.allocation["block_sparsity"]), max(report.allocation["block_sparsity"])
    assert "spread over the blocks by OWL" in card and f"blocks from {low:.1%} to {high:.1%}" in card
    assert "Sparsity per block (OWL): 0: " in card and "--allocation owl" in card
    assert "OWL" not in str(build_model_card(PruningConfig(method="wanda", reconstruction="layer",
                                                           allocation="uniform"), None))
    assert "OWL" not in str(build_model_card(PruningConfig(method="wanda", pattern="2:4"), None))
    default = str(build_model_card(PruningConfig(method="wanda"), None))
    assert "lambda = 0.08; the default for unstructured sparsity, `allocation=\"auto\"`)" in default


@pytest.mark.parametrize("value,expected", [("owl", "owl"), ("uniform", "uniform"), ("auto", "auto"),
                                            ('{"model.layers.0": 0.3}', {"model.layers.0": 0.3})])
def test_the_cli_reads_a_policy_a_json_table_or_a_table_file(value, expected, tmp_path):
    import argparse

    from optimum_recon.recipe import allocation_value

    assert allocation_value(value) == expected
    table = tmp_path / "table.json"
    table.write_text('{"model.layers.1.mlp": 0.65}')
    assert allocation_value(str(table)) == {"model.layers.1.mlp": 0.65}
    for bad in ("OWL", "[0.5]", "{broken", str(tmp_path / "missing.json")):
        with pytest.raises(argparse.ArgumentTypeError):
            allocation_value(bad)


def test_the_summary_says_how_the_sparsity_was_spread():
    model = make_tiny_model("llama", num_hidden_layers=3)
    report = prune_model(model, PruningConfig(method="wanda", sparsity=0.6, allocation="owl",
                                              reconstruction="layer"), _ids(), QUIET)
    text = report.summary()
    assert "sparsity spread over the blocks by OWL (outlier ratio above 5x the block mean, lambda 0.08" in text
    low = min(report.allocation["block_sparsity"])
    assert f"from {low:.2%}" in text
    assert "allocation='auto'" not in text and "requested" not in report.allocation
    uniform = prune_model(make_tiny_model("llama"), PruningConfig(method="wanda", reconstruction="layer",
                                                                  allocation="uniform"), _ids(), QUIET)
    assert "spread over" not in uniform.summary() and uniform.allocation["policy"] == "uniform"


@pytest.mark.parametrize("settings,policy", [
    (dict(), "owl"),                                   # the default: 50% unstructured
    (dict(sparsity=0.7, owl_lambda=0.1), "owl"),
    (dict(pattern="2:4"), "uniform"),                  # N:M fixes every layer's sparsity
    (dict(pattern="4:8", allocation="auto"), "uniform"),
    (dict(sparsity=0.1), "uniform"),                   # 0.1 - 2 x 0.08 < 0: a block could need a negative sparsity
    (dict(sparsity=0.9), "uniform"),                   # 0.9 + 2 x 0.08 >= 1
    (dict(sparsity=0.1, owl_lambda=0.05), "owl"),
    (dict(allocation="uniform"), "uniform"),
    (dict(allocation={"model.layers.0": 0.3}), "table"),
])
def test_auto_means_owl_where_it_fits_and_uniform_elsewhere(settings, policy):
    config = PruningConfig(**settings)
    assert config.allocation_policy == policy
    assert config.allocation == settings.get("allocation", "auto")  # the recipe keeps what was asked for


def test_the_default_runs_owl_and_says_it_was_chosen_by_default():
    model = make_tiny_model("llama", num_hidden_layers=3)
    report = prune_model(model, PruningConfig(method="wanda", sparsity=0.6, reconstruction="layer"), _ids(), QUIET)
    assert report.allocation["policy"] == "owl" and report.allocation["requested"] == "auto"
    assert len(set(report.allocation["block_sparsity"])) > 1
    assert "the default allocation='auto' for unstructured sparsity" in report.summary()
    nm = prune_model(make_tiny_model("llama", num_hidden_layers=3), PruningConfig(method="wanda", pattern="2:4",
                     reconstruction="layer"), _ids(), QUIET)
    assert nm.allocation["policy"] == "uniform" and set(nm.allocation["block_sparsity"]) == {0.5}


def test_a_recipe_written_before_allocation_existed_reruns_uniform():
    old = PruningConfig().to_dict()
    del old["allocation"], old["owl_threshold"], old["owl_lambda"]
    old["optimum_recon_version"] = "0.1.0"
    assert PruningConfig.from_dict(old).allocation == "uniform"
    assert PruningConfig.from_dict(PruningConfig().to_dict()).allocation == "auto"
