"""Perplexity, with the protocol of SparseGPT, Wanda and the reconstruction paper.

The evaluation text is tokenized once and cut into non-overlapping windows of ``seq_len`` tokens
(trailing tokens dropped, no per-window BOS); perplexity is exp of the mean next-token cross-entropy
over all windows.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

import torch
from torch import nn
from tqdm.auto import tqdm

from .. import distributed as dist
from ..data.sources import eval_text
from ..modeling.offload import input_device

DEFAULT_EVAL_SEQ_LEN = 2048


@dataclass
class PerplexityResult:
    dataset: str
    perplexity: float
    num_tokens: int
    seq_len: int
    seconds: float
    total_tokens: int | None = None  # tokens of the whole evaluation text (num_tokens: those measured)
    split: str | None = None
    origin: str | None = None  # where the text was read (data.sources.ORIGINS); None: text given
    selection: str | None = None  # what of the split the text is (e.g. "the first 1,100 documents of shard 0")

    def protocol(self) -> dict[str, object]:
        """How this number was measured, as the report and the model card record it."""
        return {"tokens": self.num_tokens, "total_tokens": self.total_tokens, "seq_len": self.seq_len,
                "split": self.split, "origin": self.origin, "selection": self.selection}


def model_context(model: nn.Module) -> int | None:
    config = getattr(model, "config", None)
    for name in ("max_position_embeddings", "n_positions", "n_ctx", "max_sequence_length"):
        value = getattr(config, name, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


@torch.no_grad()
def perplexity_of_ids(
    model: nn.Module, ids: torch.Tensor, seq_len: int, batch_size: int = 1, progress: bool = True, desc: str = "ppl"
) -> tuple[float, int]:
    """Perplexity of ``model`` over the 1-D token stream ``ids`` in windows of ``seq_len``; (ppl, tokens).

    In a distributed run each rank evaluates every ``world``-th window and the sums are combined."""
    num_windows = ids.numel() // seq_len
    if num_windows == 0:
        raise ValueError(f"the evaluation text has {ids.numel()} tokens, fewer than one window of {seq_len}.")
    windows = ids[: num_windows * seq_len].reshape(num_windows, seq_len)[dist.rank()::dist.world_size()]
    progress = progress and dist.is_main_process()
    device = input_device(model)
    was_training = model.training
    model.eval()
    total_nll, total_count = 0.0, 0
    try:
        for batch in tqdm(windows.split(batch_size), desc=desc, unit="batch", disable=not progress):
            batch = batch.to(device)
            logits = model(input_ids=batch, use_cache=False).logits  # (B, T, V)
            shift_logits = logits[:, :-1, :].float()
            targets = batch[:, 1:].to(shift_logits.device)
            nll = nn.functional.cross_entropy(
                shift_logits.reshape(-1, shift_logits.shape[-1]), targets.reshape(-1), reduction="sum"
            )
            total_nll += float(nll)
            total_count += targets.numel()
    finally:
        model.train(was_training)
    total_nll, total_count = dist.all_reduce_numbers([total_nll, total_count])
    return math.exp(total_nll / total_count), num_windows * seq_len


def evaluate_perplexity(
    model: nn.Module,
    tokenizer,
    dataset: str = "wikitext2",
    *,
    seq_len: int | None = None,
    max_tokens: int | None = None,
    batch_size: int = 1,
    progress: bool = True,
    text: str | None = None,
) -> PerplexityResult:
    """Perplexity of ``model`` on ``dataset`` (``wikitext2``, ``c4``, ``ptb``, a local file or Hub id).

    Args:
        seq_len: Window length; default ``min(model context, 2048)``.
        max_tokens: Use only the first ``max_tokens`` tokens (rounded down to whole windows) to bound cost.
        text: Evaluate this text instead of loading ``dataset`` (which then only labels the result).
    """
    start = time.perf_counter()
    context = model_context(model)
    if seq_len is None:
        seq_len = min(context or DEFAULT_EVAL_SEQ_LEN, DEFAULT_EVAL_SEQ_LEN)
    elif context is not None and seq_len > context:
        raise ValueError(f"seq_len={seq_len} exceeds the model's context of {context} tokens.")
    where: dict = {}
    if text is None:
        text, where = eval_text(dataset)
    ids = tokenizer(text, return_tensors="pt").input_ids[0]
    total = ids.numel()
    if max_tokens is not None:
        ids = ids[: max(max_tokens, seq_len)]
    ppl, used = perplexity_of_ids(model, ids, seq_len, batch_size, progress, desc=f"Perplexity {dataset}")
    return PerplexityResult(dataset, ppl, used, seq_len, time.perf_counter() - start, total_tokens=total, **where)
