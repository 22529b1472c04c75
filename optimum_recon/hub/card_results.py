"""How a model card words measured results: the headline (dense and pruned, the recovery, and exactly what was
measured), the protocol of each perplexity, and the `model-index` results the Hub's evaluation widget reads."""

from __future__ import annotations

import statistics
from typing import Any

from huggingface_hub import EvalResult

from ..data.sources import ORIGINS
from ..report import PruningReport
from .provenance import local_words

# Known evaluation names -> (how the card names them, the Hub dataset, its configuration) for `model-index`.
EVAL_DATASETS = {"wikitext2": ("WikiText-2 (raw)", "wikitext", "wikitext-2-raw-v1"),
                 "c4": ("C4 (English)", "allenai/c4", "en"), "ptb": ("Penn Treebank", "ptb_text_only", "penn_treebank")}


def plural(count: int, word: str) -> str:
    """``1 epoch``, ``2 epochs`` (with thousands separators)."""
    return f"{count:,} {word}{'' if count == 1 else 's'}"


def dataset_words(name: str, provenance: dict[str, Any]) -> str:
    """How the card names an evaluation dataset in a table: its display name, or the local file's name."""
    if name in EVAL_DATASETS:
        return EVAL_DATASETS[name][0]
    record = (provenance.get("evaluation") or {}).get(name)
    return f"`{name}` (a local file)" if record and record.get("local") else f"`{name}`"


def protocol_words(name: str, protocol: dict[str, Any] | None, provenance: dict[str, Any]) -> str:
    """Exactly what a perplexity was measured on: which tokens of which split of which copy, in what windows."""
    local = local_words((provenance.get("evaluation") or {}).get(name))
    if not protocol:
        return f"{local or dataset_words(name, provenance)} (how it was measured was not recorded)"
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
    origin = protocol.get("origin")
    if origin in ORIGINS and origin != "local":  # (a local file is named as such already)
        words += ", read from " + ORIGINS[origin]
        if protocol.get("origin") == "bundled" and name == "wikitext2":
            words += " (the whole raw test split)"
    return words + f", in non-overlapping windows of {window:,} tokens"


def headline(report: PruningReport | None) -> list[str]:
    """The numbers a visitor looks for first: dense and pruned, the recovery, and how they were measured."""
    if report is None:
        return []
    lines = []
    provenance = report.provenance or {}
    for name, values in report.perplexity.items():
        dense, pruned = values.get("dense"), values.get("pruned")
        if dense is None or pruned is None:
            continue
        protocols = report.evaluation.get(name) or {}
        protocol = protocols.get("pruned") or protocols.get("dense")
        differ = protocols.get("dense") and protocols.get("pruned") and protocols["dense"] != protocols["pruned"]
        lines.append(
            f"- **{dataset_words(name, provenance)} perplexity: {dense:.2f} dense → {pruned:.2f} pruned**, "
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


def model_index(report: PruningReport | None, title: str) -> list[EvalResult] | None:
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
