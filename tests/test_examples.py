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
