"""Benchmark: self-generated calibration data on the bundled model.

Part 1 (default, a few minutes on 2 CPU cores): generation throughput of `optimum_recon`'s self-generation
(first tokens drawn from the vocabulary, progress bar, length control) against a bare `model.generate` loop
with the same settings and batches, alternating the two to share the machine's noise. Goal: overhead <= 10%.

Part 2 (`--quality`): SparseGPT 50% with BR+GP and BR+GP+CR, the external calibration (N C4 windows) fixed,
adding 0, N, 2N, 4N self-generated sequences (they feed reconstruction only, as in the paper): WikiText-2
perplexity, calibration and held-out final-block error, their gap, and wall time for each; a table, the JSON and
a plot (`self_generation.png`). About 45 minutes on 2 CPU cores with
`--quality-n 16 --seq-len 128 --epochs 4 --eval-tokens 16384`; the paper's scale (256 windows of 1024 tokens)
needs a GPU.

    python examples/benchmarks/self_generation.py [--num-samples 16] [--seq-len 128] [--quality]
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import torch
from _common import HERE, add_data_dir_argument, offline_env, run_metadata, write_results


def throughput(args) -> dict:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from optimum_recon import CalibrationConfig
    from optimum_recon.data.default_model import default_model_path
    from optimum_recon.data.self_generate import _first_tokens, generate_samples

    path = args.model or default_model_path()
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(path)
    cal = CalibrationConfig(source=f"self:{args.num_samples}", seq_len=args.seq_len, seed=0,
                            self_batch_size=args.batch_size)
    tokens = args.num_samples * args.seq_len
    ours, bare = [], []
    for _ in range(args.repeats):
        start = time.perf_counter()
        generate_samples(model, tokenizer, cal, args.num_samples, progress=False)
        ours.append(time.perf_counter() - start)
        generator = torch.Generator().manual_seed(0)
        start = time.perf_counter()
        for i in range(0, args.num_samples, args.batch_size):
            starts = _first_tokens(tokenizer, model.get_input_embeddings().num_embeddings,
                                   min(args.batch_size, args.num_samples - i), generator)
            with torch.no_grad():
                model.generate(input_ids=starts, attention_mask=torch.ones_like(starts), do_sample=True,
                               temperature=1.0, top_k=50, top_p=1.0, max_new_tokens=args.seq_len - 1,
                               min_new_tokens=args.seq_len - 1, pad_token_id=tokenizer.pad_token_id)
        bare.append(time.perf_counter() - start)
    best_ours, best_bare = min(ours), min(bare)
    return {"tokens": tokens, "ours_tok_s": tokens / best_ours, "bare_tok_s": tokens / best_bare,
            "overhead": best_ours / best_bare - 1, "ours_seconds": ours, "bare_seconds": bare}


def quality(args) -> list[dict]:
    from optimum_recon import CalibrationConfig, PruningConfig, ReconPruner

    rows = []
    for reconstruction in ("block", "cross_block"):
        for k in (0, args.quality_n, 2 * args.quality_n, 4 * args.quality_n):
            source = "c4" if k == 0 else f"c4+self:{k}"
            config = PruningConfig(method="sparsegpt", reconstruction=reconstruction, propagation="global",
                                   epochs=args.epochs, allocation="uniform",
                                   calibration=CalibrationConfig(source=source, num_samples=args.quality_n,
                                                                 seq_len=args.seq_len, heldout_samples=16,
                                                                 self_generate="off"))  # (the counts as given)
            pruner = ReconPruner.from_pretrained(args.model, config=config)
            start = time.perf_counter()
            report = pruner.prune(progress=False)
            seconds = time.perf_counter() - start
            ppl = pruner.evaluate("wikitext2", seq_len=1024, max_tokens=args.eval_tokens, progress=False)["wikitext2"]
            last = report.blocks[-1]
            rows.append({"reconstruction": reconstruction, "self_generated": k, "wikitext2": ppl.perplexity,
                         "calibration_error": last.error, "heldout_error": last.heldout_error,
                         "calibration_error_normalized": last.error_normalized,
                         "heldout_error_normalized": last.heldout_error_normalized,
                         "gap": last.heldout_error / last.error - 1, "seconds": seconds})
            print(rows[-1], flush=True)
    return rows


def plot_quality(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
    for name, marker in (("block", "o"), ("cross_block", "s")):
        mine = [r for r in rows if r["reconstruction"] == name]
        if not mine:
            continue
        ks = [r["self_generated"] for r in mine]
        label = "BR+GP" if name == "block" else "BR+GP+CR"
        left.plot(ks, [r["wikitext2"] for r in mine], marker=marker, label=label)
        right.plot(ks, [r["calibration_error"] for r in mine], marker=marker, linestyle="--",
                   label=f"{label}: calibration")
        right.plot(ks, [r["heldout_error"] for r in mine], marker=marker, label=f"{label}: held-out")
    left.set_xlabel("self-generated sequences added")
    left.set_ylabel("WikiText-2 perplexity")
    left.legend(fontsize=8)
    right.set_xlabel("self-generated sequences added")
    right.set_ylabel("final-block error (MSE)")
    right.legend(fontsize=8)
    fig.suptitle("SparseGPT 50% on the bundled model: adding self-generated calibration data")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None)
    parser.add_argument("--num-samples", type=int, default=16)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--quality", action="store_true")
    parser.add_argument("--quality-n", type=int, default=16)
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--eval-tokens", type=int, default=16384)
    parser.add_argument("--skip-throughput", action="store_true")
    parser.add_argument("--output", default=str(HERE / "results" / "self_generation.json"))
    add_data_dir_argument(parser)
    args = parser.parse_args()
    os.environ.update(offline_env(args.data_dir))
    output = Path(args.output)
    results = json.loads(output.read_text()) if output.is_file() else {}
    results.update({**run_metadata(), "settings": vars(args)})
    if not args.skip_throughput:
        results["throughput"] = throughput(args)
        t = results["throughput"]
        print(f"| generator | tokens/s |\n| --- | ---: |\n| optimum-recon | {t['ours_tok_s']:.1f} |\n"
              f"| bare model.generate | {t['bare_tok_s']:.1f} |\n\noverhead: {t['overhead']:+.1%} "
              f"({t['tokens']} tokens, best of {args.repeats})")
    if args.quality:
        results["quality"] = quality(args)
        print("| reconstruction | self-generated | WikiText-2 ppl | calibration error | held-out error | "
              "held-out / calibration - 1 | prune s |\n| --- | ---: | ---: | ---: | ---: | ---: | ---: |")
        for r in results["quality"]:
            print(f"| {r['reconstruction']} | {r['self_generated']} | {r['wikitext2']:.3f} | "
                  f"{r['calibration_error']:.4g} ({r['calibration_error_normalized']:.4f}) | "
                  f"{r['heldout_error']:.4g} ({r['heldout_error_normalized']:.4f}) | {r['gap']:+.1%} | "
                  f"{r['seconds']:.0f} |")
        plot_quality(results["quality"], output.with_name("self_generation.png"))
    write_results(Path(args.output), results)
    print(f"written to {args.output}")


if __name__ == "__main__":
    main()
