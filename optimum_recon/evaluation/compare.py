"""Side-by-side comparison of a dense model and pruned versions of it, as a table, JSON, Markdown and plots.

Models are loaded and measured one at a time (only one is in memory at once), each on the same evaluation data.
A model saved by optimum-recon also brings its `pruning_report.json`: its reconstruction errors join the table
and its per-block error curve the plot.
"""

from __future__ import annotations

import gc
import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Sequence

import torch
from torch import nn

from ..report import REPORT_NAME, PruningReport
from .latency import LatencyResult, measure_latency
from .perplexity import evaluate_perplexity
from .zero_shot import TaskResult, evaluate_zero_shot, parse_tasks, require_lm_eval


@dataclass
class ModelResult:
    """Everything measured for one model of a comparison."""

    name: str
    path: str
    sparsity: float
    size_bytes: int | None
    perplexity: dict[str, float] = field(default_factory=dict)
    tasks: dict[str, TaskResult] = field(default_factory=dict)
    latency: LatencyResult | None = None
    report: PruningReport | None = None

    def to_dict(self) -> dict[str, Any]:
        report = self.report
        return {
            "name": self.name, "path": self.path, "sparsity": self.sparsity, "size_bytes": self.size_bytes,
            "perplexity": self.perplexity,
            "tasks": {t: {"metrics": r.metrics, "num_samples": r.num_samples} for t, r in self.tasks.items()},
            "latency": self.latency.to_dict() if self.latency else None,
            "reconstruction": None if report is None or not report.blocks else {
                "method": report.config.get("method"), "reconstruction": report.config.get("reconstruction"),
                "final_error": report.blocks[-1].error, "final_error_normalized": report.blocks[-1].error_normalized,
                "final_heldout_error": report.blocks[-1].heldout_error,
                "per_block_error_normalized": [b.error_normalized for b in report.blocks],
            },
        }


@dataclass
class Comparison:
    """The results of `compare_models`, one `ModelResult` per model, in the order given."""

    models: list[ModelResult]
    settings: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {"settings": self.settings, "models": [m.to_dict() for m in self.models]}

    def to_markdown(self) -> str:
        """One row per model: perplexities, task accuracies, sparsity, final-block error, size, speed."""
        datasets = list(dict.fromkeys(d for m in self.models for d in m.perplexity))
        tasks = list(dict.fromkeys(t for m in self.models for t in m.tasks))
        latency = any(m.latency for m in self.models)
        header = (["model", "sparsity"] + [f"{d} ppl" for d in datasets] + [f"{t} acc" for t in tasks]
                  + (["mean acc"] if len(tasks) > 1 else []) + ["final-block error (normalized)", "size on disk"]
                  + (["prefill tok/s", "decode tok/s"] if latency else []))
        lines = ["| " + " | ".join(header) + " |", "| --- |" + " ---: |" * (len(header) - 1)]
        for m in self.models:
            accs = [m.tasks[t].accuracy if t in m.tasks else None for t in tasks]
            cells = [m.name, f"{m.sparsity:.1%}"] + [_num(m.perplexity.get(d), ".3f") for d in datasets]
            cells += [_num(a, ".4f") for a in accs]
            if len(tasks) > 1:
                known = [a for a in accs if a is not None]
                cells.append(_num(sum(known) / len(known) if known else None, ".4f"))
            last = m.report.blocks[-1] if m.report is not None and m.report.blocks else None
            cells.append(f"{last.error:.4g} ({last.error_normalized:.3g})" if last else "—")
            cells.append(_size(m.size_bytes))
            if latency:
                cells += [_num(m.latency.prefill_tokens_per_s if m.latency else None, ",.1f"),
                          _num(m.latency.decode_tokens_per_s if m.latency else None, ",.2f")]
            lines.append("| " + " | ".join(cells) + " |")
        return "\n".join(lines)

    def save(self, output_dir: str | os.PathLike, *, overwrite: bool = False,
             protect: Iterable[str | os.PathLike | None] = ()) -> dict[str, Path]:
        """Write ``comparison.json``, ``comparison.md`` and the PNG plots (when matplotlib is installed).

        ``output_dir`` must be new, empty or a comparison optimum-recon wrote, unless ``overwrite`` (`folders.py`);
        it is written atomically."""
        from ..folders import atomic_directory

        final = Path(output_dir).expanduser().resolve()
        with atomic_directory(output_dir, kind="comparison", overwrite=overwrite, protect=protect) as tmp:
            files = self._write(tmp)
        return {key: final / path.relative_to(tmp) for key, path in files.items()}

    def _write(self, out: Path) -> dict[str, Path]:
        files = {"json": out / "comparison.json", "markdown": out / "comparison.md"}
        files["json"].write_text(json.dumps(self.to_dict(), indent=2) + "\n", encoding="utf-8")
        files["markdown"].write_text(self.to_markdown() + "\n", encoding="utf-8")
        try:
            import matplotlib  # noqa: F401
        except ImportError:
            return files
        if any(m.perplexity for m in self.models):
            files["perplexity_plot"] = self._plot_perplexity(out / "perplexity.png")
        reports = {m.name: m.report for m in self.models if m.report is not None and m.report.blocks}
        if reports:
            from ..plotting import plot_block_errors

            files["block_errors_plot"] = Path(plot_block_errors(
                reports, out / "block_errors.png", title="Per-block reconstruction error of each pruned model"))
        for i, model in enumerate(self.models, start=1):  # training_<its place in the table>.png
            name, report = model.name, model.report
            if report is not None and any(b.training and "heldout_per_epoch" in b.training for b in report.blocks):
                from ..plotting import plot_training_curves

                # the guard's decisions per epoch: calibration loss vs held-out error, the kept epoch starred
                files[f"training_plot_{i}"] = Path(plot_training_curves(
                    report, out / f"training_{i}.png", title=f"{name}: error per epoch (epoch 0: masked only)"))
        return files

    def _plot_perplexity(self, path: Path) -> Path:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        datasets = list(dict.fromkeys(d for m in self.models for d in m.perplexity))
        fig, ax = plt.subplots(figsize=(max(5, 1.6 * len(self.models) * len(datasets)), 4), dpi=120)
        width = 0.8 / len(self.models)
        for i, m in enumerate(self.models):
            xs = [j + i * width for j in range(len(datasets))]
            values = [m.perplexity.get(d, math.nan) for d in datasets]
            bars = ax.bar(xs, values, width, label=m.name, color=f"C{i % 10}")
            ax.bar_label(bars, fmt="%.1f", fontsize=7)
        ax.set_xticks([j + width * (len(self.models) - 1) / 2 for j in range(len(datasets))], datasets)
        ax.set_ylabel("perplexity (lower is better)")
        ax.set_title("Perplexity per model")
        ax.legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(path)
        plt.close(fig)
        return path


