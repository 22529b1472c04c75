"""Benchmark: what reconstruction buys on the bundled model (LR, BR, BR+GP, BR+GP+CR, BR+GP with LoRA).

For each mask method (default SparseGPT and Wanda) at 50% unstructured sparsity (`--sparsity`, `--pattern`), each
row is pruned in its own process and reports the final-block reconstruction error on the calibration windows and on
held-out windows from the same source (plain MSE and normalized by the dense hidden states' mean square), the
WikiText-2 perplexity, the wall time, the peak RSS and the optimizer state of the largest window.

The issue's setting is 64 C4 windows of 512 tokens, 10 epochs: on 2 CPU cores a BR row takes about half an
hour and a CR row an hour. `--num-samples`, `--seq-len` and `--epochs` scale it down; the table says what ran.

    python examples/benchmarks/reconstruction.py [--methods sparsegpt,wanda] [--num-samples 64] [--seq-len 512]

A row may change settings after its name: "BR+GP lr=1e-3", "default loss=mse", "LR allocation=owl" (the
sparsity allocation, issue 25: `--sparsity 0.7 --methods sparsegpt,wanda,alps --rows "LR,LR allocation=owl"`).

Rows can run side by side, one thread each, into their own files, then be merged (on 2 cores two one-thread
rows get through about 30% more work than one two-thread row):

    OMP_NUM_THREADS=1 python examples/benchmarks/reconstruction.py --resume --rows BR+GP+CR --output a.json &
    OMP_NUM_THREADS=1 python examples/benchmarks/reconstruction.py --resume --rows BR --output b.json &
    wait; python examples/benchmarks/reconstruction.py --merge a.json b.json

With `--checkpoint-dir DIR` each row checkpoints after every block (CR rows too); running the same command
again after an interruption continues the unfinished row from its last block (its time adds both calls').
"""

from __future__ import annotations

import argparse
import json
import logging
import subprocess
import sys
import time
from pathlib import Path

from _common import HERE, add_data_dir_argument, offline_env, run_metadata, write_results

# The rows measured before the guard existed train at the paper's fixed lr without it (as they were run);
# "default" is PruningConfig's defaults (guarded, lr="auto", allocation="auto") with nothing else set. Those rows
# measured before allocation="auto" became the default (uniform then) are named "default allocation=uniform" in the
# results; the fixed rows keep the uniform allocation they were measured with ("LR allocation=owl" asks for OWL).
# Likewise, "default" rows on calibration sets small enough for self_generate="auto" to add windows (16 x 128 tokens)
# measured before it existed are named "default self_generate=off"; the fixed rows never add any.
_FIXED = {"lr": 2e-4, "guard": False, "batch_size": 8, "allocation": "uniform", "self_generate": "off"}
ROWS = {  # name -> (reconstruction, propagation, extra config)
    # (forward passes in batches of 8, as the rows were measured)
    "LR": ("layer", "global", {"batch_size": 8, "allocation": "uniform"}),
    "BR": ("block", "local", _FIXED),
    "BR+GP": ("block", "global", _FIXED),
    "BR+GP+CR": ("cross_block", "global", _FIXED),
    "BR+GP LoRA-16": ("block", "global", {**_FIXED, "lora_rank": 16}),
    "default": ("block", "global", {}),
}


# what a row may set after its name: "BR+GP lr=1e-3", "default loss=mse", "default source=c4+self:64"
_ROW_OPTIONS = {"lr": float, "loss": str, "batch_size": int, "source": str, "allocation": str, "owl_lambda": float,
                "train_dtype": str, "self_generate": str}
_CALIBRATION_OPTIONS = ("source", "self_generate")  # (those that belong to the CalibrationConfig)


def _row_settings(row: str) -> tuple[str, str, dict]:
    """A row of ROWS, optionally with other settings: "BR+GP lr=1e-3" (still unguarded), "default loss=mse"."""
    name, options = _split_row(row)
    if name not in ROWS:
        raise SystemExit(f"unknown row {row!r}: use one of {', '.join(ROWS)} (optionally followed by "
                         f"{' or '.join(k + '=VALUE' for k in _ROW_OPTIONS)})")
    reconstruction, propagation, extra = ROWS[name]
    return reconstruction, propagation, {**extra, **options}


