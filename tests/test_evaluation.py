"""Perplexity protocol."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import make_tiny_model

from optimum_recon.evaluation import evaluate_perplexity, perplexity_of_ids


def test_perplexity_equals_exp_of_the_mean_window_loss():
    model = make_tiny_model("llama")
    torch.manual_seed(0)
    ids = torch.randint(0, 128, (100,))
    ppl, used = perplexity_of_ids(model, ids, seq_len=16, batch_size=3, progress=False)
    assert used == 96  # six whole windows, trailing 4 tokens dropped
    with torch.no_grad():
        losses = [float(model(input_ids=w[None], labels=w[None]).loss) for w in ids[:96].reshape(6, 16)]
    assert ppl == pytest.approx(math.exp(sum(losses) / 6), rel=1e-5)


def test_evaluate_on_a_local_file_with_max_tokens(tiny_tokenizer, text_file):
    model = make_tiny_model("llama")
    full = evaluate_perplexity(model, tiny_tokenizer, str(text_file), seq_len=32, progress=False)
    short = evaluate_perplexity(model, tiny_tokenizer, str(text_file), seq_len=32, max_tokens=100, progress=False)
    assert short.num_tokens == 96 and full.num_tokens > 96
    assert math.isfinite(full.perplexity) and full.perplexity > 1


def test_default_window_is_min_of_context_and_2048(tiny_tokenizer, text_file):
    model = make_tiny_model("llama")  # context 128
    assert evaluate_perplexity(model, tiny_tokenizer, str(text_file), progress=False).seq_len == 128
    with pytest.raises(ValueError, match="exceeds the model's context of 128"):
        evaluate_perplexity(model, tiny_tokenizer, str(text_file), seq_len=256, progress=False)


def test_text_shorter_than_one_window(tiny_tokenizer):
    with pytest.raises(ValueError, match="fewer than one window"):
        evaluate_perplexity(make_tiny_model("llama"), tiny_tokenizer, "x", text="a dog", seq_len=64, progress=False)
