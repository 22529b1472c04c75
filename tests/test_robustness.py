"""Bad input and interruptions through the real command line, on a tiny model.

Every case asserts the exit code, the one-line message, that the error came before the model's weights were loaded
(where it can), and that no file of the user's was touched. The output-folder contract has its own file,
test_output_folders.py; docs/troubleshooting.md quotes how many cases the two hold (the last test keeps them in step).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from cli_cases import count_cases
from cli_cases import one_line_error as _one_line_error
from cli_cases import prune_argv as _prune
from cli_cases import run_cli as _run
from cli_cases import snapshot as _snapshot

from optimum_recon.folders import MARKER


# --- 1. finite settings, and training that diverges ---------------------------------------------------------
@pytest.mark.parametrize("flags, message", [
    (["--lr", "inf"], "lr=inf is not valid"),
    (["--lr", "nan"], "lr=nan is not valid"),
    (["--lr", "5"], "lr=5.0 is not valid"),
    (["--weight-decay", "nan"], "weight_decay=nan is not valid"),
    (["--weight-decay", "inf"], "weight_decay=inf is not valid"),
    (["--self-temperature", "inf"], "self_temperature=inf is not valid"),
    (["--dampening", "nan"], "dampening=nan is not valid"),
    (["--lora-alpha", "inf"], "lora_alpha=inf is not valid"),
    (["--adam-betas", "0.9", "nan"], "adam_betas[1]=nan is not valid"),
])
def test_non_finite_settings(flags, message, user, tiny_model_dir, text_file, capsys):
    code, _, err = _run(_prune(tiny_model_dir, text_file, *flags), capsys)
    assert code == 2
    _one_line_error(err, message)
    assert "Loading weights" not in err


def test_diverging_training_stops_and_saves_nothing(user, tiny_model_dir, text_file, capsys, monkeypatch):
    import optimum_recon.reconstruction.training as training

    real = training.error_sum
    monkeypatch.setattr(training, "error_sum", lambda *a, **k: real(*a, **k) * float("inf"))
    out = user / "out"
    code, _, err = _run(_prune(tiny_model_dir, text_file, "--reconstruction", "block", "--epochs", "2", "--lr",
                               "0.5", "--output", out), capsys)
    assert code == 2
    _one_line_error(err, "reconstruction of block 0 diverged in epoch 1")
    assert "lr=0.5" in err and "nothing was saved" in err and not out.exists()


# --- 2. a checkpoint whose weights are not the model its config describes -----------------------------------
def test_config_beside_other_weights(user, tiny_model_dir, text_file, capsys):
    from transformers import BertConfig

    BertConfig(vocab_size=128, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
               is_decoder=True).save_pretrained(tiny_model_dir)  # config.json replaced; Llama weights stay
    out = user / "out"
    code, _, err = _run(_prune(tiny_model_dir, text_file, "--output", out), capsys)
    assert code == 2
    _one_line_error(err, "does not hold the weights of the BertLMHeadModel")
    assert "missing from the checkpoint" in err and "--allow-missing-weights" in err and not out.exists()


# --- 3 and 4. malformed data, recipes, devices: one line naming the file and the fix ------------------------
def _write(path: Path, content: str | bytes) -> Path:
    (path.write_bytes if isinstance(content, bytes) else path.write_text)(content)
    return path


def _parquet_without_text(path: Path) -> Path:
    import datasets

    datasets.Dataset.from_dict({"id": [1, 2], "score": [0.5, 0.7]}).to_parquet(str(path))
    return path


CALIBRATION_FILES = {
    "jsonl row without the text field": (lambda d: _write(d / "a.jsonl", '{"text": "x y"}\n{"body": "y"}\n'),
                                         "a.jsonl': row 2 has no 'text' field"),
    "jsonl with two text-like columns": (lambda d: _write(d / "g.jsonl", '{"body": "x", "title": "y"}\n'),
                                         "no 'text' column and string columns ['body', 'title']"),
    "jsonl rows that are not objects": (lambda d: _write(d / "b.jsonl", '{"text": "a b"}\n[1, 2]\n'),
                                        "line 2 is a JSON list, not an object"),
    "invalid json": (lambda d: _write(d / "c.jsonl", '{"text": "a"}\n{"text": \n'),
                     "c.jsonl' line 2 is not valid JSON"),
    "binary file": (lambda d: _write(d / "d.txt", b"\xff\xfe\x00\x01" * 64), "d.txt' is not UTF-8 text"),
    "empty jsonl": (lambda d: _write(d / "e.jsonl", ""), "e.jsonl' holds no rows"),
    "parquet without a string column": (lambda d: _parquet_without_text(d / "f.parquet"), "--text-column"),
}


@pytest.mark.parametrize("case", list(CALIBRATION_FILES))
def test_bad_calibration_file(case, user, tiny_model_dir, capsys):
    make, message = CALIBRATION_FILES[case]
    path = make(user)
    code, _, err = _run(_prune(tiny_model_dir, path), capsys)
    assert code == 2
    _one_line_error(err, message)
    assert "Loading weights" not in err


RECIPES = {
    "targets of the wrong type": ({"targets": 5}, "targets=5 is not valid"),
    "a JSON list": ([1, 2], "is a JSON list, not an object of settings"),
    "calibration of the wrong type": ({"calibration": "c4"}, "'calibration' must be an object"),
    "invalid JSON": ("{not json", "is not valid JSON"),
    "non-finite lr": ({"lr": float("inf"), "reconstruction": "block"}, "lr=inf is not valid"),
}


@pytest.mark.parametrize("case", list(RECIPES))
def test_bad_recipe(case, user, tiny_model_dir, text_file, capsys):
    content, message = RECIPES[case]
    recipe = user / "recipe"
    recipe.mkdir()
    _write(recipe / "pruning_config.json", content if isinstance(content, str) else json.dumps(content))
    code, _, err = _run(_prune(tiny_model_dir, text_file, "--recipe", recipe), capsys)
    assert code == 2
    _one_line_error(err, message)
    assert "pruning_config.json" in err and "Loading weights" not in err


def test_recipe_from_a_future_version_is_flagged(user, tiny_model_dir, text_file, capsys):
    recipe = user / "recipe"
    recipe.mkdir()
    _write(recipe / "pruning_config.json", json.dumps({"optimum_recon_version": "99.0", "method": "magnitude",
                                                       "reconstruction": "layer", "new_knob": 3}))
    code, _, err = _run(_prune(tiny_model_dir, text_file, "--recipe", recipe), capsys)
    assert code == 0, err
    assert "written by optimum-recon 99.0, newer than this" in err and "new_knob" in err


@pytest.mark.parametrize("flags, message", [
    (["--dtype", "foo"], "dtype='foo' is not valid"),
    (["--dtype", "int8"], "dtype='int8' is not valid"),
    (["--device", "foo"], "device='foo' is not a device"),
    (["--device", "cuda:7"], "cuda:7"),
    (["--eval", "missing-eval.txt"], "does not exist"),
])
def test_bad_runtime_flags(flags, message, user, tiny_model_dir, text_file, capsys):
    if flags[:2] == ["--device", "cuda:7"] and torch.cuda.device_count() > 7:
        pytest.skip("this machine has a cuda:7")
    code, _, err = _run(_prune(tiny_model_dir, text_file, *flags), capsys)
    assert code == 2
    _one_line_error(err, message)
    assert "Loading weights" not in err


def test_cuda_without_a_gpu(user, tiny_model_dir, text_file, capsys):
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    code, _, err = _run(_prune(tiny_model_dir, text_file, "--device", "cuda"), capsys)
    assert code == 2
    _one_line_error(err, "no GPU is visible")


@pytest.mark.parametrize("make, message", [
    (lambda d: d / "empty-folder", "has no config.json"),
    (lambda d: d / "notes.txt", "is a file"),
])
def test_model_path_that_is_not_a_model(make, message, user, text_file, capsys):
    path = make(user)
    path.mkdir(exist_ok=True) if path.suffix == "" else None
    code, _, err = _run(_prune(path, text_file), capsys)
    assert code == 2
    _one_line_error(err, message)
    assert "not a local folder" not in err


# --- 5. leftovers: the checkpoint folder --------------------------------------------------------------------
def test_checkpoint_is_deleted_after_the_save_unless_kept(user, tiny_model_dir, text_file, capsys):
    ck = user / "ck"
    code, out, _ = _run(_prune(tiny_model_dir, text_file, "--output", user / "out", "--checkpoint-dir", ck), capsys)
    assert code == 0 and not ck.exists() and "deleted the finished run's checkpoint folder" in out
    code, out, _ = _run(_prune(tiny_model_dir, text_file, "--checkpoint-dir", ck), capsys)  # no --output
    assert code == 0 and (ck / "state.json").is_file() and "holds the finished run" in out
    (ck / "mine.txt").write_text("x")
    code, _, err = _run(_prune(tiny_model_dir, text_file, "--checkpoint-dir", ck), capsys)
    assert code == 2
    _one_line_error(err, "mine.txt")
    assert (ck / "mine.txt").read_text() == "x"


def test_checkpoint_dir_of_user_files_and_overlaps(user, tiny_model_dir, text_file, capsys):
    code, _, err = _run(_prune(tiny_model_dir, text_file, "--checkpoint-dir", user), capsys)
    assert code == 2
    _one_line_error(err, "--checkpoint-dir")
    code, _, err = _run(_prune(tiny_model_dir, text_file, "--output", user / "o", "--checkpoint-dir", user / "o"),
                        capsys)
    assert code == 2 and "Loading weights" not in err


# --- 6. fail fast ------------------------------------------------------------------------------------------
def test_compare_checks_every_model_before_the_first(user, tiny_model_dir, capsys, monkeypatch):
    monkeypatch.chdir(user)
    code, _, err = _run(["compare", tiny_model_dir, "./no-such-model", "--no-progress", "--no-latency"], capsys)
    assert code == 2
    _one_line_error(err, "no-such-model")
    assert "Loading weights" not in err and not (user / "comparison").exists()
    (user / "comparison").mkdir()
    (user / "comparison" / "mine.md").write_text("x")
    code, _, err = _run(["compare", tiny_model_dir, "--no-progress", "--no-latency"], capsys)
    assert code == 2
    _one_line_error(err, "mine.md")


def test_eval_json_never_replaces_a_user_file(user, tiny_model_dir, text_file, capsys):
    code, _, err = _run(["eval", "--model", tiny_model_dir, "--dataset", text_file, "--json", user / "notes.txt",
                         "--no-progress"], capsys)
    assert code == 2
    _one_line_error(err, "was not written by optimum-recon eval")
    assert (user / "notes.txt").read_text() == "my notes\n"


def test_generate_calibration_into_a_user_folder(user, tiny_model_dir, capsys):
    code, _, err = _run(["generate-calibration", "--model", tiny_model_dir, "--num-samples", "2", "--seq-len", "8",
                         "--output", user, "--no-progress"], capsys)
    assert code == 2
    _one_line_error(err, "already holds files")


def test_a_full_disk_while_checkpointing_names_the_folder_and_the_space(user, tiny_model_dir, text_file, capsys,
                                                                          monkeypatch):
    """torch.save reports a full disk as a bare RuntimeError from its C++ writer; the user must learn which file,
    how much it needed and how much is free, and the checkpoint written before must stay usable."""
    import optimum_recon.engine.checkpoint as checkpoint

    real_save, calls = torch.save, []

    def save(obj, path, *args, **kwargs):
        calls.append(path)
        if len(calls) > 1:  # the first block's activations are written, the second block's fail
            with open(path, "wb") as f:
                f.write(b"partial")
            raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 179315008 vs 179314896")
        return real_save(obj, path, *args, **kwargs)

    monkeypatch.setattr(checkpoint.torch, "save", save)
    monkeypatch.setattr("optimum_recon.folders.shutil.disk_usage",
                        lambda _: shutil._ntuple_diskusage(10**9, 10**9 - 4096, 4096))
    ck = user / "ck"
    code, _, err = _run(_prune(tiny_model_dir, text_file, "--checkpoint-dir", ck, "--output", user / "out"), capsys)
    assert code == 2
    _one_line_error(err, "cannot write a checkpoint file to")
    assert str(ck) in err and "MiB are free" in err and "unexpected pos" in err
    assert not (user / "out").exists()
    state = json.loads((ck / "state.json").read_text())
    assert state["next_block"] == 1 and (ck / state["activations"]).is_file()
    assert not [p for p in ck.iterdir() if p.name.startswith(".activations")]  # no half-written file left
    monkeypatch.setattr(checkpoint.torch, "save", real_save)
    code, out, err = _run(_prune(tiny_model_dir, text_file, "--checkpoint-dir", ck, "--output", user / "out"), capsys)
    assert code == 0 and "resum" in (out + err).lower(), err


def test_a_full_disk_while_saving_replaces_nothing_and_says_so(user, tiny_model_dir, text_file, capsys, monkeypatch):
    """safetensors reports a full disk as its own SafetensorError: still one line that says so, no partial folder,
    and the folder saved before is intact."""
    from safetensors import SafetensorError

    out = user / "out"
    code, _, _ = _run(_prune(tiny_model_dir, text_file, "--output", out), capsys)
    assert code == 0
    before = _snapshot(out)

    def full(*args, **kwargs):
        raise SafetensorError('Error while serializing: I/O error: No space left on device (os error 28)')

    monkeypatch.setattr("transformers.modeling_utils.safe_save_file", full)
    code, _, err = _run(_prune(tiny_model_dir, text_file, "--output", out), capsys)
    assert code == 2
    _one_line_error(err, "no space left on the device while saving to")
    assert "nothing was replaced" in err and _snapshot(out) == before
    assert [p.name for p in user.iterdir() if ".partial-" in p.name] == []


# --- 7. what a newcomer reads: one clean line per notice, results once --------------------------------------
def test_notices_are_one_clean_line_each(tmp_path, tiny_model_dir, capsys):
    code, out, err = _run(["prune", "--model", tiny_model_dir, "--calibration", "c4", "--num-samples", "2",
                           "--seq-len", "16", "--method", "magnitude", "--reconstruction", "layer", "--no-progress"],
                          capsys)
    assert code == 0
    notices = [line for line in err.splitlines() if "could not be loaded from the Hub" in line]
    assert len(notices) == 1 and notices[0].startswith("optimum-recon: warning: c4 (train)")
    assert "UserWarning" not in err and ".py:" not in err


# --- interruptions, through a real process ------------------------------------------------------------------
def test_ctrl_c_is_one_line_and_exit_130(user, tiny_model_dir, text_file):
    ck = user / "ck"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    argv = [sys.executable, "-m", "optimum_recon.cli"] + [str(a) for a in _prune(
        tiny_model_dir, text_file, "--reconstruction", "block", "--epochs", "100000", "--no-guard",
        "--checkpoint-dir", ck, "--output", user / "out")]
    # (a process started in the background inherits an ignored SIGINT: restore the default, as a terminal has it)
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    deadline = time.monotonic() + 120
    while not (ck / MARKER).exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.2)
    time.sleep(1.0)  # inside the training loop (unguarded: 100,000 epochs, never stopped early)
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err
    assert "Traceback" not in err and "optimum-recon: interrupted" in err and "resume" in err
    assert not (user / "out").exists()
    shutil.rmtree(ck)


def test_troubleshooting_quotes_the_count():
    page = (Path(__file__).resolve().parents[1] / "docs" / "troubleshooting.md").read_text()
    import test_output_folders

    cases = count_cases(sys.modules[__name__], test_output_folders)
    assert f"{cases} bad-input cases" in page, cases
