"""The flags of every `optimum-recon` command, in titled groups (`cli_help.py` says how help reads).

Recipe flags are generated from the `PruningConfig` / `CalibrationConfig` dataclasses (`recipe.RECIPE_FLAGS`), so
their help text and defaults are written once. The handlers live in `cli.py`, which passes them in.
"""

from __future__ import annotations

import argparse
import textwrap
from typing import Any, Callable

from .calibration_config import CalibrationConfig
from .cli_help import RECIPE_GROUPS, Flags, HelpFormatter, recipe_choices, recipe_metavar
from .configuration import PruningConfig, field_default, field_help
from .recipe import RECIPE_FLAGS

COMMANDS = ("prune", "eval", "compare", "generate-calibration", "decompress", "env")


def _group(parser: argparse.ArgumentParser, title: str, description: str | None = None) -> Flags:
    return Flags(parser.add_argument_group(title, description))


def _model_flags(flags: Flags, blocks: bool = False) -> None:
    flags.add("--model", default=None, metavar="ID_OR_PATH",
              help="Hub model id or local folder (default: the bundled SmolLM2-135M-Instruct).")
    flags.add("--dtype", default=None, metavar="{float32,bfloat16,float16,auto}",
              help="Load dtype (default: float32 on CPU, the checkpoint's dtype on GPU).")
    flags.add("--device-map", default=None, metavar="MAP", help="Passed to from_pretrained (e.g. auto).")
    flags.add("--trust-remote-code", action="store_true", help="Allow custom modeling code from the Hub.")
    flags.add("--allow-missing-weights", action="store_true", help="Load a checkpoint even when weights of the model "
              "are missing from it or it holds weights the model does not have (by default an error: the model "
              "would be partly random).")
    if blocks:
        flags.add("--blocks-path", default=None, metavar="PATH",
                  help="Attribute path of the decoder blocks, e.g. model.layers (default: found).")


def _runtime_flags(flags: Flags, verbose: str = "Log each block's error; show tracebacks.") -> None:
    flags.add("--no-progress", action="store_true", help="Hide progress bars.")
    flags.add("-v", "--verbose", action="store_true", help=verbose)


def _eval_flags(flags: Flags, flag: str, default: str | None, help_text: str) -> None:
    flags.add(flag, default=default, metavar="DATASETS", help=help_text)
    flags.add("--eval-seq-len", type=int, default=None, metavar="TOKENS",
              help="Perplexity window length (default: min(model context, 2048)).")
    flags.add("--eval-max-tokens", type=int, default=None, metavar="N",
              help="Evaluate only the first N tokens of each dataset (bounds the cost; the card says how many).")
    flags.add("--eval-batch-size", type=int, default=1, metavar="N", help="Windows per evaluation forward pass.")


def _task_flags(flags: Flags) -> None:
    flags.add("--tasks", default=None, metavar="TASKS", help="Comma-separated lm-eval tasks for zero-shot accuracy, "
              "e.g. boolq,rte,hellaswag,winogrande,arc_easy,arc_challenge,openbookqa ('paper' for these seven); "
              "needs optimum-recon[eval].")
    flags.add("--limit", type=float, default=None, metavar="N", help="Documents per task (quick; not comparable to "
              "published numbers). Below 1: a fraction of each task.")
    flags.add("--num-fewshot", type=int, default=None, metavar="N",
              help="Few-shot examples (default: the task's own).")
    flags.add("--include-path", default=None, metavar="FOLDER", help="Folder of extra lm-eval task YAMLs.")
    flags.add("--task-batch-size", type=int, default=1, metavar="N", help="Requests per forward pass in lm-eval.")


def _latency_flags(flags: Flags) -> None:
    flags.add("--latency-prompt-tokens", type=int, default=128, metavar="N", help="Prompt length for the speed test.")
    flags.add("--latency-new-tokens", type=int, default=64, metavar="N", help="Tokens generated per speed-test run.")
    flags.add("--latency-batch-size", type=int, default=1, metavar="N", help="Prompts per generate call.")
    flags.add("--latency-warmup", type=int, default=1, metavar="N", help="Untimed runs before measuring.")
    flags.add("--latency-repeats", type=int, default=3, metavar="N", help="Timed runs (the median is reported).")


