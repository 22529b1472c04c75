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
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

from ..modeling.blocks import find_blocks, find_linear_layers

if TYPE_CHECKING:  # pragma: no cover
    from ..configuration import PruningConfig


def weights_per_fit(model, config: PruningConfig, blocks_path: str | None = None) -> int:
    """P: the weights one BR block (or CR window) sets in training, averaged over the blocks."""
    path, blocks = find_blocks(model, blocks_path)
    nm = config.nm
    kept = nm[0] / nm[1] if nm is not None else 1.0 - config.sparsity
    total = 0.0
    for index, block in enumerate(blocks):
        for layer in find_linear_layers(block, config.targets, config.ignore, f"{path}.{index}"):
            out_features, in_features = layer.weight.shape
            total += (config.lora_rank * (in_features + out_features) if config.lora_rank
                      else kept * out_features * in_features)
    window = min(config.window, len(blocks)) if config.reconstruction == "cross_block" else 1
    return round(total / max(len(blocks), 1) * window)


def hidden_size(model) -> int:
    """d: the width of the hidden states the blocks are trained to match."""
    size = getattr(model.config, "hidden_size", None)
    return int(size) if size else int(model.get_input_embeddings().embedding_dim)


def auto_self_samples(model, config: PruningConfig, num_windows: int, seq_len: int,
                      blocks_path: str | None = None) -> tuple[int, dict[str, Any]]:
    """How many windows of ``seq_len`` tokens `self_generate="auto"` adds to ``num_windows`` external ones (0 when
    nothing is trained or there are already enough targets), and the numbers behind it for the report."""
    if config.reconstruction == "layer" or config.epochs == 0:
        return 0, {}
    weights, width = weights_per_fit(model, config, blocks_path), hidden_size(model)
    if weights == 0:
        return 0, {}
    needed = max(0, math.ceil(weights / (width * seq_len)) - num_windows)
    before = num_windows * seq_len * width / weights
    return needed, {"chosen": "auto", "targets_per_weight": round(before, 4),
                    "targets_per_weight_after": round((num_windows + needed) * seq_len * width / weights, 4),
                    "weights_per_fit": weights}
