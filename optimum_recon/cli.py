"""The `optimum-recon` command line (also available as `optimum-cli recon ...`).

Flags for the recipe are generated from the `PruningConfig` / `CalibrationConfig` dataclasses, so their
help text and defaults are written once.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import sys
import traceback
import warnings
from dataclasses import fields
from typing import Any

from .calibration_config import CalibrationConfig
from .cli_help import spelled
from .cli_messages import configure_logging, error_line, one_line_warnings, user_errors
from .configuration import PruningConfig
from .recipe import RECIPE_FLAGS as _RECIPE_FLAGS
from .recipe import recipe_command  # noqa: F401 - part of this module's interface

logger = logging.getLogger(__name__)

def _latency_kwargs(args: argparse.Namespace) -> dict[str, int]:
    return dict(prompt_tokens=args.latency_prompt_tokens, new_tokens=args.latency_new_tokens,
                batch_size=args.latency_batch_size, warmup=args.latency_warmup, repeats=args.latency_repeats)


def _limit(value: float | None) -> int | float | None:
    return int(value) if value is not None and value >= 1 else value


def _datasets(value: str | None) -> list[str]:
    return [] if value is None or value.strip().lower() == "none" else [d for d in value.split(",") if d]


def add_subcommands(parser: argparse.ArgumentParser) -> None:
    """Add every subcommand (`cli_parsers.py`) to ``parser`` (shared by optimum-recon and optimum-cli recon)."""
    from .cli_parsers import add_subcommands as add

    add(parser, {"prune": run_prune, "eval": run_eval, "compare": run_compare, "generate-calibration": run_generate,
                 "decompress": run_decompress, "env": run_env})


def _explicit_flags(argv: list[str]) -> set[str]:
    """The long flags given on the command line, as the parser spells them (``--num_samples`` is ``num-samples``)."""
    return {spelled(a[2:].split("=")[0]) for a in argv if a.startswith("--")}


def config_from_args(args: argparse.Namespace, argv: list[str] | None = None) -> PruningConfig:
    """A `PruningConfig` from parsed flags (over a ``--recipe`` when given)."""
    values = {f.name: getattr(args, f.name) for f in fields(PruningConfig) if hasattr(args, f.name)}
    calibration = {f.name: getattr(args, f"calibration_{f.name}") for f in fields(CalibrationConfig)}
    argv = argv if argv is not None else getattr(args, "argv", None)
    explicit = _explicit_flags(argv if argv is not None else sys.argv[1:])
    if getattr(args, "recipe", None):
        base = PruningConfig.from_pretrained(args.recipe).to_dict()
        for flag, (cls, name, _) in _RECIPE_FLAGS.items():
            if flag in explicit or f"no-{flag}" in explicit:  # (--no-guard is as explicit as --guard)
                continue
            if cls is PruningConfig:
                values[name] = base[name]
            else:
                calibration[name] = base["calibration"][name]
    values.pop("calibration", None)
    if getattr(args, "recipe", None) and "calibration" not in explicit:
        _check_recipe_data(args.recipe, calibration["source"])
    config = PruningConfig(**values, calibration=CalibrationConfig(**calibration))
    if config.reconstruction == "layer" or config.epochs == 0:
        given = sorted(explicit & {"lr", "guard", "no-guard", "patience", "loss"})
        if given:
            warnings.warn(f"{', '.join('--' + g for g in given)} ignored: with --reconstruction "
                          f"{config.reconstruction} and --epochs {config.epochs} nothing is trained.", stacklevel=2)
    return config


def _check_recipe_data(recipe: str, source: str) -> None:
    """A recipe names its local calibration file by its base name (never the path it had on the machine that made
    it): when that file is not here, say what it was and how to give it."""
    from .data.sources import looks_local
    from .report import REPORT_NAME

    external = source.partition("+self:")[0]
    if not looks_local(external) or os.path.exists(external):
        return
    record: dict[str, Any] = {}
    report = os.path.join(recipe, REPORT_NAME)
    if os.path.isfile(report):
        with contextlib.suppress(OSError, ValueError):
            with open(report, encoding="utf-8") as fh:
                record = (json.load(fh).get("provenance") or {}).get("calibration") or {}
    digest = f" (sha256 {record['sha256'][:16]}…)" if record.get("sha256") else ""
    raise ValueError(f"the recipe {recipe!r} was calibrated on a local file, {external!r}{digest}, which is not here: "
                     f"pass --calibration PATH (that file, or other data) to use the recipe.")


def _load(args: argparse.Namespace, config: PruningConfig | None = None):
    from .pruner import ReconPruner

    kwargs: dict[str, Any] = {"dtype": args.dtype, "device_map": args.device_map,
                              "allow_missing_weights": args.allow_missing_weights}
    if args.trust_remote_code:
        kwargs["trust_remote_code"] = True
    # eval and generate-calibration prune nothing: they never read (or download) calibration data
    return ReconPruner.from_pretrained(args.model, config, blocks_path=getattr(args, "blocks_path", None),
                                       read_calibration=config is not None, **kwargs)


def _eval_kwargs(args: argparse.Namespace) -> dict[str, Any]:
    return dict(seq_len=args.eval_seq_len, max_tokens=args.eval_max_tokens, batch_size=args.eval_batch_size,
                progress=not args.no_progress)


def _check_eval_data(datasets: list[str]) -> None:
    """Read each local evaluation file now (cheap), so that a bad one fails before the model is loaded."""
    from .data.sources import check_source, load_eval_text, looks_local

    for name in datasets:
        check_source(name)
        if os.path.exists(name) or looks_local(name):
            load_eval_text(name)


def run_dry_run(args: argparse.Namespace) -> int:
    """`prune --dry-run`: the checks of a real run, then the plan and its cost from the model's config alone."""
    from .data.default_model import DEFAULT_MODEL_NAME
    from .dry_run import describe, plan_prune_cost
    from .folders import OutputFolderError
    from .modeling.loading import check_model_exists, resolve_model_path

    config = config_from_args(args)
    path = resolve_model_path(args.model)
    check_model_exists(path, args.trust_remote_code)
    plan = plan_prune_cost(path, args.model or DEFAULT_MODEL_NAME, config, dtype=args.dtype,
                           blocks_path=args.blocks_path, device=args.device, trust_remote_code=args.trust_remote_code)
    refused = None
    plan.output = "none given: nothing would be saved (pass --output FOLDER)"
    if args.output:
        held = os.path.isdir(args.output) and bool(os.listdir(args.output))
        try:
            _check_output(args, path if os.path.isdir(path) else None)
            plan.output = f"{args.output}: " + (
                "a new or empty folder: the model would be saved there" if not held else
                "replaced (--overwrite)" if args.overwrite else
                "a folder optimum-recon saved before, unchanged: it would be replaced")
        except OutputFolderError as err:
            refused = err
            plan.output = f"{args.output}: refused ({err})"
    print(describe(plan, config))
    if refused is not None:
        raise refused
    return 0


