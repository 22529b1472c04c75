"""Writing a pruned model so that an interrupted or failed save never damages a good one, and never a user's files.

The folder rules (what may be written, atomic replacement, leftovers of killed saves) are `folders.py`'s.
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path
from typing import Any

import torch
from huggingface_hub import ModelCard

from ..configuration import PruningConfig
from ..folders import OutputFolderError, atomic_directory, changed_since_written, update_marker
from ..report import REPORT_NAME, PruningReport
from .card import base_model_license, build_model_card
from .compact import SPARSE_FORMATS, dtype_name, rewrite_weights
from .provenance import Provenance, public_path


def save_pruned_model(
    model,
    tokenizer,
    config: PruningConfig,
    report: PruningReport | None,
    save_directory: str | os.PathLike,
    *,
    base_model: str | None = None,
    max_shard_size: str | int = "5GB",
    blocks_path: str | None = None,
    overwrite: bool = False,
    protect: tuple = (),
    save_dtype: Any = None,
    sparse_format: str | None = None,
    base_model_id: str | None = None,
    license: str | None = None,
    datasets: list[str] | None = None,
) -> Path:
    """Save weights (safetensors), tokenizer, `pruning_config.json`, `pruning_report.json` and a model card.

    What is written for people to read never holds a local path (`provenance.py`): ``base_model`` (where the model
    was loaded from) and local data files are published by name, marked local, data files with their SHA-256.
    ``base_model_id``, ``license`` and ``datasets`` fill the card's Hub metadata where they cannot be inferred (a
    local copy of a Hub model, say): the Hub id it is a copy of, its licence, the datasets to list.

    ``save_directory`` must be new, empty, or a model folder optimum-recon saved before (see `folders.py`);
    ``overwrite`` replaces any other folder except the ``protect``ed ones (the input model's folder).
    The weights are written in ``save_dtype`` (default: the model's dtype in memory), compact with
    ``sparse_format="bitmask"`` (see `compact.py`).

    A model dispatched with CPU or disk offload is written block by block: each shard holds at most one decoder
    block, so the save never brings more than that into memory (see `offloaded_shard_size`).
    """
    from ..modeling.offload import offload_visible_to_save, offloaded_shard_size

    dtype = dtype_name(save_dtype if save_dtype is not None else getattr(model, "dtype", torch.float32))
    if sparse_format is not None and sparse_format not in SPARSE_FORMATS:
        raise ValueError(f"sparse_format={sparse_format!r} is not valid: choose {', '.join(SPARSE_FORMATS)}, or None "
                         "for dense tensors with zeros.")
    shard_size = offloaded_shard_size(model, max_shard_size, blocks_path)
    folder = atomic_directory(save_directory, kind="model", overwrite=overwrite, protect=protect)
    with folder as tmp, warnings.catch_warnings(), offload_visible_to_save(model):
        # transformers warns that an offloaded save needs CPU memory for a whole shard; ours is one block.
        warnings.filterwarnings("ignore", message="Attempting to save a model with offloaded modules")
        model.save_pretrained(tmp, max_shard_size=shard_size)
        stats = rewrite_weights(tmp, dtype, sparse_format, config.nm)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        provenance = Provenance.of(
            base_model, config, evaluated=list(report.perplexity) if report is not None else (),
            base_model=base_model_id, datasets=datasets,
            license=license or base_model_license(base_model) or base_model_license(base_model_id))
        public = provenance.public_config(config)
        public.save_pretrained(tmp)
        published = None
        if report is not None:
            report.saved = {"dtype": dtype, "sparse_format": sparse_format, **stats}
            report.provenance = provenance.inputs
            published = PruningReport.from_dict(provenance.scrub(report.to_dict()))
            published.save(tmp / REPORT_NAME)
        card = build_model_card(public, published, base_model=public_path(base_model) if base_model else None,
                                license=provenance.inputs.get("license"))
        ModelCard(provenance.scrub(card.content)).save(tmp / "README.md")
    return Path(save_directory).expanduser().resolve()


def card_of_folder(folder: str | os.PathLike, *, repo_id: str | None = None) -> ModelCard:
    """The model card of a folder saved by optimum-recon, rebuilt from its recipe and report (``repo_id``: the
    repository it is pushed to, named by its load snippet)."""
    folder = Path(folder)
    config = PruningConfig.from_pretrained(str(folder))
    report_path = folder / REPORT_NAME
    report = PruningReport.load(report_path) if report_path.is_file() else None
    return build_model_card(config, report, repo_id=repo_id)


def record_evaluation(
    folder: str | os.PathLike,
    *,
    perplexity: dict[str, float] | None = None,
    zero_shot: dict[str, float] | None = None,
    protocols: dict[str, dict[str, Any]] | None = None,
) -> Path:
    """Add measured results of a saved pruned model to its `pruning_report.json` and rewrite its model card.

    The values are recorded as the ``pruned`` column (the dense column is kept as it was), ``protocols`` (dataset
    -> `PerplexityResult.protocol`) as how they were measured. The card is rebuilt from the saved recipe and report.
    Local evaluation files are published by name, like a save's (`provenance.py`).

    Raises:
        FileNotFoundError: When ``folder`` was not saved by optimum-recon (no `pruning_config.json`).
        OutputFolderError: When its card or report was edited since optimum-recon wrote it (its marker says so):
            the edits are never replaced.
    """
    folder = Path(folder).expanduser().resolve()
    if not (folder / "pruning_config.json").is_file():
        raise FileNotFoundError(f"{str(folder)!r} has no pruning_config.json: only a folder saved by optimum-recon "
                                "has a model card to update.")
    edited = changed_since_written(folder, ["README.md", REPORT_NAME])
    if edited:
        them = "them" if len(edited) > 1 else "it"
        raise OutputFolderError(
            f"{str(folder)!r}: {' and '.join(edited)} changed since optimum-recon wrote {them}; recording the results "
            "would replace your edits. Copy them elsewhere (or save the model again) first.")
    report_path = folder / REPORT_NAME
    report = PruningReport.load(report_path) if report_path.is_file() else PruningReport()
    provenance = Provenance.of(None, None, evaluated=[*(perplexity or {})], recorded=report.provenance)
    for name, value in (perplexity or {}).items():
        report.perplexity.setdefault(public_path(name), {})["pruned"] = value
        if protocols and name in protocols:
            report.evaluation.setdefault(public_path(name), {})["pruned"] = protocols[name]
    for name, value in (zero_shot or {}).items():
        report.zero_shot.setdefault(name, {})["pruned"] = value
    if not report.provenance and (folder / "README.md").is_file():  # saved before reports held their provenance
        data = ModelCard.load(folder / "README.md").data
        for key in ("base_model", "license"):
            provenance.inputs.setdefault(key, getattr(data, key, None))
    report.provenance = provenance.inputs
    PruningReport.from_dict(provenance.scrub(report.to_dict())).save(report_path)
    ModelCard(provenance.scrub(card_of_folder(folder).content)).save(folder / "README.md")
    update_marker(folder, [REPORT_NAME, "README.md"])  # our own rewrite: the folder stays replaceable
    return folder
