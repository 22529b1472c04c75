"""BR and CR: train the remaining weights of a pruned window of blocks toward its target outputs.

Every parameter of the window is trained (linear weights, norm weights, biases) with AdamW and a linear
decay of the learning rate to zero, minimizing the error of the window's output (``loss``: the mean squared
error as in the paper, or each token's error relative to its size, see `base.py`). The paper's settings: betas
(0.9, 0.95), no weight decay, batch 8 (here 4 by default: see `PruningConfig.batch_size`), 10 epochs, no clipping;
its lr 2e-4 is what ``lr="auto"`` gives
LLaMA-7B-sized weights. With held-out windows every epoch is judged on them (`guard.py`):
the best epoch's weights are kept, training stops early, and ``lr="auto"`` halves a rate that overshoots. Masks
stay fixed: gradients of pruned weights are zeroed and the weights are multiplied by their mask after
every step, so they are exactly zero throughout and N:M groups stay valid. The optimizer state exists
only while the window is trained.

In a distributed run every rank draws the same global batches (the same seeded permutation of all the
calibration windows), runs the windows of each batch that it holds, and contributes the sum of their squared
errors divided by the size of the *global* batch; the gradients are summed over ranks before each step. That
is the gradient of the single-process loss, so every rank takes the same step and the result matches a
single-process run up to floating-point reduction order.
"""

from __future__ import annotations

import contextlib
import functools
import math
import time
from typing import TYPE_CHECKING, Any, Iterator

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint
from tqdm.auto import tqdm

from ..distributed import all_reduce_gradients_, all_reduce_numbers, is_distributed
from ..modeling.loading import FLOAT_DTYPES, name_of_dtype
from .base import Reconstruction, WindowTask, error_sum, error_terms
from .guard import MAX_HALVINGS, HeldoutGuard, auto_learning_rate
from .lora import masked_low_rank, recomputed_merges

if TYPE_CHECKING:  # pragma: no cover
    from ..configuration import PruningConfig


def native_bf16(device: torch.device) -> bool:
    """Whether ``device`` multiplies bfloat16 matrices in hardware: a CUDA GPU with bfloat16 (Ampere and later), or
    a CPU with AMX (Intel Sapphire Rapids and later). Elsewhere bfloat16 is emulated and slower than float32."""
    if device.type == "cuda":
        try:
            return torch.cuda.is_bf16_supported(including_emulation=False)
        except TypeError:  # pragma: no cover - torch without the argument
            return torch.cuda.is_bf16_supported()
    if device.type == "cpu":
        capabilities = getattr(torch.cpu, "get_capabilities", None)  # (torch >= 2.6)
        return bool(capabilities is not None and capabilities().get("amx_bf16"))
    return False


def resolve_train_dtype(name: str, device: torch.device, weights: torch.dtype = torch.float32) -> torch.dtype:
    """The autocast dtype of ``train_dtype`` for ``weights`` on ``device`` (float32: no autocast). ``"auto"``: bfloat16
    for float32 weights where it is native (`native_bf16`), else none (weights already in 16 bits train as they
    are). bfloat16 autocast keeps the float32 master weights, optimizer state and loss; on the bundled model it gave
    the same perplexity as float32 in about half the time (docs/benchmarks.md)."""
    if name == "auto":
        return torch.bfloat16 if weights == torch.float32 and native_bf16(device) else torch.float32
    return FLOAT_DTYPES[name]


@contextlib.contextmanager
def checkpointed_children(blocks: list[nn.Module]) -> Iterator[None]:
    """Recompute each block's sub-modules (attention, MLP, ...) in the backward pass instead of storing
    their activations: gradient checkpointing *inside* a block."""
    patched = []
    for block in blocks:
        for child in block.children():
            if not any(p.requires_grad for p in child.parameters()):
                continue
            own = child.__dict__.get("forward")  # an instance-level forward (accelerate hooks set one)
            original = child.forward

            def forward(*args, _original=original, **kwargs):
                return checkpoint(_original, *args, use_reentrant=False, **kwargs)

            child.forward = forward
            patched.append((child, own))
    try:
        yield
    finally:
        for child, own in patched:
            if own is None:
                del child.forward
            else:
                child.forward = own


