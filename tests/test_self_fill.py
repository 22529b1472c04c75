"""`self_generate="auto"`: the dense model tops up a calibration set too small to train on (data/self_fill.py)."""

import math
import warnings

import pytest
import torch
from conftest import make_tiny_model

from optimum_recon import CalibrationConfig, PruningConfig, ReconPruner
from optimum_recon.data import self_fill
from optimum_recon.data.self_fill import auto_self_samples, weights_per_fit
from optimum_recon.hub.card import build_model_card
from optimum_recon.modeling.offload import onload

# the tiny Llama's block: q and o 32x32, k and v 16x32 (2 of 4 heads), gate, up 64x32 and down 32x64
BLOCK_WEIGHTS = 2 * 32 * 32 + 2 * 16 * 32 + 3 * 32 * 64


def test_weights_per_fit_counts_what_training_sets():
    model = make_tiny_model("llama")
    assert weights_per_fit(model, PruningConfig(sparsity=0.5)) == BLOCK_WEIGHTS // 2
    assert weights_per_fit(model, PruningConfig(sparsity=0.75)) == BLOCK_WEIGHTS // 4
    assert weights_per_fit(model, PruningConfig(pattern="2:4")) == BLOCK_WEIGHTS // 2
    # CR sets the weights of `window` blocks in one fit; LoRA only its updates' r x (in + out)
    assert weights_per_fit(model, PruningConfig(reconstruction="cross_block", window=2)) == BLOCK_WEIGHTS
    lora = 4 * ((32 + 32) * 2 + (32 + 16) * 2 + (32 + 64) * 3)
    assert weights_per_fit(model, PruningConfig(lora_rank=4)) == lora
    assert weights_per_fit(model, PruningConfig(targets=["mlp"])) == 3 * 32 * 64 // 2


def test_auto_adds_what_reaches_one_target_per_weight_and_nothing_above():
    model, config = make_tiny_model("llama"), PruningConfig(sparsity=0.5)
    per_fit = BLOCK_WEIGHTS // 2  # 4,608 weights; a window of 16 tokens holds 16 x 32 = 512 targets
    count, info = auto_self_samples(model, config, num_windows=4, seq_len=16)
    assert count == math.ceil(per_fit / 512) - 4 == 5
    assert info["targets_per_weight"] == pytest.approx(4 * 512 / per_fit, abs=1e-4)
    assert info["targets_per_weight_after"] >= 1 > (4 + count - 1) * 512 / per_fit  # the least that reaches 1
    assert auto_self_samples(model, config, num_windows=9, seq_len=16)[0] == 0  # 9 x 512 >= 4,608
    assert auto_self_samples(model, PruningConfig(sparsity=0.75), num_windows=4, seq_len=16)[0] == 1
    # nothing is trained: nothing to overfit
    assert auto_self_samples(model, PruningConfig(reconstruction="layer"), 4, 16) == (0, {})
    assert auto_self_samples(model, PruningConfig(epochs=0), 4, 16) == (0, {})


def _pruner(tiny_model_dir, text_file, **calibration):
    settings = dict(source=str(text_file), num_samples=4, seq_len=16, heldout_samples=2, self_batch_size=4)
    config = PruningConfig(epochs=1, batch_size=4, calibration=CalibrationConfig(**{**settings, **calibration}))
    return ReconPruner.from_pretrained(str(tiny_model_dir), config=config)


def test_a_small_set_is_topped_up_for_reconstruction_only(tiny_model_dir, text_file, tmp_path, monkeypatch):
    monkeypatch.setenv("OPTIMUM_RECON_CACHE", str(tmp_path / "cache"))
    pruner = _pruner(tiny_model_dir, text_file)
    with pytest.warns(UserWarning, match="writes 5 more windows of 16 tokens"):
        report = pruner.prune(progress=False)
    cal = report.calibration
    assert (cal["external"], cal["self_generated"], cal["for_masks"], cal["heldout"]) == (4, 5, 4, 2)
    assert cal["generation"]["chosen"] == "auto" and cal["generation"]["targets_per_weight_after"] >= 1
    assert "5 more written by the dense model" in report.summary()
    card = build_model_card(pruner.config, report).content
    assert 'Another 5 sequences' in card and 'self_generate="auto"' in card and "self-generated-calibration" in card
    # the external windows are the same as without the top-up: masks come from them alone
    off = _pruner(tiny_model_dir, text_file, self_generate="off")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no top-up, no warning
        calibration = off.calibration_set()
    assert calibration.self_generated == 0
    assert torch.equal(calibration.ids, pruner.calibration_set().ids[:4])