def _split_row(row: str) -> tuple[str, dict]:
    """"BR+GP lr=1e-3" -> ("BR+GP", {"lr": 1e-3}); "BR+GP LoRA-16" -> ("BR+GP LoRA-16", {})."""
    words = row.split(" ")
    options = {}
    for item in (w for w in words if "=" in w):
        key, _, value = item.partition("=")
        if key not in _ROW_OPTIONS or not value:
            raise SystemExit(f"row {row!r}: {item!r} is not KEY=VALUE with KEY one of {', '.join(_ROW_OPTIONS)}")
        options[key] = _ROW_OPTIONS[key](value)
    return " ".join(w for w in words if "=" not in w), options


def run_row(args, method: str, row: str) -> dict:
    import torch

    from optimum_recon import CalibrationConfig, PruningConfig, ReconPruner

    reconstruction, propagation, extra = _row_settings(row)
    calibration = {"source": "c4", **{k: extra.pop(k) for k in _CALIBRATION_OPTIONS if k in extra}}
    config = PruningConfig(method=method, sparsity=args.sparsity, pattern=args.pattern, reconstruction=reconstruction,
                           propagation=propagation, epochs=args.epochs, **extra,
                           calibration=CalibrationConfig(**calibration, num_samples=args.num_samples,
                                                         seq_len=args.seq_len, heldout_samples=args.heldout, seed=0))
    pruner = ReconPruner.from_pretrained(args.model, config=config)
    checkpoint = None if args.checkpoint_dir is None else Path(args.checkpoint_dir) / _slug(method, row)
    start = time.perf_counter()
    report = pruner.prune(progress=False, checkpoint_dir=checkpoint)
    earlier = report.resumed_seconds  # an interrupted earlier call's time up to its checkpoint
    seconds = time.perf_counter() - start + earlier
    ppl = pruner.evaluate("wikitext2", seq_len=args.eval_seq_len, max_tokens=args.eval_tokens, progress=False)
    last = report.blocks[-1]
    windows = [w for b in report.blocks for w in b.reconstruction.get("windows", [])]
    states = [w.get("optimizer_state_bytes", 0) for w in windows]
    return {
        "method": method, "row": row, "wikitext2": ppl["wikitext2"].perplexity, "seconds": seconds,
        "peak_rss_mib": report.peak_rss_mib, "final_error": last.error, "final_error_normalized": last.error_normalized,
        "heldout_error": last.heldout_error, "heldout_error_normalized": last.heldout_error_normalized,
        "final_error_relative": last.error_relative, "heldout_error_relative": last.heldout_error_relative,
        "optimizer_state_mib": max(states, default=0) / 2**20, "torch_threads": torch.get_num_threads(),
        "resumed": earlier > 0,
        "per_block": [{"index": b.index, "error": b.error, "error_normalized": b.error_normalized,
                       "error_before": b.error_before, "heldout_error": b.heldout_error,
                       "heldout_error_before": b.heldout_error_before, "error_relative": b.error_relative,
                       "heldout_error_relative": b.heldout_error_relative,
                       "heldout_error_before_relative": b.heldout_error_before_relative,
                       "training": [{k: w[k] for k in _TRAINING_KEYS if k in w}
                                    for w in b.reconstruction.get("windows", [])]} for b in report.blocks],
        "sparsity": args.sparsity, "model_sparsity": report.model_sparsity,
        "allocation": {k: v for k, v in report.allocation.items()},
        "training_seconds": sum(w.get("seconds", 0.0) for w in windows),
        "guard_seconds": sum(w.get("guard_seconds", 0.0) for w in windows),
    }


# what a row keeps of each window's training record
_TRAINING_KEYS = ("lr", "lr_final", "lr_halved_after", "loss_per_epoch", "heldout_per_epoch", "epoch_kept",
                  "epochs_run", "stopped_early", "reverted", "steps", "seconds", "guard_seconds", "train_dtype")


def _slug(method: str, row: str) -> str:
    """A folder name for a row's checkpoint: "sparsegpt-BR+GP lr=1e-3" -> "sparsegpt-BR_GP_lr_1e-3"."""
    return f"{method}-" + "".join(c if c.isalnum() or c in "-." else "_" for c in row)