def _check_output(args: argparse.Namespace, model_folder: str | None) -> None:
    """The --output check of `prune` (and of its dry run): refused like the save would refuse it."""
    from .folders import check_output_dir

    check_output_dir(args.output, kind="model", overwrite=args.overwrite, what="--output",
                     protect=[model_folder, ("--checkpoint-dir", args.checkpoint_dir)])


def _preflight_prune(args: argparse.Namespace) -> PruningConfig:
    """Everything `prune` can check before the model is loaded: the recipe, the folders, the device, the dtype and
    the evaluation data (the calibration data is read by `ReconPruner.from_pretrained`, before the weights)."""
    from .modeling.loading import parse_dtype, resolve_model_path
    from .modeling.offload import check_device

    config = config_from_args(args)
    parse_dtype(args.dtype)
    check_device(args.device)
    model_path = resolve_model_path(args.model)
    model_folder = model_path if os.path.isdir(model_path) else None
    if args.output:
        _check_output(args, model_folder)
    if args.checkpoint_dir:
        from .engine.checkpoint import check_checkpoint_dir

        check_checkpoint_dir(args.checkpoint_dir, protect=[model_folder, ("--output", args.output)],
                             what="--checkpoint-dir")
    if args.activation_folder and os.path.isfile(args.activation_folder):
        raise ValueError(f"--activation-folder {args.activation_folder!r} is a file: pass a folder.")
    if args.push_to_hub and not args.output:
        logger.info("--push-to-hub without --output: the model is saved to a temporary folder first")
    _check_eval_data([d for d in (args.eval or "").split(",") if d])
    return config


def run_prune(args: argparse.Namespace) -> int:
    if args.dry_run:
        return run_dry_run(args)
    config = _preflight_prune(args)
    pruner = _load(args, config)
    datasets = [d for d in (args.eval or "").split(",") if d]
    if datasets:
        pruner.evaluate(datasets, **_eval_kwargs(args))
    report = pruner.prune(device=args.device, progress=not args.no_progress, checkpoint_dir=args.checkpoint_dir,
                          activation_offload=args.activation_offload, activation_folder=args.activation_folder)
    if datasets:
        pruner.evaluate(datasets, **_eval_kwargs(args))
    print(report.summary())
    saved = None
    if args.output:
        saved = pruner.save_pretrained(args.output, overwrite=args.overwrite, save_dtype=args.save_dtype,
                                       sparse_format=args.sparse_format, **_card_metadata(args))
        print(f"saved to {saved}")
    if args.push_to_hub:
        commit = pruner.push_to_hub(args.push_to_hub, private=args.private or None, save_dtype=args.save_dtype,
                                    sparse_format=args.sparse_format, **_card_metadata(args))
        print(f"pushed to {args.push_to_hub}: {getattr(commit, 'commit_url', commit)}")
    if args.checkpoint_dir:
        _finish_checkpoint(args.checkpoint_dir, keep=args.keep_checkpoint or not (saved or args.push_to_hub))
    return 0


