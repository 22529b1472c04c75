"""The weights files of a saved model, rewritten shard by shard: in the dtype to save, and optionally compact.

`save_pruned_model` lets transformers write the model as it is in memory (often float32 on a CPU), then rewrites
each safetensors shard here before the folder is committed: every floating tensor is cast to the save dtype (the
checkpoint's own by default), negative zeros become zeros (a masked weight multiplied by 0 can be -0.0, and a compact
file stores no sign for zeros), and with ``sparse_format="bitmask"`` every weight whose zeros pay for their record is
stored compact (`sparse_format.py`). One shard is in memory at a time: for an offloaded model a shard is one block.
`decompress_folder` turns a compact folder back into a dense one without loading a model.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import torch

from ..modeling.loading import FLOAT_DTYPES, name_of_dtype
from .sparse_format import MASK_SUFFIX, META_SUFFIX, QUANT_METHODS, decode_stored, encode, worth_compressing

SPARSE_FORMATS = ("bitmask",)
_INDEX = "model.safetensors.index.json"


def dtype_name(dtype: Any) -> str | None:
    """"bfloat16" for torch.bfloat16 or "bfloat16"; None for None; a clear error for anything else."""
    if dtype is None:
        return None
    name = name_of_dtype(dtype)
    if name not in FLOAT_DTYPES:
        raise ValueError(f"save_dtype={dtype!r} is not valid: choose {', '.join(FLOAT_DTYPES)}.")
    return name


def _shards(folder: Path) -> tuple[list[str], dict | None]:
    index_path = folder / _INDEX
    if index_path.is_file():
        index = json.loads(index_path.read_text())
        return sorted(set(index["weight_map"].values())), index
    return sorted(p.name for p in folder.glob("*.safetensors")), None


def _cast(name: str, tensor: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    if not tensor.is_floating_point():
        return tensor
    out = tensor.to(dtype)
    if dtype != tensor.dtype and bool(torch.isinf(out).any()) and not bool(torch.isinf(tensor).any()):
        top = float(tensor.abs().max())
        raise OverflowError(f"{name} holds values up to {top:.4g}, beyond {dtype} (max {torch.finfo(dtype).max:.4g}): "
                            "saving it would write inf. Save in bfloat16 or float32 (save_dtype=...).")
    return out.masked_fill(out == 0, 0)  # -0.0 -> 0.0


def _write_shards(source: Path, target: Path, convert) -> None:
    """Rewrite every safetensors shard of ``source`` into ``target`` (the same folder or another), one shard in memory
    at a time: ``convert(name, reader, names)`` returns the tensors to store for a tensor name, or {} to drop it; the
    shard index, when there is one, is rewritten to match."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    files, index = _shards(source)
    weight_map: dict[str, str] = {}
    total = 0
    for file in files:
        tensors: dict[str, torch.Tensor] = {}
        with safe_open(source / file, framework="pt") as reader:
            metadata = reader.metadata() or {}
            names = set(reader.keys())
            for name in sorted(names):
                tensors.update(convert(name, reader, names))
        save_file(tensors, str(target / file), metadata={**metadata, "format": "pt"})
        for name, tensor in tensors.items():
            weight_map[name] = file
            total += tensor.numel() * tensor.element_size()
        del tensors
    if index is not None:
        index["weight_map"] = dict(sorted(weight_map.items()))
        index.setdefault("metadata", {})["total_size"] = total
        (target / _INDEX).write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")


def _edit_config(folder: Path, edit) -> None:
    path = folder / "config.json"
    config = json.loads(path.read_text())
    edit(config)
    path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")


