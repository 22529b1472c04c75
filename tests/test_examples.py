"""Every example runs end to end in its --tiny mode."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

EXAMPLES = sorted(p for p in (Path(__file__).resolve().parents[1] / "examples").glob("*.py"))


@pytest.mark.parametrize("script", EXAMPLES, ids=lambda p: p.stem)
def test_example_runs_tiny(script, tmp_path):
    env = dict(os.environ, OPTIMUM_RECON_CACHE=str(tmp_path / "cache"))
    result = subprocess.run([sys.executable, str(script), "--tiny"], capture_output=True, text=True, env=env,
                            cwd=tmp_path, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "sparsity" in result.stdout


def test_offload_benchmark_tiny(tmp_path):
    """The offload benchmark's big-model part, end to end on a tiny random model split between RAM and disk."""
    import json

    script = Path(__file__).resolve().parents[1] / "examples" / "benchmarks" / "offload.py"
    output = tmp_path / "offload.json"
    result = subprocess.run([sys.executable, str(script), "--tiny", "--work-dir", str(tmp_path / "work"),
                             "--output", str(output)], capture_output=True, text=True, timeout=600,
                            env=dict(os.environ, OPTIMUM_RECON_CACHE=str(tmp_path / "cache")))
    assert result.returncode == 0, result.stderr[-3000:]
    big = json.loads(output.read_text())["big"]
    assert "disk" in big["placement"] and big["reloaded_logits_finite"]
    assert abs(big["saved_sparsity"] - 0.5) < 1e-3
    assert {"load", "prune", "save", "reload"} <= set(big["peak_rss_by_phase"])
    assert (tmp_path / "offload_rss.png").stat().st_size > 0
    assert "saved sparsity" in result.stdout


def test_checkpoint_size_benchmark_tiny(tmp_path):
    """The checkpoint benchmark on a tiny random Llama, 2:4 only (each load is a new process): compact and dense with
    zeros load to the same weights and logits, and the compact linear bytes meet the format's arithmetic."""
    import json

    script = Path(__file__).resolve().parents[1] / "examples" / "benchmarks" / "checkpoint_size.py"
    output = tmp_path / "size.json"
    result = subprocess.run([sys.executable, str(script), "--models", "big", "--tiny", "--settings", "2:4",
                             "--repeats", "0", "--work-dir", str(tmp_path / "work"), "--output", str(output)],
                            capture_output=True, text=True, timeout=600,
                            env=dict(os.environ, OPTIMUM_RECON_CACHE=str(tmp_path / "cache")))
    assert result.returncode == 0, result.stderr[-3000:]
    rows = json.loads(output.read_text())["rows"]
    assert [(r["setting"], r["format"]) for r in rows] == [("dense", "dense"), ("2:4", "dense"), ("2:4", "bitmask"),
                                                           ("2:4", "bitmask, packed")]
    dense, compact, packed = rows[1:]
    for loaded in (compact, packed):  # (packed: each linear weight expanded for the hash, as forward expands it)
        assert (loaded["logits_sha256"], loaded["weights_sha256"]) == (dense["logits_sha256"], dense["weights_sha256"])
    assert compact["folder_bytes"] < dense["folder_bytes"] and compact["linear_ratio"] <= 0.56
    bad = subprocess.run([sys.executable, str(script), "--settings", "50%,40%"], capture_output=True, text=True)
    assert bad.returncode == 2 and "unknown 40%" in bad.stderr