def test_auto_leaves_explicit_counts_and_layer_wise_runs_alone(tiny_model_dir, text_file, tmp_path, monkeypatch):
    monkeypatch.setenv("OPTIMUM_RECON_CACHE", str(tmp_path / "cache"))
    given = _pruner(tiny_model_dir, text_file, source=f"{text_file}+self:2").calibration_set()
    assert given.self_generated == 2 and given.generation.get("chosen") is None
    pruner = _pruner(tiny_model_dir, text_file)
    pruner.config.reconstruction = "layer"
    assert pruner.calibration_set().self_generated == 0
    assert pruner.calibration_set(["some text " * 40] * 12).self_generated == 0  # texts given: used as given


def test_an_offloaded_model_is_not_asked_to_generate(tiny_model_dir, text_file, monkeypatch):
    monkeypatch.setattr(self_fill, "is_offloaded", lambda model: True)
    pruner = _pruner(tiny_model_dir, text_file)
    with pytest.warns(UserWarning, match="offloaded"):
        assert pruner.calibration_set().self_generated == 0


def test_generation_runs_where_the_blocks_will_run(monkeypatch):
    """A CPU model pruned on a GPU generates on the GPU when it fits there (and not at all when it does not)."""
    model = make_tiny_model("llama")
    size = sum(p.numel() * 4 for p in model.parameters())
    assert self_fill._generation_device(model, None) == (None, "")  # CPU only here: in place
    gpu = torch.device("cuda", 0)
    monkeypatch.setattr(self_fill, "check_device", lambda device: gpu)
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (2 * size, 4 * size))
    assert self_fill._generation_device(model, "cuda") == (gpu, "")
    asked = CalibrationConfig(source="c4+self:3", num_samples=4, seq_len=16)  # asked-for windows: there too
    assert self_fill.plan_self_fill(asked, model, PruningConfig(), device="cuda") == (0, {}, gpu)
    small = CalibrationConfig(source="c4", num_samples=4, seq_len=16)
    with pytest.warns(UserWarning, match="writes 5 more"):
        assert self_fill.plan_self_fill(small, model, PruningConfig(), device="cuda")[::2] == (5, gpu)
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (size, 4 * size))
    where, why = self_fill._generation_device(model, "cuda")
    assert where is None and "does not fit in cuda:0's free memory" in why
    with pytest.warns(UserWarning, match="Not generating more"):
        assert self_fill.plan_self_fill(small, model, PruningConfig(), device="cuda") == (0, {}, None)
    assert self_fill.plan_self_fill(asked, model, PruningConfig(), device="cuda") == (0, {}, None)  # where it is


def test_the_model_goes_back_where_it_was_even_after_a_failure():
    class Recorder(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.embed, self.moves = torch.nn.Embedding(4, 2), []

        def get_input_embeddings(self):
            return self.embed

        def to(self, device):
            self.moves.append(str(device))
            return self

    # the generation's move is `onload` (its branch for a model that is not offloaded)
    model = Recorder()
    with onload(model, torch.device("cpu"), keep_changes=False):
        pass
    assert model.moves == []
    with pytest.raises(RuntimeError, match="out of memory"):
        with onload(model, torch.device("cuda", 0), keep_changes=False):
            raise RuntimeError("out of memory")
    assert model.moves == ["cuda:0", "cpu"]


def test_recipes_written_before_it_existed_do_not_generate():
    data = PruningConfig().to_dict()
    del data["calibration"]["self_generate"]
    assert PruningConfig.from_dict(data).calibration.self_generate == "off"
    assert PruningConfig.from_dict({"sparsity": 0.5}).calibration.self_generate == "auto"  # hand-written: default
    with pytest.raises(ValueError, match="self_generate"):
        CalibrationConfig(self_generate="always")


def test_the_rule_reads_every_architecture(arch):
    """P and d come from the blocks' own linear layers (GPT-2's Conv1D included) and the config's hidden size."""
    from optimum_recon.modeling.blocks import find_blocks

    model = make_tiny_model(arch)
    _, blocks = find_blocks(model)
    linear = sum(m.weight.numel() for b in blocks for m in b.modules()
                 if isinstance(m, torch.nn.Linear) or type(m).__name__ == "Conv1D")
    assert weights_per_fit(model, PruningConfig(sparsity=0.5)) == round(linear / 2 / len(blocks))
    count, info = auto_self_samples(model, PruningConfig(sparsity=0.5), num_windows=1, seq_len=4)
    assert count > 0 and info["targets_per_weight_after"] >= 1 and self_fill.hidden_size(model) == 32