def _measurement_flags(parser: argparse.ArgumentParser, perplexity: tuple[str, str | None, str],
                       latency: tuple[str, str]) -> None:
    """The perplexity, zero-shot and speed groups of `eval` and `compare` (their dataset flag, default and help; the
    flag that turns the speed test on or off)."""
    _eval_flags(_group(parser, "perplexity"), *perplexity)
    _task_flags(_group(parser, "zero-shot accuracy"))
    speed = _group(parser, "speed")
    speed.add(latency[0], action="store_true", help=latency[1])
    _latency_flags(speed)


def _recipe_flag(flags: Flags, flag: str, choices: dict[str, tuple[str, ...]]) -> None:
    cls, name, kind = RECIPE_FLAGS[flag]
    kwargs: dict[str, Any] = {"help": field_help(cls, name).replace("%", "%%"), "default": field_default(cls, name),
                              "dest": name if cls is PruningConfig else f"calibration_{name}"}
    metavar = recipe_metavar(flag, choices)
    if kind == "list":
        kwargs.update(nargs="+")
    elif kind == "pair":
        kwargs.update(nargs=2, type=float)
    elif kind == "flag":
        kwargs.update(action=argparse.BooleanOptionalAction)
        metavar = None
    else:
        kwargs["type"] = kind
    if metavar is not None:
        kwargs["metavar"] = metavar
    flags.add(f"--{flag}", **kwargs)


_PRUNE_EXAMPLES = """examples:
  optimum-recon prune --output smollm2-50                      # the bundled model, the recommended recipe
  optimum-recon prune --model ID_OR_PATH --pattern 2:4 --method wanda --output out --eval wikitext2
  optimum-recon prune --model ID_OR_PATH --output out --dry-run  # the plan, without loading the weights
  optimum-recon prune --model OTHER --recipe out --output other-out  # repeat a saved recipe
"""