def test_lora_memory_benchmark_tiny(tmp_path):
    """LoRA's optimizer state is measured from the optimizer and is the low-rank factors' (2 Adam moments each)."""
    import json

    script = Path(__file__).resolve().parents[1] / "examples" / "benchmarks" / "lora_memory.py"
    output = tmp_path / "lora.json"
    result = subprocess.run([sys.executable, str(script), "--tiny", "--output", str(output)], capture_output=True,
                            text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    full, lora = json.loads(output.read_text())["runs"]
    assert (full["lora_rank"], lora["lora_rank"]) == (0, 4)
    # tiny block: hidden 64, intermediate 128, 4 heads of 16, 2 key/value heads -> k/v width 32
    shapes = [(64, 64), (32, 64), (32, 64), (64, 64), (128, 64), (128, 64), (64, 128)]  # (out, in) of q k v o g u d
    linear = sum(o * i for o, i in shapes)
    assert full["block_parameters"] == linear + 2 * 64  # the linear weights and the two norms
    assert full["optimizer_state_mib"] * 2**20 == 2 * 4 * full["block_parameters"]  # fp32 exp_avg, exp_avg_sq
    factors = sum(4 * (o + i) for o, i in shapes)
    assert lora["optimizer_state_mib"] * 2**20 == 2 * 4 * (factors + 2 * 64)  # LoRA factors plus the norms
    assert "| tiny |" in result.stdout and "LoRA-4" in result.stdout


def test_reconstruction_benchmark_merges_rows_run_side_by_side(tmp_path):
    """Rows run into separate files are merged in the table's order; other settings are refused."""
    import json

    script = Path(__file__).resolve().parents[1] / "examples" / "benchmarks" / "reconstruction.py"

    def row(method, name, error, threads=2):
        blocks = [{"index": 0, "error": error / 2, "error_normalized": 0.01, "error_before": error / 2,
                   "heldout_error": error}, {"index": 1, "error": error, "error_normalized": 0.02,
                                             "error_before": error, "heldout_error": 2 * error}]
        return {"method": method, "row": name, "wikitext2": 30.0, "seconds": 10.0, "peak_rss_mib": 100.0,
                "final_error": error, "final_error_normalized": 0.02, "heldout_error": 2 * error,
                "heldout_error_normalized": 0.04, "optimizer_state_mib": 0.0, "torch_threads": threads,
                "per_block": blocks}

    settings = {"num_samples": 64, "seq_len": 512}
    main = tmp_path / "results.json"
    main.write_text(json.dumps({"commit": "a", "settings": settings, "runs": [row("sparsegpt", "BR+GP", 2.0)]}))
    side = tmp_path / "side.json"
    side.write_text(json.dumps({"commit": "b", "settings": settings,
                                "runs": [row("sparsegpt", "BR+GP", 9.0),
                                         {**row("sparsegpt", "LR", 8.0, threads=1), "resumed": True}]}))
    result = subprocess.run([sys.executable, str(script), "--output", str(main), "--merge", str(side)],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    merged = json.loads(main.read_text())
    assert [(r["row"], r["final_error"]) for r in merged["runs"]] == [("LR", 8.0), ("BR+GP", 2.0)]  # kept, ordered
    assert merged["commit"] == ["a", "b"]
    assert "| -75.0% |" in result.stdout and "8† |" not in result.stdout and "10†‡ |" in result.stdout
    assert "‡ resumed from its --checkpoint-dir" in result.stdout
    assert (tmp_path / "results_sparsegpt.png").stat().st_size > 0

    other = tmp_path / "other.json"
    other.write_text(json.dumps({"commit": "c", "settings": {"num_samples": 32}, "runs": []}))
    result = subprocess.run([sys.executable, str(script), "--output", str(main), "--merge", str(other)],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode != 0 and "other settings" in result.stderr


def test_learning_rate_benchmark_tiny(tmp_path):
    """The learning-rate sweep end to end on a tiny model: LR plus one row per learning rate, each over the
    truncated model's blocks with a loss curve per epoch."""
    import json

    script = Path(__file__).resolve().parents[1] / "examples" / "benchmarks" / "learning_rate.py"
    output = tmp_path / "lr.json"
    result = subprocess.run([sys.executable, str(script), "--tiny", "--lrs", "1e-3,1e-2", "--output", str(output)],
                            capture_output=True, text=True, timeout=600,
                            env=dict(os.environ, OPTIMUM_RECON_CACHE=str(tmp_path / "cache")))
    assert result.returncode == 0, result.stderr[-3000:]
    runs = json.loads(output.read_text())["runs"]
    assert [r["lr"] for r in runs] == [None, 1e-3, 1e-2]
    assert all(len(r["per_block"]) == 2 for r in runs)  # the model was cut to --blocks 2 of its 3
    assert runs[0]["loss_per_epoch"] == [[], []]  # LR trains nothing
    assert all(len(curve) == 2 for r in runs[1:] for (curve,) in r["loss_per_epoch"])  # 2 epochs per block
    assert runs[1]["final_error"] != runs[2]["final_error"]  # the learning rate reached the optimizer
    assert "| BR+GP lr 0.01 |" in result.stdout


def test_reconstruction_benchmark_resumes_a_finished_row(tmp_path):
    """--resume accepts a results file written with the same measurement settings and runs nothing for rows it
    holds: options that only say how to run (--merge, --rows, ...) must not count as settings."""
    import json

    script = Path(__file__).resolve().parents[1] / "examples" / "benchmarks" / "reconstruction.py"
    settings = {"model": None, "data_dir": str(tmp_path), "num_samples": 64, "seq_len": 512, "heldout": 16,
                "epochs": 10, "eval_tokens": 65536, "eval_seq_len": 1024}
    blocks = [{"index": 0, "error": 1.0, "error_normalized": 0.1, "error_before": 1.0, "heldout_error": 1.5}]
    row = {"method": "sparsegpt", "row": "LR", "wikitext2": 30.0, "seconds": 10.0, "peak_rss_mib": 100.0,
           "final_error": 1.0, "final_error_normalized": 0.1, "heldout_error": 1.5, "heldout_error_normalized": 0.15,
           "optimizer_state_mib": 0.0, "per_block": blocks}
    output = tmp_path / "results.json"
    output.write_text(json.dumps({"commit": "a", "settings": settings, "runs": [row]}))
    result = subprocess.run([sys.executable, str(script), "--resume", "--output", str(output), "--data-dir",
                             str(tmp_path), "--methods", "sparsegpt", "--rows", "LR",
                             "--checkpoint-dir", str(tmp_path / "ck")],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "done in" not in result.stdout  # nothing was run again
    assert json.loads(output.read_text())["runs"] == [row]

    # without --resume the same call refuses to replace the file's rows (it once lost four measured rows)
    result = subprocess.run([sys.executable, str(script), "--output", str(output), "--data-dir", str(tmp_path),
                             "--methods", "sparsegpt", "--rows", "LR"], capture_output=True, text=True, timeout=300)
    assert result.returncode != 0 and "already holds results: pass --resume" in result.stderr
    assert json.loads(output.read_text())["runs"] == [row]


def test_every_benchmark_prints_its_help():
    # argparse formats help lazily: a stray "%" in a help text (say "50%") only fails when a user asks for --help
    scripts = sorted((Path(__file__).resolve().parents[1] / "examples" / "benchmarks").glob("[a-z]*.py"))
    assert scripts
    for script in scripts:
        result = subprocess.run([sys.executable, str(script), "--help"], capture_output=True, text=True, timeout=120)
        assert result.returncode == 0 and "usage:" in result.stdout, f"{script.name}: {result.stderr[-2000:]}"
