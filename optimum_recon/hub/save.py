"""Writing a pruned model so that an interrupted or failed save never damages a good one.

Everything is written into a hidden temporary sibling of the target folder, which replaces the target
only once complete (two renames on the same filesystem). A failure leaves the old folder untouched and
removes the partial one.
"""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
import tempfile
import warnings
from pathlib import Path
from typing import Iterator

from ..configuration import PruningConfig
from ..report import REPORT_NAME, PruningReport
from .card import base_model_license, build_model_card


@contextlib.contextmanager
def atomic_directory(target: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary folder that becomes ``target`` when the block finishes without error."""
    target = Path(target).expanduser().resolve()
    if target.is_file():
        raise ValueError(f"{str(target)!r} is a file; pass a folder to save into.")
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.partial-", dir=target.parent))
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o777 & ~umask)  # mkdtemp makes it private; the saved model should not be
    try:
        yield tmp
        backup = None
        if target.exists():
            backup = target.with_name(f".{target.name}.old-{os.getpid()}")
            os.replace(target, backup)
        os.replace(tmp, target)
        if backup is not None:
            shutil.rmtree(backup, ignore_errors=True)
    except OSError as err:
        shutil.rmtree(tmp, ignore_errors=True)
        if err.errno == errno.ENOSPC:
            raise OSError(
                errno.ENOSPC,
                f"no space left on the device while saving to {str(target)!r}; nothing was replaced. Free space "
                "(about twice the model's size on disk is needed during the save) or choose another folder.",
            ) from err
        raise
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


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
) -> Path:
    """Save weights (safetensors), tokenizer, `pruning_config.json`, `pruning_report.json` and a model card.

    A model dispatched with CPU or disk offload is written block by block: each shard holds at most one decoder
    block, so the save never brings more than that into memory (see `offloaded_shard_size`).
    """
    from ..modeling.offload import offload_visible_to_save, offloaded_shard_size

    shard_size = offloaded_shard_size(model, max_shard_size, blocks_path)
    with atomic_directory(save_directory) as tmp, warnings.catch_warnings(), offload_visible_to_save(model):
        # transformers warns that an offloaded save needs CPU memory for a whole shard; ours is one block.
        warnings.filterwarnings("ignore", message="Attempting to save a model with offloaded modules")
        model.save_pretrained(tmp, max_shard_size=shard_size)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        config.save_pretrained(tmp)
        if report is not None:
            report.save(tmp / REPORT_NAME)
        card = build_model_card(config, report, base_model=base_model, license=base_model_license(base_model))
        card.save(tmp / "README.md")
    return Path(save_directory).expanduser().resolve()


def record_evaluation(
    folder: str | os.PathLike,
    *,
    perplexity: dict[str, float] | None = None,
    zero_shot: dict[str, float] | None = None,
) -> Path:
    """Add measured results of a saved pruned model to its `pruning_report.json` and rewrite its model card.

    The values are recorded as the ``pruned`` column (the dense column is kept as it was). The card is rebuilt
    from the saved recipe and report, keeping its base model and licence.

    Raises:
        FileNotFoundError: When ``folder`` was not saved by optimum-recon (no `pruning_config.json`).
    """
    from huggingface_hub import ModelCard

    folder = Path(folder).expanduser().resolve()
    if not (folder / "pruning_config.json").is_file():
        raise FileNotFoundError(f"{str(folder)!r} has no pruning_config.json: only a folder saved by optimum-recon "
                                "has a model card to update.")
    config = PruningConfig.from_pretrained(str(folder))
    report_path = folder / REPORT_NAME
    report = PruningReport.load(report_path) if report_path.is_file() else PruningReport()
    for name, value in (perplexity or {}).items():
        report.perplexity.setdefault(name, {})["pruned"] = value
    for name, value in (zero_shot or {}).items():
        report.zero_shot.setdefault(name, {})["pruned"] = value
    base_model = license = None
    if (folder / "README.md").is_file():
        data = ModelCard.load(folder / "README.md").data
        base_model, license = getattr(data, "base_model", None), getattr(data, "license", None)
    report.save(report_path)
    build_model_card(config, report, base_model=base_model, license=license).save(folder / "README.md")
    return folder
