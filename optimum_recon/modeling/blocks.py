"""Finding decoder blocks and the linear layers inside them, for any decoder-only architecture.

This is the only module that knows where architectures keep their blocks. Lookup order:

1. the user's override (``blocks_path="model.layers"``);
2. the model's ``_no_split_modules``: the ``nn.ModuleList`` holding the most modules of those classes;
3. ``BLOCK_PATTERNS``, a table of attribute paths used by common architectures.

A new architecture that defeats 1-3 is a new row in ``BLOCK_PATTERNS``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch
from torch import nn

# Attribute paths of the decoder-block ModuleList, tried in order after `_no_split_modules`.
BLOCK_PATTERNS: tuple[str, ...] = (
    "model.layers",  # Llama, Mistral, Qwen2/3, Gemma 1-3, Phi-3, ...
    "model.decoder.layers",  # OPT
    "transformer.h",  # GPT-2, GPT-J, Falcon, Bloom
    "gpt_neox.layers",  # GPT-NeoX, Pythia
    "model.language_model.layers",  # multimodal wrappers (Gemma 3, Llava-style)
    "transformer.blocks",  # MPT
    "model.transformer.blocks",
)


class BlocksNotFoundError(ValueError):
    """Raised when the decoder blocks of a model cannot be located."""


def _get_attr_path(model: nn.Module, path: str) -> nn.Module | None:
    module = model
    for part in path.split("."):
        module = getattr(module, part, None)
        if module is None:
            return None
    return module


def _from_no_split_modules(model: nn.Module) -> tuple[str, nn.ModuleList] | None:
    names = set(getattr(model, "_no_split_modules", None) or ())
    if not names:
        return None
    best: tuple[int, str, nn.ModuleList] | None = None
    for path, module in model.named_modules():
        if not isinstance(module, nn.ModuleList) or len(module) == 0:
            continue
        hits = sum(type(child).__name__ in names for child in module)
        if hits == len(module) and (best is None or hits > best[0]):
            best = (hits, path, module)
    return (best[1], best[2]) if best else None


def find_blocks(model: nn.Module, blocks_path: str | None = None) -> tuple[str, nn.ModuleList]:
    """Return ``(path, module_list)`` of the model's decoder blocks.

    Raises:
        BlocksNotFoundError: naming the model class and how to pass ``blocks_path``.
    """
    if blocks_path:
        found = _get_attr_path(model, blocks_path)
        if not isinstance(found, nn.ModuleList) or len(found) == 0:
            raise BlocksNotFoundError(
                f"blocks_path={blocks_path!r} does not name a non-empty nn.ModuleList in {type(model).__name__}."
            )
        return blocks_path, found
    found = _from_no_split_modules(model)
    if found is not None:
        return found
    for path in BLOCK_PATTERNS:
        module = _get_attr_path(model, path)
        if isinstance(module, nn.ModuleList) and len(module) > 0:
            return path, module
    candidates = [p for p, m in model.named_modules() if isinstance(m, nn.ModuleList) and len(m) > 1]
    raise BlocksNotFoundError(
        f"cannot find the decoder blocks of {type(model).__name__}: it has no usable `_no_split_modules` and "
        f"none of {', '.join(BLOCK_PATTERNS)} exists. Pass blocks_path='...' (CLI: --blocks-path) naming the "
        f"nn.ModuleList of decoder layers; ModuleLists in this model: {', '.join(candidates) or 'none'}."
    )


@dataclass
class LinearLayer:
    """A prunable linear layer inside a block, seen with its weight as (out, in).

    GPT-2 style ``Conv1D`` stores its weight as (in, out); ``weight`` / ``set_weight`` hide that.
    """

    name: str  # relative to the block, e.g. "self_attn.q_proj"
    module: nn.Module
    transposed: bool

    @property
    def in_features(self) -> int:
        return self.module.weight.shape[0 if self.transposed else 1]

    @property
    def weight(self) -> torch.Tensor:  # (out, in)
        w = self.module.weight.data
        return w.t() if self.transposed else w

    def set_weight(self, weight: torch.Tensor) -> None:
        """Copy ``weight`` (out, in) into the module in place, keeping its dtype and device."""
        target = self.module.weight.data
        target.copy_(weight.t() if self.transposed else weight)


def _is_linear(module: nn.Module) -> tuple[bool, bool]:
    if isinstance(module, nn.Linear):
        return True, False
    if type(module).__name__ == "Conv1D" and getattr(module, "weight", None) is not None:
        return True, True  # transformers.pytorch_utils.Conv1D: weight (in, out)
    return False, False


_REGEX_CHARACTERS = re.compile(r"[\\^$*+?()\[\]{}|]")


def layer_matches(pattern: str, *names: str) -> bool:
    """Whether a `targets` / `ignore` entry names a layer called ``names`` (inside the block, and in full).

    * ``"re:<regex>"``: the regular expression must match a whole name (`re.fullmatch`);
    * anything else is a dotted name that must stand in the layer's name on dot boundaries: ``"q_proj"`` is the
      layer ``self_attn.q_proj``, ``"mlp"`` every layer of the MLP, ``"model.layers.1"`` every layer of block 1 but
      not of block 10 (an unanchored regex search would take those too);
    * an entry with regex characters but no ``re:`` (written for versions that searched regexes) is searched as
      before (`re.search`); `PruningConfig` warns about it.
    """
    if pattern.startswith("re:"):
        return any(re.fullmatch(pattern[3:], name) for name in names)
    if _REGEX_CHARACTERS.search(pattern):
        return any(re.search(pattern, name) for name in names)
    wanted = f".{pattern.strip('.')}."
    return any(wanted in f".{name}." for name in names)


def layers_to_prune(blocks: nn.ModuleList, path: str, targets: list[str] | None, ignore: list[str] | None
                    ) -> list[list[LinearLayer]]:
    """The linear layers each of ``blocks`` prunes (`find_linear_layers`, full names under ``path.<index>``)."""
    return [find_linear_layers(block, targets, ignore, f"{path}.{index}") for index, block in enumerate(blocks)]


def find_linear_layers(
    block: nn.Module,
    targets: list[str] | None = None,
    ignore: list[str] | None = None,
    block_name: str = "",
) -> list[LinearLayer]:
    """The linear layers of ``block`` to prune, in module order.

    ``targets``: entries (`layer_matches`) matched against the name inside the block; ``None`` means every linear
    layer. ``ignore``: entries matched against the name inside the block and the full name ``block_name.name``.
    """
    layers = []
    for name, module in block.named_modules():
        is_linear, transposed = _is_linear(module)
        if not is_linear:
            continue
        full_name = f"{block_name}.{name}" if block_name else name
        if targets is not None and not any(layer_matches(p, name) for p in targets):
            continue
        if ignore and any(layer_matches(p, name, full_name) for p in ignore):
            continue
        layers.append(LinearLayer(name=name, module=module, transposed=transposed))
    return layers
