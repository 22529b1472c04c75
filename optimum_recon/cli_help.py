"""How the command line's help reads: titled groups, choices shown, each default said once, and the spellings users
bring from other tools accepted.

`accelerate launch --help` is the model: a short usage line, then the flags in titled groups. Recipe flags keep the
help text of their config field (written once, in the dataclasses' docstrings); this module adds what a reader of
``--help`` needs beside it: which group a flag is in, the values it takes, and its default when the text does not
already say it. HfArgumentParser spells flags with underscores (``--num_samples``); every flag here takes that
spelling too, as a hidden alias.
"""

from __future__ import annotations

import argparse
from typing import Any

# Recipe flags (recipe.RECIPE_FLAGS) by the help group they appear in.
RECIPE_GROUPS = {
    "what to prune": ("sparsity", "pattern", "method", "allocation", "owl-threshold", "owl-lambda", "targets",
                      "ignore", "dampening", "block-size"),
    "reconstruction": ("reconstruction", "propagation", "epochs", "lr", "guard", "patience", "loss", "batch-size",
                       "adam-betas", "weight-decay", "window", "train-dtype", "gradient-checkpointing", "lora-rank",
                       "lora-alpha"),
    "calibration data": ("calibration", "num-samples", "seq-len", "seed", "text-column", "calibration-split",
                         "heldout-samples", "self-generate", "self-use", "self-temperature", "self-top-k",
                         "self-top-p", "self-prompts", "self-on-eos", "self-batch-size"),
}

# What a value looks like, for flags whose type alone does not say (the metavar).
_METAVARS = {"sparsity": "FRACTION", "pattern": "{unstructured,2:4,4:8,N:M}", "owl-threshold": "M",
             "owl-lambda": "LAMBDA", "targets": "LAYER", "ignore": "LAYER", "dampening": "FRACTION",
             "block-size": "COLUMNS", "epochs": "N", "lr": "{auto,RATE}", "patience": "EPOCHS", "batch-size": "N",
             "adam-betas": ("BETA1", "BETA2"), "weight-decay": "X", "window": "BLOCKS", "lora-rank": "R",
             "lora-alpha": "ALPHA", "calibration": "NAME_OR_FILE", "num-samples": "N", "seq-len": "TOKENS",
             "seed": "N", "text-column": "COLUMN", "calibration-split": "SPLIT", "heldout-samples": "N",
             "self-temperature": "T", "self-top-k": "K", "self-top-p": "P", "self-prompts": "TEXT",
             "self-batch-size": "N", "allocation": "{auto,uniform,owl,JSON}"}


def recipe_choices() -> dict[str, tuple[str, ...]]:
    """The values of the recipe flags that take a name: from the registries and the configs' own tuples, so that a
    new mask method or loss shows up in the help without touching it."""
    from .configuration import PROPAGATIONS
    from .masks import MASK_METHODS
    from .reconstruction import RECONSTRUCTIONS
    from .reconstruction.base import LOSSES

    return {"method": tuple(MASK_METHODS), "reconstruction": tuple(RECONSTRUCTIONS), "propagation": PROPAGATIONS,
            "loss": LOSSES, "train-dtype": ("auto", "float32", "bfloat16", "float16"),
            "self-use": ("reconstruction", "all"), "self-on-eos": ("continue", "resample"),
            "self-generate": ("auto", "off")}


def recipe_metavar(flag: str, choices: dict[str, tuple[str, ...]]) -> Any:
    if flag in choices:
        return "{" + ",".join(choices[flag]) + "}"
    return _METAVARS.get(flag)


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """The default after the help text, once, and only when it says something: not None or False, and not when the
    text already speaks of its default (the config docstrings often do, better than a bare value)."""

    def __init__(self, prog: str, **kwargs: Any) -> None:
        super().__init__(prog, max_help_position=34, **kwargs)

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        default = action.default
        if ("%(default)" in text or "default" in text.lower() or default is None or default is argparse.SUPPRESS
                or isinstance(default, bool) or not action.option_strings or default in ([], ())):
            return text
        shown = " ".join(map(str, default)) if isinstance(default, (list, tuple)) else default
        return f"{text} (default: {str(shown).replace('%', '%%')})"


class Flags:
    """Adds flags to a parser or one of its groups, each with a hidden underscore alias (``--num_samples`` for
    ``--num-samples``, ``--no_guard`` for ``--no-guard``), so that commands written for HfArgumentParser-based tools
    work. The aliases have no help line and no default of their own."""

    def __init__(self, container: Any) -> None:
        self.container = container

    def add(self, *names: str, **kwargs: Any) -> argparse.Action:
        action = self.container.add_argument(*names, **kwargs)
        longs = [n[2:] for n in names if n.startswith("--")]
        aliases = ["--" + n.replace("-", "_") for n in longs if "-" in n]
        hidden = {k: v for k, v in kwargs.items() if k not in ("help", "default", "action")}
        hidden.update(dest=action.dest, help=argparse.SUPPRESS, default=argparse.SUPPRESS)
        if kwargs.get("action") is argparse.BooleanOptionalAction:
            if aliases:
                self.container.add_argument(*aliases, action="store_true", **hidden)
            self.container.add_argument(*["--no_" + n.replace("-", "_") for n in longs], action="store_false",
                                        **hidden)
        elif aliases:
            self.container.add_argument(*aliases, **({"action": kwargs["action"]} if "action" in kwargs else {}),
                                        **hidden)
        return action


def spelled(flag: str) -> str:
    """A flag as the parser names it (``num_samples`` -> ``num-samples``): for telling which flags were given."""
    return flag.replace("_", "-")
