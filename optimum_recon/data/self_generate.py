"""Self-generated calibration data: text sampled from the dense model itself with `model.generate`.

The paper's cure for overfitting the small calibration set: reconstruct against extra samples the dense
model writes itself. Each sequence starts from a first token drawn uniformly from the vocabulary (special
tokens excluded), or from a user prompt, and is sampled (temperature 1.0, top-k 50, top-p 1.0 by default)
with the KV cache, in batches, under a fixed seed: batch j is sampled under a seed derived from (seed, j), so
the same seed, settings and batch size give the same tokens, also when a distributed run splits the batches
over its ranks (rank r generates batches r, r + world, ...; the kept samples are gathered in batch order).
Sequences are exactly `seq_len` tokens long: with `on_eos="continue"` the end-of-sequence token is suppressed
until then; with `"resample"` a sequence that ends early is dropped and generated again.

The result is a `datasets.Dataset` (`input_ids`, `text`) cached on disk under a key made of the model's
identity, the seed and every setting, so a second prune does not generate again.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import warnings
from pathlib import Path
from typing import Any, Callable

import torch
from tqdm.auto import tqdm

from .. import distributed as dist
from ..calibration_config import CalibrationConfig
from ..modeling.offload import input_device
from ..version import __version__
from .default_model import cache_dir

logger = logging.getLogger(__name__)

SampleFilter = Callable[[str, torch.Tensor], bool]  # (decoded text, token ids) -> keep?


def generation_settings(config: CalibrationConfig, seq_len: int) -> dict[str, Any]:
    return {"temperature": config.self_temperature, "top_k": config.self_top_k, "top_p": config.self_top_p,
            "prompts": config.self_prompts, "on_eos": config.self_on_eos, "batch_size": config.self_batch_size,
            "seq_len": seq_len, "seed": config.seed}


def model_fingerprint(model) -> str:
    """A cheap identity for the weights: the name plus a hash of a few parameters' bytes."""
    digest = hashlib.sha256(str(getattr(model.config, "_name_or_path", "")).encode())
    params = list(model.parameters())
    for param in params[:2] + params[-2:]:
        data = param.detach().reshape(-1)[:4096].float().cpu().numpy().tobytes()
        digest.update(data)
    return digest.hexdigest()[:16]


def cache_key(model, num_samples: int, settings: dict[str, Any]) -> str:
    payload = json.dumps({"model": model_fingerprint(model), "n": num_samples, "settings": settings,
                          "version": __version__, "seeding": "per batch"}, sort_keys=True)
    return hashlib.sha256(payload.encode()).hexdigest()[:20]


class _TokenProgress:
    """A logits processor that only advances a progress bar: generate calls it once per new token step."""

    def __init__(self, bar: tqdm, batch: int):
        self.bar, self.batch = bar, batch

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        self.bar.update(self.batch)
        return scores


def _pad_token_id(model, tokenizer) -> int:
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else getattr(
        model.generation_config, "pad_token_id", None)
    if pad is None:
        pad = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else 0
        warnings.warn(f"the model has no pad token; using token id {pad} for padding during generation.",
                      stacklevel=3)
    return int(pad)


def _first_tokens(tokenizer, vocab: int, count: int, generator: torch.Generator) -> torch.Tensor:
    special = torch.tensor(sorted(set(tokenizer.all_special_ids) | {i for i in range(vocab)
                                                                    if i >= len(tokenizer)}), dtype=torch.long)
    allowed = torch.ones(vocab, dtype=torch.bool)
    allowed[special[special < vocab]] = False
    choices = allowed.nonzero().reshape(-1)
    return choices[torch.randint(len(choices), (count,), generator=generator)].reshape(-1, 1)


def _generate_batch(model, starts: torch.Tensor, seq_len: int, settings: dict, eos: int | None, pad: int,
                    bar: tqdm, ranks: int = 1) -> torch.Tensor:
    from transformers import LogitsProcessorList

    new_tokens = seq_len - starts.shape[1]
    kwargs = dict(do_sample=True, temperature=settings["temperature"], top_k=settings["top_k"] or None,
                  top_p=settings["top_p"], max_new_tokens=new_tokens, pad_token_id=pad, use_cache=True,
                  logits_processor=LogitsProcessorList([_TokenProgress(bar, starts.shape[0] * ranks)]))
    if settings["on_eos"] == "continue":
        kwargs["min_new_tokens"] = new_tokens  # suppresses EOS until the sequence is full
    ids = starts.to(input_device(model))
    with torch.no_grad():
        out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), **kwargs)
    return out[:, :seq_len].cpu()