def _card_metadata(args: argparse.Namespace) -> dict[str, Any]:
    return {"base_model_id": args.base_model, "license": args.license, "datasets": args.dataset_tag}


def _finish_checkpoint(folder: str, keep: bool) -> None:
    """The checkpoint of a finished run is no longer needed once the model is saved: say so, or delete it."""
    from .engine.checkpoint import remove_checkpoint
    from .folders import folder_size
    from .modeling.offload import human_size

    if not os.path.isdir(folder) or int(os.environ.get("RANK", "0")) != 0:
        return
    if keep:
        print(f"the checkpoint folder {folder} ({human_size(folder_size(folder))}) holds the finished run; delete it "
              "when you no longer need it (without --keep-checkpoint, a saved run deletes it).")
        return
    print(f"deleted the finished run's checkpoint folder {folder} ({human_size(remove_checkpoint(folder))} freed).")


def _written_by_eval(data: Any) -> bool:
    return isinstance(data, dict) and set(data) >= {"model", "results"}


def run_eval(args: argparse.Namespace) -> int:
    from .modeling.loading import parse_dtype, resolve_model_path

    datasets = _datasets(args.dataset) if args.dataset is not None else (
        [] if args.tasks or args.latency else ["wikitext2"])
    if not datasets and not args.tasks and not args.latency:
        raise ValueError("nothing to evaluate: give --dataset, --tasks or --latency.")
    if args.tasks:
        from .evaluation.zero_shot import require_lm_eval

        require_lm_eval()  # before the model load
    parse_dtype(args.dtype)
    if args.json:
        from .folders import check_output_file

        check_output_file(args.json, overwrite=args.overwrite, what="--json", ours=_written_by_eval,
                          writer="optimum-recon eval")
    if args.update_card and not os.path.isfile(os.path.join(resolve_model_path(args.model), "pruning_config.json")):
        raise ValueError(f"--update-card needs a folder saved by optimum-recon; {args.model!r} has no "
                         "pruning_config.json.")
    _check_eval_data(datasets)
    pruner = _load(args)
    output: dict[str, Any] = {"model": args.model, "results": {}}
    protocols: dict[str, dict[str, Any]] = {}
    for name, result in pruner.evaluate(datasets, **_eval_kwargs(args)).items():
        print(f"{name}: perplexity {result.perplexity:.3f} ({result.num_tokens:,} tokens, windows of {result.seq_len})")
        output["results"][name] = {"perplexity": result.perplexity, "num_tokens": result.num_tokens,
                                   "seq_len": result.seq_len}
        protocols[name] = result.protocol()
    tasks = {}
    if args.tasks:
        tasks = pruner.evaluate_tasks(args.tasks, limit=_limit(args.limit), num_fewshot=args.num_fewshot,
                                      batch_size=args.task_batch_size, include_path=args.include_path)
        for name, result in tasks.items():
            shown = ", ".join(f"{k} {v:.4f}" for k, v in result.metrics.items() if not k.endswith("_stderr"))
            print(f"{name}: {shown} ({result.num_samples} documents)")
        output["tasks"] = {n: {"metrics": r.metrics, "num_samples": r.num_samples} for n, r in tasks.items()}
    if args.latency:
        from .evaluation.latency import measure_latency

        speed = measure_latency(pruner.model, **_latency_kwargs(args))
        print(f"speed on {speed.device}: prefill {speed.prefill_tokens_per_s:,.1f} tokens/s, decode "
              f"{speed.decode_tokens_per_s:,.2f} tokens/s (batch {speed.batch_size}, median of {speed.repeats})")
        output["latency"] = speed.to_dict()
    if args.json:
        with open(args.json, "w", encoding="utf-8") as fh:
            json.dump(output, fh, indent=2)
    if args.update_card:
        from .hub.save import record_evaluation
        from .modeling.loading import resolve_model_path

        folder = record_evaluation(
            resolve_model_path(args.model), perplexity={n: r["perplexity"] for n, r in output["results"].items()},
            zero_shot={n: r.accuracy for n, r in tasks.items() if r.accuracy is not None}, protocols=protocols)
        print(f"results recorded in {folder / 'README.md'}")
    return 0


