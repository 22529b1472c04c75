"""Prefill and decode speed of a model with `generate`, measured with warm-up and repeats.

Sparsity alone does not make a model faster: zeros stored in dense tensors are multiplied like any other
number, so an unstructured-sparse model runs at the dense model's speed. Only N:M patterns with sparse kernels
(2:4 on GPUs that support it) can be faster; the numbers here are what the model does as loaded.

How one repeat is timed: `generate` (greedy, the KV cache on, exactly ``new_tokens`` new tokens) with a stopping
criterion that timestamps every step. Time to the first new token is the prefill (the prompt's forward pass
plus one token choice); the time from the first to the last new token, over ``new_tokens - 1`` tokens, is decode.
"""

from __future__ import annotations

import statistics
import time
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import nn

from ..modeling.offload import input_device
from .perplexity import model_context


@dataclass
class LatencyResult:
    """Speeds (medians over the repeats) and the raw per-repeat timings.

    Attributes:
        prefill_tokens_per_s: Prompt tokens processed per second (batch included).
        decode_tokens_per_s: New tokens generated per second after the first (batch included).
        prefill_seconds: Time to the first new token, per repeat.
        decode_seconds: Time from the first to the last new token, per repeat.
    """

    device: str
    batch_size: int
    prompt_tokens: int
    new_tokens: int
    warmup: int
    repeats: int
    prefill_seconds: list[float] = field(default_factory=list)
    decode_seconds: list[float] = field(default_factory=list)

    @property
    def prefill_tokens_per_s(self) -> float:
        return self.batch_size * self.prompt_tokens / statistics.median(self.prefill_seconds)

    @property
    def decode_tokens_per_s(self) -> float:
        return self.batch_size * (self.new_tokens - 1) / statistics.median(self.decode_seconds)

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data.update(prefill_tokens_per_s=self.prefill_tokens_per_s, decode_tokens_per_s=self.decode_tokens_per_s)
        return data


class _StepClock:
    """A stopping criterion that never stops generation and records when each new token was chosen."""

    def __init__(self, device: torch.device):
        self.device = device
        self.times: list[float] = []

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor, **kwargs: Any) -> torch.Tensor:
        _synchronize(self.device)
        self.times.append(time.perf_counter())
        return torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@torch.no_grad()
def measure_latency(
    model: nn.Module,
    *,
    prompt_tokens: int = 128,
    new_tokens: int = 64,
    batch_size: int = 1,
    warmup: int = 1,
    repeats: int = 3,
    seed: int = 0,
) -> LatencyResult:
    """Measure prefill and decode tokens/s of ``model`` with `generate` on the device it is on.

    The prompt is ``batch_size`` rows of ``prompt_tokens`` random token ids (content does not change the cost).

    Args:
        prompt_tokens: Prompt length.
        new_tokens: Tokens generated per repeat (at least 2: decode speed needs a second token).
        batch_size: Prompts per `generate` call.
        warmup: Untimed runs first (kernel selection, caches, allocator).
        repeats: Timed runs; the result is their median.
        seed: Seed of the random prompt.

    Raises:
        ValueError: For counts out of range or a prompt plus new tokens longer than the model's context.

    Example:
        ```python
        >>> from optimum_recon.evaluation.latency import measure_latency
        >>> result = measure_latency(model, prompt_tokens=256, new_tokens=32)
        >>> result.decode_tokens_per_s
        ```
    """
    from transformers import StoppingCriteriaList

    if prompt_tokens < 1 or new_tokens < 2 or batch_size < 1 or warmup < 0 or repeats < 1:
        raise ValueError(
            f"need prompt_tokens >= 1, new_tokens >= 2, batch_size >= 1, warmup >= 0 and repeats >= 1; got "
            f"prompt_tokens={prompt_tokens}, new_tokens={new_tokens}, batch_size={batch_size}, warmup={warmup}, "
            f"repeats={repeats}."
        )
    context = model_context(model)
    if context is not None and prompt_tokens + new_tokens > context:
        raise ValueError(f"prompt_tokens + new_tokens = {prompt_tokens + new_tokens} exceeds the model's context of "
                         f"{context} tokens.")
    device = input_device(model)
    generator = torch.Generator().manual_seed(seed)
    vocab = model.get_input_embeddings().num_embeddings
    ids = torch.randint(0, vocab, (batch_size, prompt_tokens), generator=generator).to(device)
    mask = torch.ones_like(ids)
    pad = getattr(model.generation_config, "pad_token_id", None)
    eos = getattr(model.generation_config, "eos_token_id", None)
    if pad is None:
        pad = eos[0] if isinstance(eos, (list, tuple)) and eos else eos if eos is not None else 0
    result = LatencyResult(str(device), batch_size, prompt_tokens, new_tokens, warmup, repeats)
    was_training = model.training
    model.eval()
    try:
        for run in range(warmup + repeats):
            clock = _StepClock(device)
            _synchronize(device)
            start = time.perf_counter()
            out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=new_tokens,
                                 min_new_tokens=new_tokens, do_sample=False, pad_token_id=pad,
                                 stopping_criteria=StoppingCriteriaList([clock]))
            if out.shape[1] - prompt_tokens != new_tokens or len(clock.times) != new_tokens:
                raise RuntimeError(f"generate produced {out.shape[1] - prompt_tokens} tokens instead of {new_tokens}.")
            if run >= warmup:
                result.prefill_seconds.append(clock.times[0] - start)
                result.decode_seconds.append(clock.times[-1] - clock.times[0])
    finally:
        model.train(was_training)
    return result
