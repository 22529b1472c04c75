"""Benchmark: how much of the reconstruction error BR+GP removes as a function of the learning rate.

The paper's lr (2e-4) was tuned on LLaMA-7B and OPT-125M. AdamW moves each weight by about lr per step whatever
the gradient's scale, so what matters is lr relative to the weights' size, and the bundled SmolLM2-135M's
projection weights are large (mean |w| about 0.15; LLaMA-style models are initialized at a standard deviation of
0.02). This sweep prunes the first ``--blocks`` decoder blocks of the bundled model (``--method``, default
SparseGPT, 50% unstructured, global propagation) with LR and with BR+GP at each learning rate, keeping the
number of optimizer steps of the issue's setting (64 windows, batch 8, 10 epochs: 80 steps per block) but with
shorter windows by default so that it runs in minutes on a CPU, and reports the last block's error on the
calibration and held-out windows.

    python examples/benchmarks/learning_rate.py [--method wanda] [--blocks 4] [--lrs 2e-4,2e-3] [--seq-len 512]
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

from _common import HERE, add_data_dir_argument, offline_env, run_metadata, write_results


def run(args, lr: float | None) -> dict:
    """Prune the truncated bundled model; ``lr=None`` is LR (no training)."""
    import torch

    from optimum_recon import CalibrationConfig, PruningConfig, ReconPruner
    from optimum_recon.modeling import find_blocks

    # fixed rates as the paper trains (unguarded); "auto" is the library's default (guarded, lr chosen per block)
    guard = None if lr == "auto" else False
    # batch 8 as every row of the sweep was measured (the library's default became 4 later)
    training = {"epochs": 0} if lr is None else {"epochs": args.epochs, "lr": lr, "guard": guard, "batch_size": 8}
    config = PruningConfig(method=args.method, sparsity=0.5, reconstruction="layer" if lr is None else "block",
                           propagation="global", allocation="uniform", **training,
                           calibration=CalibrationConfig(source=args.source, num_samples=args.num_samples,
                                                         seq_len=args.seq_len, heldout_samples=args.heldout, seed=0))
    pruner = ReconPruner.from_pretrained(args.model, config=config)
    _, blocks = find_blocks(pruner.model)
    del blocks[args.blocks:]  # the first blocks only (any architecture): the rest would never be reached
    pruner.model.config.num_hidden_layers = args.blocks
    start = time.perf_counter()
    report = pruner.prune(progress=False)
    last = report.blocks[-1]
    return {"lr": lr, "seconds": time.perf_counter() - start, "torch_threads": torch.get_num_threads(),
            "final_error": last.error, "final_error_normalized": last.error_normalized,
            "heldout_error": last.heldout_error, "heldout_error_normalized": last.heldout_error_normalized,
            "per_block": [b.error for b in report.blocks],
            "loss_per_epoch": [[w.get("loss_per_epoch") for w in b.reconstruction.get("windows", [])]
                               for b in report.blocks]}


def table(results: dict) -> str:
    lr_row = next(r for r in results["runs"] if r["lr"] is None)
    lines = ["| setting | last-block error (normalized) | vs LR | held-out error (normalized) | vs LR | time (s) |",
             "| --- | ---: | ---: | ---: | ---: | ---: |"]
    for r in results["runs"]:
        name = "LR" if r["lr"] is None else "BR+GP default (guarded, lr auto)" if r["lr"] == "auto" else \
            f"BR+GP lr {r['lr']:g}"
        lines.append(
            f"| {name} | {r['final_error']:.4g} ({r['final_error_normalized']:.3g}) | "
            f"{r['final_error'] / lr_row['final_error'] - 1:+.0%} | {r['heldout_error']:.4g} "
            f"({r['heldout_error_normalized']:.3g}) | {r['heldout_error'] / lr_row['heldout_error'] - 1:+.0%} | "
            f"{r['seconds']:.0f} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None, help="default: the bundled SmolLM2-135M-Instruct")
    add_data_dir_argument(parser)
    parser.add_argument("--method", default="sparsegpt", choices=["sparsegpt", "wanda", "magnitude"])
    parser.add_argument("--blocks", type=int, default=4)
    parser.add_argument("--lrs", default="2e-4,1e-3,2e-3,5e-3", help="fixed rates (unguarded), or 'auto'")
    parser.add_argument("--num-samples", type=int, default=64)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--heldout", type=int, default=16)
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--source", default="c4", help="calibration data (a known name, Hub id or local file)")
    parser.add_argument("--output", default=str(HERE / "results" / "learning_rate.json"))
    parser.add_argument("--tiny", action="store_true", help="smoke test on a tiny random model (seconds)")
    args = parser.parse_args()
    if args.tiny:
        import tempfile

        from optimum_recon.testing import save_tiny_model, save_tiny_text

        work = Path(tempfile.mkdtemp(prefix="optimum-recon-lr-"))
        args.model, args.source = str(save_tiny_model(work / "model")), str(save_tiny_text(work / "text.txt"))
        args.blocks, args.num_samples, args.seq_len, args.heldout, args.epochs = 2, 16, 32, 4, 2
    os.environ.update(offline_env(args.data_dir))
    results = {**run_metadata(),
               "settings": {k: v for k, v in vars(args).items() if k != "output"}, "runs": []}
    for lr in [None, *(v if v == "auto" else float(v) for v in args.lrs.split(","))]:
        results["runs"].append(run(args, lr))
        print(f"{'LR' if lr is None else f'lr {lr}'}: last-block error {results['runs'][-1]['final_error']:.4g}",
              flush=True)
        write_results(Path(args.output), results)
    print(table(results))
    print(f"written to {args.output}")


if __name__ == "__main__":
    main()
