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

from ..configuration import CalibrationConfig
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


def sample_calibration_windows(tokenizer, config: CalibrationConfig, documents: list[str] | None = None) -> torch.Tensor:
    """Token ids of shape (num_samples, seq_len) drawn from ``config.source`` (or the given ``documents``).

    Raises:
        ValueError: when the text is shorter than ``seq_len`` in all.
        DataSourceError: when the source cannot be loaded.
    """
    if documents is None:
        documents = load_documents(config.source, config.split or "train", config.text_column)
    docs = [d for d in documents if isinstance(d, str) and d.strip()]
    if not docs:
        raise ValueError(f"the calibration source {config.source!r} holds no text.")
    rng = random.Random(config.seed)
    seq_len, windows = config.seq_len, []
    cache: dict[int, torch.Tensor] = {}
    attempts, max_attempts = 0, max(1000, 50 * config.num_samples)
    while len(windows) < config.num_samples and attempts < max_attempts:
        attempts += 1
        index = rng.randint(0, len(docs) - 1)
        if index not in cache:
            cache[index] = tokenizer(docs[index], return_tensors="pt").input_ids[0]
        ids = cache[index]
        if ids.numel() <= seq_len:
            continue
        start = rng.randint(0, ids.numel() - seq_len - 1)
        windows.append(ids[start : start + seq_len])
    if len(windows) == config.num_samples:
        return torch.stack(windows)
    warnings.warn(
        f"only {len(windows)} of {config.num_samples} windows found in documents of {config.source!r} longer than "
        f"seq_len={seq_len} tokens; cutting all windows from the documents joined into one stream instead.",
        stacklevel=2,
    )
    return _stream_windows(docs, tokenizer, config.num_samples, seq_len, random.Random(config.seed), config.source)
