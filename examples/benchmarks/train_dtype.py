"""Benchmark: BR training time in float32 against bfloat16 autocast, and what `train_dtype="auto"` picks here.

A Llama with the bundled SmolLM2-135M's block shapes (hidden 576, MLP 1536, 9 heads, 3 KV heads; random weights:
speed does not depend on their values) and `--blocks` blocks is pruned to 50% with SparseGPT and trained block by
block (BR+GP, unguarded, `--epochs` epochs, batch 4) on `--windows` random windows of 512 tokens, once per dtype,
the dtypes alternating over `--repeats` rounds. The time is the training loop's own (the report's per-window
`seconds`), best of the rounds; the ratio is float32 over bfloat16 within each round.

    python examples/benchmarks/train_dtype.py [--repeats 3] [--blocks 2] [--windows 16] [--epochs 2]

Where bfloat16 is emulated (no AMX on a CPU) the ratio is below 1 and `train_dtype="auto"` keeps float32.
"""

from __future__ import annotations

import argparse

import torch
from _common import HERE, run_metadata, write_results

from optimum_recon import CalibrationSet, PruningConfig, prune_model
from optimum_recon.engine.runtime import Runtime
from optimum_recon.modeling.loading import name_of_dtype
from optimum_recon.reconstruction.training import native_bf16, resolve_train_dtype


def _model(blocks: int) -> torch.nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=1024, hidden_size=576, intermediate_size=1536, num_hidden_layers=blocks,
                         num_attention_heads=9, num_key_value_heads=3, head_dim=64, max_position_embeddings=1024)
    return LlamaForCausalLM(config).eval()


def train_seconds(dtype: str, args) -> float:
    model = _model(args.blocks)
    ids = torch.randint(0, 1024, (args.windows, 512), generator=torch.Generator().manual_seed(1))
    config = PruningConfig(method="sparsegpt", epochs=args.epochs, lr=1e-4, guard=False, batch_size=4,
                           train_dtype=dtype, allocation="uniform", calibration={"heldout_samples": 0})
    report = prune_model(model, config, CalibrationSet(ids), Runtime(progress=False))
    return sum(w["seconds"] for b in report.blocks for w in b.reconstruction.get("windows", []))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--blocks", type=int, default=2)
    parser.add_argument("--windows", type=int, default=16)
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--output", default=str(HERE / "results" / "train_dtype.json"))
    args = parser.parse_args()
    rounds = []
    for _ in range(args.repeats):
        rounds.append({dtype: train_seconds(dtype, args) for dtype in ("float32", "bfloat16")})
        print(f"float32 {rounds[-1]['float32']:.2f} s, bfloat16 {rounds[-1]['bfloat16']:.2f} s", flush=True)
    cpu = torch.device("cpu")
    results = {
        **run_metadata(), "torch": torch.__version__, "threads": torch.get_num_threads(),
        "cpu_capability": torch.backends.cpu.get_cpu_capability(), "native_bf16": native_bf16(cpu),
        "auto_picks": name_of_dtype(resolve_train_dtype("auto", cpu)),
        "setting": vars(args) | {"seq_len": 512, "shapes": "SmolLM2-135M blocks"}, "rounds": rounds,
        "best_seconds": {d: min(r[d] for r in rounds) for d in ("float32", "bfloat16")},
        "ratios": [r["float32"] / r["bfloat16"] for r in rounds],
    }
    write_results(args.output, results)
    best = results["best_seconds"]
    print(f"\n| dtype | training s (best of {args.repeats}) |\n| --- | ---: |")
    for dtype in ("float32", "bfloat16"):
        print(f"| {dtype} | {best[dtype]:.2f} |")
    print(f"\nfloat32 / bfloat16 per round: {', '.join(f'{r:.2f}x' for r in results['ratios'])}; "
          f"train_dtype='auto' picks {results['auto_picks']} here (native bf16: {results['native_bf16']})")
    print(f"written to {args.output}")


if __name__ == "__main__":
    main()
