"""Benchmark: wall time of a prune with 1 and 2 processes (`torchrun`, Gloo on CPU), and the cost model's inputs.

The bundled SmolLM2-135M, SparseGPT 50% unstructured, LR+GP and BR+GP, C4 calibration. Each setting runs twice
through `torchrun --standalone`: one process with `OMP_NUM_THREADS=2`, and two processes with one thread each, so
both use the machine's two cores. For each run: the time of `prune()` (rank 0), the peak RSS of each rank, the
final-block error, and how far the 2-process weights are from the 1-process ones (masks must be identical).

It also measures what the cost model in `docs/howto/distributed.md` needs on this machine: the fp32 matmul rate
(GFLOP/s) and the Gloo all-reduce bandwidth between two local processes, and prints the model's prediction of the
1-process block time next to the measured one.

Usage (2 CPU cores: about 10 minutes at the defaults; `--tiny` runs a tiny random model in a minute):
    python examples/benchmarks/distributed.py [--num-samples 16] [--seq-len 256] [--epochs 2]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

from _common import HERE, add_data_dir_argument, offline_env, run_metadata, write_results

SETTINGS = {"LR+GP": "layer", "BR+GP": "block"}


def worker(args: argparse.Namespace) -> None:
    """One rank of a run: prune, time it, dump the weights (rank 0) and a summary line per rank."""
    import torch

    from optimum_recon import CalibrationConfig, PruningConfig, ReconPruner
    from optimum_recon import distributed as dist

    config = PruningConfig(method="sparsegpt", sparsity=0.5, reconstruction=SETTINGS[args.setting],
                           propagation="global", epochs=args.epochs, batch_size=args.batch_size, allocation="uniform",
                           calibration=CalibrationConfig(source=args.source, num_samples=args.num_samples,
                                                         seq_len=args.seq_len, seed=0, self_generate="off"))
    pruner = ReconPruner.from_pretrained(args.model, config=config)
    dist.barrier()
    start = time.perf_counter()
    report = pruner.prune(progress=False)
    seconds = time.perf_counter() - start
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    peaks = dist.all_gather_objects(peak)
    if dist.is_main_process():
        out = Path(args.out)
        torch.save({k: v.detach().clone() for k, v in pruner.model.state_dict().items()}, out / "weights.pt")
        blocks = report.blocks
        summary = {"world": dist.world_size(), "threads": torch.get_num_threads(), "seconds": seconds,
                   "seconds_per_block": seconds / len(blocks), "peak_rss_mib": peaks,
                   "final_block_error": blocks[-1].error, "final_block_error_normalized": blocks[-1].error_normalized,
                   "tokens": report.num_calibration_tokens}
        (out / "summary.json").write_text(json.dumps(summary, indent=2))


def matmul_gflops(size: int = 1024, repeats: int = 20) -> float:
    import torch

    a, b = torch.randn(size, size), torch.randn(size, size)
    a @ b
    start = time.perf_counter()
    for _ in range(repeats):
        a @ b
    return 2 * size**3 * repeats / (time.perf_counter() - start) / 1e9


def allreduce_worker(args: argparse.Namespace) -> None:
    """Time all_reduce of a buffer the size of one bundled-model block's fp32 gradients (about 3.5M params)."""
    import torch

    from optimum_recon import distributed as dist

    dist.init_distributed()
    buffer = torch.ones(args.numel)
    dist.all_reduce_(buffer)
    start = time.perf_counter()
    for _ in range(args.repeats):
        dist.all_reduce_(buffer)
    seconds = (time.perf_counter() - start) / args.repeats
    if dist.is_main_process():
        Path(args.out, "allreduce.json").write_text(json.dumps(
            {"bytes": args.numel * 4, "seconds": seconds, "gb_per_s": args.numel * 4 / seconds / 1e9}))


def torchrun(nproc: int, threads: int, extra: list[str], env: dict[str, str]) -> None:
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
               str(Path(__file__).resolve()), *extra]
    done = subprocess.run(command, env={**env, "OMP_NUM_THREADS": str(threads)}, capture_output=True, text=True)
    if done.returncode:
        raise SystemExit(f"torchrun failed:\n{done.stdout[-3000:]}\n{done.stderr[-5000:]}")


