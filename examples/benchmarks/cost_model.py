"""The cost model of a data-parallel prune: time per block for a 7B and a 70B Llama, by GPUs and interconnect.

Pure arithmetic (instant); every input is a flag, and `docs/howto/distributed.md` explains each term. Per block:

    compute   = forwards * 2 * P * N / (G * R)     forwards = 3 (LR) or 4 + 3 * epochs (BR: forward + backward
                                                   = 3 forward-equivalents per epoch, plus the "before" error pass)
    solve     = max over ranks of S_rank / R_solve SparseGPT's per-layer solves, layer i on rank i % G (the
                                                   largest layer, the down projection, bounds it); then each
                                                   result is broadcast:
    results   = broadcast(4 * P)                   the pruned weights, once per block
    stats     = allreduce(8 * sum of d_in^2)       the float64 Hessians, once per block
    gradients = steps * allreduce(g * P)           once per training step, not overlapped with compute
    allreduce(bytes) = 2 (G - 1) / G * bytes / busbw + latency

with P the parameters of one block, N the calibration tokens, G the processes (one GPU each), R the sustained
FLOP/s of one GPU and busbw the all-reduce bus bandwidth. Attention's T^2 term is left out (4% of a 7B block's
forward at T = 1024). The defaults are the paper's recipe: 256 windows of 1024 tokens, 10 epochs, batch 8.

Usage:
    python examples/benchmarks/cost_model.py [--tflops 400] [--solve-tflops 20] [--epochs 10]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from _common import HERE

MODELS = {  # Llama-2 shapes: hidden, intermediate, heads, kv heads, blocks
    "7B": dict(hidden=4096, inter=11008, heads=32, kv_heads=32, blocks=32),
    "70B": dict(hidden=8192, inter=28672, heads=64, kv_heads=8, blocks=80),
}
# all-reduce bus bandwidth (GB/s) and latency (s) per collective; see the doc for where the numbers come from
LINKS = {
    "NVLink (H100 SXM)": (350.0, 30e-6),
    "PCIe 4.0 x16": (20.0, 50e-6),
    "100 Gb/s network": (11.0, 100e-6),
    "25 Gb/s network": (2.8, 100e-6),
}


def block_shapes(m: dict) -> tuple[int, list[float], float]:
    """(parameters of one block, SparseGPT solve FLOPs per layer, float64 Hessian bytes)."""
    h, i = m["hidden"], m["inter"]
    kv = h // m["heads"] * m["kv_heads"]
    layers = [(h, h), (kv, h), (kv, h), (h, h), (i, h), (i, h), (h, i)]  # (out, in): q k v o gate up down
    params = sum(o * n for o, n in layers) + 2 * h  # + the two norms
    # lazy-batch OBS updates ~ d_out * d_in^2, plus the Cholesky factor and inverse ~ d_in^3 per layer
    solve = [o * n * n + n**3 for o, n in layers]
    hessians = 8 * (3 * h * h + i * i)  # q/k/v, o, gate/up share inputs; down has its own (float64 sums)
    return params, solve, hessians


def allreduce(num_bytes: float, gpus: int, busbw: float, latency: float) -> float:
    if gpus == 1:
        return 0.0
    return 2 * (gpus - 1) / gpus * num_bytes / (busbw * 1e9) + latency


def broadcast(num_bytes: float, gpus: int, busbw: float, latency: float) -> float:
    return 0.0 if gpus == 1 else num_bytes / (busbw * 1e9) + latency


def estimate(name: str, setting: str, gpus: int, link: str, args: argparse.Namespace) -> dict:
    m = MODELS[name]
    params, solve_flops, hessian_bytes = block_shapes(m)
    tokens = args.samples * args.seq_len
    trains = setting == "BR"
    forwards = 4 + 3 * args.epochs if trains else 3
    busbw, latency = LINKS[link]
    steps = args.epochs * (args.samples // args.batch_size) if trains else 0
    parts = {
        "compute": forwards * 2 * params * tokens / (gpus * args.tflops * 1e12),
        "solve": max(sum(solve_flops[r::gpus]) for r in range(gpus)) / (args.solve_tflops * 1e12),
        "stats": allreduce(hessian_bytes, gpus, busbw, latency) + broadcast(4 * params, gpus, busbw, latency),
        "gradients": steps * allreduce(args.grad_bytes * params, gpus, busbw, latency),
    }
    total = sum(parts.values())
    return {"model": name, "setting": setting, "gpus": gpus, "link": link, **parts, "block_s": total,
            "model_h": total * m["blocks"] / 3600}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tflops", type=float, default=400.0,
                        help="sustained TFLOP/s of one GPU on the block's matmuls (H100 bf16: ~40%% of 989)")
    parser.add_argument("--solve-tflops", type=float, default=20.0,
                        help="sustained TFLOP/s of SparseGPT's fp32 solves (Cholesky and triangular updates)")
    parser.add_argument("--samples", type=int, default=256)
    parser.add_argument("--seq-len", type=int, default=1024)
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--grad-bytes", type=int, default=4, help="bytes per gradient element (fp32: 4)")
    parser.add_argument("--output", default=str(HERE / "results" / "cost_model.json"))
    args = parser.parse_args()
    rows = []
    for name in MODELS:
        for setting in ("LR", "BR"):
            rows.append(estimate(name, setting, 1, "NVLink (H100 SXM)", args))
            for link in LINKS:
                for gpus in (2, 8):
                    rows.append(estimate(name, setting, gpus, link, args))
    print("| model | setting | GPUs | interconnect | compute s | solve s | stats s | gradients s | s/block | "
          "whole model (h) | speedup |")
    print("| --- | --- | ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    single = {}
    for r in rows:
        key = (r["model"], r["setting"])
        if r["gpus"] == 1:
            single[key] = r["block_s"]
        link = "—" if r["gpus"] == 1 else r["link"]
        print(f"| {r['model']} | {r['setting']} | {r['gpus']} | {link} | {r['compute']:.2f} | {r['solve']:.2f} | "
              f"{r['stats']:.3f} | {r['gradients']:.2f} | {r['block_s']:.2f} | {r['model_h']:.2f} | "
              f"{single[key] / r['block_s']:.2f} |")
    Path(args.output).parent.mkdir(parents=True, exist_ok=True)
    Path(args.output).write_text(json.dumps({"assumptions": vars(args), "links_busbw_gb_s_latency_s": LINKS,
                                             "rows": rows}, indent=2) + "\n")
    print(f"written to {args.output}")


if __name__ == "__main__":
    main()