def run_compare(args: argparse.Namespace) -> int:
    from .evaluation.compare import compare_models
    from .modeling.loading import parse_dtype

    parse_dtype(args.dtype)
    _check_eval_data(_datasets(args.datasets))
    comparison = compare_models(
        [None if m == "bundled" else m for m in args.models], names=args.names, datasets=_datasets(args.datasets),
        tasks=args.tasks, limit=_limit(args.limit), num_fewshot=args.num_fewshot, task_batch_size=args.task_batch_size,
        include_path=args.include_path, eval_seq_len=args.eval_seq_len,
        eval_max_tokens=args.eval_max_tokens, eval_batch_size=args.eval_batch_size, latency=not args.no_latency,
        latency_kwargs=_latency_kwargs(args), dtype=args.dtype, device_map=args.device_map, output_dir=args.output,
        overwrite=args.overwrite, progress=not args.no_progress)
    print(comparison.to_markdown())
    print(f"written to {args.output}/ (comparison.json, comparison.md, plots)")
    return 0


def run_generate(args: argparse.Namespace) -> int:
    from .data.self_generate import load_or_generate, save_dataset

    cal = CalibrationConfig(source=f"self:{args.num_samples}" if args.num_samples > 0 else "self:0",
                            seq_len=args.seq_len, seed=args.seed, self_temperature=args.self_temperature,
                            self_top_k=args.self_top_k, self_top_p=args.self_top_p, self_on_eos=args.self_on_eos,
                            self_batch_size=args.self_batch_size, self_prompts=args.prompts)
    if args.output:
        from .folders import check_output_dir

        check_output_dir(args.output, kind="dataset", overwrite=args.overwrite, what="--output")
    pruner = _load(args)
    dataset = load_or_generate(pruner.model, pruner.tokenizer, cal, progress=not args.no_progress)
    print(f"{len(dataset)} sequences of {args.seq_len} tokens; first: {dataset[0]['text'][:200]!r}")
    if args.output:
        print(f"saved to {save_dataset(dataset, args.output, overwrite=args.overwrite)}")
    print(f"use them with: optimum-recon prune --calibration c4+self:{args.num_samples} --seq-len {args.seq_len} "
          f"--seed {args.seed} (the cache is reused when the model, seed and settings match)")
    return 0


def run_decompress(args: argparse.Namespace) -> int:
    from .hub.compact import decompress_folder
    from .modeling.loading import resolve_model_path

    folder = args.folder
    if not os.path.isdir(folder):  # a Hub repo: download it (from the cache when it is there)
        from huggingface_hub import snapshot_download

        folder = snapshot_download(resolve_model_path(folder))
    out = decompress_folder(folder, args.output, overwrite=args.overwrite)
    print(f"wrote the dense checkpoint to {out}")
    return 0


def run_env(args: argparse.Namespace) -> int:
    from .environment import environment_report

    print(environment_report())
    return 0


def run_args(args: argparse.Namespace, parser: argparse.ArgumentParser | None = None) -> int:
    """Run a parsed `prune` / `eval` command; user errors are printed without a traceback."""
    handler = getattr(args, "recon_handler", None)
    if handler is None:
        if parser is not None:
            parser.print_help()
        return 2
    verbose = getattr(args, "verbose", False)
    configure_logging(verbose)
    # Under torchrun / accelerate launch every rank runs this command; rank 0 prints the results.
    quiet = int(os.environ.get("RANK", "0")) != 0
    try:
        with open(os.devnull, "w") as devnull, (contextlib.redirect_stdout(devnull) if quiet
                                                 else contextlib.nullcontext()), one_line_warnings(verbose):
            return handler(args)
    except KeyboardInterrupt:
        hint = " (run the same command again to resume from --checkpoint-dir)" if getattr(
            args, "checkpoint_dir", None) else ""
        print(f"\noptimum-recon: interrupted; nothing was saved that was not complete{hint}.", file=sys.stderr)
        return 130
    except user_errors() as err:
        if verbose:
            traceback.print_exc()
        print(f"optimum-recon: error: {error_line(err)}", file=sys.stderr)
        return 2


def build_parser() -> argparse.ArgumentParser:
    from .version import __version__

    parser = argparse.ArgumentParser(prog="optimum-recon",
                                     description="Prune LLMs and reconstruct them block by block.")

    parser.add_argument("--version", action="version", version=f"optimum-recon {__version__}")
    add_subcommands(parser)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    args.argv = list(argv) if argv is not None else sys.argv[1:]
    return run_args(args, parser)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
