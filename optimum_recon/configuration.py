"""Configuration dataclasses: what to prune, how, and on which calibration data.

Both configs are flat, typed dataclasses. Every field has its help text once (in ``metadata``), which
the CLI reuses. ``__post_init__`` validates user input and raises ``ValueError`` naming the field, the
bad value and what is allowed. ``PruningConfig`` round-trips through one versioned JSON file,
``pruning_config.json``; keys written by a newer version are dropped with a warning.
"""

from __future__ import annotations

import json
import os
import re
import warnings
from dataclasses import MISSING, asdict, dataclass, field, fields
from typing import Any

from .version import __version__

CONFIG_NAME = "pruning_config.json"

# Short names accepted by `CalibrationConfig.source` and the evaluation helpers.
KNOWN_DATASETS = ("c4", "wikitext2", "ptb")
PROPAGATIONS = ("global", "local")
_NM_RE = re.compile(r"^(\d+):(\d+)$")


def parse_pattern(pattern: str) -> tuple[int, int] | None:
    """Return ``(n, m)`` for an ``"N:M"`` pattern, ``None`` for ``"unstructured"``.

    Raises:
        ValueError: for anything else, or an N:M pattern with ``not 0 < N < M``.
    """
    if pattern == "unstructured":
        return None
    match = _NM_RE.match(str(pattern))
    if match is None:
        raise ValueError(
            f"pattern={pattern!r} is not valid: use 'unstructured' or 'N:M' with integers 0 < N < M, "
            "e.g. '2:4' or '4:8'."
        )
    n, m = int(match.group(1)), int(match.group(2))
    if not 0 < n < m:
        raise ValueError(
            f"pattern={pattern!r} is not valid: N:M keeps N weights in every group of M, so it needs 0 < N < M "
            "(e.g. '2:4' or '4:8')."
        )
    return n, m


def _help(text: str, **kwargs: Any) -> Any:
    return field(metadata={"help": text}, **kwargs)


@dataclass
class CalibrationConfig:
    """Where the calibration text comes from and how it is cut into windows.

    Args:
        source: A known name (`c4`, `wikitext2`, `ptb`), a Hub dataset id, or a local `.txt`, `.jsonl`,
            `.json`, `.parquet` file or a folder saved with `datasets.Dataset.save_to_disk`.
        num_samples: Number of calibration windows.
        seq_len: Tokens per window.
        seed: Seed for choosing documents and window offsets.
        text_column: Column holding the text (default: `text`, or the only string column).
        split: Dataset split for Hub datasets (default: `train`).
        heldout_samples: Extra windows from the same source on which the reconstruction error is also
            reported; they never influence masks or training.
    """

    source: str = _help("Calibration text: c4, wikitext2, ptb, a Hub dataset id or a local file/folder.", default="c4")
    num_samples: int = _help("Number of calibration windows.", default=128)
    seq_len: int = _help("Tokens per calibration window.", default=512)
    seed: int = _help("Seed for choosing documents and window offsets.", default=0)
    text_column: str | None = _help("Column holding the text (default: 'text').", default=None)
    split: str | None = _help("Dataset split for Hub datasets (default: 'train').", default=None)
    heldout_samples: int = _help("Extra windows from the same source, never used for masks or training, on which "
                                 "the reconstruction error is also reported (0: none).", default=0)

    def __post_init__(self) -> None:
        if not isinstance(self.source, str) or not self.source.strip():
            raise ValueError(f"calibration source={self.source!r} is empty: name a dataset or a local file.")
        heldout = self.heldout_samples
        if isinstance(heldout, bool) or not isinstance(heldout, int) or heldout < 0:
            raise ValueError(f"calibration heldout_samples={self.heldout_samples!r} is not valid: use an integer >= 0.")
        for name in ("num_samples", "seq_len"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ValueError(f"calibration {name}={value!r} is not valid: it must be a positive integer.")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int):
            raise ValueError(f"calibration seed={self.seed!r} is not valid: it must be an integer.")


