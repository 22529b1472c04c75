"""Cutting calibration windows out of documents, the way SparseGPT, Wanda and the paper do.

For each window: draw a random document (with replacement) until its tokenized length is strictly
greater than ``seq_len``, then a random crop of ``seq_len`` tokens starting in [0, len - seq_len - 1].
If the source has too few documents that long (a single text file of short lines, say), the documents
are joined with blank lines into one stream and the windows are cropped from it instead (with a warning).
"""

from __future__ import annotations

import random
import warnings

import torch

from ..calibration_config import CalibrationConfig
from .sources import load_documents


def _stream_windows(docs: list[str], tokenizer, num_samples: int, seq_len: int, rng: random.Random, source: str):
    ids = tokenizer("\n\n".join(d for d in docs if d), return_tensors="pt").input_ids[0]
    if ids.numel() <= seq_len:
        raise ValueError(
            f"the calibration text {source!r} has {ids.numel()} tokens in all, not more than seq_len={seq_len}: "
            "use a longer text or a smaller seq_len."
        )
    starts = [rng.randint(0, ids.numel() - seq_len - 1) for _ in range(num_samples)]
    return torch.stack([ids[s : s + seq_len] for s in starts])


def _crop_documents(tokenizer, docs: list[str], count: int, seq_len: int, rng: random.Random,
                    candidates: list[int]) -> tuple[list[torch.Tensor], set[int]]:
    """Random crops from random documents (with replacement) among ``candidates`` longer than ``seq_len``."""
    windows, used = [], set()
    cache: dict[int, torch.Tensor] = {}
    attempts, max_attempts = 0, max(1000, 50 * count)
    while candidates and len(windows) < count and attempts < max_attempts:
        attempts += 1
        index = candidates[rng.randint(0, len(candidates) - 1)]
        if index not in cache:
            cache[index] = tokenizer(docs[index], return_tensors="pt").input_ids[0]
        ids = cache[index]
        if ids.numel() <= seq_len:
            continue
        start = rng.randint(0, ids.numel() - seq_len - 1)
        windows.append(ids[start : start + seq_len])
        used.add(index)
    return windows, used


def _windows(tokenizer, docs, count, seq_len, seed, candidates, source) -> tuple[torch.Tensor, set[int]]:
    windows, used = _crop_documents(tokenizer, docs, count, seq_len, random.Random(seed), candidates)
    if len(windows) == count:
        return torch.stack(windows), used
    warnings.warn(
        f"only {len(windows)} of {count} windows found in documents of {source!r} longer than seq_len={seq_len} "
        "tokens; cutting all windows from the documents joined into one stream instead.",
        stacklevel=3,
    )
    return _stream_windows([docs[i] for i in candidates], tokenizer, count, seq_len, random.Random(seed), source), set(
        candidates)


def sample_calibration_windows(
    tokenizer, config: CalibrationConfig, documents: list[str] | None = None, *, with_heldout: bool = False
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor | None]:
    """Token ids of shape (num_samples, seq_len) drawn from ``config.source`` (or the given ``documents``).

    With ``with_heldout``, also returns ``config.num_heldout`` windows (or None) drawn from documents that no
    calibration window came from (by default, when none is left: None, with a warning).

    Raises:
        ValueError: when the text is shorter than ``seq_len`` in all, or nothing is left for held-out windows.
        DataSourceError: when the source cannot be loaded.
    """
    if documents is None:
        documents = load_documents(config.source, config.split or "train", config.text_column)
    docs = [d for d in documents if isinstance(d, str) and d.strip()]
    if not docs:
        raise ValueError(f"the calibration source {config.source!r} holds no text.")
    calib, used = _windows(tokenizer, docs, config.num_samples, config.seq_len, config.seed, list(range(len(docs))),
                           config.source)
    if not with_heldout:
        return calib
    count = config.num_heldout
    if count == 0:
        return calib, None
    rest = [i for i in range(len(docs)) if i not in used]
    if not rest:
        if config.heldout_samples is None:  # the default: do without, and say what that means
            warnings.warn(f"no document of {config.source!r} is left for held-out windows (the calibration windows "
                          "use them all); give a larger source or fewer calibration samples to have them.",
                          stacklevel=2)
            return calib, None
        raise ValueError(
            f"no text of {config.source!r} is left for {count} held-out windows: every document was used for "
            "calibration. Use a larger source, fewer calibration samples, or heldout_samples=0 (unguarded)."
        )
    heldout, _ = _windows(tokenizer, docs, count, config.seq_len, config.seed + 1, rest, config.source)
    return calib, heldout
