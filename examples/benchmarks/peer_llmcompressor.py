"""Peer row: llm-compressor's Wanda with its OWL sparsity profile, on the same calibration windows and evaluation.

llm-compressor pins its own transformers, so it lives in its own virtual environment; this script runs in three
processes:
  1. (our environment) the bundled model's calibration windows exactly as `reconstruction.py` draws them (64 C4
     windows of 512 tokens, seed 0), written to a file;
  2. (llm-compressor's environment, ``--peer-python``) `oneshot` with `WandaPruningModifier(sparsity=S,
     sparsity_profile="owl", owl_m=5, owl_lmbda=0.08)` on those windows; the pruned model saved dense;
  3. (our environment) WikiText-2 perplexity of the saved model as in `reconstruction.py` (first 65,536 test
     tokens, windows of 1,024), its measured sparsity, and the time of step 2.

    python -m venv /tmp/llmc && /tmp/llmc/bin/pip install torch==2.13.0 llmcompressor
    python examples/benchmarks/peer_llmcompressor.py --peer-python /tmp/llmc/bin/python --sparsity 0.7
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

from _common import HERE, add_data_dir_argument, offline_env, run_metadata, write_results


def prepare(args) -> None:
    import torch

    from optimum_recon import CalibrationConfig, PruningConfig, ReconPruner

    config = PruningConfig(calibration=CalibrationConfig(source="c4", num_samples=args.num_samples,
                                                         seq_len=args.seq_len, heldout_samples=16, seed=0))
    pruner = ReconPruner.from_pretrained(args.model, config=config)
    ids, _ = pruner.calibration_ids()
    work = Path(args.work_dir)
    work.mkdir(parents=True, exist_ok=True)
    torch.save(ids, work / "calibration.pt")
    pruner.model.save_pretrained(work / "dense")
    pruner.tokenizer.save_pretrained(work / "dense")


def prune_with_llmcompressor(args) -> None:  # runs in llm-compressor's environment
    import torch
    from datasets import Dataset
    from llmcompressor import oneshot
    from llmcompressor.modifiers.pruning.wanda import WandaPruningModifier
    from transformers import AutoModelForCausalLM

    work = Path(args.work_dir)
    ids = torch.load(work / "calibration.pt")
    data = Dataset.from_dict({"input_ids": ids.tolist(), "attention_mask": torch.ones_like(ids).tolist()})
    model = AutoModelForCausalLM.from_pretrained(work / "dense", dtype=torch.float32)
    modifier = WandaPruningModifier(sparsity=args.sparsity, sparsity_profile="owl", owl_m=5, owl_lmbda=0.08,
                                    mask_structure="0:0", targets=["Linear"], ignore=["re:.*lm_head"])
    start = time.perf_counter()
    oneshot(model=model, dataset=data, recipe=modifier, num_calibration_samples=ids.shape[0],
            max_seq_length=ids.shape[1], batch_size=1, shuffle_calibration_samples=False)
    seconds = time.perf_counter() - start
    model.save_pretrained(work / "pruned", save_compressed=False)
    (work / "prune.json").write_text(json.dumps({"seconds": seconds}))


def evaluate(args) -> dict:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from optimum_recon.evaluation.perplexity import evaluate_perplexity

    work = Path(args.work_dir)
    model = AutoModelForCausalLM.from_pretrained(work / "pruned", dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(work / "dense")
    result = evaluate_perplexity(model, tokenizer, "wikitext2", seq_len=args.eval_seq_len,
                                 max_tokens=args.eval_tokens, progress=False)
    zeros = total = 0
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear) and ".layers." in name:
            zeros += int((module.weight == 0).sum())
            total += module.weight.numel()
    return {"method": "llm-compressor wanda", "row": "LR allocation=owl", "wikitext2": result.perplexity,
            "model_sparsity": zeros / total, "seconds": json.loads((work / "prune.json").read_text())["seconds"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--peer-python", required=False, help="the python of llm-compressor's environment")
    parser.add_argument("--model", default=None)
    parser.add_argument("--sparsity", type=float, default=0.7)
    parser.add_argument("--num-samples", type=int, default=64)
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--eval-tokens", type=int, default=65536)
    parser.add_argument("--eval-seq-len", type=int, default=1024)
    parser.add_argument("--work-dir", default="/tmp/optimum-recon-peer")
    parser.add_argument("--output", default=None)
    parser.add_argument("--phase", choices=["prepare", "prune"], default=None, help=argparse.SUPPRESS)
    add_data_dir_argument(parser)
    args = parser.parse_args()
    if args.phase == "prepare":
        return prepare(args)
    if args.phase == "prune":
        return prune_with_llmcompressor(args)
    if not args.peer_python:
        raise SystemExit("--peer-python: the python of a virtual environment with llmcompressor installed")
    env = offline_env(args.data_dir)
    os.environ.update(env)  # (step 3 runs here)
    passed = list(sys.argv[1:])
    for python, phase in ((sys.executable, "prepare"), (args.peer_python, "prune")):
        subprocess.run([python, __file__, *passed, "--phase", phase], env=env, check=True)
    row = evaluate(args)
    output = Path(args.output or HERE / "results" / f"peer_llmcompressor_{round(args.sparsity * 100)}.json")
    write_results(output, {**run_metadata(), "settings": {k: v for k, v in vars(args).items()
                                                          if k not in ("peer_python", "output", "phase", "work_dir")},
                           "runs": [row]})
    print(json.dumps(row, indent=2))
    print(f"written to {output}")


if __name__ == "__main__":
    main()