@dataclass
class PruningConfig:
    """What to prune and how: the recipe saved as `pruning_config.json` next to a pruned model.

    Args:
        sparsity: Fraction of weights set to zero in each pruned linear layer, in [0, 1). For an N:M
            pattern it is fixed to `1 - N/M`.
        pattern: `"unstructured"` or `"N:M"` (at most N nonzeros in every M consecutive input weights).
        method: Mask method: `sparsegpt`, `wanda` or `magnitude`.
        reconstruction: `layer` (LR: the mask method alone; SparseGPT's update is its layer-wise
            reconstruction), `block` (BR: train each pruned block toward its target) or `cross_block`
            (CR: train sliding windows of `window` consecutive blocks jointly).
        propagation: `global` (GP: targets are the dense model's own hidden states) or `local` (targets are
            the dense block applied to the pruned model's inputs).
        targets: Regular expressions matched (`re.search`) against linear-layer names inside a decoder
            block (e.g. `self_attn.q_proj`); default: every linear layer of every block. Embeddings and the
            LM head are never pruned.
        ignore: Regular expressions of linear layers to leave dense; matched against both the name inside
            the block and the full module name (e.g. `model.layers.0.mlp`).
        dampening: SparseGPT: Hessian dampening as a fraction of its mean diagonal.
        block_size: SparseGPT: columns processed together (lazy batch updates).
        epochs: BR/CR: passes over the calibration set per block (0: no training, i.e. LR).
        lr: BR/CR: AdamW learning rate, decayed linearly to 0.
        batch_size: Calibration windows per training step and per forward pass.
        adam_betas: BR/CR: AdamW betas.
        weight_decay: BR/CR: AdamW weight decay (0 keeps pruned weights trivially fixed).
        window: CR: consecutive blocks trained jointly; windows slide by one block.
        train_dtype: BR/CR: `float32`, or `bfloat16` / `float16` autocast (fp32 master weights).
        gradient_checkpointing: BR/CR: recompute each block's sub-modules in the backward pass.
        lora_rank: BR/CR: train low-rank updates of the pruned weights, applied through their masks, instead of
            the full weights (far less optimizer memory); 0 trains the full weights.
        lora_alpha: BR/CR with `lora_rank`: the update is scaled by alpha / rank (default alpha = rank).
        calibration: The calibration data (`CalibrationConfig`).

    Example:
        ```python
        >>> PruningConfig(sparsity=0.5, pattern="2:4", method="wanda")
        ```
    """

    sparsity: float = _help("Fraction of weights pruned in each layer, in [0, 1); N:M fixes it to 1-N/M.", default=0.5)
    pattern: str = _help("'unstructured' or 'N:M' (e.g. '2:4').", default="unstructured")
    method: str = _help("Mask method: sparsegpt, wanda or magnitude.", default="sparsegpt")
    reconstruction: str = _help("Reconstruction: layer (LR), block (BR) or cross_block (CR).", default="block")
    propagation: str = _help("Targets: global (dense model's hidden states) or local (dense block on pruned inputs).",
                             default="global")
    targets: list[str] | None = _help("Regexes of linear layers (inside a block) to prune; default: all.", default=None)
    ignore: list[str] = _help("Regexes of linear layers to leave dense.", default_factory=list)
    dampening: float = _help("SparseGPT Hessian dampening, as a fraction of the mean diagonal.", default=0.01)
    block_size: int = _help("SparseGPT lazy-update block size (columns).", default=128)
    epochs: int = _help("BR/CR: epochs over the calibration set per block (0: no training).", default=10)
    lr: float = _help("BR/CR: AdamW learning rate (linear decay to 0, no warm-up).", default=2e-4)
    batch_size: int = _help("Calibration windows per training step and per forward pass.", default=8)
    adam_betas: tuple[float, float] = _help("BR/CR: AdamW betas.", default=(0.9, 0.95))
    weight_decay: float = _help("BR/CR: AdamW weight decay.", default=0.0)
    window: int = _help("CR: consecutive blocks trained jointly (windows slide by one block).", default=2)
    train_dtype: str = _help("BR/CR: float32, or bfloat16/float16 autocast.", default="float32")
    gradient_checkpointing: bool = _help("BR/CR: gradient checkpointing inside each block.", default=False)
    lora_rank: int = _help("BR/CR: train rank-r updates of the pruned weights through their masks instead of the "
                           "full weights (0: full training).", default=0)
    lora_alpha: float | None = _help("BR/CR with lora_rank: scale alpha/r of the low-rank update (default: r).",
                                     default=None)
    calibration: CalibrationConfig = _help("Calibration data.", default_factory=CalibrationConfig)

    def __post_init__(self) -> None:
        if isinstance(self.calibration, dict):
            self.calibration = CalibrationConfig(**self.calibration)
        self._validate_sparsity()
        from .masks import MASK_METHODS  # registries are the single source of valid names
        from .reconstruction import RECONSTRUCTIONS

        _check_choice("method", self.method, sorted(MASK_METHODS))
        _check_choice("reconstruction", self.reconstruction, sorted(RECONSTRUCTIONS))
        _check_choice("propagation", self.propagation, PROPAGATIONS)
        if not 0 <= self.dampening < 1:
            raise ValueError(f"dampening={self.dampening!r} is not valid: use a small fraction such as 0.01.")
        if isinstance(self.block_size, bool) or not isinstance(self.block_size, int) or self.block_size <= 0:
            raise ValueError(f"block_size={self.block_size!r} is not valid: it must be a positive integer.")
        for name in ("targets", "ignore"):
            self._validate_regexes(name)
        self._validate_training()

    def _validate_training(self) -> None:
        for name, low in (("epochs", 0), ("batch_size", 1), ("window", 1), ("lora_rank", 0)):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise ValueError(f"{name}={value!r} is not valid: it must be an integer >= {low}.")
        if isinstance(self.lr, bool) or not isinstance(self.lr, (int, float)) or not self.lr > 0:
            raise ValueError(f"lr={self.lr!r} is not valid: the learning rate must be > 0 (e.g. 2e-4).")
        betas = tuple(self.adam_betas)
        if len(betas) != 2 or not all(0 <= b < 1 for b in betas):
            raise ValueError(f"adam_betas={self.adam_betas!r} is not valid: two numbers in [0, 1), e.g. (0.9, 0.95).")
        self.adam_betas = (float(betas[0]), float(betas[1]))
        if self.weight_decay < 0:
            raise ValueError(f"weight_decay={self.weight_decay!r} is not valid: it must be >= 0.")
        _check_choice("train_dtype", self.train_dtype, ("float32", "bfloat16", "float16"))
        if self.lora_alpha is not None and not self.lora_alpha > 0:
            raise ValueError(f"lora_alpha={self.lora_alpha!r} is not valid: it must be > 0.")

    def _validate_sparsity(self) -> None:
        if isinstance(self.sparsity, bool) or not isinstance(self.sparsity, (int, float)):
            raise ValueError(f"sparsity={self.sparsity!r} is not valid: it must be a number in [0, 1).")
        nm = parse_pattern(self.pattern)
        if nm is not None:
            implied = 1.0 - nm[0] / nm[1]
            if abs(float(self.sparsity) - implied) > 1e-9:
                warnings.warn(
                    f"pattern={self.pattern!r} keeps {nm[0]} of every {nm[1]} weights, so sparsity is {implied:g}; "
                    f"the given sparsity={self.sparsity!r} is ignored.",
                    stacklevel=3,
                )
            self.sparsity = implied
        if not 0 <= float(self.sparsity) < 1:
            raise ValueError(
                f"sparsity={self.sparsity!r} is not valid: it is the fraction of weights set to zero, in [0, 1) "
                "(0.5 prunes half of each layer)."
            )
        self.sparsity = float(self.sparsity)

    def _validate_regexes(self, name: str) -> None:
        value = getattr(self, name)
        if value is None:
            return
        if isinstance(value, str):
            value = [value]
            setattr(self, name, value)
        for pattern in value:
            try:
                re.compile(pattern)
            except re.error as err:
                raise ValueError(f"{name} entry {pattern!r} is not a valid regular expression: {err}.") from None

    @property
    def nm(self) -> tuple[int, int] | None:
        """``(N, M)`` for an N:M pattern, else ``None``."""
        return parse_pattern(self.pattern)

    # --- serialization -------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["optimum_recon_version"] = __version__
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "PruningConfig":
        """Build a config from a dict, dropping (with a warning) keys this version does not know."""
        data = dict(data)
        data.pop("optimum_recon_version", None)
        calibration, unknown_calibration = _split_known(CalibrationConfig, data.pop("calibration", {}) or {})
        kwargs, unknown = _split_known(cls, data)
        unknown += [f"calibration.{key}" for key in unknown_calibration]
        if unknown:
            warnings.warn(
                f"Ignoring {', '.join(unknown)} in {CONFIG_NAME}: written by a newer optimum-recon; upgrade to use "
                "these settings.",
                stacklevel=2,
            )
        return cls(**kwargs, calibration=CalibrationConfig(**calibration))

    def save_pretrained(self, save_directory: str | os.PathLike) -> str:
        """Write `pruning_config.json` into `save_directory` and return its path."""
        if os.path.isfile(save_directory):
            raise ValueError(f"save_directory={str(save_directory)!r} is a file; pass a folder.")
        os.makedirs(save_directory, exist_ok=True)
        path = os.path.join(save_directory, CONFIG_NAME)
        with open(path, "w", encoding="utf-8") as fh:
            json.dump(self.to_dict(), fh, indent=2, sort_keys=True)
            fh.write("\n")
        return path

    @classmethod
    def from_pretrained(cls, path_or_repo: str | os.PathLike, **hub_kwargs: Any) -> "PruningConfig":
        """Load the recipe from a folder, a `pruning_config.json` file, or a Hub repo holding one."""
        path = str(path_or_repo)
        if os.path.isdir(path):
            path = os.path.join(path, CONFIG_NAME)
        elif not os.path.isfile(path):
            from huggingface_hub import hf_hub_download

            path = hf_hub_download(path, CONFIG_NAME, **hub_kwargs)
        if not os.path.isfile(path):
            raise FileNotFoundError(f"No {CONFIG_NAME} found at {path!r}: is this a model pruned with optimum-recon?")
        with open(path, encoding="utf-8") as fh:
            return cls.from_dict(json.load(fh))


def _check_choice(name: str, value: Any, allowed: Any) -> None:
    if value not in allowed:
        raise ValueError(f"{name}={value!r} is not valid: choose one of {', '.join(map(repr, allowed))}.")


def _split_known(cls: type, data: dict[str, Any]) -> tuple[dict[str, Any], list[str]]:
    known = {f.name for f in fields(cls) if f.name != "calibration"}
    return {k: v for k, v in data.items() if k in known}, sorted(set(data) - known)


def field_help(cls: type, name: str) -> str:
    """The help text of a config field (used by the CLI so that it is written once)."""
    for f in fields(cls):
        if f.name == name:
            return f.metadata.get("help", "")
    raise KeyError(name)


def field_default(cls: type, name: str) -> Any:
    for f in fields(cls):
        if f.name == name:
            if f.default is not MISSING:
                return f.default
            return f.default_factory()  # type: ignore[misc]
    raise KeyError(name)
