"""ReconPruner end to end on a saved tiny model: prune, evaluate, save atomically, reload."""

from __future__ import annotations

import dataclasses
import json
import os

import pytest
import torch
from huggingface_hub import ModelCard
from transformers import AutoModelForCausalLM

from optimum_recon import CalibrationConfig, PruningConfig, PruningReport, ReconPruner
from optimum_recon.report import REPORT_NAME


@pytest.fixture
def pruned(tiny_model_dir, text_file):
    config = PruningConfig(method="sparsegpt", pattern="2:4",
                           calibration=CalibrationConfig(source=str(text_file), num_samples=8, seq_len=32))
    pruner = ReconPruner.from_pretrained(str(tiny_model_dir), config=config)
    pruner.evaluate(str(text_file), seq_len=32, progress=False)
    pruner.prune(progress=False)
    pruner.evaluate(str(text_file), seq_len=32, progress=False)
    return pruner


def test_save_reload_is_bit_identical_and_keeps_zeros(pruned, tmp_path):
    out = pruned.save_pretrained(tmp_path / "out")
    for name in ("model.safetensors", "config.json", "pruning_config.json", REPORT_NAME, "README.md",
                 "tokenizer.json"):
        assert (out / name).is_file(), name
    reloaded = AutoModelForCausalLM.from_pretrained(out)
    state = pruned.model.state_dict()
    for name, tensor in reloaded.state_dict().items():
        assert torch.equal(tensor, state[name]), name
    down = reloaded.model.layers[0].mlp.down_proj.weight
    assert int((down.reshape(down.shape[0], -1, 4) != 0).sum(-1).max()) <= 2
    # the recipe as published: the local calibration file by its base name
    public = dataclasses.replace(pruned.config, calibration=dataclasses.replace(pruned.config.calibration,
                                                                                 source="text.txt"))
    assert PruningConfig.from_pretrained(out) == public
    report = PruningReport.load(out / REPORT_NAME)
    assert report.final_error == pytest.approx(pruned.report.final_error)
    assert set(report.perplexity[next(iter(report.perplexity))]) == {"dense", "pruned"}
    assert not [p for p in os.listdir(tmp_path) if p.startswith(".")]  # no temporary folders left


def test_model_card_metadata(pruned, tmp_path):
    out = pruned.save_pretrained(tmp_path / "out")
    card = ModelCard.load(out / "README.md")
    assert card.data.library_name == "transformers"
    assert {"optimum-recon", "pruned", "sparse", "sparsity-50", "2:4", "sparsegpt"} <= set(card.data.tags)
    assert "Limitations" in card.text and "| wikitext2 |" not in card.text


def test_failed_save_keeps_the_previous_model(pruned, tmp_path, monkeypatch):
    out = pruned.save_pretrained(tmp_path / "out")
    before = {p: (out / p).read_bytes() for p in os.listdir(out)}

    def boom(*args, **kwargs):
        raise OSError("simulated failure halfway through the save")

    monkeypatch.setattr(pruned.tokenizer, "save_pretrained", boom)
    with pytest.raises(OSError, match="simulated failure"):
        pruned.save_pretrained(out)
    assert {p: (out / p).read_bytes() for p in os.listdir(out)} == before
    assert not [p for p in os.listdir(tmp_path) if p.startswith(".")]


def test_prune_twice_is_refused(pruned):
    with pytest.raises(RuntimeError, match="already pruned"):
        pruned.prune(progress=False)


def test_missing_model_path_is_reported_before_loading(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        ReconPruner.from_pretrained(str(tmp_path / "no-such-model"))


def test_unreachable_hub_model_is_a_clear_error():
    with pytest.raises(OSError, match="could not load model 'someone/not-here'"):
        ReconPruner.from_pretrained("someone/not-here")


def test_prune_from_a_list_of_texts(tiny_model_dir):
    pruner = ReconPruner.from_pretrained(str(tiny_model_dir), read_calibration=False, config=PruningConfig(
        method="wanda", calibration=CalibrationConfig(num_samples=4, seq_len=16)))
    report = pruner.prune(["the quick brown fox jumps over the lazy dog " * 10] * 3, progress=False)
    assert report.num_calibration_tokens == 64
    assert report.config["method"] == "wanda"
    json.dumps(report.to_dict())


def test_data_fallbacks_are_recorded_in_the_report_and_card(tiny_model_dir, tmp_path):
    config = PruningConfig(method="magnitude", reconstruction="layer",
                           calibration=CalibrationConfig(source="c4", num_samples=2, seq_len=16))
    with pytest.warns(UserWarning, match="bundled"):  # shown when the data is read, before the model is loaded
        pruner = ReconPruner.from_pretrained(str(tiny_model_dir), config=config)
    report = pruner.prune(progress=False)
    assert any("using the copy bundled with optimum-recon" in note for note in report.notes)
    out = pruner.save_pretrained(tmp_path / "out")
    assert "Notes from the run" in (out / "README.md").read_text()


def test_save_pretrained_follows_the_folder_contract(pruned, tmp_path, tiny_model_dir):
    from optimum_recon.folders import OutputFolderError

    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "keep.txt").write_text("x")
    with pytest.raises(OutputFolderError, match="keep.txt"):
        pruned.check_output(mine)  # the same check, before any work
    with pytest.raises(OutputFolderError, match="already holds files"):
        pruned.save_pretrained(mine)
    assert (mine / "keep.txt").read_text() == "x"
    pruned.source_folder = str(tiny_model_dir)
    with pytest.raises(OutputFolderError, match="input model's folder"):
        pruned.save_pretrained(tiny_model_dir, overwrite=True)
    out = pruned.save_pretrained(mine, overwrite=True)
    assert not (out / "keep.txt").exists() and (out / "model.safetensors").is_file()
    assert pruned.save_pretrained(out) == out  # its own folder: saved again without overwrite


