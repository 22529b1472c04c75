"""The command line, as a user runs it."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import pytest

from optimum_recon import PruningConfig
from optimum_recon.cli import main


def test_prune_eval_and_recipe(tiny_model_dir, text_file, tmp_path, capsys):
    out = tmp_path / "pruned"
    code = main(["prune", "--model", str(tiny_model_dir), "--sparsity", "0.5", "--pattern", "2:4", "--method", "wanda",
                 "--reconstruction", "layer", "--propagation", "global", "--calibration", str(text_file),
                 "--num-samples", "6", "--seq-len", "32", "--output", str(out), "--eval", str(text_file),
                 "--eval-seq-len", "32", "--no-progress"])
    assert code == 0
    printed = capsys.readouterr().out
    assert printed.count("perplexity: dense") == 1 and "saved to" in printed  # the result printed once
    config = PruningConfig.from_pretrained(out)
    assert (config.method, config.pattern, config.calibration.num_samples) == ("wanda", "2:4", 6)

    assert main(["eval", "--model", str(out), "--dataset", str(text_file), "--eval-seq-len", "32", "--no-progress",
                 "--json", str(tmp_path / "ppl.json")]) == 0
    result = json.loads((tmp_path / "ppl.json").read_text())["results"][str(text_file)]
    assert result["perplexity"] > 1 and result["seq_len"] == 32
    assert main(["eval", "--model", str(out), "--dataset", str(text_file), "--eval-seq-len", "32", "--no-progress",
                 "--json", str(tmp_path / "ppl.json")]) == 0  # its own earlier file: replaced without --overwrite

    # --recipe repeats the recipe; explicit flags win over it
    again = tmp_path / "again"
    assert main(["prune", "--model", str(tiny_model_dir), "--recipe", str(out), "--method", "magnitude",
                 "--output", str(again), "--no-progress", "--calibration", str(text_file)]) == 0
    repeated = PruningConfig.from_pretrained(again)
    assert (repeated.method, repeated.pattern, repeated.calibration.seq_len) == ("magnitude", "2:4", 32)


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--sparsity", "1.5"], "sparsity=1.5 is not valid"),
        (["--pattern", "3:2"], "pattern='3:2' is not valid"),
        (["--method", "obs"], "method='obs' is not valid"),
        (["--model", "./no/such/folder"], "model path './no/such/folder' does not exist"),
        (["--calibration", "missing.jsonl"], "does not exist"),
        (["--guard", "--heldout-samples", "0"], "guard=True judges training on held-out windows"),
        (["--allocation", "owl", "--pattern", "2:4"], "allocation='owl' needs unstructured sparsity"),
        (["--allocation", "owl", "--owl-lambda", "0.7"], "owl_lambda=0.7 is not valid"),
        (["--allocation", "{\"model.layers.0\": 1.5}"], "allocation['model.layers.0']=1.5 is not valid"),
    ],
)
def test_bad_input_is_one_clear_line(argv, message, tiny_model_dir, capsys):
    base = ["prune", "--model", str(tiny_model_dir), "--no-progress"]
    assert main(base + argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("optimum-recon: error:") and message in err and "Traceback" not in err
    assert "Loading weights" not in err  # reported before the model is loaded


def test_optimum_cli_plugin_is_registered():
    from pathlib import Path

    beside = Path(sys.executable).parent / "optimum-cli"  # the venv's, even when it is not activated
    exe = str(beside) if beside.exists() else shutil.which("optimum-cli")
    if exe is None:
        pytest.skip("optimum-cli is not on PATH")
    result = subprocess.run([exe, "recon", "prune", "--help"], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "--reconstruction" in result.stdout and "--calibration" in result.stdout


def test_console_script_version():
    result = subprocess.run([sys.executable, "-m", "optimum_recon.cli", "--version"], capture_output=True, text=True)
    assert result.returncode == 0 and result.stdout.startswith("optimum-recon ")


def test_training_flags_with_layer_reconstruction_are_named_as_ignored(tiny_model_dir, text_file, tmp_path, capsys):
    assert main(["prune", "--model", str(tiny_model_dir), "--reconstruction", "layer", "--lr", "2e-3", "--no-guard",
                 "--calibration", str(text_file), "--num-samples", "4", "--seq-len", "16", "--no-progress",
                 "--output", str(tmp_path / "out")]) == 0
    err = capsys.readouterr().err
    assert "--lr, --no-guard ignored" in err and "nothing is trained" in err


def test_lr_auto_and_the_guard_from_the_command_line(tiny_model_dir, text_file, tmp_path, capsys):
    out = tmp_path / "br"
    assert main(["prune", "--model", str(tiny_model_dir), "--lr", "auto", "--epochs", "2", "--batch-size", "2",
                 "--method", "magnitude", "--calibration", str(text_file), "--num-samples", "4", "--seq-len", "16",
                 "--no-progress", "--output", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "epoch kept" in printed and "every epoch judged on the held-out windows" in printed
    config = PruningConfig.from_pretrained(out)
    assert config.lr == "auto" and config.guard is None and config.calibration.heldout_samples is None
    card = (out / "README.md").read_text()
    heldout = json.loads((out / "pruning_report.json").read_text())["calibration"]["heldout"]
    assert 'lr="auto"' in card and f"judged on {heldout} held-out windows" in card and "--lr auto" in card


def test_prune_with_owl_then_repeat_the_recipe(tiny_model_dir, text_file, tmp_path):
    out, again = tmp_path / "owl", tmp_path / "again"
    assert main(["prune", "--model", str(tiny_model_dir), "--sparsity", "0.6", "--method", "wanda", "--allocation",
                 "owl", "--owl-lambda", "0.1", "--reconstruction", "layer", "--calibration", str(text_file),
                 "--num-samples", "6", "--seq-len", "32", "--output", str(out), "--no-progress"]) == 0
    report = json.loads((out / "pruning_report.json").read_text())
    assert report["allocation"]["policy"] == "owl" and len(set(report["allocation"]["block_sparsity"])) > 1
    assert "spread over the blocks by OWL" in (out / "README.md").read_text()
    table = tmp_path / "table.json"
    table.write_text('{"model.layers.0": 0.4}')
    assert main(["prune", "--model", str(tiny_model_dir), "--recipe", str(out), "--allocation", str(table),
                 "--output", str(again), "--no-progress", "--calibration", str(text_file)]) == 0
    repeated = PruningConfig.from_pretrained(again)
    assert repeated.allocation == {"model.layers.0": 0.4} and repeated.owl_lambda == 0.1 and repeated.sparsity == 0.6
    blocks = json.loads((again / "pruning_report.json").read_text())["blocks"]
    assert blocks[0]["sparsity"] == pytest.approx(0.4, abs=1e-3)


def test_eval_never_reads_calibration_data(tiny_model_dir, text_file, capsys, monkeypatch):
    import optimum_recon.pruner as pruner

    def refuse(*args, **kwargs):
        raise AssertionError("eval read calibration data")

    monkeypatch.setattr(pruner, "external_windows", refuse)
    assert main(["eval", "--model", str(tiny_model_dir), "--dataset", str(text_file), "--eval-seq-len", "32",
                 "--eval-max-tokens", "64", "--no-progress"]) == 0
    assert "c4" not in capsys.readouterr().err  # no "C4 could not be loaded" warning


def test_a_recipe_whose_local_data_is_not_here_says_what_it_was(tiny_model_dir, text_file, tmp_path, capsys,
                                                                 monkeypatch):
    out = tmp_path / "pruned"
    assert main(["prune", "--model", str(tiny_model_dir), "--reconstruction", "layer", "--calibration",
                 str(text_file), "--num-samples", "4", "--seq-len", "32", "--output", str(out), "--no-progress"]) == 0
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    assert main(["prune", "--model", str(tiny_model_dir), "--recipe", str(out), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "calibrated on a local file, 'text.txt' (sha256 " in err and "--calibration PATH" in err
    assert main(["prune", "--model", str(tiny_model_dir), "--recipe", str(out), "--calibration", str(text_file),
                 "--output", str(tmp_path / "again"), "--no-progress"]) == 0


def test_help_is_grouped_shows_choices_and_says_each_default_once(capsys):
    with pytest.raises(SystemExit):
        main(["prune", "--help"])
    text = capsys.readouterr().out
    titles = [line[:-1] for line in text.splitlines() if line and not line.startswith(" ") and line.endswith(":")]
    assert titles == ["options", "model", "what to prune", "reconstruction", "calibration data", "evaluation",
                      "output and Hub", "runtime", "examples"]
    assert "(default: None)" not in text and "(default: False)" not in text and "(default: )" not in text
    assert "--method {magnitude,sparsegpt,wanda,alps}" in text and "--loss {mse,relative}" in text
    assert "CALIBRATION_" not in text and "--num_samples" not in text  # the aliases are hidden
    assert "(default: 128)" in text and "--seed N " in text
    assert text.count("(default: ") == len([line for line in text.splitlines() if "(default: " in line])
    usage = text.split("\n\n")[0]
    assert len(usage.splitlines()) <= 3  # not a 40-line list of every flag


def test_underscore_spellings_of_the_flags_are_accepted(tiny_model_dir, text_file, tmp_path):
    out = tmp_path / "out"
    assert main(["prune", "--model", str(tiny_model_dir), "--reconstruction", "block", "--epochs", "1",
                 "--calibration", str(text_file), "--num_samples", "4", "--seq_len", "16", "--no_guard",
                 "--heldout_samples=0", "--self_generate", "off", "--no_progress", "--output", str(out)]) == 0
    config = PruningConfig.from_pretrained(out)
    assert (config.calibration.num_samples, config.calibration.seq_len, config.guard) == (4, 16, False)
    # the recipe's explicit flags are told apart in either spelling
    again = tmp_path / "again"
    assert main(["prune", "--model", str(tiny_model_dir), "--recipe", str(out), "--calibration", str(text_file),
                 "--seq_len", "8", "--no-progress", "--output", str(again)]) == 0
    assert PruningConfig.from_pretrained(again).calibration.seq_len == 8


def test_env_prints_what_a_bug_report_needs(capsys):
    assert main(["env"]) == 0
    text = capsys.readouterr().out
    for name in ("optimum-recon", "Python", "torch", "transformers", "accelerate", "huggingface_hub", "GPU"):
        assert f"- {name}: " in text or f"- {name} 0: " in text
    import torch
    import transformers

    assert f"- transformers: {transformers.__version__}" in text and torch.__version__ in text


def test_dry_run_prints_the_plan_without_loading_weights_or_data(tiny_model_dir, tmp_path, capsys, monkeypatch):
    import optimum_recon.modeling.loading as loading
    import optimum_recon.pruner as pruner

    def refuse(*args, **kwargs):
        raise AssertionError("the dry run loaded weights or read data")

    monkeypatch.setattr(loading, "load_model", refuse)
    monkeypatch.setattr(pruner, "external_windows", refuse)
    out = tmp_path / "new"
    assert main(["prune", "--model", str(tiny_model_dir), "--dry-run", "--num-samples", "16", "--seq-len", "32",
                 "--output", str(out), "--allocation", '{"model.layers.0": 0.3}']) == 0
    text = capsys.readouterr().out
    assert "no weights loaded, no data read" in text and "3 at model.layers, 7 linear layers each" in text
    assert "27,648 weights to prune" in text and "16 windows x 32 tokens = 512 tokens" in text
    assert "per block: 0: 30.0%, 1: 60.0%, 2: 60.0%" in text  # the table's block, the others share the rest
    assert "time         about" in text and "memory       about" in text and "GFLOP/s" in text
    assert "a new or empty folder" in text and not out.exists()
    # an output the real run would refuse: the plan, the reason, and the same exit code
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("x")
    assert main(["prune", "--model", str(tiny_model_dir), "--dry-run", "--output", str(mine)]) == 2
    captured = capsys.readouterr()
    assert "refused" in captured.out and "notes.txt" in captured.err
    # a pattern the model's widths do not allow fails as the real run would, before anything
    assert main(["prune", "--model", str(tiny_model_dir), "--dry-run", "--pattern", "3:7"]) == 2
    assert "divisible by 7" in capsys.readouterr().err


def test_the_dry_run_estimate_counts_what_the_recipe_adds(tiny_model_dir):
    from optimum_recon.dry_run import plan_prune_cost

    def plan(**settings):
        config = PruningConfig(calibration={"num_samples": 16, "seq_len": 32, "self_generate": "off"},
                               **{"allocation": "uniform", **settings})
        return plan_prune_cost(str(tiny_model_dir), "tiny", config)

    lr, br = plan(reconstruction="layer"), plan(reconstruction="block", epochs=10)
    assert lr.seconds["training (at most)"] == 0 and br.seconds["training (at most)"] > 0
    # FLOPs, not the measured rate, decide the ratio: 10 epochs of 3 passes over N and 1 over H, against 3N + 2H
    ratio = (br.seconds["training (at most)"] * br.flops_per_s) / (lr.seconds["masks and propagation"] * lr.flops_per_s
                                                                    - _solve_flops(lr))
    assert ratio == pytest.approx(10 * (3 * 16 + 8) / (3 * 16 + 2 * 8), rel=1e-6)
    owl = plan(reconstruction="layer", allocation="owl")  # one more pass over the N windows, for its statistics
    assert owl.seconds["masks and propagation"] * owl.flops_per_s - _solve_flops(owl) == pytest.approx(
        (lr.seconds["masks and propagation"] * lr.flops_per_s - _solve_flops(lr)) * (4 * 16 + 2 * 8) / (3 * 16 + 16))
    assert br.memory["one block at work"] > lr.memory["one block at work"]  # gradients, AdamW, the guard's copy
    assert plan(propagation="local").memory["activations between blocks"] == pytest.approx(
        1.5 * br.memory["activations between blocks"])


def _solve_flops(plan) -> float:
    return sum(o * i * i + i**3 for block in plan.layers for _, o, i in block)
