"""Prune a model that does not fit in memory: accelerate disk offload, activations on disk, resumable.

Shows: `device_map`/`max_memory`/`offload_folder`, `activation_offload="disk"`, `checkpoint_dir` (run it
twice: the second run resumes and finishes at once). For a 7B model on one 24 GB GPU use
`--model meta-llama/Llama-2-7b-hf --dtype bfloat16` (hours). `--tiny` offloads a tiny model's blocks to disk.

    python examples/large_model_offload.py [--model ID_OR_PATH] [--tiny]
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

from optimum_recon import CalibrationConfig, PruningConfig, ReconPruner


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None)
    parser.add_argument("--dtype", default=None)
    parser.add_argument("--work-dir", default="outputs/offload-run")
    parser.add_argument("--tiny", action="store_true")
    args = parser.parse_args()
    work = Path(args.work_dir)
    calibration = CalibrationConfig(source="c4", num_samples=128, seq_len=1024)
    device_map, max_memory = "auto", {0: "20GiB", "cpu": "24GiB"}
    if args.tiny:
        from optimum_recon.testing import save_tiny_model, save_tiny_text

        work = Path(tempfile.mkdtemp())
        args.model = str(save_tiny_model(work / "model"))
        calibration = CalibrationConfig(source=str(save_tiny_text(work / "text.txt")), num_samples=8, seq_len=32)
        device_map = {"model.embed_tokens": "cpu", "model.layers.0": "cpu", "model.layers.1": "disk",
                      "model.layers.2": "disk", "model.norm": "cpu", "model.rotary_emb": "cpu", "lm_head": "cpu"}
        max_memory = None
    config = PruningConfig(method="sparsegpt", reconstruction="layer", calibration=calibration)
    pruner = ReconPruner.from_pretrained(args.model, config=config, dtype=args.dtype, device_map=device_map,
                                         max_memory=max_memory, offload_folder=str(work / "offload"))
    report = pruner.prune(checkpoint_dir=work / "checkpoint", activation_offload="disk",
                          activation_folder=work / "activations")
    print(report.summary())
    print(f"saved to {pruner.save_pretrained(work / 'pruned')}")


if __name__ == "__main__":
    main()
