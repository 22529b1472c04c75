"""Loading a causal LM and its tokenizer from the Hub or a folder: the one place that does it, for the pruner,
`compare` and the command line.

Everything checkable without the weights is checked first (the path, the dtype, that a Hub id can be reached);
weights missing from the checkpoint, or weights in it that the model does not have, are an error
(`ModelLoadError`) unless the caller allows them.
"""

from __future__ import annotations

import os
from typing import Any

import torch

from ..data.default_model import default_model_path
from .blocks import find_blocks
from .offload import check_max_memory


def _looks_local(name: str) -> bool:
    return name.startswith(("/", "./", "../", "~")) or os.path.isabs(name) or name.count("/") > 1


def resolve_model_path(model_id_or_path: str | None) -> str:
    """The bundled model's folder when ``None``; else the id or path, checked when it is clearly local."""
    if model_id_or_path is None:
        return default_model_path()
    path = os.path.expanduser(str(model_id_or_path))
    if os.path.isdir(path):
        if not os.path.isfile(os.path.join(path, "config.json")):
            raise FileNotFoundError(
                f"model folder {model_id_or_path!r} has no config.json: it is not a transformers model folder (one "
                "written by save_pretrained, with config.json and the weights)."
            )
        return path
    if os.path.isfile(path):
        raise FileNotFoundError(f"model path {model_id_or_path!r} is a file: pass the folder that holds config.json "
                                "and the weights, or a Hub model id.")
    if _looks_local(path):
        raise FileNotFoundError(
            f"model path {model_id_or_path!r} does not exist: pass a folder with config.json and weights, or a Hub "
            "model id such as 'HuggingFaceTB/SmolLM2-135M'."
        )
    return path


def check_model_exists(path: str, trust_remote_code: bool = False) -> None:
    """Fail in seconds when ``path`` (from `resolve_model_path`) is a Hub id that cannot be reached: only its
    config is fetched (or read from the cache), not the weights."""
    if os.path.isdir(path):
        return
    from transformers import AutoConfig

    try:
        AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as err:
        raise OSError(
            f"could not load model {path!r}: it is not a local folder, and it could not be fetched from the Hub "
            f"(offline, private, or misspelled?). Original error: {str(err).splitlines()[0]}"
        ) from err


# The floating-point dtypes a checkpoint is stored, saved or trained in, by name.
FLOAT_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def name_of_dtype(dtype: Any) -> str:
    """"bfloat16" for torch.bfloat16 (and for "bfloat16"): the name configs, reports and cards use."""
    return str(dtype).removeprefix("torch.")


def checkpoint_dtype(path: str, trust_remote_code: bool = False) -> str | None:
    """The dtype the checkpoint at ``path`` declares in its config ("bfloat16", ...), or None when it declares none
    (read before loading: loading in another dtype overwrites the config's)."""
    from transformers import AutoConfig

    try:
        config = AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code)
    except (OSError, ValueError):
        return None
    config = config.get_text_config() if hasattr(config, "get_text_config") else config
    dtype = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None)
    name = name_of_dtype(dtype) if dtype is not None else None
    return name if name in FLOAT_DTYPES else None


class ModelLoadError(ValueError):
    """The loaded model is not the checkpoint: weights missing from the files, or files holding other weights."""


def empty_model(path: str, trust_remote_code: bool = False):
    """The model ``path`` holds, built from its config on the `meta` device (`accelerate.init_empty_weights`): every
    module and shape, no weight; a 70B model costs what its config.json costs (`prune --dry-run`)."""
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code)
    with init_empty_weights():
        model = AutoModelForCausalLM.from_config(config, trust_remote_code=trust_remote_code)
    model.tie_weights()  # (a tied LM head is the embedding: counted once, as a loaded model holds it)
    return model


def parse_dtype(dtype: Any) -> Any:
    """``None``, ``"auto"``, a `torch.dtype` or its name (``"bfloat16"``); anything else is a clear error."""
    if dtype is None or dtype == "auto" or isinstance(dtype, torch.dtype):
        return dtype
    value = getattr(torch, str(dtype), None) if isinstance(dtype, str) else None
    if not isinstance(value, torch.dtype) or not value.is_floating_point:
        raise ValueError(f"dtype={dtype!r} is not valid: choose float32, bfloat16, float16 or auto.")
    return value


