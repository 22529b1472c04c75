"""The command-line flags of a recipe, and the `optimum-recon prune` command that repeats one.

Shared by the CLI (which builds its flags from this table) and the model card (which prints the command); it knows
the configuration dataclasses only, so that neither has to import the other.
"""

from __future__ import annotations

import argparse
import json
import os
from dataclasses import fields
from typing import Any

from .calibration_config import CalibrationConfig
from .configuration import PruningConfig, field_default

# Flags whose name is not the field's (the calibration source is the most used calibration setting).
_RENAMED = {(CalibrationConfig, "source"): "calibration", (CalibrationConfig, "split"): "calibration-split"}


def float_or_auto(text: str) -> float | str:
    """A number, or the word `auto` (the `lr` flag)."""
    if text.strip().lower() == "auto":
        return "auto"
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is neither a number nor 'auto'") from None


def allocation_value(text: str) -> str | dict[str, float]:
    """`auto`, `uniform`, `owl`, a JSON object {module name: sparsity}, or the path of a JSON file holding one (the
    `allocation` flag)."""
    text = text.strip()
    if text in ("auto", "uniform", "owl"):
        return text
    if not text.startswith("{"):
        if not os.path.isfile(text):
            raise argparse.ArgumentTypeError(f"{text!r} is not 'auto', 'uniform', 'owl', a JSON object or a JSON "
                                             "file")
        with open(text, encoding="utf-8") as fh:
            text = fh.read()
    try:
        table = json.loads(text)
    except json.JSONDecodeError as err:
        raise argparse.ArgumentTypeError(f"the allocation table is not valid JSON: {err.msg}") from None
    if not isinstance(table, dict):
        raise argparse.ArgumentTypeError("the allocation table must be a JSON object {module name: sparsity}")
    return table


# How a field's annotation is parsed on the command line. Lists take several values: --targets q_proj k_proj.
_KINDS = {"float": float, "int": int, "str": str, "float | None": float, "str | None": str, "int | None": int,
          "float | str": float_or_auto, "bool": "flag", "bool | None": "flag", "list[str]": "list",
          "list[str] | None": "list", "tuple[float, float]": "pair", "str | dict[str, float]": allocation_value}


def _recipe_flags() -> dict[str, tuple[type, str, Any]]:
    """CLI flag -> (dataclass, field, kind), for every field of the two configs, in their order: the table is
    derived from the dataclasses, so a new field is a new flag with its docstring as help."""
    flags = {}
    for cls in (PruningConfig, CalibrationConfig):
        for f in fields(cls):
            if f.name == "calibration":
                continue
            kind = _KINDS.get(str(f.type))
            if kind is None:  # pragma: no cover - a new field of a type the table does not know
                raise TypeError(f"{cls.__name__}.{f.name}: no command-line form for the type {f.type!r}")
            flags[_RENAMED.get((cls, f.name), f.name.replace("_", "-"))] = (cls, f.name, kind)
    return flags


RECIPE_FLAGS = _recipe_flags()


TRAINING_FLAGS = {"epochs", "lr", "guard", "patience", "loss", "batch-size", "adam-betas", "weight-decay", "window",
                  "train-dtype", "gradient-checkpointing", "lora-rank", "lora-alpha"}


_ALWAYS = {"sparsity", "pattern", "method", "reconstruction", "propagation", "calibration", "num-samples", "seq-len",
           "seed", "epochs", "lr", "batch-size"}


def recipe_command(config: PruningConfig, model: str | None) -> str:
    """The `optimum-recon prune` command line that repeats ``config`` on ``model``: the main settings always,
    the others when they differ from their defaults; training flags only when something is trained."""
    parts = ["optimum-recon prune"] + ([f"--model {model}"] if model else [])
    for flag, (cls, name, kind) in RECIPE_FLAGS.items():
        value = getattr(config if cls is PruningConfig else config.calibration, name)
        if flag in TRAINING_FLAGS and config.reconstruction == "layer":
            continue
        if value is None or (flag not in _ALWAYS and value == field_default(cls, name)):
            continue
        if kind == "flag":
            parts.append(f"--{flag}" if value else f"--no-{flag}")
        elif isinstance(value, dict):
            parts.append(f"--{flag} '{json.dumps(value)}'")
        elif kind in ("list", "pair"):
            parts.append(f"--{flag} " + " ".join(f"'{v}'" if kind == "list" else str(v) for v in value))
        else:
            parts.append(f"--{flag} {value}")
    lines = [" ".join(parts[:2])] + parts[2:] + ["--output pruned-model"]
    return " \\\n  ".join(lines)
