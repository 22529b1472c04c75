"""ALPS: against a slow, literal reference of the paper's algorithm, and against SparseGPT where it should win."""

from __future__ import annotations

import pytest
import torch
from conftest import QUIET, VOCAB, make_tiny_model

from optimum_recon import PruningConfig, prune_model
from optimum_recon.masks import alps_prune, get_mask_method, sparsegpt_prune


def _problem(seed: int, rows: int = 12, cols: int = 24, samples: int = 200, dtype=torch.float64):
    generator = torch.Generator().manual_seed(seed)
    mix = torch.randn(cols, cols, generator=generator, dtype=dtype) / cols**0.5 + torch.eye(cols, dtype=dtype)
    x = torch.randn(samples, cols, generator=generator, dtype=dtype) @ mix
    x[:, :2] *= 10  # a few outlier features, as in LLMs
    w = torch.randn(rows, cols, generator=generator, dtype=dtype)
    return w, x


def _reference(w, h, keep, nm=None, rho=0.1, max_iter=300, damp=0.01):
    """The paper's iteration written plainly: a linear solve per step, the top-k by sorting, and the final refit as
    an exact least-squares solve on each output's support."""
    h = h.clone()
    h += damp * h.diagonal().mean() * torch.eye(h.shape[0], dtype=h.dtype)
    d = h.diagonal().sqrt()
    hn = h / torch.outer(d, d)
    b0 = (w * d).t()
    target = hn @ b0

    def top(values):
        if nm is not None:
            n, m = nm
            mask = torch.zeros_like(values, dtype=torch.bool)
            for j in range(values.shape[1]):
                for g in range(0, values.shape[0], m):
                    order = sorted(range(m), key=lambda i: -abs(float(values[g + i, j])))
                    for i in order[:n]:
                        mask[g + i, j] = True
            return mask
        order = torch.argsort(values.abs().reshape(-1), descending=True)
        mask = torch.zeros(values.numel(), dtype=torch.bool)
        mask[order[:keep]] = True
        return mask.reshape(values.shape)

    initial = top(b0)
    D, V, previous, raised = b0 * initial, torch.zeros_like(b0), initial, False
    eye = torch.eye(hn.shape[0], dtype=hn.dtype)
    B = b0
    for it in range(1, max_iter + 1):
        B = torch.linalg.solve(hn + rho * eye, target - V + rho * D)
        support = top(B + V / rho)
        D = (B + V / rho) * support
        V = V + rho * (B - D)
        if it % 3:
            continue
        changed = int((support != previous).sum())
        previous = support
        share = changed / keep
        if share > 0.1:
            rho, raised = rho * 1.3, True
        elif share > 0.005:
            rho, raised = rho * 1.2, True
        elif changed > 0:
            if raised:
                rho *= 1.1
            else:
                rho /= 5
                D, V, previous = b0 * initial, torch.zeros_like(b0), initial
        elif raised:
            break
        else:
            rho /= 5
        if it >= 30 and share < 3e-4 and raised:
            break
        rho = min(rho, 1e6)
    support = top(B)
    refit = torch.zeros_like(B)
    for j in range(B.shape[1]):  # exact least squares on the support of output j
        s = support[:, j]
        refit[s, j] = torch.linalg.solve(hn[s][:, s], target[s, j])
    return (refit / d.reshape(-1, 1)).t(), support.t()


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("sparsity,nm", [(0.5, None), (0.7, None), (0.5, (2, 4))])
def test_alps_matches_the_slow_reference(seed, sparsity, nm):
    w, x = _problem(seed)
    h = 2 * x.t() @ x / x.shape[0]
    keep = w.numel() - int(w.numel() * sparsity)
    expected_w, expected_mask = _reference(w, h, keep, nm)
    got = alps_prune(w, h, sparsity, nm, cg_iters=200)  # enough CG steps to converge on 24 inputs
    assert torch.equal(got.mask, expected_mask)
    torch.testing.assert_close(got.weight, expected_w, rtol=1e-7, atol=1e-9)


@pytest.mark.parametrize("sparsity", [0.6, 0.7])
def test_alps_reconstructs_the_layer_better_than_sparsegpt_at_high_sparsity(sparsity):
    wins = 0
    for seed in range(4):
        w, x = _problem(seed, rows=32, cols=64, samples=512, dtype=torch.float32)
        h = 2 * x.t() @ x / x.shape[0]

        def error(pruned):
            return float(((x @ (pruned - w).t()) ** 2).sum())

        wins += error(alps_prune(w, h, sparsity).weight) < error(sparsegpt_prune(w, h, sparsity).weight)
    assert wins == 4


def test_alps_prunes_exactly_keeps_n_m_valid_and_leaves_the_hessian_alone():
    w, x = _problem(5, rows=16, cols=32, dtype=torch.float32)
    h = 2 * x.t() @ x / x.shape[0]
    h[3, :] = 0.0
    h[:, 3] = 0.0  # a dead input
    before = h.clone()
    result = alps_prune(w, h, 0.5, num_prune=255)
    assert int((~result.mask).sum()) == 255 and torch.equal(h, before)
    assert not result.mask[:, 3].any() or bool((result.weight[:, 3] == 0).all())
    assert torch.equal(result.weight == 0, ~result.mask | (result.weight == 0))
    nm = alps_prune(w, h, 0.5, (2, 4))
    assert (nm.mask.reshape(16, -1, 4).sum(-1) == 2).all()
    assert nm.weight.dtype == w.dtype and torch.isfinite(nm.weight).all()


def test_alps_through_the_engine_at_70_percent_with_owl():
    model = make_tiny_model("llama", num_hidden_layers=3)
    ids = torch.randint(0, VOCAB, (8, 16), generator=torch.Generator().manual_seed(0))
    report = prune_model(model, PruningConfig(method="alps", sparsity=0.7, allocation="owl", owl_lambda=0.1,
                                              reconstruction="layer"), ids, QUIET)
    total = sum(r.shape[0] * r.shape[1] for b in report.blocks for r in b.layers)
    assert report.model_sparsity * total == pytest.approx(round(0.7 * total), abs=1e-6)
    assert get_mask_method("alps").name == "alps"
    assert torch.isfinite(model(ids).logits).all()