def _check_loading_info(model_id_or_path: str, info: dict, model: Any) -> None:
    missing, unexpected = sorted(info.get("missing_keys") or ()), sorted(info.get("unexpected_keys") or ())
    if not missing and not unexpected:
        return
    parts = []
    for label, keys in (("missing from the checkpoint", missing), ("in the checkpoint but not in the model",
                                                                     unexpected)):
        if keys:
            shown = ", ".join(keys[:5]) + (f" and {len(keys) - 5} more" if len(keys) > 5 else "")
            parts.append(f"{len(keys)} weights {label} ({shown})")
    raise ModelLoadError(
        f"{model_id_or_path!r} does not hold the weights of the {type(model).__name__} its config.json describes: "
        f"{'; '.join(parts)}. Pruning it would prune randomly initialised weights. Check that config.json and the "
        "weight files belong together; pass allow_missing_weights=True (--allow-missing-weights) if this is "
        "intended."
    )


def load_model(model_id_or_path: str, dtype: Any = None, *, allow_missing_weights: bool = False, **kwargs: Any):
    """Load a causal LM with transformers; clear errors when that is impossible.

    Raises:
        ModelLoadError: when weights of the model are missing from the files or the files hold weights the model
            does not have (a config beside another model's weights), unless ``allow_missing_weights``.
    """
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    dtype = parse_dtype(dtype)
    if dtype is None:  # fp32 on CPU (fast and exact there), the checkpoint's dtype on an accelerator
        dtype = "auto" if torch.cuda.is_available() else torch.float32
    verbosity = hf_logging.get_verbosity()
    if not allow_missing_weights:  # transformers' own table of the same keys would come before our one-line error
        hf_logging.set_verbosity_error()
    try:
        model, info = AutoModelForCausalLM.from_pretrained(model_id_or_path, dtype=dtype, output_loading_info=True,
                                                           **kwargs)
    except OSError as err:
        local = os.path.isdir(model_id_or_path)
        where = ("the folder's files could not be read as a model" if local else "it is not a local folder, and it "
                 "could not be fetched from the Hub (offline, private, or misspelled?)")
        raise OSError(f"could not load model {model_id_or_path!r}: {where}. Original error: {err}") from err
    except ValueError as err:  # e.g. a config whose model type has no causal-LM class
        raise ModelLoadError(f"could not load model {model_id_or_path!r} as a causal language model: {err}") from err
    finally:
        hf_logging.set_verbosity(verbosity)
    if not allow_missing_weights:
        _check_loading_info(str(model_id_or_path), info, model)
    return model


def load_tokenizer(model_id_or_path: str, trust_remote_code: bool = False):
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(model_id_or_path, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as err:
        raise OSError(f"could not load the tokenizer of {model_id_or_path!r}: {str(err).splitlines()[0]}") from err


def load_model_and_tokenizer(model_id_or_path: str, dtype: Any = None, *, allow_missing_weights: bool = False,
                             **kwargs: Any):
    """The tokenizer (first: it is cheap and fails fast) and the model of ``model_id_or_path`` (`load_model`)."""
    tokenizer = load_tokenizer(model_id_or_path, kwargs.get("trust_remote_code", False))
    model = load_model(model_id_or_path, dtype, allow_missing_weights=allow_missing_weights, **kwargs)
    return model, tokenizer


def check_memory_budget(path: str, max_memory: dict, dtype: Any, blocks_path: str | None, trust: bool) -> None:
    """Build the model on the meta device (no weights) to check that one block fits the accelerator budget."""
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(path, trust_remote_code=trust)
    with init_empty_weights():
        skeleton = AutoModelForCausalLM.from_config(config, trust_remote_code=trust)
    _, blocks = find_blocks(skeleton, blocks_path)
    size = getattr(torch, dtype) if isinstance(dtype, str) and dtype != "auto" else dtype
    if not isinstance(size, torch.dtype):
        size = getattr(config, "dtype", None) or torch.float32
        size = getattr(torch, size) if isinstance(size, str) else size
    check_max_memory(max_memory, max(blocks, key=lambda b: sum(p.numel() for p in b.parameters())), size)