def generate_samples(
    model,
    tokenizer,
    config: CalibrationConfig,
    num_samples: int,
    *,
    sample_filter: SampleFilter | None = None,
    progress: bool = True,
) -> tuple[torch.Tensor, list[str]]:
    """Generate ``num_samples`` sequences of ``config.seq_len`` tokens; return (ids (N, T), texts)."""
    if num_samples <= 0:
        raise ValueError(f"the number of self-generated samples must be positive, got {num_samples}.")
    seq_len, settings = config.seq_len, generation_settings(config, config.seq_len)
    context = getattr(model.config, "max_position_embeddings", None)
    if context is not None and seq_len > context:
        raise ValueError(f"seq_len={seq_len} exceeds the model's context of {context} tokens.")
    pad = _pad_token_id(model, tokenizer)
    eos = tokenizer.eos_token_id
    prompts = [tokenizer(p, return_tensors="pt").input_ids[0] for p in (config.self_prompts or [])]
    vocab = model.get_input_embeddings().num_embeddings
    size, world, rank = config.self_batch_size, dist.world_size(), dist.rank()
    kept: dict[int, list[torch.Tensor]] = {}  # batch index -> its kept samples (every rank's, once gathered)
    bar = tqdm(total=num_samples * seq_len, desc="Generating calibration", unit="tok",
               disable=not (progress and dist.is_main_process()))
    first = 0  # rounds of `world` batches until the batches so far hold enough samples
    while sum(len(v) for v in kept.values()) < num_samples:
        if first > 50 + 10 * -(-num_samples // size):
            raise RuntimeError("too many generated samples were rejected (early end of sequence or the filter); "
                               "use self_on_eos='continue' or a looser filter.")
        j = first + rank
        generator = torch.Generator().manual_seed(config.seed * 1_000_003 + j)
        torch.manual_seed(config.seed * 1_000_003 + j)  # generate samples with torch's global generator
        mine: list[torch.Tensor] = []
        if prompts:
            rows = [prompts[(j * size + i) % len(prompts)][: seq_len - 1] for i in range(size)]
            for start in sorted({len(r) for r in rows}):  # prompts of one length generate together
                group = torch.stack([r for r in rows if len(r) == start])
                mine += _filter(_generate_batch(model, group, seq_len, settings, eos, pad, bar, world), tokenizer,
                                eos, config, sample_filter)
        else:
            starts = _first_tokens(tokenizer, vocab, size, generator)
            mine += _filter(_generate_batch(model, starts, seq_len, settings, eos, pad, bar, world), tokenizer, eos,
                            config, sample_filter)
        for r, samples in enumerate(dist.all_gather_objects(mine)):
            kept[first + r] = samples
        first += world
    bar.close()
    ids = torch.stack([row for j in sorted(kept) for row in kept[j]][:num_samples])
    return ids, tokenizer.batch_decode(ids, skip_special_tokens=False)


def _filter(batch: torch.Tensor, tokenizer, eos, config: CalibrationConfig, sample_filter) -> list[torch.Tensor]:
    keep = []
    for row in batch:
        if row.numel() < config.seq_len:
            continue
        if config.self_on_eos == "resample" and eos is not None and bool((row[1:] == eos).any()):
            continue
        if sample_filter is not None and not sample_filter(tokenizer.decode(row), row):
            continue
        keep.append(row)
    return keep


def load_or_generate(
    model,
    tokenizer,
    config: CalibrationConfig,
    *,
    num_samples: int | None = None,
    cache: str | os.PathLike | None = None,
    sample_filter: SampleFilter | None = None,
    progress: bool = True,
):
    """The self-generated samples as a `datasets.Dataset` (`input_ids`, `text`), from the cache when the model,
    seed and settings match; generated (and cached) otherwise. A filter disables caching."""
    import datasets

    num_samples = num_samples or config.self_samples
    settings = generation_settings(config, config.seq_len)
    key = cache_key(model, num_samples, settings)
    folder = Path(cache) if cache is not None else cache_dir() / "self-calibration"
    target = folder / key
    # in a distributed run, the cache is used only when every rank finds it (ranks may not share a disk)
    if dist.all_ranks_agree(sample_filter is None and (target / "dataset_info.json").is_file()):
        logger.info("using cached self-generated calibration data from %s", target)
        return datasets.load_from_disk(str(target))
    ids, texts = generate_samples(model, tokenizer, config, num_samples, sample_filter=sample_filter,
                                  progress=progress)
    dataset = datasets.Dataset.from_dict({"input_ids": ids.tolist(), "text": texts})
    dataset.info.description = json.dumps({"generator": "optimum-recon", "key": key, "settings": settings})
    if sample_filter is None:
        dist.run_on_main(save_dataset, dataset, target, overwrite=True)  # our own cache entry
    return dataset


def save_dataset(dataset, target: str | os.PathLike, *, overwrite: bool = False) -> Path:
    """Save ``dataset`` to ``target`` atomically, under the output-folder contract (`folders.py`): ``target`` must
    be new, empty or a dataset folder optimum-recon wrote, unless ``overwrite``."""
    from ..folders import OutputFolderError, atomic_directory

    try:
        with atomic_directory(target, kind="dataset", overwrite=overwrite, what="self-generated data folder") as tmp:
            dataset.save_to_disk(str(tmp))
    except (PermissionError, OutputFolderError) as err:
        raise OSError(f"cannot write self-generated calibration data: {err} Set OPTIMUM_RECON_CACHE (or --output) "
                      "to a writable folder.") from err
    return Path(target)