def _num(value: float | None, fmt: str) -> str:
    return "—" if value is None else format(value, fmt)


def _size(size: int | None) -> str:
    from ..modeling.offload import human_size

    return "—" if size is None else human_size(size)


def measured_sparsity(model: nn.Module, blocks_path: str | None = None) -> float:
    """Fraction of exact zeros in the linear weights of the decoder blocks (offloaded weights included)."""
    from ..modeling.blocks import find_blocks, find_linear_layers
    from ..modeling.offload import weights_on

    _, blocks = find_blocks(model, blocks_path)
    zeros = total = 0
    for block in blocks:
        for layer in find_linear_layers(block):
            with weights_on(layer.module, torch.device("cpu")):
                weight = layer.module.weight
                zeros += int((weight == 0).sum())
                total += weight.numel()
    return zeros / max(total, 1)


def _files_of(path: str) -> Path | None:
    """The local folder holding a model: the path itself, or the Hub cache snapshot of a model id."""
    if os.path.isdir(path):
        return Path(path)
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(path, local_files_only=True))
    except Exception:  # not cached (or not a Hub id): the size is then unknown
        return None


def _size_on_disk(folder: Path | None) -> int | None:
    if folder is None:
        return None
    weights = [p for p in folder.glob("*.safetensors")] or [p for p in folder.glob("*.bin")]
    return sum(p.stat().st_size for p in weights) if weights else None


