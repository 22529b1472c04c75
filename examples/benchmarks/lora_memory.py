"""Benchmark: what LoRA reconstruction saves on a block of a real-sized model (optimizer state, peak memory, time).

On the bundled 135M model a block has 3.5M weights, so full-weight training's optimizer state is 27 MiB and
LoRA's saving disappears in the process's memory. The saving matters for large blocks: this script builds a
one-block Llama with the decoder-block shape of a published model (random weights, a vocabulary of 256 so that
the block is nearly all of the memory) and reconstructs that block with BR — full weights
and LoRA of each rank — each in its own process, for a few steps on random token windows. It reports the
optimizer state that training held (measured from the optimizer), the peak RSS during pruning over the RSS
right before it, and the seconds per training step.

Only memory and time mean something here: the weights and data are random, so the errors are not reported
(`reconstruction.py` measures what LoRA costs in error and perplexity on the bundled model).

    python examples/benchmarks/lora_memory.py [--shapes llama-7b,llama-13b] [--ranks 0,16,64] [--steps 4]
    python examples/benchmarks/lora_memory.py --tiny   # a few seconds, for the tests
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

from _common import HERE, rss_mib, run_metadata, write_results

# the decoder-block shapes of published models (hidden, intermediate, heads, key/value heads)
SHAPES = {
    "tiny": (64, 128, 4, 2),
    "llama-7b": (4096, 11008, 32, 32),  # Llama-2-7B
    "llama-13b": (5120, 13824, 40, 40),  # Llama-2-13B
    "llama-70b": (8192, 28672, 64, 8),  # Llama-2-70B (about 14 GiB of host memory for full-weight training)
}


def run_one(shape: str, rank: int, steps: int, seq_len: int) -> dict:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from optimum_recon import PruningConfig, Runtime, prune_model

    hidden, intermediate, heads, kv_heads = SHAPES[shape]
    config = LlamaConfig(vocab_size=256, hidden_size=hidden, intermediate_size=intermediate, num_hidden_layers=1,
                         num_attention_heads=heads, num_key_value_heads=kv_heads, max_position_embeddings=seq_len)
    torch.manual_seed(0)
    model = LlamaForCausalLM(config).eval()
    batch = 2
    ids = torch.randint(0, config.vocab_size, (batch * steps, seq_len), generator=torch.Generator().manual_seed(0))
    # magnitude masks: no statistics pass and no SparseGPT solve, so the time is the training's
    recipe = PruningConfig(method="magnitude", sparsity=0.5, reconstruction="block", epochs=1, batch_size=batch,
                           lora_rank=rank, allocation="uniform")
    before = rss_mib()[0]
    start = time.perf_counter()
    report = prune_model(model, recipe, ids, Runtime(progress=False))
    seconds = time.perf_counter() - start
    window = report.blocks[0].reconstruction["windows"][0]
    block = model.model.layers[0]
    return {
        "shape": shape, "lora_rank": rank, "block_parameters": sum(p.numel() for p in block.parameters()),
        "optimizer_state_mib": window["optimizer_state_bytes"] / 2**20,
        "rss_before_mib": before, "peak_rss_mib": report.peak_rss_mib,
        "peak_over_before_mib": report.peak_rss_mib - before,
        "seconds_per_step": seconds / window["steps"], "steps": window["steps"], "seq_len": seq_len,
        "batch_size": batch, "torch_threads": torch.get_num_threads(),
    }


def print_table(results: dict) -> None:
    lines = ["| block shape | block weights | training | optimizer state (MiB) | peak RSS over start (MiB) | "
             "s / step |", "| --- | ---: | --- | ---: | ---: | ---: |"]
    full = {r["shape"]: r for r in results["runs"] if r["lora_rank"] == 0}
    for r in results["runs"]:
        ref = full.get(r["shape"])
        ratio = "" if ref is None or r is ref else f" ({r['optimizer_state_mib'] / ref['optimizer_state_mib']:.1%})"
        kind = "full weights" if r["lora_rank"] == 0 else f"LoRA-{r['lora_rank']}"
        lines.append(f"| {r['shape']} | {r['block_parameters'] / 1e6:,.2f} M | {kind} | "
                     f"{r['optimizer_state_mib']:,.1f}{ratio} | {r['peak_over_before_mib']:,.0f} | "
                     f"{r['seconds_per_step']:.2f} |")
    print("\n".join(lines))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shapes", default="llama-7b", help=f"comma-separated, from {', '.join(SHAPES)}")
    parser.add_argument("--ranks", default="0,16,64", help="0 = full-weight training")
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--tiny", action="store_true", help="the tiny shape, ranks 0 and 4, two steps")
    parser.add_argument("--output", default=str(HERE / "results" / "lora_memory.json"))
    parser.add_argument("--child", nargs=4, metavar=("SHAPE", "RANK", "STEPS", "SEQ_LEN"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        shape, rank, steps, seq_len = args.child
        print(json.dumps(run_one(shape, int(rank), int(steps), int(seq_len))))
        return
    if args.tiny:
        args.shapes, args.ranks, args.steps, args.seq_len = "tiny", "0,4", 2, 16
    results = {**run_metadata(), "runs": []}
    for shape in args.shapes.split(","):
        if shape not in SHAPES:
            parser.error(f"unknown shape {shape!r}; choose from {', '.join(SHAPES)}")
        for rank in (int(r) for r in args.ranks.split(",")):
            # one process per setting: a process's peak RSS never comes down, so settings cannot share one
            out = subprocess.run([sys.executable, __file__, "--child", shape, str(rank), str(args.steps),
                                  str(args.seq_len)], stdout=subprocess.PIPE, text=True, check=True)
            results["runs"].append(json.loads(out.stdout.strip().splitlines()[-1]))
            write_results(Path(args.output), results)  # partial results survive
    print_table(results)
    print(f"written to {args.output}")


if __name__ == "__main__":
    main()
