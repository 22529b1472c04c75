"""`self_generate="auto"`: how many windows the dense model writes itself when the calibration set is too small to
train on.

Notation: N calibration windows of T tokens; d the hidden size (every block maps T x d to T x d); P the weights that
one training fit sets: the kept weights of the pruned layers of one block (BR) or of the `window` blocks that CR
trains together, or with `lora_rank` r the r x (in + out) values of each layer's update.

Why: one fit sets P weights to match N x T x d target values (the block's outputs on the calibration windows). With
fewer targets than weights (N T d < P) the fit is underdetermined: it can reproduce the calibration windows without
learning what the block does on other text, which is the overfitting the paper warns about, and its cure is more
text from the dense model itself. Measured on the bundled model (SparseGPT 50%, the default BR+GP, 16 windows of
128 tokens: N T d / P = 0.67; docs/benchmarks.md, the small-data row), the 8 generated windows this rule adds cut the
held-out final-block error from 238.6 to 210.0 (LR: 305.5) and WikiText-2 from 58.82 to 56.62, for 63 s more (97 ->
160 s, generation included); 16 gave 200.9 and 56.36 in 176 s. The rule needs nothing but the shapes, so
it scales with the model: the usual budgets sit far above one target per weight (the bundled model at 64 x 512
tokens: 10.7; LLaMA-7B at 128 x 2048: 10.6), so it only acts where a user gave little text. It generates what is
missing to reach one target per weight (the least that leaves the underdetermined regime: generation and the
training it adds cost time; more can be asked for with `source="c4+self:N"`).

Where: the windows are generated where the blocks will run (asked-for ones, `c4+self:N`, too). A model loaded on the
CPU and pruned block by block on a GPU is moved to the GPU for the generation (and back) when it fits in the GPU's
free memory: generating on the CPU costs a full pass over every weight per token, hours for a 7B model. When it does
not fit, or when its weights are offloaded (every token would read them from CPU memory or disk), `auto` generates
nothing and a warning says so; asked-for windows are then generated where the model is, as asked.
"""

from __future__ import annotations

import math
import warnings
from typing import TYPE_CHECKING, Any

import torch

from ..modeling.blocks import find_blocks, layers_to_prune
from ..modeling.offload import _nbytes, check_device, default_device, input_device, is_offloaded
from ..reconstruction import get_reconstruction, trains

if TYPE_CHECKING:  # pragma: no cover
    from ..calibration_config import CalibrationConfig
    from ..configuration import PruningConfig

NO_FILL: tuple[int, dict[str, Any], None] = (0, {}, None)


def weights_per_fit(model, config: PruningConfig, blocks_path: str | None = None) -> int:
    """P: the weights one BR block (or CR window) sets in training, averaged over the blocks."""
    path, blocks = find_blocks(model, blocks_path)
    nm = config.nm
    kept = nm[0] / nm[1] if nm is not None else 1.0 - config.sparsity
    total = 0.0
    for layers in layers_to_prune(blocks, path, config.targets, config.ignore):
        for layer in layers:
            out_features, in_features = layer.weight.shape
            total += (config.lora_rank * (in_features + out_features) if config.lora_rank
                      else kept * out_features * in_features)
    window = min(get_reconstruction(config.reconstruction).window_size(config), len(blocks))
    return round(total / max(len(blocks), 1) * window)


def hidden_size(model) -> int:
    """d: the width of the hidden states the blocks are trained to match."""
    size = getattr(model.config, "hidden_size", None)
    return int(size) if size else int(model.get_input_embeddings().embedding_dim)


def auto_self_samples(model, config: PruningConfig, num_windows: int, seq_len: int,
                      blocks_path: str | None = None) -> tuple[int, dict[str, Any]]:
    """How many windows of ``seq_len`` tokens `self_generate="auto"` adds to ``num_windows`` external ones (0 when
    nothing is trained or there are already enough targets), and the numbers behind it for the report."""
    if not trains(config):
        return 0, {}
    weights, width = weights_per_fit(model, config, blocks_path), hidden_size(model)
    if weights == 0:
        return 0, {}
    needed = max(0, math.ceil(weights / (width * seq_len)) - num_windows)
    before = num_windows * seq_len * width / weights
    return needed, {"chosen": "auto", "targets_per_weight": round(before, 4),
                    "targets_per_weight_after": round((num_windows + needed) * seq_len * width / weights, 4),
                    "weights_per_fit": weights}


def plan_self_fill(config: CalibrationConfig, model, pruning: PruningConfig, blocks_path: str | None = None,
                   device: torch.device | str | None = None) -> tuple[int, dict[str, Any], torch.device | None]:
    """What `self_generate="auto"` does for windows read from ``config.source``: (windows to generate, the numbers
    behind it for the report, the device to move the model to for the generation or None), with a warning whenever
    it generates or would but cannot. Windows asked for (``"c4+self:N"``) are generated where the blocks will run
    too when the model fits there, else where it is."""
    if config.self_samples:
        return 0, {}, _generation_device(model, device)[0]
    if config.self_generate != "auto" or config.external_source is None:
        return NO_FILL
    count, info = auto_self_samples(model, pruning, config.num_samples, config.seq_len, blocks_path)
    if not count:
        return NO_FILL
    fit = "window of blocks" if pruning.reconstruction == "cross_block" else "block"
    ratio = (f"{config.num_samples} windows x {config.seq_len} tokens x the hidden size give "
             f"{info['targets_per_weight']:.2g} target values per weight that training sets "
             f"({info['weights_per_fit']:,} per {fit})")
    where, why_not = _generation_device(model, device)
    if why_not:
        warnings.warn(f"{ratio}: training may fit the calibration windows by heart. Not generating more with the "
                      f"dense model (self_generate='auto'): {why_not}. Give more calibration text, or "
                      "source='<name>+self:N' to generate anyway.", stacklevel=4)
        return NO_FILL
    warnings.warn(f"{ratio}: training could fit the calibration windows by heart, so the dense model writes {count} "
                  f"more windows of {config.seq_len} tokens for "
                  f"{'reconstruction' if config.self_use == 'reconstruction' else 'the masks and reconstruction'} "
                  "(self_generate='auto': one target per "
                  "weight; 'off' to skip, or source='<name>+self:N' for a number of your own).", stacklevel=4)
    return count, info, where


def _generation_device(model, device: torch.device | str | None) -> tuple[torch.device | None, str]:
    """(where to move the model for generating, or None to generate where it is; why not to generate, or "")."""
    if is_offloaded(model):
        return None, "its weights are offloaded, and generation would read every one of them for each token"
    target, home = check_device(device) or default_device(), input_device(model)
    if target.type == home.type:
        return None, ""
    if home.type != "cpu" or target.type != "cuda":
        return None, f"the model is on {home} and its blocks run on {target}"
    free, _ = torch.cuda.mem_get_info(target)
    size = _nbytes([*model.parameters(), *model.buffers()])
    if size > 0.8 * free:  # (the KV cache and activations of a batch need the rest)
        return None, (f"the model ({size / 2**30:.1f} GiB) is on the CPU, where generating costs a pass over every "
                      f"weight per token, and does not fit in {target}'s free memory ({free / 2**30:.1f} GiB)")
    return target, ""