def _prune_parser(sub: Any) -> argparse.ArgumentParser:
    prune = sub.add_parser(
        "prune", help="Prune a model block by block and save it.", formatter_class=HelpFormatter,
        usage="%(prog)s [--model ID_OR_PATH] [--sparsity FRACTION] [--pattern P] [--method M]\n"
              "       [--output FOLDER] [--dry-run] [options]",
        description=textwrap.fill("Prune a causal LM one-shot, block by block, and reconstruct each block so that it "
                                  "keeps as much of the dense model's behaviour as possible. The defaults are the "
                                  "recommended recipe; --dry-run shows what a run would do.", 100),
        epilog=_PRUNE_EXAMPLES)
    model = _group(prune, "model")
    _model_flags(model, blocks=True)
    choices = recipe_choices()
    for title, names in RECIPE_GROUPS.items():
        flags = _group(prune, title)
        if title == "what to prune":
            flags.add("--recipe", default=None, metavar="FOLDER_OR_REPO", help="Start from the pruning_config.json "
                      "of a folder or Hub repo; flags given explicitly override it.")
        for flag in names:
            _recipe_flag(flags, flag, choices)
    _eval_flags(_group(prune, "evaluation"), "--eval", None, "Comma-separated datasets to evaluate before and after "
                "pruning (wikitext2, c4, ptb, a local file or a Hub id); the model card reports both.")
    output = _group(prune, "output and Hub")
    output.add("--output", default=None, metavar="FOLDER", help="Folder to save the pruned model into: a new or "
               "empty folder, or one optimum-recon saved a model into, unchanged (checked before the model is loaded).")
    output.add("--overwrite", action="store_true", help="Replace an --output folder that holds other files (never "
               "the model's own folder, one containing it or one inside it).")
    output.add("--save-dtype", choices=("float32", "bfloat16", "float16"), default=None,
               help="dtype of the saved weights (default: the dtype of the checkpoint the model was loaded from, "
               "whatever dtype pruning ran in).")
    output.add("--sparse-format", choices=("bitmask",), default=None,
               help="Save each pruned weight compact: its kept values plus a packed mask (N:M: which N of every M), "
               "about 0.56 of its dense bytes at 50%%. Loads with AutoModelForCausalLM once optimum_recon is "
               "imported; `optimum-recon decompress` writes a dense copy. Default: dense tensors with zeros, which "
               "every tool reads.")
    output.add("--push-to-hub", default=None, metavar="REPO_ID",
               help="Also upload the saved model to this Hub repository (created if needed).")
    output.add("--private", action="store_true", help="With --push-to-hub: create the repository private.")
    output.add("--base-model", default=None, metavar="HUB_ID", help="The Hub model a local --model folder is a copy "
               "of, for the model card's base_model and its reproduce command.")
    output.add("--license", default=None, metavar="LICENSE", help="The card's licence (default: the base model's, "
               "when its card says).")
    output.add("--dataset-tag", action="append", default=None, metavar="HUB_DATASET_ID",
               help="A Hub dataset to list in the card's metadata (repeatable; default: the calibration dataset "
               "when it is on the Hub).")
    runtime = _group(prune, "runtime")
    runtime.add("--dry-run", action="store_true", help="Print the plan (blocks, layers, sparsity per block, "
                "calibration tokens, estimated time and peak memory, the output folder check) from the model's config "
                "alone, and exit: no weights are loaded, no data is read.")
    runtime.add("--device", default=None, metavar="DEVICE",
                help="Where blocks run (default: the GPU if there is one, else the CPU).")
    runtime.add("--activation-offload", choices=("cpu", "disk"), default="cpu",
                help="Keep activations between blocks in CPU memory or in files (--activation-folder).")
    runtime.add("--activation-folder", default=None, metavar="FOLDER",
                help="Scratch folder for --activation-offload disk.")
    runtime.add("--checkpoint-dir", default=None, metavar="FOLDER", help="Save progress after every block; run the "
                "same command again after an interruption to continue from the last finished block (CR included). "
                "Deleted once the model is saved, unless --keep-checkpoint.")
    runtime.add("--keep-checkpoint", action="store_true", help="Keep the --checkpoint-dir after the model is saved.")
    _runtime_flags(runtime)
    return prune


def _eval_parser(sub: Any) -> argparse.ArgumentParser:
    evaluate = sub.add_parser("eval", help="Perplexity, zero-shot accuracy (lm-eval) and speed of a (pruned) model.",
                              formatter_class=HelpFormatter, description="Evaluate a model (no calibration data is "
                              "read). With --update-card, the results go into a pruned folder's card.")
    _model_flags(_group(evaluate, "model"))
    _measurement_flags(evaluate, ("--dataset", None, "Comma-separated perplexity datasets (wikitext2, c4, ptb, a "
                                  "local file or a Hub id); 'none' for none. Default: wikitext2, unless --tasks or "
                                  "--latency is given."),
                       ("--latency", "Also measure prefill and decode tokens/s."))
    output = _group(evaluate, "output")
    output.add("--json", default=None, metavar="FILE", help="Also write the results to this JSON file (a new file, or "
               "one an earlier eval wrote, unless --overwrite).")
    output.add("--overwrite", action="store_true", help="Let --json replace any existing file.")
    output.add("--update-card", action="store_true", help="Record the results in the model folder's "
               "pruning_report.json and model card (a folder saved by optimum-recon).")
    _runtime_flags(_group(evaluate, "runtime"), "More logging; show tracebacks.")
    return evaluate


