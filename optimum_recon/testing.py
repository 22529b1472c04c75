"""Helpers for tests and smoke runs: a tiny causal LM with a tokenizer, saved as a normal HF folder."""

from __future__ import annotations

import os
from pathlib import Path

TINY_TEXT = ("the quick brown fox jumps over the lazy dog while a cat sat on the mat and watched the birds fly "
             "across the river towards the old mill where the farmer kept his sheep")


def tiny_tokenizer(vocab_size: int = 128):
    """A byte-level BPE tokenizer with at most ``vocab_size`` entries, trained in memory on a few sentences."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<eos>"], show_progress=False,
                                  initial_alphabet=[])
    tok.train_from_iterator([TINY_TEXT] * 20, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>", pad_token="<eos>")


def save_tiny_model(path: str | os.PathLike, seed: int = 0, num_hidden_layers: int = 3) -> Path:
    """Save a randomly initialised tiny Llama (hidden 32) and its tokenizer to ``path``; return the path."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=num_hidden_layers,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                         bos_token_id=0, eos_token_id=0, pad_token_id=0)
    path = Path(path)
    LlamaForCausalLM(config).save_pretrained(path)
    tiny_tokenizer().save_pretrained(path)
    return path


def save_tiny_text(path: str | os.PathLike, lines: int = 80) -> Path:
    """A text file long enough for tiny calibration and evaluation runs."""
    import random

    rng = random.Random(0)
    words = TINY_TEXT.split()
    path = Path(path)
    path.write_text("\n".join(" ".join(rng.choice(words) for _ in range(60)) for _ in range(lines)) + "\n")
    return path
