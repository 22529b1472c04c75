"""What the command-line robustness tests share: running the CLI and reading its one line (the `user` fixture, a
user's working folder, is in conftest.py).

Imported by `test_robustness.py` (bad input and interruptions) and `test_output_folders.py` (the output-folder
contract); docs/troubleshooting.md quotes how many cases the two hold together (`count_cases`).
"""

from __future__ import annotations

import hashlib
from pathlib import Path

from optimum_recon.cli import main


def snapshot(folder: Path) -> dict[str, str]:
    """Every file under ``folder`` with a hash of its bytes."""
    return {p.relative_to(folder).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def prune_argv(model, text, *extra, samples="4", seq="32"):
    return ["prune", "--model", str(model), "--calibration", str(text), "--num-samples", samples, "--seq-len", seq,
            "--reconstruction", "layer", "--method", "magnitude", "--no-progress", *extra]


def run_cli(argv, capsys):
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def one_line_error(err: str, message: str) -> None:
    lines = [line for line in err.splitlines() if line.startswith("optimum-recon: error:")]
    assert len(lines) == 1 and message in lines[0], err
    assert "Traceback" not in err


def count_cases(*modules) -> int:
    """The cases of test modules: one per test, or one per parameter set of a parametrized test."""
    count = 0
    for module in modules:
        for name, fn in vars(module).items():
            if not name.startswith("test_") or name == "test_troubleshooting_quotes_the_count":
                continue
            marks = [m for m in getattr(fn, "pytestmark", []) if m.name == "parametrize"]
            count += len(marks[0].args[1]) if marks else 1
    return count
