"""Benchmark: peak memory and wall time with accelerate offloading, up to a model larger than the memory budget.

Part 1 (`--part bundled`), the bundled SmolLM2-135M in fp32, SparseGPT 50% unstructured, LR+GP and BR+GP, each run
in its own process:
  * `memory`: the whole model in RAM;
  * `cpu`: weights held in accelerate's CPU weights map (`accelerate.cpu_offload`), onloaded block by block;
  * `disk`: `device_map="auto"` with `max_memory={"cpu": "150MB"}`: most blocks offloaded to disk.
For each: prune time, save time, peak RSS, WikiText-2 perplexity (the three must agree: offloading does not change
the result).

Part 2 (`--part big`): a randomly initialised Llama-architecture model of about 5 GB in fp32 (built from a config,
saved in 500 MB shards; its quality does not matter), pruned (SparseGPT 50%, LR+GP) with disk offload under
`max_memory={"cpu": "1GB"}`, saved, then reloaded the same way and run. Goal: peak RSS below 40% of the model's
size. RSS is sampled every 0.5 s and drawn over time, one colour per phase.

Usage (2 CPU cores: part 1 about 40 minutes at the default 16 windows of 512 tokens, part 2 about 20 minutes
plus ~3 minutes to build the 5 GB checkpoint once; it needs ~16 GB of free disk):
    python examples/benchmarks/offload.py [--part bundled|big|all] [--work-dir /tmp/optimum-recon-offload]
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

from _common import HERE, add_data_dir_argument, offline_env, rss_mib, run_metadata, write_results

MODES = ("memory", "cpu", "disk")
ROWS = {"LR+GP": "layer", "BR+GP": "block"}
BIG = dict(hidden_size=2048, intermediate_size=5632, num_hidden_layers=21, num_attention_heads=16,
           num_key_value_heads=16, max_position_embeddings=2048, tie_word_embeddings=False)
TINY = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=4,
            max_position_embeddings=256, tie_word_embeddings=False)


class RssSampler:
    """Samples this process's resident memory (VmRSS) in a background thread, labelled with the current phase."""

    def __init__(self, interval: float = 0.5):
        self.samples: list[tuple[float, float, str]] = []
        self._phase = "start"
        self._start = time.perf_counter()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(interval,), daemon=True)
        self._thread.start()

    def _sample(self) -> None:
        total, anon, file = rss_mib()
        self.samples.append((time.perf_counter() - self._start, total, self._phase, anon, file))

    @property
    def phase(self) -> str:
        return self._phase

    @phase.setter
    def phase(self, name: str) -> None:  # the last sample of the old phase, the first of the new one
        self._sample()
        self._phase = name
        self._sample()

    def _run(self, interval: float) -> None:
        while not self._stop.wait(interval):
            self._sample()

    def stop(self) -> list[tuple]:
        self._stop.set()
        self._thread.join()
        self._sample()
        return self.samples


def _config(args, reconstruction: str, num_samples: int, seq_len: int):
    from optimum_recon import CalibrationConfig, PruningConfig

    source = str(Path(args.work_dir) / "tiny.txt") if args.tiny else "c4"
    return PruningConfig(method="sparsegpt", sparsity=0.5, reconstruction=reconstruction, propagation="global",
                         epochs=args.epochs, allocation="uniform",
                         calibration=CalibrationConfig(source=source, num_samples=num_samples, seq_len=seq_len,
                                                       heldout_samples=0, seed=0, self_generate="off"))


def run_bundled(args, mode: str, row: str) -> dict:
    import torch

    from optimum_recon import ReconPruner
    from optimum_recon.report import peak_rss_mib

    work = Path(args.work_dir) / f"bundled-{mode}-{row}"
    shutil.rmtree(work, ignore_errors=True)
    config = _config(args, ROWS[row], args.num_samples, args.seq_len)
    start = time.perf_counter()
    if mode == "disk":
        pruner = ReconPruner.from_pretrained(None, config=config, dtype=torch.float32, device_map="auto",
                                             max_memory={"cpu": args.disk_max_memory}, offload_folder=str(work / "off"))
    else:
        pruner = ReconPruner.from_pretrained(None, config=config, dtype=torch.float32)
        if mode == "cpu":
            from accelerate import cpu_offload

            cpu_offload(pruner.model, execution_device=torch.device("cpu"))
    load = time.perf_counter() - start
    start = time.perf_counter()
    report = pruner.prune(progress=False)
    prune = time.perf_counter() - start
    start = time.perf_counter()
    pruner.save_pretrained(work / "saved")
    save = time.perf_counter() - start
    ppl = pruner.evaluate("wikitext2", seq_len=1024, max_tokens=args.eval_tokens, progress=False)
    placement = sorted(set(getattr(pruner.model, "hf_device_map", {"": "cpu"}).values()))
    shutil.rmtree(work, ignore_errors=True)
    return {"mode": mode, "row": row, "load_seconds": load, "prune_seconds": prune, "save_seconds": save,
            "peak_rss_mib": peak_rss_mib(), "wikitext2": ppl["wikitext2"].perplexity,
            "final_error": report.blocks[-1].error, "placement": placement}