def compare_models(
    models: Sequence[str | None],
    *,
    names: Sequence[str] | None = None,
    datasets: str | Iterable[str] = ("wikitext2",),
    tasks: str | Iterable[str] | None = None,
    limit: int | float | None = None,
    num_fewshot: int | None = None,
    task_batch_size: int = 1,
    include_path: str | os.PathLike | None = None,
    eval_seq_len: int | None = None,
    eval_max_tokens: int | None = None,
    eval_batch_size: int = 1,
    latency: bool = True,
    latency_kwargs: dict[str, Any] | None = None,
    dtype: Any = None,
    device_map: Any = None,
    output_dir: str | os.PathLike | None = None,
    overwrite: bool = False,
    progress: bool = True,
) -> Comparison:
    """Evaluate each model on the same data and collect the results side by side.

    Args:
        models: Hub ids or local folders (``None``: the bundled SmolLM2-135M-Instruct), typically the dense model
            first, then pruned versions of it.
        names: Labels for the table and plots (default: the folder or repository name).
        datasets: Perplexity datasets (``wikitext2``, ``c4``, ``ptb``, a local file or Hub id); empty for none.
        tasks: lm-eval task names for zero-shot accuracy (needs ``optimum-recon[eval]``).
        limit: Documents per task (quick, not comparable to published numbers).
        num_fewshot: Few-shot examples per prompt (default: each task's own).
        task_batch_size: Requests per forward pass in lm-eval.
        include_path: Folder of extra lm-eval task YAMLs.
        eval_seq_len: Perplexity window (default ``min(context, 2048)``).
        eval_max_tokens: Evaluate only the first N tokens of each dataset.
        latency: Measure prefill and decode tokens/s (`measure_latency`, with ``latency_kwargs``).
        dtype: Load dtype (default float32 on CPU, the checkpoint's on GPU).
        device_map: Passed to `from_pretrained`.
        output_dir: When given, `Comparison.save` writes the table, JSON and plots there (checked before the first
            model is loaded: a new or empty folder, or a comparison written before, unless ``overwrite``).

    Returns:
        A `Comparison`.

    Example:
        ```python
        >>> from optimum_recon.evaluation.compare import compare_models
        >>> table = compare_models(["HuggingFaceTB/SmolLM2-135M", "smollm2-lr", "smollm2-br"], output_dir="cmp")
        >>> print(table.to_markdown())
        ```
    """
    from ..folders import check_output_dir
    from ..modeling.loading import check_model_exists, load_model_and_tokenizer, resolve_model_path

    if not models:
        raise ValueError("compare needs at least one model.")
    dataset_names = [d for d in (datasets.split(",") if isinstance(datasets, str) else list(datasets)) if d]
    task_names = parse_tasks(tasks)
    if task_names:
        require_lm_eval()  # before loading any model
    if names is not None and len(names) != len(models):
        raise ValueError(f"got {len(names)} names for {len(models)} models.")
    paths = [resolve_model_path(m) for m in models]
    for path in paths:  # every model is found before the first one is evaluated
        check_model_exists(path)
    local = [p for p in paths if os.path.isdir(p)]
    if output_dir is not None:
        check_output_dir(output_dir, kind="comparison", overwrite=overwrite, protect=local, flag="--overwrite")
    labels = list(names) if names is not None else _labels(models)
    results = []
    for label, model_arg, path in zip(labels, models, paths):
        kwargs = {"device_map": device_map} if device_map is not None else {}
        model, tokenizer = load_model_and_tokenizer(path, dtype=dtype, **kwargs)
        folder = _files_of(path)
        report_file = folder / REPORT_NAME if folder is not None else None
        entry = ModelResult(name=label, path=str(model_arg) if model_arg is not None else path,
                            sparsity=measured_sparsity(model), size_bytes=_size_on_disk(folder),
                            report=PruningReport.load(report_file) if report_file and report_file.is_file() else None)
        for dataset in dataset_names:
            entry.perplexity[dataset] = evaluate_perplexity(
                model, tokenizer, dataset, seq_len=eval_seq_len, max_tokens=eval_max_tokens,
                batch_size=eval_batch_size, progress=progress).perplexity
        if task_names:
            entry.tasks = evaluate_zero_shot(model, tokenizer, task_names, limit=limit, num_fewshot=num_fewshot,
                                             batch_size=task_batch_size, include_path=include_path)
        if latency:
            entry.latency = measure_latency(model, **(latency_kwargs or {}))
        results.append(entry)
        del model, tokenizer
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    settings = {"datasets": dataset_names, "tasks": task_names, "limit": limit, "num_fewshot": num_fewshot,
                "eval_seq_len": eval_seq_len,
                "eval_max_tokens": eval_max_tokens, "latency": (latency_kwargs or {}) if latency else None,
                "dtype": str(dtype) if dtype is not None else None}
    comparison = Comparison(results, settings)
    if output_dir is not None:
        comparison.save(output_dir, overwrite=overwrite, protect=local)
    return comparison


def _labels(models: Sequence[str | None]) -> list[str]:
    from ..data.default_model import DEFAULT_MODEL_NAME

    labels = [DEFAULT_MODEL_NAME.split("/")[-1] if m is None else Path(str(m).rstrip("/")).name or str(m)
              for m in models]
    seen: dict[str, int] = {}
    unique = []
    for label in labels:  # two folders with the same name get a suffix
        seen[label] = seen.get(label, 0) + 1
        unique.append(label if seen[label] == 1 else f"{label}-{seen[label]}")
    return unique