def table(results: dict) -> str:
    lines = [
        "| method | reconstruction | final-block error (normalized) | vs LR | held-out error (normalized) "
        "| WikiText-2 ppl | time (s) | peak RSS (MiB) | optimizer state (MiB) |",
        "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    lr = {r["method"]: r["final_error"] for r in results["runs"] if r["row"] == "LR"}
    for r in results["runs"]:
        cut = f"{r['final_error'] / lr[r['method']] - 1:+.1%}" if r["method"] in lr else "–"  # 84.5% is not 85%
        mark = ("†" if r.get("torch_threads") == 1 else "") + ("‡" if r.get("resumed") else "") + (
            "§" if _trained_in(r) == "bfloat16" else "")
        lines.append(
            f"| {r['method']} | {r['row']} | {r['final_error']:.4g} ({r['final_error_normalized']:.3g}) | {cut} | "
            f"{r['heldout_error']:.4g} ({r['heldout_error_normalized']:.3g}) | {r['wikitext2']:.3f} | "
            f"{r['seconds']:.0f}{mark} | {r['peak_rss_mib']:,.0f} | {r['optimizer_state_mib']:.1f} |"
        )
    if any(r.get("torch_threads") == 1 for r in results["runs"]):
        lines.append("\n† one torch thread, side by side with another row: compare its time only with other † rows")
    if any(r.get("resumed") for r in results["runs"]):
        lines.append("\n‡ resumed from its --checkpoint-dir after an interruption: the time adds the calls' times "
                     "(up to the last checkpoint of the interrupted one); the peak RSS is the last call's")
    if any(_trained_in(r) == "bfloat16" for r in results["runs"]):
        lines.append("\n§ trained in bfloat16 autocast (float32 master weights; what train_dtype=\"auto\" picks on a "
                     "CPU with AMX)")
    return "\n".join(lines)


def _trained_in(row: dict) -> str | None:
    """The dtype a row trained in: recorded per window since train_dtype="auto"; float32 before (the default then)."""
    windows = [w for b in row.get("per_block", []) for w in b.get("training", [])]
    if not windows:
        return None
    if "train_dtype=" in row["row"]:
        return row["row"].split("train_dtype=")[1].split(" ")[0]
    return windows[0].get("train_dtype", "float32")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None, help="default: the bundled SmolLM2-135M-Instruct")
    add_data_dir_argument(parser)
    parser.add_argument("--methods", default="sparsegpt,wanda")
    parser.add_argument("--rows", default=",".join(ROWS),
                        help="comma-separated rows; a row may set another learning rate: 'BR+GP lr=1e-3'")
    parser.add_argument("--num-samples", type=int, default=64)
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--pattern", default="unstructured", help="'unstructured' or N:M, e.g. 2:4")
    parser.add_argument("--sparsity", type=float, default=0.5, help="unstructured sparsity (N:M sets its own)")
    parser.add_argument("--heldout", type=lambda v: None if v == "auto" else int(v), default=16,
                        help="held-out windows, or 'auto' (the library's default)")
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--eval-tokens", type=int, default=65536)
    parser.add_argument("--eval-seq-len", type=int, default=1024)
    parser.add_argument("--output", default=str(HERE / "results" / "reconstruction.json"))
    parser.add_argument("--resume", action="store_true",
                        help="keep the rows already in --output (same settings) and run only the missing ones")
    parser.add_argument("--merge", nargs="+", metavar="FILE",
                        help="run nothing: add the rows of these result files (same settings; e.g. from runs side by "
                             "side with OMP_NUM_THREADS=1 and their own --output) to --output, print and plot")
    parser.add_argument("--checkpoint-dir", default=None,
                        help="give each row a checkpoint folder here: a row interrupted (a crash, a session that "
                             "ends) continues from its last finished block when the same command runs again")
    parser.add_argument("--child", nargs=2, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        # a row can take hours: say when each block is done (the engine logs it at INFO) on the inherited stderr
        logging.basicConfig(format=f"%(asctime)s {' '.join(args.child)}: %(message)s", level=logging.WARNING)
        logging.getLogger("optimum_recon.engine").setLevel(logging.INFO)
        print(json.dumps(run_row(args, *args.child)))
        return
    if args.merge:
        _finish(_merge(Path(args.output), [Path(f) for f in args.merge]), Path(args.output))
        return
    env = offline_env(args.data_dir)
    how_to_run = ("child", "output", "resume", "methods", "rows", "merge", "checkpoint_dir")  # not what was measured
    settings = {k: v for k, v in vars(args).items() if k not in how_to_run}
    for key, before in (("pattern", "unstructured"), ("sparsity", 0.5)):  # (rows measured before the flag existed)
        if settings[key] == before:
            del settings[key]
    results = {**run_metadata(), "settings": settings, "runs": []}
    if Path(args.output).is_file():
        if not args.resume:  # hours of measured rows: never replaced by a call that forgot --resume
            raise SystemExit(f"{args.output} already holds results: pass --resume to add rows to it, or choose "
                             "another --output (delete the file yourself to start over)")
        _combine(results, json.loads(Path(args.output).read_text()), f"--resume: {args.output}")
    done = {(r["method"], r["row"]) for r in results["runs"]}
    for row in args.rows.split(","):
        _row_settings(row)  # an unknown row fails before anything runs
    for method in args.methods.split(","):
        for row in args.rows.split(","):
            if (method, row) in done:
                continue
            start = time.perf_counter()
            out = subprocess.run([sys.executable, __file__, *sys.argv[1:], "--child", method, row], env=env,
                                 stdout=subprocess.PIPE, text=True)  # its stderr (progress, errors) goes to ours
            if out.returncode != 0:
                raise SystemExit(f"{method} {row} failed (its error is above)")
            results["runs"].append(json.loads(out.stdout.strip().splitlines()[-1]))
            print(f"{method} {row}: done in {time.perf_counter() - start:.0f} s", flush=True)
            write_results(Path(args.output), results)  # partial results survive
    _finish(results, Path(args.output))


def _merge(output: Path, others: list[Path]) -> dict:
    """The rows of ``output`` plus those of ``others`` that it lacks (a row is a method and a setting)."""
    files = [output, *others] if output.is_file() else others
    merged = None
    for path in files:
        results = json.loads(path.read_text())
        if merged is None:
            merged = results
        else:
            _combine(merged, results, f"--merge: {path}")
    order = list(ROWS)
    methods = list(dict.fromkeys(r["method"] for r in merged["runs"]))
    merged["runs"].sort(key=lambda r: (methods.index(r["method"]), order.index(_split_row(r["row"])[0]), r["row"]))
    write_results(output, merged)
    return merged


def _combine(into: dict, other: dict, source: str) -> None:
    """Add to ``into`` the rows of ``other`` that it lacks (a row is a method and a setting) and its commits;
    both must have been run with the same settings."""
    if other["settings"] != into["settings"]:
        raise SystemExit(f"{source} was run with other settings: {other['settings']}")
    done = {(r["method"], r["row"]) for r in into["runs"]}
    into["runs"] += [r for r in other["runs"] if (r["method"], r["row"]) not in done]
    commits = {*_as_list(into["commit"]), *_as_list(other["commit"])}
    into["commit"] = sorted(commits) if len(commits) > 1 else commits.pop()


def _as_list(commit: str | list[str]) -> list[str]:
    return [commit] if isinstance(commit, str) else list(commit)


def _finish(results: dict, output: Path) -> None:
    print(table(results))
    for method in dict.fromkeys(r["method"] for r in results["runs"]):
        _plot(results, method, output.with_name(f"{output.stem}_{method}.png"))
        for r in results["runs"]:
            if r["method"] == method and r["row"] == "default":
                _plot_training(r, output.with_name(f"{output.stem}_{method}_default_training.png"))
    print(f"written to {output}")


def _block_sparsity(row: dict, index: int) -> float:
    """A block's own sparsity in a row (its allocation's share, or the row's sparsity when uniform)."""
    shares = (row.get("allocation") or {}).get("block_sparsity") or []
    return shares[index] if index < len(shares) else row.get("sparsity", 0.5)


def _plot_training(row: dict, path: Path) -> None:
    """The guarded row's per-epoch curves: calibration loss vs held-out error, the kept epoch marked."""
    from optimum_recon.plotting import plot_training_curves
    from optimum_recon.report import BlockRecord, PruningReport

    blocks = [BlockRecord(index=b["index"], error=b["error"], error_normalized=b["error_normalized"], error_local=None,
                          sparsity=_block_sparsity(row, b["index"]), seconds=0.0,
                          reconstruction={"windows": b.get("training", [])}) for b in row["per_block"]]
    plot_training_curves(PruningReport(blocks=blocks), path,
                         title=f"{row['method']} {row['row']}: error per epoch (epoch 0: masked only)")


def _plot(results: dict, method: str, path: Path) -> None:
    """Per-block errors of one mask method, calibration vs held-out, one colour per row."""
    from optimum_recon.plotting import plot_block_errors
    from optimum_recon.report import BlockRecord, PruningReport

    reports = {}
    for r in results["runs"]:
        if r["method"] != method:
            continue
        blocks = [BlockRecord(index=b["index"], error=b["error"], error_normalized=b["error_normalized"],
                              error_local=None, sparsity=_block_sparsity(r, b["index"]), seconds=0.0,
                              heldout_error=b["heldout_error"])
                  for b in r["per_block"]]
        reports[r["row"]] = PruningReport(blocks=blocks)
    plot_block_errors(reports, path, normalized=False, title=f"{method}: per-block error, calibration vs held-out")


if __name__ == "__main__":
    main()