def build_big(args) -> Path:
    """Build (once) the random ~5 GB Llama checkpoint, with the bundled model's tokenizer."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from optimum_recon.modeling.loading import resolve_model_path

    path = _big_path(args)
    if (path / "config.json").is_file():
        return path
    if args.tiny:
        from optimum_recon.testing import save_tiny_text, tiny_tokenizer

        tokenizer = tiny_tokenizer()
        save_tiny_text(Path(args.work_dir) / "tiny.txt")
    else:
        tokenizer = AutoTokenizer.from_pretrained(resolve_model_path(None))
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=len(tokenizer), **(TINY if args.tiny else BIG))).float()
    partial = path.with_name(path.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    model.save_pretrained(partial, max_shard_size="100KB" if args.tiny else "500MB")
    tokenizer.save_pretrained(partial)
    partial.rename(path)
    return path


def _big_path(args) -> Path:
    return Path(args.work_dir) / ("random-llama-tiny" if args.tiny else "random-llama-5gb")


def _size_on_disk(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.glob("*.safetensors"))


def run_big(args) -> dict:
    import torch
    from safetensors import safe_open
    from transformers import AutoModelForCausalLM

    from optimum_recon import ReconPruner

    checkpoint = _big_path(args)
    model_bytes = _size_on_disk(checkpoint)
    saved, offload = Path(args.work_dir) / "big-pruned", Path(args.work_dir) / "big-offload"
    for folder in (saved, offload, offload.with_name("big-reload-offload")):
        shutil.rmtree(folder, ignore_errors=True)
    sampler = RssSampler()
    timings = {}
    sampler.phase = "load"
    start = time.perf_counter()
    pruner = ReconPruner.from_pretrained(str(checkpoint), config=_config(args, "layer", args.big_samples,
                                                                         args.big_seq_len),
                                         dtype=torch.float32, device_map="auto",
                                         max_memory={"cpu": args.big_max_memory}, offload_folder=str(offload))
    timings["load"] = time.perf_counter() - start
    devices = list(pruner.model.hf_device_map.values())
    placement = {v: devices.count(v) for v in set(devices)}
    sampler.phase = "prune"
    start = time.perf_counter()
    report = pruner.prune(progress=False)
    timings["prune"] = time.perf_counter() - start
    sampler.phase = "save"
    start = time.perf_counter()
    pruner.save_pretrained(saved)
    timings["save"] = time.perf_counter() - start
    del pruner
    import gc

    gc.collect()
    sampler.phase = "reload"
    start = time.perf_counter()
    reloaded = AutoModelForCausalLM.from_pretrained(saved, dtype=torch.float32, device_map="auto",
                                                    max_memory={"cpu": args.big_max_memory},
                                                    offload_folder=str(offload.with_name("big-reload-offload")))
    with torch.no_grad():
        logits = reloaded(input_ids=torch.arange(1, 17).unsqueeze(0)).logits
    timings["reload_and_forward"] = time.perf_counter() - start
    samples = sampler.stop()
    zeros = total = 0
    for shard in saved.glob("*.safetensors"):  # measured sparsity of the saved block weights, one tensor at a time
        with safe_open(shard, "pt") as f:
            for name in f.keys():
                if ".layers." in name and name.endswith("proj.weight"):
                    t = f.get_tensor(name)
                    zeros, total = zeros + int((t == 0).sum()), total + t.numel()
    peak = max(s[1] for s in samples)
    peak_anon = max(s[3] for s in samples)
    result = {"model_bytes": model_bytes, "max_memory": args.big_max_memory, "placement": placement,
              "timings": timings, "peak_rss_mib": peak, "peak_rss_fraction": peak * 2**20 / model_bytes,
              "peak_rss_anon_mib": peak_anon, "peak_rss_file_mib": max(s[4] for s in samples),
              "peak_rss_by_phase": {p: max(s[1] for s in samples if s[2] == p) for p in dict.fromkeys(s[2] for s in
                                                                                                     samples)},
              "saved_bytes": _size_on_disk(saved), "saved_sparsity": zeros / max(total, 1),
              "reloaded_logits_finite": bool(torch.isfinite(logits).all()), "final_error": report.blocks[-1].error,
              "samples": samples}
    for folder in (saved, offload, offload.with_name("big-reload-offload")):
        shutil.rmtree(folder, ignore_errors=True)
    return result


def plot_rss(big: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 4))
    for phase in dict.fromkeys(s[2] for s in big["samples"]):
        pts = [(s[0], s[1]) for s in big["samples"] if s[2] == phase]
        ax.plot([p[0] for p in pts], [p[1] / 1024 for p in pts], ".", markersize=2, label=phase)
    if len(big["samples"][0]) > 3:  # anonymous memory alone (the rest of RSS is mapped file pages)
        ax.plot([s[0] for s in big["samples"]], [s[3] / 1024 for s in big["samples"]], "-", color="black",
                linewidth=0.6, label="anonymous (RssAnon)")
    ax.axhline(big["model_bytes"] * 0.4 / 2**30, color="red", linestyle="--", label="40% of the model")
    ax.axhline(big["model_bytes"] / 2**30, color="grey", linestyle=":", label="model size (fp32)")
    ax.set_xlabel("seconds")
    ax.set_ylabel("RSS (GiB)")
    ax.set_title(f"Random Llama {big['model_bytes'] / 2**30:.1f} GiB, disk offload, max_memory cpu "
                 f"{big['max_memory']}")
    ax.legend(loc="upper left", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def tables(results: dict) -> str:
    lines = []
    if results.get("bundled"):
        lines += ["| reconstruction | placement | prune (s) | save (s) | peak RSS (MiB) | WikiText-2 ppl |",
                  "| --- | --- | ---: | ---: | ---: | ---: |"]
        for r in results["bundled"]:
            lines.append(f"| {r['row']} | {r['mode']} | {r['prune_seconds']:.0f} | {r['save_seconds']:.1f} | "
                         f"{r['peak_rss_mib']:,.0f} | {r['wikitext2']:.3f} |")
    big = results.get("big")
    if big:
        lines += ["", "| model (fp32) | max_memory | load (s) | prune (s) | save (s) | reload+forward (s) "
                  "| peak RSS | of model size | peak RssAnon | saved sparsity |",
                  "| ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
                  f"| {big['model_bytes'] / 2**30:.2f} GiB | cpu {big['max_memory']} | {big['timings']['load']:.0f} | "
                  f"{big['timings']['prune']:.0f} | {big['timings']['save']:.0f} | "
                  f"{big['timings']['reload_and_forward']:.0f} | {big['peak_rss_mib']:,.0f} MiB | "
                  f"{big['peak_rss_fraction']:.0%} | {big.get('peak_rss_anon_mib', float('nan')):,.0f} MiB | "
                  f"{big['saved_sparsity']:.3f} |"]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--part", choices=["bundled", "big", "all"], default="all")
    add_data_dir_argument(parser)
    parser.add_argument("--work-dir", default="/tmp/optimum-recon-offload")
    parser.add_argument("--num-samples", type=int, default=16)
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--eval-tokens", type=int, default=16384)
    parser.add_argument("--disk-max-memory", default="150MB")
    parser.add_argument("--big-samples", type=int, default=8)
    parser.add_argument("--big-seq-len", type=int, default=256)
    parser.add_argument("--big-max-memory", default="1GB")
    parser.add_argument("--output", default=str(HERE / "results" / "offload.json"))
    parser.add_argument("--tiny", action="store_true",
                        help="smoke test: part 2 only, on a tiny random model under a tiny max_memory (seconds)")
    parser.add_argument("--child", nargs="+", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.tiny:
        args.part, args.big_samples, args.big_seq_len, args.big_max_memory = "big", 4, 32, "300KB"
    if args.child:
        if args.child[0] == "bundled":
            print(json.dumps(run_bundled(args, *args.child[1:])))
        elif args.child[0] == "build":
            print(json.dumps(str(build_big(args))))
        else:
            print(json.dumps(run_big(args)))
        return
    env = offline_env(args.data_dir)
    output = Path(args.output)
    results = json.loads(output.read_text()) if output.is_file() else {}
    results.update({**run_metadata(),
                    "settings": {k: v for k, v in vars(args).items() if k not in ("child", "output", "part")}})

    def child(*what: str) -> dict:
        out = subprocess.run([sys.executable, __file__, *sys.argv[1:], "--child", *what], env=env,
                             capture_output=True, text=True)
        if out.returncode != 0:
            sys.stderr.write(out.stderr[-4000:])
            raise SystemExit(f"{' '.join(what)} failed")
        return json.loads(out.stdout.strip().splitlines()[-1])

    def write() -> None:
        write_results(output, results)

    Path(args.work_dir).mkdir(parents=True, exist_ok=True)
    if args.part in ("bundled", "all"):
        results["bundled"] = []
        for row in ROWS:
            for mode in MODES:
                results["bundled"].append(child("bundled", mode, row))
                print(f"{row} {mode}: done", flush=True)
                write()
    if args.part in ("big", "all"):
        child("build")
        results["big"] = child("big")
        write()
        plot_rss(results["big"], output.with_name("offload_rss.png"))
    print(tables(results))
    print(f"written to {output}")


if __name__ == "__main__":
    main()
