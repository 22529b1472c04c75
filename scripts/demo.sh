#!/usr/bin/env bash
# The main job: set up, then prune the bundled SmolLM2-135M-Instruct to 50% with SparseGPT (LR + GP)
# and print dense vs pruned WikiText-2 perplexity. Runs offline with the bundled data; set
# HF_HUB_OFFLINE=0 to use the Hub's C4 and WikiText-2 instead. Extra flags go to `optimum-recon prune`.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export HF_HUB_OFFLINE=${HF_HUB_OFFLINE:-1}
exec .venv/bin/optimum-recon prune --sparsity 0.5 --method sparsegpt --reconstruction layer --propagation global \
  --calibration c4 --num-samples 64 --seq-len 512 --eval wikitext2 --eval-max-tokens 16384 --eval-seq-len 1024 \
  --output outputs/smollm2-135m-sparsegpt-50 "$@"
