"""ALPS (Meng et al., NeurIPS 2024): the layer's pruning problem solved by ADMM, then refined on the chosen support.

Why a fourth method: SparseGPT and Wanda choose the mask greedily (column by column, or by a score), which is close
to optimal at 50% and far from it at 60-70%, where ALPS reports LLaMA-7B perplexities well below SparseGPT's. ALPS
treats the mask and the weights as one problem,

    min_W  || X W^T - X W_0^T ||^2   subject to   W having at most k nonzeros,

written in variables scaled by the inputs' norms, where it is better conditioned: with H = X^T X + damp I (in, in),
d = sqrt(diag H) and Hn = H / (d d^T) (unit diagonal), B = d * W^T (in, out) and B_0 likewise, the problem is
min_B 1/2 tr((B - B_0)^T Hn (B - B_0)) with ||B||_0 <= k. ADMM splits it into B (the least-squares part) and D (the
sparse copy), with dual V and penalty rho:

    B <- (Hn + rho I)^-1 (Hn B_0 - V + rho D)       (one (in, in) x (in, out) product: the inverse is kept)
    D <- the k largest |B + V / rho| (unstructured: over the whole matrix; N:M: the N largest of every M inputs)
    V <- V + rho (B - D)

rho grows while the support still changes (x1.3 while more than 10% of the k positions change between checks, x1.2
above 0.5%, x1.1 for any change; checks every 3 iterations), which forces B and D together; the iteration stops when
the support no longer changes (or, after 30 iterations, changes by less than 0.03%), or after ``max_iter``. If the
support barely moves before rho was ever raised, rho started too large (ADMM would stop at the magnitude mask): rho
is divided by 5 and the iteration restarts. The inverse (Hn + rho I)^-1 comes from one eigendecomposition of Hn, so a
new rho costs one (in, in) product, not a new factorization. Finally the kept weights are refit on the chosen
support by conjugate gradients on the normal equations (projected onto the support at every step), from the ADMM
solution; ``cg_iters`` steps.

Memory: Hn, its eigenvectors and the current inverse (three (in, in) float32 matrices; the eigendecomposition runs in
float64, two more transiently), plus B, D, V, B_0 and Hn B_0 ((in, out) each). Time: per ADMM iteration one
(in, in) x (in, out) product and one top-k over the weights, plus the eigendecomposition: about 10x SparseGPT's
time per layer on a CPU (measured on one thread: 3.7 s against 0.27 s for a 576 x 1536 layer, 30 iterations),
a small part of a BR run's time.
The schedule constants are the paper's; everything here is written from its description.
"""

from __future__ import annotations

from typing import Any

import torch

from .base import MaskMethod, PruneResult
from .statistics import HessianStatistics

RHO_START = 0.1
RHO_MAX = 1e6
CHECK_EVERY = 3
MIN_ITERS_FOR_SMALL_CHANGE = 30


def _project(values: torch.Tensor, keep: int, nm: tuple[int, int] | None) -> torch.Tensor:
    """Bool (in, out): where the ``keep`` largest |values| are (unstructured), or the N largest of every M
    consecutive inputs of each output (N:M)."""
    if nm is not None:
        n, m = nm
        groups = values.t().abs().reshape(values.shape[1], -1, m)  # (out, in / m, m)
        top = groups.topk(n, dim=-1).indices
        mask = torch.zeros_like(groups, dtype=torch.bool).scatter_(-1, top, True)
        return mask.reshape(values.shape[1], values.shape[0]).t()
    flat = values.abs().reshape(-1)
    mask = torch.zeros_like(flat, dtype=torch.bool)
    mask[flat.topk(keep, sorted=False).indices] = True
    return mask.reshape(values.shape)


def _refit(hn: torch.Tensor, target: torch.Tensor, start: torch.Tensor, support: torch.Tensor,
           iters: int) -> torch.Tensor:
    """Conjugate gradients for Hn B = target (one system per column of B), B restricted to ``support``."""
    b = start * support
    r = (target - hn @ b) * support  # (in, out) residual on the support
    p = r.clone()
    rr = (r * r).sum(0)  # (out,)
    for _ in range(iters):
        hp = hn @ p
        denominator = (p * hp).sum(0)
        alpha = rr / torch.where(denominator > 0, denominator, torch.ones_like(denominator))
        b = b + alpha * p
        r = (r - alpha * hp) * support
        rr_new = (r * r).sum(0)
        p = r + (rr_new / torch.where(rr > 0, rr, torch.ones_like(rr))) * p
        rr = rr_new
        if float(rr.max()) == 0.0:
            break
    return b * support