def _compare_parser(sub: Any) -> argparse.ArgumentParser:
    compare = sub.add_parser("compare", help="Evaluate a dense model and pruned versions side by side.",
                             formatter_class=HelpFormatter)
    compare.add_argument("models", nargs="+", metavar="MODEL", help="Hub ids or local folders, e.g. the dense model "
                         "first, then pruned versions; 'bundled' is the bundled SmolLM2-135M-Instruct.")
    names = _group(compare, "models")
    names.add("--names", nargs="+", default=None, metavar="NAME", help="Labels for the table (default: folder names).")
    names.add("--dtype", default=None, metavar="{float32,bfloat16,float16,auto}",
              help="Load dtype (default: float32 on CPU, the checkpoint's on GPU).")
    names.add("--device-map", default=None, metavar="MAP", help="Passed to from_pretrained (e.g. auto).")
    _measurement_flags(compare, ("--datasets", "wikitext2", "Comma-separated perplexity datasets; 'none' for none."),
                       ("--no-latency", "Skip the prefill/decode speed measurement."))
    output = _group(compare, "output")
    output.add("--output", default="comparison", metavar="FOLDER", help="Folder for comparison.json, comparison.md "
               "and the PNG plots: new, empty, or an earlier comparison.")
    output.add("--overwrite", action="store_true", help="Replace an --output folder that holds other files.")
    _runtime_flags(_group(compare, "runtime"), "More logging; show tracebacks.")
    return compare


def _generate_parser(sub: Any) -> argparse.ArgumentParser:
    generate = sub.add_parser("generate-calibration", help="Sample calibration text from the dense model itself.",
                              formatter_class=HelpFormatter)
    _model_flags(_group(generate, "model"))
    flags = _group(generate, "generation")
    flags.add("--num-samples", type=int, default=128, metavar="N", help="Sequences to generate.")
    flags.add("--seq-len", type=int, default=field_default(CalibrationConfig, "seq_len"), metavar="TOKENS",
              help="Tokens per sequence.")
    flags.add("--seed", type=int, default=0, metavar="N",
              help="Seed: the same seed and settings give the same tokens.")
    choices = recipe_choices()
    for name in ("self_temperature", "self_top_k", "self_top_p", "self_on_eos", "self_batch_size"):
        flag = name.replace("_", "-")
        metavar = recipe_metavar(flag, choices)
        flags.add(f"--{flag[5:]}", dest=name, type=type(field_default(CalibrationConfig, name)),
                  default=field_default(CalibrationConfig, name), help=field_help(CalibrationConfig, name),
                  **({"metavar": metavar} if metavar else {}))
    flags.add("--prompts", nargs="+", default=None, metavar="TEXT", help=field_help(CalibrationConfig,
                                                                                   "self_prompts"))
    output = _group(generate, "output")
    output.add("--output", default=None, metavar="FOLDER", help="Also save the dataset (input_ids, text) to this "
               "folder (new, empty, or one it wrote before).")
    output.add("--overwrite", action="store_true", help="Replace an --output folder that holds other files.")
    _runtime_flags(_group(generate, "runtime"), "More logging; show tracebacks.")
    return generate


def _decompress_parser(sub: Any) -> argparse.ArgumentParser:
    decompress = sub.add_parser("decompress", formatter_class=HelpFormatter, help="Write a compact sparse checkpoint "
                                "(--sparse-format bitmask) as a plain dense one, for tools that read only dense "
                                "safetensors.")
    decompress.add_argument("folder", help="The compact folder (a local folder or a Hub repo id).")
    decompress.add_argument("output", help="A new or empty folder for the dense copy (its card says it is dense).")
    Flags(decompress).add("--overwrite", action="store_true", help="Replace an output folder that holds other files "
                          "(never the input folder).")
    return decompress


def add_subcommands(parser: argparse.ArgumentParser, handlers: dict[str, Callable[[argparse.Namespace], int]]) -> None:
    """Add every subcommand to ``parser`` (shared by optimum-recon and optimum-cli recon); ``handlers`` maps a
    command to the function that runs it."""
    sub = parser.add_subparsers(dest="recon_command", metavar="{" + ",".join(COMMANDS) + "}")
    built = {"prune": _prune_parser(sub), "eval": _eval_parser(sub), "compare": _compare_parser(sub),
             "generate-calibration": _generate_parser(sub), "decompress": _decompress_parser(sub),
             "env": sub.add_parser("env", formatter_class=HelpFormatter, help="Print the versions and the device, "
                                   "to paste into a bug report.")}
    for name, command in built.items():
        command.set_defaults(recon_handler=handlers[name])
