"""Benchmark: layer-wise pruning (LR) of the bundled model with every mask method and pattern.

What it measures, for SparseGPT / Wanda / magnitude at 50% unstructured and 2:4, LR with global
propagation, 128 C4 windows of 512 tokens, seed 0:
  * WikiText-2 test perplexity (first 65,536 tokens, windows of 1,024) of the dense and pruned model;
  * wall time of the prune and the peak RSS of the process (each run is its own process);
  * the engine's overhead: prune time / time of one full-model forward pass over the same calibration
    tokens (the floor is about 3: statistics, pruned and dense propagation; the goal is at most 4).

Usage (about an hour on 2 CPU cores; `--quick` runs a 2-minute smoke version):
    python examples/benchmarks/core_lr.py [--data-dir ../shared/data] [--output results/core_lr.json]
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
import time
from pathlib import Path

from _common import HERE, add_data_dir_argument, offline_env, run_metadata, write_results


def _forward_seconds(pruner, ids) -> float:
    """One full-model forward pass over the calibration windows, in the same batches as the engine."""
    import torch

    with torch.no_grad():
        start = time.perf_counter()
        for batch in ids.split(pruner.config.batch_size):
            pruner.model(input_ids=batch, use_cache=False)
        return time.perf_counter() - start


def run_dense(args) -> dict:
    from optimum_recon import ReconPruner

    pruner = ReconPruner.from_pretrained(args.model, config=_config(args, "sparsegpt", "unstructured"))
    ppl = pruner.evaluate("wikitext2", seq_len=args.eval_seq_len, max_tokens=args.eval_tokens, progress=False)
    return {"wikitext2": ppl["wikitext2"].perplexity, "eval_tokens": ppl["wikitext2"].num_tokens}


def _config(args, method: str, pattern: str):
    from optimum_recon import CalibrationConfig, PruningConfig

    return PruningConfig(sparsity=0.5, pattern=pattern, method=method, reconstruction="layer", propagation="global",
                         batch_size=args.batch_size, allocation="uniform",
                         calibration=CalibrationConfig(source="c4", num_samples=args.num_samples,
                                                       seq_len=args.seq_len, seed=0))


def run_one(args, method: str, pattern: str, measure_forward: bool) -> dict:
    from optimum_recon import ReconPruner

    pruner = ReconPruner.from_pretrained(args.model, config=_config(args, method, pattern))
    ids, _ = pruner.calibration_ids()
    forward_seconds = _forward_seconds(pruner, ids) if measure_forward else None  # same process, just before
    start = time.perf_counter()
    report = pruner.prune(ids, progress=False)
    prune_seconds = time.perf_counter() - start
    ppl = pruner.evaluate("wikitext2", seq_len=args.eval_seq_len, max_tokens=args.eval_tokens, progress=False)
    return {
        "method": method, "pattern": pattern, "wikitext2": ppl["wikitext2"].perplexity,
        "prune_seconds": prune_seconds, "engine_seconds": report.total_seconds, "peak_rss_mib": report.peak_rss_mib,
        "forward_seconds": forward_seconds,
        "overhead": report.total_seconds / forward_seconds if forward_seconds else None,
        "final_error": report.final_error, "final_error_normalized": report.blocks[-1].error_normalized,
        "sparsity": report.model_sparsity,
    }


def _child(args, *extra: str) -> dict:
    cmd = [sys.executable, __file__, *sys.argv[1:], "--child", *extra]
    out = subprocess.run(cmd, env=offline_env(args.data_dir), capture_output=True, text=True)
    if out.returncode != 0:
        sys.stderr.write(out.stderr[-4000:])
        raise SystemExit(f"benchmark child {extra} failed")
    return json.loads(out.stdout.strip().splitlines()[-1])


def table(results: dict) -> str:
    dense = results["dense"]
    lines = [
        f"dense WikiText-2 perplexity: {dense['wikitext2']:.3f} ({dense['eval_tokens']:,} tokens); one full forward "
        f"pass over the calibration tokens: {results['runs'][0]['forward_seconds']:.1f} s",
        "",
        "| method | pattern | WikiText-2 ppl | final-block error (normalized) | prune time (s) | overhead (x forward) "
        "| peak RSS (MiB) |",
        "| --- | --- | ---: | ---: | ---: | ---: | ---: |",
    ]
    forward = results["runs"][0]["forward_seconds"]
    for r in results["runs"]:
        overhead = f"{r['overhead']:.2f}" if r["overhead"] else f"{r['engine_seconds'] / forward:.2f}*"
        lines.append(
            f"| {r['method']} | {r['pattern']} | {r['wikitext2']:.3f} | {r['final_error']:.4g} "
            f"({r['final_error_normalized']:.4g}) | {r['prune_seconds']:.1f} | {overhead} | {r['peak_rss_mib']:,.0f} |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None, help="default: the bundled SmolLM2-135M-Instruct")
    add_data_dir_argument(parser)
    parser.add_argument("--num-samples", type=int, default=128)
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--eval-tokens", type=int, default=65536)
    parser.add_argument("--eval-seq-len", type=int, default=1024)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--methods", default="sparsegpt,wanda,magnitude")
    parser.add_argument("--patterns", default="unstructured,2:4")
    parser.add_argument("--quick", action="store_true", help="tiny sizes: a smoke test of this script")
    parser.add_argument("--output", default=str(HERE / "results" / "core_lr.json"))
    parser.add_argument("--child", nargs="*", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.quick:
        args.num_samples, args.seq_len, args.eval_tokens, args.eval_seq_len = 4, 64, 1024, 256
    if args.child is not None:
        result = run_dense(args) if args.child == ["dense"] else run_one(args, *args.child[:2],
                                                                           args.child[2] == "1")
        print(json.dumps(result))
        return

    meta = run_metadata()
    results = {"machine": f"{meta['machine']}, {platform.python_version()}",
               "commit": meta["commit"],
               "settings": {k: v for k, v in vars(args).items() if k not in ("child", "output")}, "runs": []}
    results["dense"] = _child(args, "dense")
    print(f"dense: {results['dense']}", flush=True)
    for method in args.methods.split(","):
        for pattern in args.patterns.split(","):
            first = "0" if results["runs"] else "1"  # the forward pass is timed once, in the first run
            results["runs"].append(_child(args, method, pattern, first))
            print(f"{method} {pattern}: {results['runs'][-1]}", flush=True)
    write_results(Path(args.output), results)
    print(table(results))
    print(f"written to {args.output}")


if __name__ == "__main__":
    main()