def _mask_gradient(grad: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return grad * mask


@contextlib.contextmanager
def _trainable(task: WindowTask, config: "PruningConfig") -> Iterator[list[nn.Parameter]]:
    """Make the window trainable: every parameter with masked gradients, or (LoRA) low-rank updates of the
    masked weights plus every other parameter (norms, biases)."""
    params = [p for block in task.blocks for p in block.parameters()]
    flags = [p.requires_grad for p in params]
    lora = config.lora_rank > 0
    masked = {id(p) for p in task.masks}
    handles = []
    with contextlib.ExitStack() as stack:
        try:
            for p in params:
                p.requires_grad_(not (lora and id(p) in masked))
            trainable = [p for p in params if p.requires_grad]
            if lora:
                alpha = config.lora_alpha if config.lora_alpha is not None else float(config.lora_rank)
                trainable += stack.enter_context(masked_low_rank(task.masks, task.modules, config.lora_rank, alpha,
                                                                 seed=task.seed))
            else:
                # the boolean masks themselves: a copy in the weights' dtype would add 4 bytes per weight (the
                # size of the block again in fp32), and float * bool gives the float's dtype anyway
                for param, mask in task.masks.items():
                    handles.append(param.register_hook(functools.partial(_mask_gradient, mask=mask)))
            yield trainable
        finally:
            for handle in handles:
                handle.remove()
            for p, flag in zip(params, flags):
                p.requires_grad_(flag)
                p.grad = None


class NonFiniteTrainingError(ArithmeticError):
    """Reconstruction training produced a NaN or infinite loss or weight; nothing of the run should be saved."""


def _check_finite(task: WindowTask, config: "PruningConfig", epoch: int, loss: float,
                  params: list[nn.Parameter] | None = None, lr: float = 0.0) -> None:
    bad = None if math.isfinite(loss) else f"the training loss became {loss}"
    if bad is None and params is not None:
        broken = [p for p in params if not bool(torch.isfinite(p).all())]
        bad = f"{len(broken)} trained tensors hold NaN or inf" if broken else None
    if bad is None:
        return
    hint = (f"the learning rate lr={lr:g} is too large for this model; give lr a smaller number"
            if lr > 1e-3 else "check the calibration data and the model's dtype (float16 overflows easily: "
            "use float32 or bfloat16)")
    raise NonFiniteTrainingError(
        f"reconstruction of {task.label} diverged in epoch {epoch + 1}: {bad}. Stopped; nothing was saved. Most likely "
        f"{hint}{', or train_dtype=float16 overflows' if config.train_dtype == 'float16' else ''}."
    )


def _batches(num_samples: int, batch_size: int, generator: torch.Generator) -> list[torch.Tensor]:
    """Shuffled sample indices in batches of ``batch_size``; the incomplete last batch is dropped."""
    order = torch.randperm(num_samples, generator=generator)
    if num_samples < batch_size:
        return [order]
    return list(order[: num_samples // batch_size * batch_size].split(batch_size))


def _adamw(params: list[nn.Parameter], lr: float, config: "PruningConfig") -> torch.optim.AdamW:
    return torch.optim.AdamW(params, lr=lr, betas=tuple(config.adam_betas), eps=1e-8, weight_decay=config.weight_decay)


@torch.enable_grad()
def train_window(task: WindowTask, config: "PruningConfig") -> dict[str, Any]:
    """Minimize the ``config.loss`` error of window(inputs) against targets over the window's parameters; masks stay
    fixed.

    Returns what the report records: the training loss per epoch, the steps taken, the learning rate (``lr``: the
    peak used first; ``lr_final``: after any halving), and with the guard the held-out error per epoch (epoch 0:
    before training), the epoch kept and whether training stopped early or kept the starting weights.
    """
    started = time.perf_counter()
    generator = torch.Generator().manual_seed(task.seed)
    num_samples = task.num_samples
    steps_per_epoch = len(_batches(num_samples, config.batch_size, torch.Generator()))
    total_steps = config.epochs * steps_per_epoch
    weights_dtype = next(task.blocks[0].parameters()).dtype
    dtype = resolve_train_dtype(config.train_dtype, task.device, weights_dtype)
    amp = dtype not in (torch.float32, weights_dtype)  # (autocast to the weights' own dtype would change nothing)
    scaler = torch.amp.GradScaler(task.device.type, enabled=amp and dtype == torch.float16)
    auto = config.lr == "auto"
    peak = first_peak = auto_learning_rate(task.masks) if auto else float(config.lr)
    guarded = task.heldout_error is not None and config.guard is not False
    losses: list[float] = []
    halved_after: list[int] = []  # epochs after which lr="auto" halved the rate
    step = restarted = 0
    with _trainable(task, config) as params, (
        checkpointed_children(task.blocks) if config.gradient_checkpointing else contextlib.nullcontext()
    ):
        optimizer = _adamw(params, peak, config)
        guard = HeldoutGuard(params, task.heldout_error, config.patience) if guarded else None
        state_bytes = 0
        bar = tqdm(total=config.epochs, desc="  epochs", unit="epoch", leave=False, disable=not task.progress)
        for _ in range(config.epochs):
            epoch_loss = 0.0
            batches = _batches(num_samples, config.batch_size, generator)
            for index in batches:
                rows = index if task.sample_rows is None else task.sample_rows[index]
                rows = rows[rows >= 0]  # the batch's windows held by this rank (all in a single process)
                optimizer.zero_grad(set_to_none=True)
                rate = peak * max(0.0, 1 - step / max(total_steps, 1))  # linear decay to 0 over the planned steps
                if auto:  # warmed up over the first epoch after every (re)start: see guard.py
                    rate *= min(1.0, (step - restarted + 1) / steps_per_epoch)
                for group in optimizer.param_groups:
                    group["lr"] = rate
                if len(rows):
                    x = task.inputs[rows].to(task.device, non_blocking=True)
                    y = task.targets[rows].to(task.device, non_blocking=True)
                    with torch.autocast(task.device.type, dtype=dtype, enabled=amp), (
                        recomputed_merges() if config.lora_rank > 0 else contextlib.nullcontext()
                    ):
                        out = task.forward(x)
                    # the mean over the global batch: this rank's share of it
                    loss = error_sum(out, y, config.loss) / (len(index) * error_terms(y, config.loss))
                    scaler.scale(loss).backward()
                    epoch_loss += float(loss.detach())
                    if not is_distributed():  # (ranks check together at the epoch's end: none may stop alone)
                        _check_finite(task, config, len(losses), epoch_loss, lr=peak)
                all_reduce_gradients_(params)
                scaler.step(optimizer)
                scaler.update()
                step += 1
                if config.lora_rank == 0:
                    with torch.no_grad():
                        for param, mask in task.masks.items():
                            param.mul_(mask)
            epoch_loss = all_reduce_numbers([epoch_loss])[0]
            _check_finite(task, config, len(losses), epoch_loss, params, lr=peak)
            losses.append(epoch_loss / max(len(batches), 1))
            state_bytes = max(state_bytes, _state_bytes(optimizer))
            improved = guard is None or guard.check()
            shown = {} if guard is None else {"heldout": f"{guard.curve[-1]:.3g}"}
            bar.set_postfix(loss=f"{losses[-1]:.3g}", **shown)
            bar.update(1)
            if improved:
                continue
            if auto and guard.turned_up and len(halved_after) < MAX_HALVINGS:
                # the rate overshot: back to the best weights; half the rate, fresh moments, a fresh patience
                guard.restart()
                peak /= 2
                halved_after.append(len(losses))
                restarted = step
                del optimizer
                optimizer = _adamw(params, peak, config)
            elif guard.exhausted:
                break
        bar.close()
        if guard is not None:
            guard.restore()
        del optimizer  # the optimizer state lives only while this window is trained
    info: dict[str, Any] = {"loss_per_epoch": losses, "steps": step, "optimizer_state_bytes": state_bytes,
                            "lr": first_peak, "lr_auto": auto, "seconds": time.perf_counter() - started,
                            # without autocast, training runs in the weights' own dtype (a 16-bit model stays so)
                            "train_dtype": name_of_dtype(dtype if amp else weights_dtype),
                            "autocast": amp, "weights_dtype": name_of_dtype(weights_dtype)}
    if auto:
        info.update(lr_final=peak, lr_halved_after=halved_after)
    if guard is not None:
        info.update(heldout_per_epoch=guard.curve, epoch_kept=guard.best_epoch, epochs_run=len(losses),
                    stopped_early=len(losses) < config.epochs, reverted=guard.reverted, guard_seconds=guard.seconds)
    return info


def _state_bytes(optimizer: torch.optim.Optimizer) -> int:
    return sum(t.numel() * t.element_size() for st in optimizer.state.values() for t in st.values()
               if torch.is_tensor(t) and t.dim() > 0)


class BlockReconstruction(Reconstruction):
    """BR: train each pruned block alone toward its target."""

    name = "block"

    def reconstruct(self, task: WindowTask, config: "PruningConfig") -> dict[str, Any]:
        return train_window(task, config)


class CrossBlockReconstruction(BlockReconstruction):
    """CR: train windows of ``config.window`` consecutive blocks jointly (windows overlap by all but one)."""

    name = "cross_block"

    def window_size(self, config: "PruningConfig") -> int:
        return config.window
