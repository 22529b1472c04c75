"""Shared fixtures: tiny models of several architectures built from configs, a tiny tokenizer, local data."""

from __future__ import annotations

import os
from pathlib import Path

# huggingface_hub and datasets read these once, at import: set them before anything imports them, so that
# nothing in the test suite waits on the network.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["HF_DATASETS_OFFLINE"] = "1"

import pytest  # noqa: E402
import torch  # noqa: E402

from optimum_recon import Runtime  # noqa: E402

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"

# Architectures of the core test matrix: config kwargs small enough for milliseconds per forward.
QUIET = Runtime(progress=False)  # prune_model without progress bars

ARCHITECTURES = ("llama", "mistral", "qwen2", "gemma2", "gemma3", "opt", "gpt2")
VOCAB = 128


def make_tiny_model(arch: str, seed: int = 0, **overrides):
    """A randomly initialised tiny causal LM of architecture ``arch`` (fp32, eval mode)."""
    import transformers as tf

    torch.manual_seed(seed)
    layers = overrides.pop("num_hidden_layers", None)
    common = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=layers or 3,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128)
    if arch == "llama":
        config = tf.LlamaConfig(**common)
    elif arch == "mistral":
        config = tf.MistralConfig(**common, sliding_window=8)
    elif arch == "qwen2":
        config = tf.Qwen2Config(**{**common, "num_hidden_layers": layers or 4}, use_sliding_window=True,
                                sliding_window=8, max_window_layers=2)
    elif arch == "gemma2":
        config = tf.Gemma2Config(**common, head_dim=8, sliding_window=8)
    elif arch == "gemma3":
        config = tf.Gemma3TextConfig(**{**common, "num_hidden_layers": layers or 4}, head_dim=8, sliding_window=8,
                                     sliding_window_pattern=2)
    elif arch == "opt":
        config = tf.OPTConfig(vocab_size=VOCAB, hidden_size=32, ffn_dim=64, num_hidden_layers=layers or 3,
                              num_attention_heads=4,
                              max_position_embeddings=128, word_embed_proj_dim=32)
    elif arch == "gpt2":
        config = tf.GPT2Config(vocab_size=VOCAB, n_embd=32, n_layer=layers or 3, n_head=4, n_positions=128,
                               bos_token_id=0, eos_token_id=0)
    else:
        raise ValueError(arch)
    for key, value in overrides.items():
        setattr(config, key, value)
    model = tf.AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    return model.eval()


@pytest.fixture(params=ARCHITECTURES)
def arch(request):
    return request.param


@pytest.fixture
def calib_ids():
    torch.manual_seed(1)
    return torch.randint(0, VOCAB, (12, 24))


@pytest.fixture(scope="session")
def tiny_tokenizer():
    """A byte-level BPE tokenizer with at most VOCAB entries (optimum_recon.testing)."""
    from optimum_recon.testing import tiny_tokenizer as make

    tokenizer = make(VOCAB)
    assert len(tokenizer) <= VOCAB
    return tokenizer


@pytest.fixture
def tiny_model_dir(tmp_path, tiny_tokenizer):
    """A saved tiny Llama with a tokenizer, loadable with from_pretrained."""
    model = make_tiny_model("llama")
    path = tmp_path / "tiny-llama"
    model.save_pretrained(path)
    tiny_tokenizer.save_pretrained(path)
    return path


@pytest.fixture
def text_file(tmp_path):
    """A local text file long enough for calibration and evaluation of the tiny tokenizer."""
    from optimum_recon.testing import save_tiny_text

    return save_tiny_text(tmp_path / "text.txt")


@pytest.fixture
def shared_data():
    if not SHARED_DATA.is_dir():
        pytest.skip(f"needs the shared test data at {SHARED_DATA} (present in CI)")
    return SHARED_DATA


@pytest.fixture(autouse=True)
def _no_data_dir(monkeypatch):
    monkeypatch.delenv("OPTIMUM_RECON_DATA_DIR", raising=False)


@pytest.fixture
def user(tmp_path, tiny_model_dir, text_file):
    """A user's working folder: the model, a calibration text, and a file of their own beside them."""
    (tmp_path / "notes.txt").write_text("my notes\n")
    (tiny_model_dir / "my-readme.md").write_text("the user's own file in the model folder\n")
    return tmp_path
