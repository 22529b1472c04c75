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
