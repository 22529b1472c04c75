"""The model card written next to every pruned model (`README.md`, Hub metadata in its YAML header)."""

from __future__ import annotations

from huggingface_hub import ModelCard, ModelCardData

from ..configuration import PruningConfig
from ..report import PruningReport
from ..version import __version__

_CITATION = """@inproceedings{shin2024rethinking,
  title     = {Rethinking Pruning Large Language Models: Benefits and Pitfalls of Reconstruction Error Minimization},
  author    = {Shin, Sungbin and Park, Wonpyo and Lee, Jaeho and Lee, Namhoon},
  booktitle = {Proceedings of the 2024 Conference on Empirical Methods in Natural Language Processing},
  year      = {2024}
}"""


def _config_table(config: PruningConfig) -> str:
    rows = ["| setting | value |", "| --- | --- |"]
    data = config.to_dict()
    calibration = data.pop("calibration")
    for key, value in sorted(data.items()):
        rows.append(f"| `{key}` | `{value}` |")
    for key, value in sorted(calibration.items()):
        rows.append(f"| `calibration.{key}` | `{value}` |")
    return "\n".join(rows)


def _results(report: PruningReport | None) -> str:
    if report is None:
        return "No pruning report was saved with this model."
    lines = [
        f"- Measured sparsity of the pruned layers: **{report.model_sparsity:.2%}** "
        f"({report.pruned_parameters:,} weights)",
    ]
    if report.blocks:
        lines.append(
            f"- Reconstruction error of the final block (calibration data, MSE against the dense model): "
            f"{report.final_error:.4g} (normalized: {report.blocks[-1].error_normalized:.4g})"
        )
    if report.perplexity:
        lines += ["", "| dataset | dense perplexity | pruned perplexity |", "| --- | --- | --- |"]
        for name, values in report.perplexity.items():
            dense = values.get("dense")
            pruned = values.get("pruned")
            fmt = lambda v: f"{v:.3f}" if v is not None else "-"  # noqa: E731
            lines.append(f"| {name} | {fmt(dense)} | {fmt(pruned)} |")
    return "\n".join(lines)


def build_model_card(config: PruningConfig, report: PruningReport | None, base_model: str | None = None) -> ModelCard:
    """A model card saying exactly how the model was pruned, with Hub metadata."""
    tags = ["optimum-recon", "pruned", "sparse", f"sparsity-{round(config.sparsity * 100)}"]
    if config.nm is not None:
        tags.append(config.pattern)
    tags.append(config.method)
    data = ModelCardData(
        base_model=base_model if base_model and "/" in base_model else None,
        library_name="transformers",
        pipeline_tag="text-generation",
        tags=tags,
    )
    pattern = "unstructured" if config.nm is None else f"{config.pattern} semi-structured"
    body = f"""
# Pruned {base_model or "model"} ({config.sparsity:.0%} {pattern} sparsity)

This model was pruned one-shot with optimum-recon
{__version__}: each decoder block's linear layers were masked with **{config.method}**
({pattern}, {config.sparsity:.0%} of each layer's weights set to zero) using
{config.calibration.num_samples} calibration windows of {config.calibration.seq_len} tokens from
`{config.calibration.source}` (seed {config.calibration.seed}), with reconstruction `{config.reconstruction}`
and `{config.propagation}` propagation.

## Results

{_results(report)}

## How to load

```python
from transformers import AutoModelForCausalLM
model = AutoModelForCausalLM.from_pretrained("path-or-repo-id")
```

The pruned weights are stored as exact zeros in ordinary safetensors: no extra package is needed.

## Limitations

Unstructured sparsity does not make inference faster or the files smaller with dense kernels: the zeros
are stored and multiplied like any other weight. N:M (2:4) sparsity can be accelerated only by kernels and
hardware that support it. Pruning lowers quality; check the results above on your own task.

## Configuration

{_config_table(config)}

## Citation

```bibtex
{_CITATION}
```
"""
    return ModelCard(f"---\n{data.to_yaml()}\n---\n{body}")
