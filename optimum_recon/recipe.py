"""The command-line flags of a recipe, and the `optimum-recon prune` command that repeats one.

Shared by the CLI (which builds its flags from this table) and the model card (which prints the command); it knows
the configuration dataclasses only, so that neither has to import the other.
"""

from __future__ import annotations

from .configuration import CalibrationConfig, PruningConfig, field_default

# CLI flag -> (dataclass, field). Lists take several values: --targets q_proj k_proj.
RECIPE_FLAGS = {
    "sparsity": (PruningConfig, "sparsity", float),
    "pattern": (PruningConfig, "pattern", str),
    "method": (PruningConfig, "method", str),
    "reconstruction": (PruningConfig, "reconstruction", str),
    "propagation": (PruningConfig, "propagation", str),
    "targets": (PruningConfig, "targets", "list"),
    "ignore": (PruningConfig, "ignore", "list"),
    "dampening": (PruningConfig, "dampening", float),
    "block-size": (PruningConfig, "block_size", int),
    "epochs": (PruningConfig, "epochs", int),
    "lr": (PruningConfig, "lr", float),
    "batch-size": (PruningConfig, "batch_size", int),
    "adam-betas": (PruningConfig, "adam_betas", "pair"),
    "weight-decay": (PruningConfig, "weight_decay", float),
    "window": (PruningConfig, "window", int),
    "train-dtype": (PruningConfig, "train_dtype", str),
    "gradient-checkpointing": (PruningConfig, "gradient_checkpointing", "flag"),
    "lora-rank": (PruningConfig, "lora_rank", int),
    "lora-alpha": (PruningConfig, "lora_alpha", float),
    "calibration": (CalibrationConfig, "source", str),
    "num-samples": (CalibrationConfig, "num_samples", int),
    "seq-len": (CalibrationConfig, "seq_len", int),
    "seed": (CalibrationConfig, "seed", int),
    "text-column": (CalibrationConfig, "text_column", str),
    "calibration-split": (CalibrationConfig, "split", str),
    "heldout-samples": (CalibrationConfig, "heldout_samples", int),
    "self-use": (CalibrationConfig, "self_use", str),
    "self-temperature": (CalibrationConfig, "self_temperature", float),
    "self-top-k": (CalibrationConfig, "self_top_k", int),
    "self-top-p": (CalibrationConfig, "self_top_p", float),
    "self-on-eos": (CalibrationConfig, "self_on_eos", str),
    "self-batch-size": (CalibrationConfig, "self_batch_size", int),
    "self-prompts": (CalibrationConfig, "self_prompts", "list"),
}


_TRAINING_FLAGS = {"epochs", "lr", "batch-size", "adam-betas", "weight-decay", "window", "train-dtype",
                   "gradient-checkpointing", "lora-rank", "lora-alpha"}


_ALWAYS = {"sparsity", "pattern", "method", "reconstruction", "propagation", "calibration", "num-samples", "seq-len",
           "seed", "epochs", "lr", "batch-size"}


def recipe_command(config: PruningConfig, model: str | None) -> str:
    """The `optimum-recon prune` command line that repeats ``config`` on ``model``: the main settings always,
    the others when they differ from their defaults; training flags only when something is trained."""
    parts = ["optimum-recon prune"] + ([f"--model {model}"] if model else [])
    for flag, (cls, name, kind) in RECIPE_FLAGS.items():
        value = getattr(config if cls is PruningConfig else config.calibration, name)
        if flag in _TRAINING_FLAGS and config.reconstruction == "layer":
            continue
        if value is None or (flag not in _ALWAYS and value == field_default(cls, name)):
            continue
        if kind == "flag":
            parts.append(f"--{flag}" if value else f"--no-{flag}")
        elif kind in ("list", "pair"):
            parts.append(f"--{flag} " + " ".join(f"'{v}'" if kind == "list" else str(v) for v in value))
        else:
            parts.append(f"--{flag} {value}")
    lines = [" ".join(parts[:2])] + parts[2:] + ["--output pruned-model"]
    return " \\\n  ".join(lines)