def block_flops(model_dir: str, tokens: int, setting: str, epochs: int) -> float:
    """The cost model's FLOPs per block: 2 * params * tokens per forward; LR: 3 forwards; BR adds 3 forward
    equivalents (forward + backward) per epoch."""
    from transformers import AutoConfig

    cfg = AutoConfig.from_pretrained(model_dir)
    h, i = cfg.hidden_size, cfg.intermediate_size
    kv = h // cfg.num_attention_heads * getattr(cfg, "num_key_value_heads", cfg.num_attention_heads)
    params = 2 * h * h + 2 * h * kv + 3 * h * i
    forwards = 3 + (3 * epochs if setting == "block" else 0)
    return forwards * 2 * params * tokens


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_data_dir_argument(parser)
    parser.add_argument("--work-dir", default="/tmp/optimum-recon-distributed")
    parser.add_argument("--num-samples", type=int, default=16)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--output", default=str(HERE / "results" / "distributed.json"))
    parser.add_argument("--tiny", action="store_true", help="smoke test on a tiny random model")
    # internal: one rank of a run
    parser.add_argument("--worker", choices=["prune", "allreduce"])
    parser.add_argument("--setting", choices=list(SETTINGS))
    parser.add_argument("--model")
    parser.add_argument("--source", default="c4")
    parser.add_argument("--out")
    parser.add_argument("--numel", type=int, default=3_500_000)
    parser.add_argument("--repeats", type=int, default=20)
    args = parser.parse_args()
    if args.worker == "prune":
        return worker(args)
    if args.worker == "allreduce":
        return allreduce_worker(args)

    import torch

    env = offline_env(args.data_dir, dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1",
                                          TOKENIZERS_PARALLELISM="false"))
    work = Path(args.work_dir)
    work.mkdir(parents=True, exist_ok=True)
    if args.tiny:
        from optimum_recon.testing import save_tiny_model, save_tiny_text

        model = str(save_tiny_model(work / "model"))
        source = str(save_tiny_text(work / "text.txt"))
        args.num_samples, args.seq_len, args.epochs, args.batch_size = 8, 16, 1, 4
    else:
        from optimum_recon.data.default_model import default_model_path

        model, source = default_model_path(), "c4"
    rows = []
    # (processes, threads each, float64 statistics): the 1 x 1 exact run is the reference the 2-process run must
    # reproduce (same per-process arithmetic); 1 x 2 is the plain single-process run for the timing
    runs = [(1, 2, False), (1, 1, True), (2, 1, True)]
    for setting in SETTINGS:
        weights = {}
        for nproc, threads, exact in runs:
            out = work / f"{setting}-{nproc}x{threads}"
            out.mkdir(parents=True, exist_ok=True)
            run_env = dict(env, OPTIMUM_RECON_EXACT_STATISTICS="1" if exact else "0")
            torchrun(nproc, threads, ["--worker", "prune", "--setting", setting, "--model", model, "--source",
                                         source, "--out", str(out), "--num-samples", str(args.num_samples),
                                         "--seq-len", str(args.seq_len), "--epochs", str(args.epochs),
                                         "--batch-size", str(args.batch_size)], run_env)
            summary = json.loads((out / "summary.json").read_text())
            weights[(nproc, threads)] = torch.load(out / "weights.pt")
            rows.append({"setting": setting, "exact_statistics": exact, **summary})
        for (nproc, threads), row in zip([(1, 2), (2, 1)], (rows[-3], rows[-1])):
            ref, got = weights[(1, 1)], weights[(nproc, threads)]
            row.update(mask_entries_differing_from_reference=sum(int(((ref[k] == 0) != (got[k] == 0)).sum())
                                                                 for k in ref),
                       pruned_entries=sum(int((ref[k] == 0).sum()) for k in ref),
                       max_weight_diff_to_reference=max(float((ref[k] - got[k]).abs().max()) for k in ref))
        rows[-1]["speedup"] = rows[-3]["seconds"] / rows[-1]["seconds"]
    torchrun(2, 1, ["--worker", "allreduce", "--out", str(work)], env)
    allreduce = json.loads((work / "allreduce.json").read_text())
    torch.set_num_threads(2)
    gflops = matmul_gflops()
    for row in rows:
        if row["world"] == 1 and row["threads"] == 2:
            flops = block_flops(model, row["tokens"], SETTINGS[row["setting"]], args.epochs)
            row["model_flops_per_block"] = flops
            row["predicted_seconds_per_block"] = flops / (gflops * 1e9)
    result = {**run_metadata(),
              "settings": {k: getattr(args, k) for k in ("num_samples", "seq_len", "epochs", "batch_size", "tiny")},
              "matmul_gflops_2_threads": gflops, "gloo_allreduce": allreduce, "runs": rows}
    write_results(Path(args.output), result)
    print("| setting | processes x threads | statistics | prune s | s/block | speedup vs 1 x 2 "
          "| peak RSS per rank (MiB) | final-block error | mask entries ≠ 1 x 1 | max abs Δw vs 1 x 1 "
          "| predicted s/block |")
    print("| --- | --- | --- | ---: | ---: | ---: | --- | ---: | ---: | ---: | ---: |")
    for r in rows:
        predicted = f"{r['predicted_seconds_per_block']:.2f}" if "predicted_seconds_per_block" in r else ""
        speedup = f"{r['speedup']:.2f}" if "speedup" in r else ""
        if "mask_entries_differing_from_reference" in r:
            masks = f"{r['mask_entries_differing_from_reference']:,} of {r['pruned_entries']:,}"
            diff = f"{r['max_weight_diff_to_reference']:.2e}"
        else:
            masks, diff = "(reference)", ""
        statistics = "float64" if r["exact_statistics"] else "float32"
        print(f"| {r['setting']} | {r['world']} x {r['threads']} | {statistics} | "
              f"{r['seconds']:.1f} | {r['seconds_per_block']:.2f} | {speedup} | "
              f"{', '.join(f'{p:.0f}' for p in r['peak_rss_mib'])} | "
              f"{r['final_block_error']:.4g} ({r['final_block_error_normalized']:.4f}) | {masks} | {diff} | "
              f"{predicted} |")
    print(f"fp32 matmul: {gflops:.1f} GFLOP/s (2 threads); Gloo all-reduce of {allreduce['bytes'] / 2**20:.1f} MiB: "
          f"{allreduce['seconds'] * 1e3:.1f} ms ({allreduce['gb_per_s']:.2f} GB/s)")
    print(f"written to {args.output}")


if __name__ == "__main__":
    main()
