"""`optimum-recon prune --dry-run`: what a prune would do, and about what it would cost, from the model's config alone.

The model is built on the `meta` device (`modeling.loading.empty_model`): its modules and shapes exist, its weights
do not, so a 70B model's plan costs what its config.json costs. Nothing is read but the config, and no folder is
written; the output folder is checked as the real run checks it.

The estimate is the cost model of docs/howto/distributed.md for one process, on this machine's measured matmul rate.
Notation: P_b the weights of block b's pruned layers, N and H the calibration and held-out windows of T tokens, E the
epochs, R the device's sustained matmul FLOP/s (timed here on a matrix product of a block's shapes, for about a
quarter of a second). Per block:

    masks and propagation   3 forward passes over the N windows and 2 over the H windows: 2 P_b T (3 N + 2 H)
    training (BR, CR)       each epoch a forward and a backward (3 forward-equivalents) over N, one forward over H
    SparseGPT               sum over layers of d_out d_in^2 + d_in^3 (the lazy OBS updates and the inverse)
    ALPS                    about 10 times SparseGPT (its ADMM iterations; README's measurement)

and OWL adds one forward pass over N for the whole model. Attention's T^2 term, the LM head and the dtype changes
are left out, and the guard usually stops training before E epochs: the time is an order of magnitude to plan with,
not a promise. Memory adds up what the engine holds: the weights (loaded in full unless offloaded), the activations
between blocks (pruned and dense paths, and local targets, for N + H windows of T x d), and one block's working set
(its weights, with BR/CR their gradients, AdamW's two moments and the guard's copy; SparseGPT's Hessians; one training
batch's activations).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

import torch

from .configuration import PruningConfig
from .modeling.offload import human_size
from .report import peak_rss_mib

_DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}


@dataclass
class PlanEstimate:
    """The plan of a prune and its estimated cost (`dry_run`); `describe` words it."""

    model: str
    architecture: str
    parameters: int
    load_dtype: str
    blocks_path: str
    layers: list[list[tuple[str, int, int]]]  # per block: (name inside the block, out, in)
    block_parameters: int  # every parameter of one block (norms and biases too): what training holds
    block_sparsity: list[float] | None  # None: chosen from the data (OWL)
    sparsity_words: str
    windows: int
    heldout: int
    self_generated: int
    seq_len: int
    hidden: int
    intermediate: int
    device: str
    flops_per_s: float
    seconds: dict[str, float] = field(default_factory=dict)
    memory: dict[str, int] = field(default_factory=dict)
    output: str = ""


def matmul_rate(device: torch.device, dtype: torch.dtype, rows: int, inner: int, cols: int) -> float:
    """Sustained FLOP/s of (rows x inner) @ (inner x cols) on ``device``, timed for about a quarter of a second.
    Each side is capped at 2,048: a 70B block's shapes would cost a gigabyte and seconds per product on a CPU, for
    the same rate."""
    rows, inner, cols = (min(n, 2048) for n in (rows, inner, cols))
    a = torch.randn(rows, inner, device=device, dtype=dtype)
    b = torch.randn(inner, cols, device=device, dtype=dtype)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    a @ b  # warm-up
    sync()
    count, start = 0, time.perf_counter()
    while time.perf_counter() - start < 0.25 or count < 2:
        a @ b
        count += 1
    sync()
    return 2 * rows * inner * cols * count / (time.perf_counter() - start)


def _sparsity(config: PruningConfig, names: list[str], sizes: list[int], block_of: list[int], blocks: int):
    from .masks.allocation import table_sparsities

    policy = config.allocation_policy
    if policy == "uniform":
        return [config.sparsity] * blocks, "uniform: every layer the same"
    if policy == "owl":
        low, high = config.sparsity - 2 * config.owl_lambda, config.sparsity + 2 * config.owl_lambda
        chosen = " (allocation='auto')" if config.allocation == "auto" else ""
        return None, (f"OWL{chosen}: each block's sparsity is chosen from the calibration data, within "
                      f"[{max(low, 0):.0%}, {min(high, 1):.0%}]; the model's total stays {config.sparsity:.0%}")
    per_layer = table_sparsities(config.allocation, names, sizes, config.sparsity)
    totals = [0.0] * blocks
    weights = [0] * blocks
    for value, size, b in zip(per_layer, sizes, block_of):
        totals[b] += value * size
        weights[b] += size
    return [t / w if w else 0.0 for t, w in zip(totals, weights)], "from the allocation table"


def plan_prune_cost(model_path: str, model_name: str, config: PruningConfig, *, dtype: Any = None,
                    blocks_path: str | None = None, device: str | None = None,
                    trust_remote_code: bool = False) -> PlanEstimate:
    """The plan and cost of pruning ``model_path`` with ``config`` (module docstring), without its weights."""
    from .data.self_fill import auto_self_samples
    from .engine.sequential import validate_layers
    from .modeling.blocks import find_blocks, layers_to_prune
    from .modeling.loading import checkpoint_dtype, empty_model, name_of_dtype, parse_dtype
    from .modeling.offload import check_device, default_device

    model = empty_model(model_path, trust_remote_code)
    path, blocks = find_blocks(model, blocks_path)
    plan = layers_to_prune(blocks, path, config.targets, config.ignore)
    validate_layers(plan, config, path)
    layers = [[(layer.name, *layer.weight.shape) for layer in block] for block in plan]  # (name, out, in)
    names = [f"{path}.{b}.{name}" for b, block in enumerate(layers) for name, _, _ in block]
    sizes = [o * i for block in layers for _, o, i in block]
    block_of = [b for b, block in enumerate(layers) for _ in block]
    block_sparsity, words = _sparsity(config, names, sizes, block_of, len(blocks))
    cal = config.calibration
    windows = cal.num_samples if cal.external_source is not None else 0
    generated = cal.self_samples or (auto_self_samples(model, config, windows, cal.seq_len, path)[0]
                                     if cal.self_generate == "auto" else 0)
    parsed = parse_dtype(dtype)
    run_on = check_device(device) or default_device()
    load = (name_of_dtype(parsed) if isinstance(parsed, torch.dtype) else
            (checkpoint_dtype(model_path, trust_remote_code) or "float32") if parsed == "auto" or
            run_on.type == "cuda" else "float32")
    hidden = int(getattr(model.config, "hidden_size", 0) or model.get_input_embeddings().embedding_dim)
    widest = max((max(o, i) for block in layers for _, o, i in block), default=hidden)
    rate_dtype = torch.bfloat16 if load == "bfloat16" else torch.float32
    estimate = PlanEstimate(
        model=model_name, architecture=type(model).__name__, parameters=model.num_parameters(),
        load_dtype=load, blocks_path=path, layers=layers,
        block_parameters=max(sum(p.numel() for p in block.parameters()) for block in blocks),
        block_sparsity=block_sparsity, sparsity_words=words, windows=windows, heldout=cal.num_heldout,
        self_generated=generated, seq_len=cal.seq_len, hidden=hidden, intermediate=widest, device=str(run_on),
        flops_per_s=matmul_rate(run_on, rate_dtype, min(cal.seq_len, 2048), hidden, widest))
    _estimate_seconds(estimate, config)
    _estimate_memory(estimate, config)
    return estimate


def _estimate_seconds(plan: PlanEstimate, config: PruningConfig) -> None:
    from .reconstruction import trained_window, trains

    n, h, t = plan.windows + plan.self_generated, plan.heldout, plan.seq_len
    training_runs, window = trains(config), trained_window(config)
    masks = training = solve = 0.0
    for block in plan.layers:
        weights = sum(o * i for _, o, i in block)
        masks += 2 * weights * t * (3 * n + 2 * h)
        if training_runs:  # CR trains every block in `window` windows
            training += window * config.epochs * 2 * weights * t * (3 * n + h)
        if config.method in ("sparsegpt", "alps"):
            solve += sum(o * i * i + i**3 for _, o, i in block) * (10 if config.method == "alps" else 1)
    if config.allocation_policy == "owl":
        masks += 2 * sum(o * i for block in plan.layers for _, o, i in block) * t * n
    rate = plan.flops_per_s
    plan.seconds = {"masks and propagation": (masks + solve) / rate, "training (at most)": training / rate}
    if plan.self_generated:  # every generated token is a forward pass of the whole model (FLOPs only)
        plan.seconds["self-generation (at least)"] = 2 * plan.parameters * plan.self_generated * t / rate


def _estimate_memory(plan: PlanEstimate, config: PruningConfig) -> None:
    from .reconstruction import trained_window, trains

    bytes_per = _DTYPE_BYTES.get(plan.load_dtype, 4)
    paths = 3 if config.propagation == "local" else 2
    tokens = (plan.windows + plan.self_generated + plan.heldout) * plan.seq_len
    training_runs, window = trains(config), trained_window(config)
    block = plan.block_parameters * 4 * window * ((1 + 1 + 2 + 1) if training_runs else 1)  # master, grad, Adam, guard
    hessians = sum(i * i * 4 for _, _, i in plan.layers[0]) if config.method in ("sparsegpt", "alps") else 0
    batch = (config.batch_size * plan.seq_len * (16 * plan.hidden + 4 * plan.intermediate) * 4 * window
             if training_runs else 0)
    plan.memory = {"Python, torch and transformers": int(peak_rss_mib() * 2**20),
                   "weights": plan.parameters * bytes_per,
                   "activations between blocks": paths * tokens * plan.hidden * bytes_per,
                   "one block at work": block + hessians + batch}


def describe(plan: PlanEstimate, config: PruningConfig) -> str:
    """The plan as `prune --dry-run` prints it."""
    pruned = sum(o * i for block in plan.layers for _, o, i in block)
    names = list(dict.fromkeys(name for block in plan.layers for name, _, _ in block))
    cal = config.calibration
    recipe = {"layer": "LR (the mask method alone)", "block": "BR (each block trained)",
              "cross_block": f"CR (windows of {config.window} blocks trained)"}[config.reconstruction]
    lines = [
        f"dry run: the plan for {plan.model} ({plan.architecture}, {_count(plan.parameters)} parameters, "
        f"{plan.load_dtype}); no weights loaded, no data read",
        f"  blocks       {len(plan.layers)} at {plan.blocks_path}, {len(names)} linear layers each "
        f"({', '.join(names)}): {pruned:,} weights to prune",
        f"  sparsity     {config.sparsity:.1%} {config.pattern}, {config.method} masks; {plan.sparsity_words}",
    ]
    if plan.block_sparsity is not None and len(set(round(s, 4) for s in plan.block_sparsity)) > 1:
        lines.append("               per block: " + ", ".join(f"{b}: {s:.1%}" for b, s in
                                                                   enumerate(plan.block_sparsity)))
    epochs = f", up to {config.epochs} epochs per block, lr {config.lr}" if config.reconstruction != "layer" else ""
    lines.append(f"  recipe       {recipe} + {config.propagation} propagation{epochs}")
    source = f"from {cal.external_source}" if cal.external_source else "generated by the dense model"
    lines.append(f"  calibration  {plan.windows} windows x {plan.seq_len} tokens = {plan.windows * plan.seq_len:,} "
                 f"tokens {source}; {plan.heldout} held-out windows"
                 + (f"; {plan.self_generated} more written by the dense model" if plan.self_generated else ""))
    total = sum(plan.seconds.values())
    lines.append(f"  time         about {_duration(total)} on {plan.device} (matmuls measured at "
                 f"{plan.flops_per_s / 1e9:,.0f} GFLOP/s): "
                 + ", ".join(f"{k} {_duration(v)}" for k, v in plan.seconds.items() if v))
    lines.append(f"  memory       about {human_size(sum(plan.memory.values()))} at the peak: "
                 + ", ".join(f"{k} {human_size(v)}" for k, v in plan.memory.items() if v))
    lines.append(f"  output       {plan.output}")
    return "\n".join(lines)


def _count(number: int) -> str:
    for unit, scale in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if number >= scale:
            return f"{number / scale:,.1f}{unit}"
    return str(number)


def _duration(seconds: float) -> str:
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 5400:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"
