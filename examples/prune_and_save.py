"""Prune a model with block-wise reconstruction, compare perplexities, save it and reload it.

Shows: PruningConfig, ReconPruner.from_pretrained / evaluate / prune / save_pretrained, the report.
Full run (the bundled SmolLM2-135M-Instruct, BR+GP, 64 windows): about 35 minutes on 2 CPU cores, a few
minutes on a GPU. `--tiny` runs the same code on a tiny random model in seconds (used by the tests).

    python examples/prune_and_save.py [--model ID_OR_PATH] [--output DIR] [--tiny]
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

from transformers import AutoModelForCausalLM

from optimum_recon import CalibrationConfig, PruningConfig, ReconPruner


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None, help="default: the bundled SmolLM2-135M-Instruct")
    parser.add_argument("--output", default="outputs/pruned-br-gp")
    parser.add_argument("--tiny", action="store_true", help="a tiny random model and local text: a smoke run")
    args = parser.parse_args()

    calibration = CalibrationConfig(source="c4", num_samples=64, seq_len=512, heldout_samples=8)
    eval_data, eval_kwargs = "wikitext2", {"seq_len": 1024, "max_tokens": 16384}
    if args.tiny:
        from optimum_recon.testing import save_tiny_model, save_tiny_text

        work = Path(tempfile.mkdtemp())
        args.model = str(save_tiny_model(work / "model"))
        text = str(save_tiny_text(work / "text.txt"))
        calibration = CalibrationConfig(source=text, num_samples=8, seq_len=32, heldout_samples=2)
        eval_data, eval_kwargs = text, {"seq_len": 32}
        args.output = str(work / "pruned")

    config = PruningConfig(sparsity=0.5, method="sparsegpt", reconstruction="block", propagation="global",
                           epochs=2 if args.tiny else 10, calibration=calibration)
    pruner = ReconPruner.from_pretrained(args.model, config=config)
    pruner.evaluate(eval_data, **eval_kwargs)
    report = pruner.prune()
    pruner.evaluate(eval_data, **eval_kwargs)
    print(report.summary())
    path = pruner.save_pretrained(args.output)
    reloaded = AutoModelForCausalLM.from_pretrained(path)
    zeros = (reloaded.model.layers[0].mlp.down_proj.weight == 0).float().mean().item()
    print(f"saved to {path}; reloaded with plain transformers, first down_proj is {zeros:.0%} zeros")


if __name__ == "__main__":
    main()
