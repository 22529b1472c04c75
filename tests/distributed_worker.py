"""Run by tests/test_distributed.py under `torchrun`: prune a tiny model with a few recipes and dump, per rank,
the masks, weights and report of each, so the test can compare world sizes. Not a test module itself.

Usage: torchrun --nproc_per_node=N tests/distributed_worker.py MODEL_DIR TEXT_FILE OUT_DIR [--fail MODE]
  --fail mismatch: rank 1 is given another sparsity; --fail stall: rank 1 stops answering in block 1;
  --checkpoint-dir DIR [--crash-at-block K]: a resumable run (that every rank abandons entering block K).
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import torch

from optimum_recon import CalibrationConfig, PruningConfig, ReconPruner
from optimum_recon import distributed as dist

RECIPES = {
    "sparsegpt-lr": dict(method="sparsegpt", reconstruction="layer"),
    "sparsegpt-br-gp": dict(method="sparsegpt", reconstruction="block", propagation="global", epochs=2),
    "wanda-cr-local": dict(method="wanda", reconstruction="cross_block", propagation="local", epochs=1),
    "sparsegpt-br-self": dict(method="sparsegpt", reconstruction="block", epochs=1, self_samples=6),
    "wanda-lr-owl": dict(method="wanda", reconstruction="layer", sparsity=0.7, allocation="owl", owl_lambda=0.1),
}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("model")
    parser.add_argument("text")
    parser.add_argument("out")
    parser.add_argument("--recipes", default=",".join(RECIPES))
    parser.add_argument("--fail", choices=["mismatch", "stall"])
    parser.add_argument("--checkpoint-dir", default=None)
    parser.add_argument("--crash-at-block", type=int, default=None, help="every rank raises entering this block")
    args = parser.parse_args()
    out = Path(args.out)
    for name in args.recipes.split(","):
        recipe = dict(RECIPES[name])
        self_samples = recipe.pop("self_samples", 0)
        source = f"{args.text}+self:{self_samples}" if self_samples else args.text
        calibration = CalibrationConfig(source=source, num_samples=12, seq_len=16, heldout_samples=4,
                                        self_batch_size=2)
        sparsity = recipe.pop("sparsity", 0.5)
        if args.fail == "mismatch" and int(os.environ["RANK"]) == 1:
            sparsity = 0.6
        # float32 training: the runs are compared to 1e-5, and bfloat16 autocast (train_dtype="auto" on a CPU with
        # AMX) rounds a batch split over two ranks differently from the whole batch
        config = PruningConfig(sparsity=sparsity, batch_size=4, train_dtype="float32", calibration=calibration,
                               **recipe)
        pruner = ReconPruner.from_pretrained(args.model, config=config)
        if args.fail == "stall" and dist.rank() == 1:
            def stall(module, inputs):
                time.sleep(600)
            pruner.model.model.layers[1].register_forward_pre_hook(stall)
        if args.crash_at_block is not None:
            before = pruner.model.model.layers[args.crash_at_block - 1].self_attn.q_proj.weight

            def crash(module, inputs):  # once the block before is pruned (OWL's dense pass runs every block first)
                if bool((before == 0).any()):
                    raise RuntimeError("injected crash")
            pruner.model.model.layers[args.crash_at_block].register_forward_pre_hook(crash)
        report = pruner.prune(progress=False, checkpoint_dir=args.checkpoint_dir)
        ppl = pruner.evaluate(args.text, seq_len=16, progress=False)[args.text].perplexity
        weights = {k: v.detach().clone() for k, v in pruner.model.state_dict().items()}
        torch.save({"weights": weights, "report": report.to_dict(), "perplexity": ppl,
                    "world": dist.world_size()}, out / f"{name}-rank{dist.rank()}.pt")
        pruner.save_pretrained(out / f"saved-{name}")
    if dist.is_main_process():
        (out / "done.json").write_text(json.dumps({"world": dist.world_size()}))


if __name__ == "__main__":
    main()