def alps_prune(
    weight: torch.Tensor,
    hessian: torch.Tensor,
    sparsity: float,
    nm: tuple[int, int] | None = None,
    *,
    num_prune: int | None = None,
    dampening: float = 0.01,
    rho: float = RHO_START,
    max_iter: int = 300,
    cg_iters: int = 10,
) -> PruneResult:
    """Prune ``weight`` (out, in) with ALPS given the layer Hessian ``hessian`` (in, in) (any positive multiple of
    X^T X: the scale cancels). Unstructured: exactly ``num_prune`` (default ``int(numel * sparsity)``) weights of
    the whole matrix are pruned. Returns the refit weight in the input dtype, its keep-mask and in ``info`` the ADMM
    iterations run and the final rho. ``hessian`` is not modified."""
    out_dtype = weight.dtype
    rows, cols = weight.shape
    if nm is not None and cols % nm[1]:
        raise ValueError(f"an N:M pattern with M={nm[1]} needs an input width divisible by {nm[1]}, got {cols}.")
    # the iterations run in float32 (float64 when given a float64 Hessian, as the reference test does); the
    # eigendecomposition always in float64
    work = torch.float64 if hessian.dtype == torch.float64 else torch.float32
    H = hessian.detach().double().clone()  # (in, in)
    W = weight.detach().double().clone()  # (out, in)
    dead = torch.diag(H) == 0  # inputs never active: their weights cannot matter
    H[dead, dead] = 1.0
    W[:, dead] = 0.0
    H.diagonal().add_(dampening * float(H.diagonal().mean()))
    d = H.diagonal().sqrt()  # (in,)
    hn = H / d.reshape(-1, 1) / d.reshape(1, -1)  # (in, in), unit diagonal
    del H
    eigenvalues, eigenvectors = (t.to(work) for t in torch.linalg.eigh(hn))
    hn, d = hn.to(work), d.to(work)
    b0 = (W * d.reshape(1, -1).double()).t().contiguous().to(work)  # (in, out)
    del W
    target = hn @ b0  # (in, out): Hn B_0
    numel = rows * cols
    keep = numel - (int(numel * sparsity) if num_prune is None else int(num_prune))

    def inverse(r: float) -> torch.Tensor:  # (Hn + r I)^-1
        return (eigenvectors * (1.0 / (eigenvalues + r)).reshape(1, -1)) @ eigenvectors.t()

    initial = _project(b0, keep, nm)
    support, previous = initial, initial
    D = b0 * initial
    V = torch.zeros_like(b0)
    inv = inverse(rho)
    raised, iterations = False, 0
    B = b0
    for iteration in range(max_iter):
        iterations = iteration + 1
        B = inv @ (target - V + rho * D)
        support = _project(B + V / rho, keep, nm)
        D = (B + V / rho) * support
        V = V + rho * (B - D)
        if iterations % CHECK_EVERY:
            continue
        changed = int((support != previous).sum())  # positions that left or entered the support
        previous = support
        share = changed / max(keep, 1)
        if share > 0.1:
            rho, raised = rho * 1.3, True
        elif share > 0.005:
            rho, raised = rho * 1.2, True
        elif changed > 0:
            if raised:
                rho *= 1.1
            else:  # rho too large from the start: the support never moved off the magnitude mask
                rho /= 5
                D, V, previous = b0 * initial, torch.zeros_like(b0), initial
        elif raised:
            break
        else:
            rho /= 5
        if iterations >= MIN_ITERS_FOR_SMALL_CHANGE and share < 3e-4 and raised:
            break
        rho = min(rho, RHO_MAX)
        inv = inverse(rho)
    support = _project(B, keep, nm)
    B = _refit(hn, target, B, support, cg_iters)
    pruned = (B / d.reshape(-1, 1)).t()  # (out, in)
    mask = support.t().contiguous()
    return PruneResult(weight=(pruned * mask).to(out_dtype), mask=mask,
                       info={"admm_iterations": iterations, "rho": rho})


class ALPS(MaskMethod):
    name = "alps"

    def new_statistics(self, in_features: int, device: torch.device, *, exact: bool = False) -> HessianStatistics:
        return HessianStatistics(in_features, device, exact=exact)

    def prune(self, weight, stats, *, sparsity, nm, num_prune=None, **options: Any) -> PruneResult:
        return alps_prune(weight, stats.take_hessian(), sparsity, nm, num_prune=num_prune,
                          dampening=options.get("dampening", 0.01))