def rewrite_weights(folder: str | os.PathLike, dtype: str, sparse_format: str | None = None,
                    pattern: tuple[int, int] | None = None) -> dict[str, int]:
    """Rewrite the safetensors files of the model saved in ``folder``: cast to ``dtype``, compress with
    ``sparse_format``; update the shard index and config.json (its ``dtype``, and the ``quantization_config`` that
    makes transformers load a compact folder through optimum-recon). Returns byte counts: ``compressed_dense`` (what
    the compressed weights take dense in ``dtype``), ``compressed`` (what they take now) and ``compressed_tensors``.

    Raises:
        ValueError: ``sparse_format`` given but no weight has zeros enough to be stored compact.
    """
    from .quantizer import SparseCheckpointConfig

    folder = Path(folder)
    target = FLOAT_DTYPES[dtype]
    stats = {"compressed_dense": 0, "compressed": 0, "compressed_tensors": 0}

    def convert(name, reader, names):
        tensor = _cast(name, reader.get_tensor(name), target)
        if not (sparse_format and name.endswith(".weight") and worth_compressing(tensor)):
            return {name: tensor}
        parts = encode(tensor, pattern)
        stats["compressed_dense"] += tensor.numel() * tensor.element_size()
        stats["compressed"] += sum(t.numel() * t.element_size() for t in parts.values())
        stats["compressed_tensors"] += 1
        return {name: parts["values"], name + MASK_SUFFIX: parts["mask"], name + META_SUFFIX: parts["meta"]}

    _write_shards(folder, folder, convert)
    if sparse_format and stats["compressed_tensors"] == 0:
        raise ValueError(f"sparse_format={sparse_format!r}: no weight of this model has zeros enough to be stored "
                         "compact (at least one bit per entry must be saved), so the folder would be the dense save. "
                         "Prune first, or save without sparse_format.")

    def edit(config):
        config["dtype"] = dtype
        config.pop("torch_dtype", None)
        if sparse_format:
            pattern_name = "unstructured" if pattern is None else f"{pattern[0]}:{pattern[1]}"
            config["quantization_config"] = SparseCheckpointConfig(sparse_format, pattern=pattern_name).to_dict()

    _edit_config(folder, edit)
    return stats


def is_compact(folder: str | os.PathLike) -> bool:
    path = Path(folder) / "config.json"
    if not path.is_file():
        return False
    quant = json.loads(path.read_text()).get("quantization_config") or {}
    return quant.get("quant_method") in QUANT_METHODS


def decompress_folder(folder: str | os.PathLike, output: str | os.PathLike, *, overwrite: bool = False) -> Path:
    """Write ``folder`` (a compact sparse checkpoint) to ``output`` as a plain dense checkpoint (every other file
    copied), one shard at a time, without loading a model; ``output`` follows the same folder rules as a save."""
    from ..folders import atomic_directory

    folder = Path(folder).expanduser().resolve()
    if not is_compact(folder):
        raise ValueError(f"{str(folder)!r} is not a compact sparse checkpoint (its config.json has no optimum_recon "
                         "quantization_config): it is dense already.")
    with atomic_directory(output, kind="model", overwrite=overwrite, protect=(folder,)) as tmp:
        for item in folder.iterdir():
            if item.is_file() and item.suffix != ".safetensors" and item.name != _INDEX:
                shutil.copy2(item, tmp / item.name)

        def convert(name, reader, names):
            if name.endswith(MASK_SUFFIX) or name.endswith(META_SUFFIX):
                return {}  # read with their weight

            def part(suffix):
                return reader.get_tensor(name + suffix) if name + suffix in names else None

            return {name: decode_stored(name, reader.get_tensor(name), part(MASK_SUFFIX), part(META_SUFFIX))}

        _write_shards(folder, tmp, convert)
        _edit_config(tmp, lambda config: config.pop("quantization_config", None))
        if (tmp / "pruning_report.json").is_file() and (tmp / "pruning_config.json").is_file():
            _describe_as_dense(tmp)
    return Path(output).expanduser().resolve()


def _describe_as_dense(folder: Path) -> None:
    """The report and card of a decompressed copy: the same provenance and numbers, stored dense (the card no
    longer says that loading needs optimum-recon), and that it was decompressed."""
    from ..report import REPORT_NAME, PruningReport
    from .save import card_of_folder

    report = PruningReport.load(folder / REPORT_NAME)
    compact = dict(report.saved)
    report.saved = {"dtype": compact.get("dtype"), "sparse_format": None,
                    "decompressed_from": {k: compact[k] for k in ("sparse_format", "compressed", "compressed_dense",
                                                                   "compressed_tensors") if k in compact}}
    report.save(folder / REPORT_NAME)
    card_of_folder(folder).save(folder / "README.md")
