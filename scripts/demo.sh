#!/usr/bin/env bash
# The main job: set up, then prune the bundled SmolLM2-135M-Instruct to 50% with SparseGPT masks twice — masks
# only (LR) and with the recommended recipe (the defaults: OWL's allocation of the 50% over the blocks, each block
# trained toward the dense model's hidden states, every epoch judged on held-out windows, the learning rate chosen
# per block; both runs use the default allocation) — and print the dense, LR-only
# and final WikiText-2 perplexity side by side. The calibration budget, 32 C4 windows of 256 tokens (+8 held-out),
# is chosen to fit about 12 minutes on 2 CPU cores, setup included. Runs offline with the bundled data; set
# HF_HUB_OFFLINE=0 to use the Hub's C4 and WikiText-2 instead. Extra flags go to both `optimum-recon prune` runs
# (e.g. --pattern 2:4 --method wanda).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export HF_HUB_OFFLINE=${HF_HUB_OFFLINE:-1}
RECON=.venv/bin/optimum-recon
OUT=outputs/smollm2-135m-50
DATA=(--sparsity 0.5 --method sparsegpt --calibration c4 --num-samples 32 --seq-len 256)
echo "== 1/3 masks only (LR) =="
$RECON prune "${DATA[@]}" --reconstruction layer --output "$OUT-lr" "$@"
echo "== 2/3 the recommended recipe (the defaults: guarded block-wise reconstruction, lr=auto) =="
$RECON prune "${DATA[@]}" --output "$OUT" "$@"
echo "== 3/3 dense vs LR only vs recommended: WikiText-2 perplexity and reconstruction error =="
exec $RECON compare bundled "$OUT-lr" "$OUT" --names dense "LR only" recommended --no-latency \
  --datasets wikitext2 --eval-max-tokens 16384 --eval-seq-len 1024 --output outputs/comparison-50
