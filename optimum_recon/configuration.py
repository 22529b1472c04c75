"""Configuration dataclasses: what to prune and how (`PruningConfig`), and on which calibration data
(`CalibrationConfig`, defined in `calibration_config.py` and re-exported here).

Both configs are flat, typed dataclasses. Every field has its help text once, in the class docstring's
``Args`` (`field_help` reads it for the CLI). ``__post_init__`` validates user input and raises ``ValueError``
naming the field, the bad value and what is allowed. ``PruningConfig`` round-trips through one versioned JSON
file, ``pruning_config.json``; keys written by a newer version are dropped with a warning.
"""

from __future__ import annotations

import inspect
import json
import os
import re
import warnings
from dataclasses import MISSING, asdict, dataclass, field, fields
from typing import Any

from .calibration_config import CalibrationConfig, check_choice, check_number
from .version import __version__

CONFIG_NAME = "pruning_config.json"

PROPAGATIONS = ("global", "local")
# Settings whose default changed when they were added, and how a recipe written before that ran.
_BEFORE_IT_EXISTED = {"guard": False, "loss": "mse", "allocation": "uniform"}
_CALIBRATION_BEFORE_IT_EXISTED = {"self_generate": "off"}
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


@dataclass
class PruningConfig:
    """What to prune and how: the recipe saved as `pruning_config.json` next to a pruned model.

    Args:
        sparsity: Fraction of weights set to zero in each pruned linear layer, in [0, 1). For an N:M
            pattern it is fixed to `1 - N/M`.
        pattern: `"unstructured"` or `"N:M"` (at most N nonzeros in every M consecutive input weights).
        method: Mask method: `sparsegpt`, `wanda`, `magnitude` or `alps` (ALPS: mask and weights by ADMM, for 60-70%).
        allocation: How `sparsity` is spread over the pruned layers: `auto` (default: `owl` for unstructured
            sparsity, where it measured better, `uniform` for N:M or where `owl_lambda` does not fit around
            `sparsity`), `uniform` (every layer the same), `owl` (outlier-weighted: blocks whose Wanda scores hold
            more outliers are pruned less, others more, see `owl_threshold` and `owl_lambda`; costs one extra forward
            pass over the calibration windows), or a table {module name or prefix: sparsity} (e.g.
            {"model.layers.0": 0.3}: layers it does not name share the rest). Either way the model's fraction of
            zeros is `sparsity` to within half a weight. `owl` and tables need unstructured sparsity.
        owl_threshold: OWL: a score is an outlier above this many times its block's mean score (the paper's M).
        owl_lambda: OWL: block sparsities span at most 2 x this around `sparsity` (the paper's lambda).
        reconstruction: `layer` (LR: the mask method alone; SparseGPT's update is its layer-wise
            reconstruction), `block` (BR: train each pruned block toward its target) or `cross_block`
            (CR: train sliding windows of `window` consecutive blocks jointly).
        propagation: `global` (GP: targets are the dense model's own hidden states) or `local` (targets are
            the dense block applied to the pruned model's inputs).
        targets: Linear layers to prune, by name inside a decoder block: `q_proj` (a name, or its last parts:
            `self_attn.q_proj`), `mlp` (every layer of the MLP), matched on dot boundaries; or `re:<regex>`
            matching a whole name. Default: every linear layer of every block. Embeddings and the LM head are
            never pruned. An entry that matches no layer is warned about.
        ignore: Linear layers to leave dense, written like `targets` and matched against both the name inside
            the block and the full module name (`model.layers.0.mlp` is block 0's MLP, not block 10's).
        dampening: SparseGPT: Hessian dampening as a fraction of its mean diagonal.
        block_size: SparseGPT: columns processed together (lazy batch updates).
        epochs: BR/CR: passes over the calibration set per block (0: no training, i.e. LR).
        lr: BR/CR: AdamW's peak learning rate, decayed linearly to 0, or `auto` (default): for each window, 1% of
            the root mean square of its kept weights, halved whenever an epoch makes the held-out error worse (the
            best weights are restored first). A number is used exactly as given (the paper's 2e-4 suits LLaMA-7B).
        guard: BR/CR: judge every epoch by the window's held-out error, keep the weights of the best epoch, stop
            after `patience` epochs without improvement, and keep the masked-only weights when training never
            beats them. Default (None): on whenever there are held-out windows; true needs them.
        patience: BR/CR with the guard: epochs without a better held-out error before training stops.
        loss: BR/CR: what training minimizes and the guard judges: `relative` (default: each token's squared error
            divided by its target's squared norm, averaged over tokens, so that the few tokens with massive
            activations do not outweigh all the others) or `mse` (the paper's mean squared error over all entries).
        batch_size: Calibration windows per training step and per forward pass (4; the paper's 8 was over 256 windows).
        adam_betas: BR/CR: AdamW betas.
        weight_decay: BR/CR: AdamW weight decay (0 keeps pruned weights trivially fixed).
        window: CR: consecutive blocks trained jointly; windows slide by one block.
        train_dtype: BR/CR: `auto` (default: `bfloat16` autocast where it is native, a CUDA GPU with bfloat16 or a
            CPU with AMX, else `float32`), or `float32` / `bfloat16` / `float16` as given (fp32 master weights).
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

    sparsity: float = 0.5
    pattern: str = "unstructured"
    method: str = "sparsegpt"
    allocation: str | dict[str, float] = "auto"
    owl_threshold: float = 5.0
    owl_lambda: float = 0.08
    reconstruction: str = "block"
    propagation: str = "global"
    targets: list[str] | None = None
    ignore: list[str] = field(default_factory=list)
    dampening: float = 0.01
    block_size: int = 128
    epochs: int = 10
    lr: float | str = "auto"
    guard: bool | None = None
    patience: int = 2
    loss: str = "relative"
    batch_size: int = 4
    adam_betas: tuple[float, float] = (0.9, 0.95)
    weight_decay: float = 0.0
    window: int = 2
    train_dtype: str = "auto"
    gradient_checkpointing: bool = False
    lora_rank: int = 0
    lora_alpha: float | None = None
    calibration: CalibrationConfig = field(default_factory=CalibrationConfig)

    def __post_init__(self) -> None:
        if isinstance(self.calibration, dict):
            self.calibration = CalibrationConfig(**self.calibration)
        self._validate_sparsity()
        from .masks import MASK_METHODS  # registries are the single source of valid names
        from .reconstruction import RECONSTRUCTIONS
        from .reconstruction.base import LOSSES

        check_choice("method", self.method, sorted(MASK_METHODS))
        check_choice("reconstruction", self.reconstruction, sorted(RECONSTRUCTIONS))
        check_choice("propagation", self.propagation, PROPAGATIONS)
        check_choice("loss", self.loss, LOSSES)
        check_number("dampening", self.dampening, 0, 1, high_open=True, example="0.01")
        if isinstance(self.block_size, bool) or not isinstance(self.block_size, int) or self.block_size <= 0:
            raise ValueError(f"block_size={self.block_size!r} is not valid: it must be a positive integer.")
        for name in ("targets", "ignore"):
            self._validate_regexes(name)
        self._validate_allocation()
        self._validate_training()

    def _validate_allocation(self) -> None:
        from .masks.allocation import POLICIES

        if isinstance(self.allocation, dict):
            for key, value in self.allocation.items():
                if not isinstance(key, str) or not key:
                    raise ValueError(f"allocation table key {key!r} is not valid: use module names such as "
                                     "'model.layers.0' or 'model.layers.0.mlp.down_proj'.")
                check_number(f"allocation[{key!r}]", value, 0, 1, high_open=True, example="0.4")
            self.allocation = {key: float(value) for key, value in self.allocation.items()}
        elif self.allocation not in POLICIES:
            raise ValueError(f"allocation={self.allocation!r} is not valid: choose one of "
                             f"{', '.join(map(repr, POLICIES))}, or give a table {{module name: sparsity}}.")
        check_number("owl_threshold", self.owl_threshold, 0, None, low_open=True, example="5")
        check_number("owl_lambda", self.owl_lambda, 0, 0.5, high_open=True, example="0.08")
        if self.allocation not in ("auto", "uniform") and self.nm is not None:
            raise ValueError(f"allocation={self.allocation if isinstance(self.allocation, str) else 'a table'!r} "
                             f"needs unstructured sparsity: pattern={self.pattern!r} fixes every layer's sparsity at "
                             f"{self.sparsity:g}. Use allocation='uniform' with N:M.")

    def _validate_training(self) -> None:
        for name, low in (("epochs", 0), ("batch_size", 1), ("window", 1), ("lora_rank", 0), ("patience", 1)):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise ValueError(f"{name}={value!r} is not valid: it must be an integer >= {low}.")
        # AdamW moves each weight by about lr per step whatever the gradient: above 1 nothing sensible is left
        if self.lr != "auto":
            check_number("lr", self.lr, 0, 1, low_open=True, example="2e-4, or 'auto'")
        if self.guard is not None and not isinstance(self.guard, bool):
            raise ValueError(f"guard={self.guard!r} is not valid: true, false, or unset (on with held-out windows).")
        if self.guard and self.calibration.heldout_samples == 0:
            raise ValueError("guard=True judges training on held-out windows, but calibration heldout_samples=0 draws "
                             "none: leave heldout_samples unset (default: a quarter of num_samples) or give a count.")
        betas = self.adam_betas
        if not isinstance(betas, (list, tuple)) or len(betas) != 2:
            raise ValueError(f"adam_betas={self.adam_betas!r} is not valid: two numbers in [0, 1), e.g. (0.9, 0.95).")
        for i, beta in enumerate(betas):
            check_number(f"adam_betas[{i}]", beta, 0, 1, high_open=True, example="0.9")
        self.adam_betas = (float(betas[0]), float(betas[1]))
        check_number("weight_decay", self.weight_decay, 0, 1, example="0.0")
        check_choice("train_dtype", self.train_dtype, ("auto", "float32", "bfloat16", "float16"))
        if not isinstance(self.gradient_checkpointing, bool):
            raise ValueError(f"gradient_checkpointing={self.gradient_checkpointing!r} is not valid: true or false.")
        if self.lora_alpha is not None:
            check_number("lora_alpha", self.lora_alpha, 0, None, low_open=True, example="16")

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
        if not isinstance(value, (list, tuple)) or not all(isinstance(p, str) for p in value):
            raise ValueError(f"{name}={value!r} is not valid: give a list of layer names (strings).")
        setattr(self, name, list(value))
        for pattern in value:
            regex = pattern[3:] if pattern.startswith("re:") else pattern
            try:
                re.compile(regex)
            except re.error as err:
                raise ValueError(f"{name} entry {pattern!r} is not a valid regular expression: {err}.") from None
            if not pattern.startswith("re:") and re.search(r"[\\^$*+?()\[\]{}|]", pattern):
                warnings.warn(f"{name} entry {pattern!r} looks like a regular expression: it is searched anywhere in "
                              f"the layer names, as before. Write a dotted name ({pattern.strip('^$')!r} style, "
                              f"matched on dot boundaries) or 're:{pattern}' for a regex that must match a whole "
                              "name.", stacklevel=4)

    @property
    def allocation_policy(self) -> str:
        """The allocation a prune uses: `owl`, `uniform` or `table` (`auto` resolved, see `masks/allocation.py`)."""
        from .masks.allocation import resolve_policy

        return resolve_policy(self.allocation, self.sparsity, self.owl_lambda, self.nm)

    @property
    def nm(self) -> tuple[int, int] | None:
        """``(N, M)`` for an N:M pattern, else ``None``."""
        return parse_pattern(self.pattern)

    # --- serialization -------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        """Every setting as plain JSON-able values, stamped with the optimum-recon version."""
        data = asdict(self)
        data["optimum_recon_version"] = __version__
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any], *, source: str | None = None) -> "PruningConfig":
        """Build a config from a dict, dropping (with a warning) keys this version does not know.

        ``source`` names the file in messages. A recipe written by a newer optimum-recon is read with a warning.
        """
        where = f"the recipe {source!r}" if source else "the recipe"
        if not isinstance(data, dict):
            raise ValueError(f"{where} is a JSON {type(data).__name__}, not an object of settings: it is not a "
                             f"{CONFIG_NAME} written by optimum-recon.")
        data = dict(data)
        version = data.pop("optimum_recon_version", None)
        if _newer(version, __version__):
            warnings.warn(f"{where} was written by optimum-recon {version}, newer than this {__version__}: "
                          "settings it added are ignored and the result may differ; upgrade optimum-recon.",
                          stacklevel=2)
        # a recipe written by optimum-recon holds every setting of the version that wrote it: one it lacks predates
        # that setting, and its run behaved as the value below says, not as today's default
        for key, before in _BEFORE_IT_EXISTED.items() if version is not None else ():
            data.setdefault(key, before)
        calibration = data.pop("calibration", {}) or {}
        if not isinstance(calibration, dict):
            raise ValueError(f"{where}: 'calibration' must be an object of settings, not {calibration!r}.")
        if version is not None:
            calibration = {**_CALIBRATION_BEFORE_IT_EXISTED, **calibration}
        calibration, unknown_calibration = _split_known(CalibrationConfig, calibration)
        kwargs, unknown = _split_known(cls, data)
        unknown += [f"calibration.{key}" for key in unknown_calibration]
        if unknown:
            warnings.warn(
                f"Ignoring {', '.join(unknown)} in {where}: written by a newer optimum-recon; upgrade to use "
                "these settings.",
                stacklevel=2,
            )
        try:
            return cls(**kwargs, calibration=CalibrationConfig(**calibration))
        except ValueError as err:
            raise ValueError(f"{where}: {err}") from None

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
        try:
            with open(path, encoding="utf-8") as fh:
                data = json.load(fh)
        except json.JSONDecodeError as err:
            raise ValueError(f"the recipe {path!r} is not valid JSON: {err.msg} at line {err.lineno}, column "
                             f"{err.colno}.") from None
        except UnicodeDecodeError:
            raise ValueError(f"the recipe {path!r} is not a text file: it is not a {CONFIG_NAME}.") from None
        return cls.from_dict(data, source=path)


def _newer(version: Any, current: str) -> bool:
    """Whether ``version`` (from a file) is a release newer than ``current``."""
    from packaging.version import InvalidVersion, Version

    try:
        return version is not None and Version(str(version)) > Version(current)
    except InvalidVersion:
        return False


def _split_known(cls: type, data: dict[str, Any]) -> tuple[dict[str, Any], list[str]]:
    known = {f.name for f in fields(cls) if f.name != "calibration"}
    return {k: v for k, v in data.items() if k in known}, sorted(set(data) - known)


def field_help(cls: type, name: str) -> str:
    """The help text of a config field, read from the class docstring's ``Args:`` entry: written once, for the API
    reference, the CLI's ``--help`` and the docs alike."""
    for f in fields(cls):
        if f.name == name:
            break
    else:
        raise KeyError(name)
    doc = inspect.getdoc(cls) or ""
    match = re.search(rf"^    {re.escape(name)}: (.*(?:\n {{8}}.*)*)", doc, re.M)
    if match is None:
        raise KeyError(f"{cls.__name__}.{name} has no entry in the class docstring's Args")
    return " ".join(match.group(1).split()).replace("`", "")


def field_default(cls: type, name: str) -> Any:
    for f in fields(cls):
        if f.name == name:
            if f.default is not MISSING:
                return f.default
            return f.default_factory()  # type: ignore[misc]
    raise KeyError(name)
