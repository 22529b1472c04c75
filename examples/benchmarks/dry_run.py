"""Benchmark: how close `prune --dry-run`'s estimate of time and peak memory is to a real prune.

For each setting, the estimate (`optimum_recon.dry_run.plan_prune_cost`, from the config alone) and then the real
prune of the same model and recipe, each in a new process (so that peak RSS is the prune's own), on the bundled
model by default. Prints a table of estimated and measured seconds and peak RSS with their ratios, and writes the
rows as JSON after each one (a row already in the file is skipped with --resume).

Usage:
    python examples/benchmarks/dry_run.py [--settings lr,br] [--num-samples 32] [--seq-len 256] [--resume]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

from _common import HERE, add_data_dir_argument, offline_env, run_metadata, write_results

SETTINGS = {  # name -> prune flags
    "lr": ["--reconstruction", "layer"],
    "br": ["--reconstruction", "block"],
    "br-wanda-2:4": ["--reconstruction", "block", "--method", "wanda", "--pattern", "2:4"],
}

_WORKER = """
import json, sys, time
from optimum_recon.cli import build_parser, config_from_args
from optimum_recon import ReconPruner
from optimum_recon.dry_run import plan_prune_cost
from optimum_recon.modeling.loading import resolve_model_path
from optimum_recon.report import peak_rss_mib

mode, model, argv = sys.argv[1], sys.argv[2] or None, sys.argv[3:]
args = build_parser().parse_args(["prune", *argv])
config = config_from_args(args, argv)
if mode == "estimate":
    plan = plan_prune_cost(resolve_model_path(model), model or "bundled", config)
    print(json.dumps({"seconds": sum(plan.seconds.values()), "parts": plan.seconds,
                      "memory_mib": sum(plan.memory.values()) / 2**20,
                      "memory_parts_mib": {k: v / 2**20 for k, v in plan.memory.items()}}))
else:
    start = time.perf_counter()
    pruner = ReconPruner.from_pretrained(model, config)
    report = pruner.prune(progress=False)
    epochs = sum(b.training.get("epochs_run", 0) for b in report.blocks if b.training)
    print(json.dumps({"seconds": report.total_seconds, "wall_seconds": time.perf_counter() - start,
                      "peak_rss_mib": peak_rss_mib(), "epochs_run": epochs}))
"""


def _run(mode: str, model: str | None, flags: list[str], env: dict) -> dict:
    done = subprocess.run([sys.executable, "-c", _WORKER, mode, model or "", *flags], capture_output=True, text=True,
                          env=env)
    if done.returncode:
        raise SystemExit(f"{mode} failed:\n{done.stderr[-4000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_data_dir_argument(parser)
    parser.add_argument("--model", default=None, help="a model id or folder (default: the bundled model)")
    parser.add_argument("--settings", default="lr,br", help=f"comma-separated, from {', '.join(SETTINGS)}")
    parser.add_argument("--num-samples", type=int, default=32)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--output", default=str(HERE / "results" / "dry_run.json"))
    parser.add_argument("--resume", action="store_true", help="keep the rows already in --output")
    args = parser.parse_args()
    env = offline_env(args.data_dir)
    results = {**run_metadata(), "runs": []}
    if Path(args.output).is_file():
        if not args.resume:
            raise SystemExit(f"{args.output} already holds results: pass --resume to add to them, or another "
                             "--output")
        results["runs"] = json.loads(Path(args.output).read_text())["runs"]
    done = {r["setting"] for r in results["runs"]}
    for name in [s for s in args.settings.split(",") if s]:
        if name in done:
            continue
        flags = [*SETTINGS[name], "--num-samples", str(args.num_samples), "--seq-len", str(args.seq_len)]
        estimate = _run("estimate", args.model, flags, env)
        measured = _run("prune", args.model, flags, env)
        results["runs"].append({"setting": name, "flags": flags, "estimate": estimate, "measured": measured})
        write_results(args.output, results)
    print("| setting | estimated s | measured s | measured / estimated | epochs run | estimated peak MiB | "
          "measured peak RSS MiB | measured / estimated |")
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    for row in results["runs"]:
        e, m = row["estimate"], row["measured"]
        print(f"| {row['setting']} | {e['seconds']:.0f} | {m['seconds']:.0f} | {m['seconds'] / e['seconds']:.2f} | "
              f"{m['epochs_run']} | {e['memory_mib']:,.0f} | {m['peak_rss_mib']:,.0f} | "
              f"{m['peak_rss_mib'] / e['memory_mib']:.2f} |")


if __name__ == "__main__":
    main()
