#!/usr/bin/env bash
# Set up (with test tools) and run the default test suite; arguments go to pytest (e.g. -m slow).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh --dev
.venv/bin/ruff check optimum_recon optimum tests examples
exec .venv/bin/python -m pytest "$@"
