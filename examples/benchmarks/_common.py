"""What every benchmark here shares: where the test data is, offline settings, and what machine and commit ran.

A helper module of the scripts beside it (they run as `python examples/benchmarks/NAME.py`, so this folder is on
their import path); not part of the package.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
from pathlib import Path

HERE = Path(__file__).resolve().parent
DEFAULT_DATA = HERE.parents[2] / "shared" / "data"  # the team's checkout keeps the test data beside the repo


def add_data_dir_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--data-dir", default=str(DEFAULT_DATA) if DEFAULT_DATA.is_dir() else None,
                        help="a folder laid out like c4/ and wikitext-2-raw/ (default: ../shared/data when it exists; "
                             "else the Hub, or the copies bundled with the package when offline)")


def offline_env(data_dir: str | None, base: dict | None = None) -> dict[str, str]:
    """``base`` (default: this process's environment) reading the data from ``data_dir`` and, unless the caller
    says otherwise with HF_HUB_OFFLINE, never waiting on the network."""
    env = dict(os.environ if base is None else base)
    env.setdefault("HF_HUB_OFFLINE", "1")
    if data_dir:
        env["OPTIMUM_RECON_DATA_DIR"] = str(Path(data_dir).resolve())
    return env


def run_metadata() -> dict[str, str]:
    """The machine and the commit a result was measured on."""
    commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=HERE, capture_output=True, text=True).stdout.strip()
    return {"machine": f"{platform.machine()}, {os.cpu_count()} CPU cores", "commit": commit}


def write_results(path: str | os.PathLike, results: dict) -> None:
    """Write a benchmark's results as indented JSON, creating the folder (called after every row, so that
    partial results survive an interrupted run)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(results, indent=2) + "\n")


def rss_mib() -> tuple[float, float, float]:
    """This process's (VmRSS, RssAnon, RssFile) now, in MiB: the resident total, anonymous memory, and mapped
    file pages (Linux; NaN where /proc/self/status lacks them)."""
    values = {}
    with open("/proc/self/status") as f:
        for line in f:
            key = line.split(":")[0]
            if key in ("VmRSS", "RssAnon", "RssFile"):
                values[key] = int(line.split()[1]) / 1024
    return tuple(values.get(k, float("nan")) for k in ("VmRSS", "RssAnon", "RssFile"))