def test_a_live_partial_folder_is_never_removed(tmp_path):
    from optimum_recon.folders import PARTIAL_MARKER, remove_stale_partials

    live = tmp_path / ".out.partial-live"
    live.mkdir()
    (live / PARTIAL_MARKER).write_text(json.dumps({"pid": os.getpid(), "host": os.uname().nodename}))
    other_host = tmp_path / ".out.partial-remote"
    other_host.mkdir()
    (other_host / PARTIAL_MARKER).write_text(json.dumps({"pid": 1, "host": "another-machine"}))
    assert remove_stale_partials(tmp_path, "out") == [] and live.is_dir() and other_host.is_dir()


def test_a_failed_prune_is_not_saved(tiny_model_dir, text_file, tmp_path, monkeypatch):
    import optimum_recon.pruner as pruner_module

    config = PruningConfig(method="magnitude", reconstruction="layer",
                           calibration=CalibrationConfig(source=str(text_file), num_samples=4, seq_len=16))
    pruner = ReconPruner.from_pretrained(str(tiny_model_dir), config=config)

    def fail(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(pruner_module, "prune_model", fail)
    with pytest.raises(KeyboardInterrupt):
        pruner.prune(progress=False)
    with pytest.raises(RuntimeError, match="half pruned"):
        pruner.save_pretrained(tmp_path / "out")
    assert not (tmp_path / "out").exists()


# --- models already in memory, and calibration sets of the user's own ---------------------------------------
def _quick(**overrides):
    return PruningConfig(method="wanda", reconstruction="block", epochs=1, allocation="uniform",
                         calibration=CalibrationConfig(num_samples=4, seq_len=16, self_generate="off", **overrides))


def test_a_model_object_is_pruned_in_place(tiny_model_dir, tiny_tokenizer, text_file, tmp_path):
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    config = _quick(source=str(text_file))
    pruner = ReconPruner.from_pretrained(model, config, tokenizer=tiny_tokenizer)
    assert pruner.model is model and pruner.source_folder == str(tiny_model_dir)  # its folder is protected
    pruner.prune(progress=False)
    assert model.model.layers[0].mlp.up_proj.weight.eq(0).float().mean() == pytest.approx(0.5)
    card = (pruner.save_pretrained(tmp_path / "out") / "README.md").read_text()
    assert f"# {tiny_model_dir.name} pruned" in card and str(tmp_path) not in card
    # without tokenizer=, the one of the folder the model came from
    again = ReconPruner.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model_dir), config)
    assert again.tokenizer.get_vocab() == tiny_tokenizer.get_vocab()


def test_a_model_object_with_loading_arguments_or_no_origin_is_a_clear_error(tiny_model_dir):
    from conftest import make_tiny_model

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    with pytest.raises(ValueError, match="device_map applies to loading a model, and this one is already loaded"):
        ReconPruner.from_pretrained(model, device_map="auto", read_calibration=False)
    with pytest.raises(ValueError, match="pass tokenizer="):
        ReconPruner.from_pretrained(make_tiny_model("llama"), read_calibration=False)
    with pytest.raises(TypeError, match="not a transformers causal LM"):
        ReconPruner.from_pretrained(torch.nn.Linear(2, 2), read_calibration=False)
    with pytest.raises(TypeError, match="a Hub model id, a local folder or a transformers model, not dict"):
        ReconPruner.from_pretrained({"model": 1})
    model.peft_config = {}  # what a peft model carries
    with pytest.raises(ValueError, match="merge_and_unload"):
        ReconPruner.from_pretrained(model, read_calibration=False)


def test_prune_takes_a_calibration_set_or_heldout_ids(tiny_model_dir):
    from optimum_recon import CalibrationSet

    torch.manual_seed(0)
    ids, held = torch.randint(0, 128, (4, 16)), torch.randint(0, 128, (2, 16))
    guarded = ReconPruner.from_pretrained(str(tiny_model_dir), _quick(), read_calibration=False)
    report = guarded.prune(ids, heldout=held, progress=False)
    assert all(b.heldout_error is not None for b in report.blocks) and report.calibration["heldout"] == 2
    as_set = ReconPruner.from_pretrained(str(tiny_model_dir), _quick(), read_calibration=False)
    assert as_set.prune(CalibrationSet(ids, held), progress=False).calibration["heldout"] == 2
    # the same windows give the same model
    for a, b in zip(guarded.model.parameters(), as_set.model.parameters()):
        assert torch.equal(a, b)
    third = ReconPruner.from_pretrained(str(tiny_model_dir), _quick(), read_calibration=False)
    with pytest.raises(ValueError, match="do not match the calibration windows' 16"):
        third.prune(ids, heldout=held[:, :8], progress=False)
    with pytest.raises(ValueError, match="carries its own held-out windows"):
        third.prune(CalibrationSet(ids), heldout=held, progress=False)
