"""Training that judges itself: the held-out guard and ``lr="auto"``.

Why: minimizing a block's reconstruction error on a small calibration set can fit that set rather than the model
(the paper's pitfall). On the bundled model it is plain at a fixed learning rate: at 5e-3 the calibration error
falls 21% below 2e-3's while the held-out error rises 74% and perplexity gets worse (docs/benchmarks.md), and the
best fixed rate differs from model to model. So every window's training is judged on H held-out windows, drawn
from documents no calibration window comes from and never trained on.

Notation: E_k is the window's held-out error (its output against its target, measured as the training loss
``config.loss`` measures it) after epoch k, E_0 that of the weights it starts training with (for BR: masked only).
The guard measures E_k after every epoch, keeps a
copy of the weights of the best epoch so far, stops after ``patience`` epochs without a better one, and restores
the best at the end; since E_0 is a candidate, a window never ends with a held-out error above the one it
started with (when no epoch beats E_0 the masked-only weights are kept: "reverted").

Why once per epoch: an epoch is the smallest unit after which every calibration window has been seen equally
often, and the check costs a forward pass over the H held-out windows against the forward and backward pass
(about 3 forward passes) over the N calibration windows of an epoch: with the default H = N / 4, about 1/12 of
an epoch. Memory: one CPU copy of the window's trainable weights (a block's size for BR).

``lr="auto"``: AdamW moves every weight by about lr per step whatever the size of its gradient, so a rate only
means something relative to the size of the weights it moves. The peak rate is therefore 1% of the root mean square
of the window's kept (unpruned) weights: for weights of RMS 0.02-0.03 (LLaMA-style models are initialized at a
standard deviation of 0.02) that is the paper's 2e-4-3e-4; for the bundled SmolLM2-135M (kept weights' RMS 0.27) it
is 2.7e-3 (the best fixed rate of a hand sweep there: 2e-3). The rate is warmed up linearly over the first epoch
(AdamW's first steps move every weight by the full rate at once, which showed as a held-out error that rose in the
first epoch and fell after it) and decays linearly to zero over the planned steps.
The rule only picks a starting point: when an epoch leaves the held-out error above the best so far, the
best weights are restored, the rate is halved and AdamW's moments are reset (they were gathered on the
discarded path), so a rate too large for a window costs one epoch and is corrected there. Without held-out
windows the rule alone is used. A number given as ``lr`` is used exactly as given: no rule, no halving.
"""

from __future__ import annotations

import math
import time
from typing import Callable

import torch
from torch import nn

# the peak learning rate of lr="auto", as a fraction of the RMS of the kept weights
AUTO_LR_PER_RMS = 0.01
# an epoch counts as better when it lowers the best held-out error by more than this fraction; lr="auto" halves the
# rate when an epoch raises it by more than RISE (a plateau's wobble is neither)
MIN_IMPROVEMENT, RISE = 1e-3, 1e-2
# at most this many halvings per window (the rate falls to 1/8 of the rule's): a window that still gets worse then
# is one that training cannot help, and the patience ends it
MAX_HALVINGS = 3


def auto_learning_rate(masks: dict[nn.Parameter, torch.Tensor]) -> float:
    """``AUTO_LR_PER_RMS`` times the root mean square of the kept weights of the masked layers.

    Args:
        masks: Each pruned weight and its keep-mask (the same shape).
    """
    total, count = 0.0, 0
    with torch.no_grad():
        for weight, mask in masks.items():
            kept = weight.detach()[mask.to(weight.device)]  # (kept,) the unpruned weights
            total += float(kept.double().pow(2).sum())
            count += kept.numel()
    if count == 0 or total == 0.0:
        raise ValueError("lr='auto' found no nonzero kept weight in the window to scale the learning rate by; "
                         "give lr a number.")
    return AUTO_LR_PER_RMS * math.sqrt(total / count)


class HeldoutGuard:
    """Tracks E_0, E_1, ... of one window and keeps the weights of the best epoch (see the module docstring).

    Args:
        params: The window's trainable tensors (what is copied and restored).
        evaluate: Returns the window's held-out error with the weights as they are (every rank the same value).
        patience: Epochs without a lower held-out error before `exhausted`.
    """

    def __init__(self, params: list[torch.Tensor], evaluate: Callable[[], float], patience: int):
        self.params, self.evaluate, self.patience = params, evaluate, patience
        self.seconds = 0.0  # spent measuring and copying: the guard's cost
        self.curve: list[float] = [self._measure()]
        self.best, self.best_epoch, self.stale = self.curve[0], 0, 0
        self._kept = self._copy()

    def _measure(self) -> float:
        start = time.perf_counter()
        with torch.no_grad():
            error = float(self.evaluate())
        self.seconds += time.perf_counter() - start
        return error

    def _copy(self) -> list[torch.Tensor]:
        start = time.perf_counter()
        kept = [p.detach().to("cpu", copy=True) for p in self.params]
        self.seconds += time.perf_counter() - start
        return kept

    def check(self) -> bool:
        """Measure the error after the epoch just trained; keep the weights when it is the lowest so far by more than
        ``MIN_IMPROVEMENT`` (smaller changes are noise: they count toward the patience)."""
        error = self._measure()
        self.curve.append(error)
        if error < self.best * (1 - MIN_IMPROVEMENT):  # (a NaN is never lower: it counts as no improvement)
            self.best, self.best_epoch, self.stale = error, len(self.curve) - 1, 0
            self._kept = self._copy()
            return True
        self.stale += 1
        return False

    @property
    def turned_up(self) -> bool:
        """The last epoch raised the held-out error above the best by more than ``RISE``: it overshot."""
        return not self.curve[-1] <= self.best * (1 + RISE)

    @property
    def exhausted(self) -> bool:
        return self.stale >= self.patience

    @property
    def reverted(self) -> bool:
        """No epoch beat the starting weights: they are what is kept."""
        return self.best_epoch == 0

    def restart(self) -> None:
        """Back to the best epoch's weights with a fresh patience (lr="auto" halving the rate)."""
        self.restore()
        self.stale = 0

    def restore(self) -> None:
        """Put the best epoch's weights back (a no-op when the last epoch is the best)."""
        if self.best_epoch == len(self.curve) - 1:
            return
        with torch.no_grad():
            for param, kept in zip(self.params, self._kept):
                param.copy_(kept.to(param.device))
