"""Benchmark: `compare` on the bundled model: dense, LR and BR+GP (SparseGPT 50% unstructured).

Prunes the bundled SmolLM2-135M-Instruct twice (LR+GP, and BR+GP with the paper's training settings), saves both,
then runs `compare_models` on the three: WikiText-2 perplexity, measured sparsity, final-block reconstruction
error, size on disk, prefill and decode tokens/s with `generate` (greedy, KV cache, warm-up then median of
repeats). Writes `comparison.md`, `comparison.json`, `perplexity.png` and `block_errors.png` into the output
folder and prints the table.

Usage (2 CPU cores: about 30 minutes at the defaults; `--tiny` runs a tiny random model in seconds):
    python examples/benchmarks/compare.py [--num-samples 32] [--seq-len 512] [--output results/compare]
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

from _common import HERE, add_data_dir_argument, offline_env, run_metadata


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_data_dir_argument(parser)
    parser.add_argument("--work-dir", default="/tmp/optimum-recon-compare")
    parser.add_argument("--num-samples", type=int, default=32)
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--eval-tokens", type=int, default=65536)
    parser.add_argument("--eval-seq-len", type=int, default=1024)
    parser.add_argument("--prompt-tokens", type=int, default=128)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--output", default=str(HERE / "results" / "compare"))
    parser.add_argument("--tiny", action="store_true", help="smoke test on a tiny random model")
    parser.add_argument("--reuse", action="store_true", help="reuse the pruned models already in --work-dir (only "
                        "evaluate again, e.g. to time the speed on an idle machine); prune times come from their "
                        "reports")
    args = parser.parse_args()
    os.environ.update(offline_env(args.data_dir))

    from optimum_recon import CalibrationConfig, PruningConfig, ReconPruner
    from optimum_recon.evaluation.compare import compare_models

    work = Path(args.work_dir)
    work.mkdir(parents=True, exist_ok=True)
    dense, source, dataset = None, "c4", "wikitext2"
    if args.tiny:
        from optimum_recon.testing import save_tiny_model, save_tiny_text

        dense = str(save_tiny_model(work / "dense"))
        source = dataset = str(save_tiny_text(work / "text.txt"))
        args.num_samples, args.seq_len, args.epochs, args.eval_tokens, args.eval_seq_len = 8, 32, 2, 2048, 32
        args.prompt_tokens, args.new_tokens, args.repeats = 16, 4, 2
    timings = {}
    pruned = []
    for name, reconstruction in (("LR", "layer"), ("BR+GP", "block")):
        folder = work / name.replace("+", "-").lower()
        if args.reuse and (folder / "pruning_report.json").is_file():
            timings[name] = json.loads((folder / "pruning_report.json").read_text())["total_seconds"]
            pruned.append(str(folder))
            continue
        config = PruningConfig(method="sparsegpt", sparsity=0.5, reconstruction=reconstruction, propagation="global",
                               epochs=args.epochs, allocation="uniform", calibration=CalibrationConfig(
                                   source=source, num_samples=args.num_samples, seq_len=args.seq_len, seed=0))
        pruner = ReconPruner.from_pretrained(dense, config=config)
        start = time.perf_counter()
        pruner.prune(progress=False)
        timings[name] = time.perf_counter() - start
        pruned.append(str(pruner.save_pretrained(folder)))
        del pruner
    comparison = compare_models(
        [dense, *pruned], names=["dense", "LR", "BR+GP"], datasets=[dataset], eval_seq_len=args.eval_seq_len,
        eval_max_tokens=args.eval_tokens, latency_kwargs=dict(prompt_tokens=args.prompt_tokens,
                                                              new_tokens=args.new_tokens, repeats=args.repeats),
        output_dir=args.output, progress=False)
    meta = {**run_metadata(),
            "settings": {k: v for k, v in vars(args).items() if k not in ("output", "data_dir")},
            "prune_seconds": timings}
    (Path(args.output) / "run.json").write_text(json.dumps(meta, indent=2) + "\n")
    print(comparison.to_markdown())
    print(f"prune seconds: {timings}; sparsity {comparison.models[1].sparsity:.3f}")
    print(f"written to {args.output}")


if __name__ == "__main__":
    main()
