"""Mask methods against slow, obviously-correct reference implementations written here."""

from __future__ import annotations

import warnings

import pytest
import torch

from optimum_recon.masks import get_mask_method, magnitude_prune, sparsegpt_prune, wanda_prune
from optimum_recon.masks.sparsegpt import inverse_hessian_factor


def _weight(rows=6, cols=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(rows, cols, generator=g, dtype=torch.float64).float()


def _ref_keep_smallest_pruned(values: list[float], num_prune: int) -> list[bool]:
    """Keep-flags pruning the ``num_prune`` smallest values; ties broken by position (earlier pruned later)."""
    order = sorted(range(len(values)), key=lambda i: (values[i], -i))
    pruned = set(order[:num_prune])
    return [i not in pruned for i in range(len(values))]


def _ref_nm(scores: torch.Tensor, n: int, m: int) -> torch.Tensor:
    keep = torch.zeros_like(scores, dtype=torch.bool)
    for r in range(scores.shape[0]):
        for g in range(0, scores.shape[1], m):
            group = scores[r, g : g + m].tolist()
            flags = _ref_keep_smallest_pruned(group, m - n)
            for j, flag in enumerate(flags):
                keep[r, g + j] = flag
    return keep


@pytest.mark.parametrize("sparsity", [0.3, 0.5, 0.7])
def test_magnitude_unstructured_matches_reference(sparsity):
    w = _weight()
    result = magnitude_prune(w, sparsity)
    flat = w.abs().flatten().tolist()
    expected = torch.tensor(_ref_keep_smallest_pruned(flat, int(len(flat) * sparsity))).reshape(w.shape)
    assert torch.equal(result.mask, expected)
    assert torch.equal(result.weight, w * expected)
    assert int((result.weight == 0).sum()) == int(w.numel() * sparsity)


@pytest.mark.parametrize("nm", [(2, 4), (4, 8), (1, 4)])
def test_magnitude_nm_matches_reference(nm):
    w = _weight()
    result = magnitude_prune(w, 1 - nm[0] / nm[1], nm)
    assert torch.equal(result.mask, _ref_nm(w.abs(), *nm))
    groups = (result.weight.reshape(w.shape[0], -1, nm[1]) != 0).sum(-1)
    assert torch.all(groups == nm[0])


@pytest.mark.parametrize("sparsity", [0.25, 0.5])
def test_wanda_unstructured_matches_reference(sparsity):
    w = _weight()
    norms = torch.rand(w.shape[1]) * 5
    result = wanda_prune(w, norms, sparsity)
    expected = torch.zeros_like(result.mask)
    for r in range(w.shape[0]):
        scores = [abs(float(w[r, j])) * float(norms[j]) ** 0.5 for j in range(w.shape[1])]
        expected[r] = torch.tensor(_ref_keep_smallest_pruned(scores, int(w.shape[1] * sparsity)))
    assert torch.equal(result.mask, expected)
    assert torch.all((result.weight == 0).sum(1) == int(w.shape[1] * sparsity))  # exact in every row


def test_wanda_nm_matches_reference():
    w = _weight()
    norms = torch.rand(w.shape[1]) * 5
    result = wanda_prune(w, norms, 0.5, (2, 4))
    assert torch.equal(result.mask, _ref_nm(w.abs() * norms.sqrt(), 2, 4))


def test_wanda_statistics_are_column_norms():
    method = get_mask_method("wanda")
    stats = method.new_statistics(5, torch.device("cpu"))
    x = torch.randn(3, 7, 5)
    stats.update(x[:2])
    stats.update(x[2:])
    torch.testing.assert_close(stats.sq_norms, x.reshape(-1, 5).pow(2).sum(0))


def _hessian(cols=16, tokens=64, seed=1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(tokens, cols, generator=g, dtype=torch.float64)
    x[:, 3] *= 5  # uneven input scales make the OBS update matter
    return x, (2.0 / tokens) * x.t() @ x


def _ref_sparsegpt(w, H, sparsity, nm, block_size, damp):
    """Textbook OBS, one column at a time, with explicit inverses of the remaining Hessian (float64).

    Removing column j with the columns j.. still free: the error e = (w_j - q_j) / [inv(H_F)]_00 is spread as
    W[:, F] -= e * inv(H_F)[0, :]. Masks are chosen per block of columns, at the block start, from the OBS
    saliency w_j^2 / [inv(H_F)]_00 of each column j (F = the columns j.. still free).
    """
    W = w.double().clone()
    H = H.double().clone()
    cols = W.shape[1]
    H = H + damp * torch.diag(H).mean() * torch.eye(cols, dtype=torch.float64)
    pivots = torch.tensor([torch.linalg.inv(H[j:, j:])[0, 0] for j in range(cols)], dtype=torch.float64)
    keep = torch.ones_like(W, dtype=torch.bool)
    for start in range(0, cols, block_size):
        end = min(start + block_size, cols)
        scores = W[:, start:end] ** 2 / pivots[start:end]
        if nm is None:
            flat = scores.flatten().tolist()
            keep[:, start:end] = torch.tensor(_ref_keep_smallest_pruned(flat, int(len(flat) * sparsity))).reshape(
                scores.shape)
        for j in range(start, end):
            if nm is not None and (j - start) % nm[1] == 0:
                group = W[:, j : j + nm[1]] ** 2 / pivots[j : j + nm[1]]
                keep[:, j : j + nm[1]] = _ref_nm(group, *nm)
            inv = torch.linalg.inv(H[j:, j:])
            err = (W[:, j] * ~keep[:, j]) / inv[0, 0]
            W[:, j:] -= err.unsqueeze(1) * inv[0, :].unsqueeze(0)
            W[:, j] = W[:, j] * keep[:, j]  # exact zero (the update above already drives it to zero)
    return W, keep


@pytest.mark.parametrize("block_size", [16, 8, 5])
@pytest.mark.parametrize("nm", [None, (2, 4)])
def test_sparsegpt_matches_textbook_obs(block_size, nm):
    w = _weight(rows=5, cols=16).double()
    _, H = _hessian()
    result = sparsegpt_prune(w, H, 0.5, nm, block_size=block_size, dampening=0.01)
    effective_block = block_size if nm is None else max(4, block_size // 4 * 4)
    ref_w, ref_keep = _ref_sparsegpt(w, H, 0.5, nm, effective_block, 0.01)
    assert torch.equal(result.mask, ref_keep)
    torch.testing.assert_close(result.weight.double(), ref_w, rtol=1e-6, atol=1e-8)


def test_sparsegpt_exact_sparsity_and_better_output_than_masking_alone():
    w = _weight(rows=32, cols=64)
    x, H = _hessian(cols=64, tokens=256)
    result = sparsegpt_prune(w, H.float(), 0.5, block_size=16)
    assert int((result.weight == 0).sum()) == w.numel() // 2  # 16 * 32 * 0.5 per block, exactly
    x = x.float()
    err_obs = (x @ result.weight.t() - x @ w.t()).pow(2).mean()
    err_mask_only = (x @ (w * result.mask).t() - x @ w.t()).pow(2).mean()
    assert err_obs < err_mask_only


def test_sparsegpt_dead_inputs_are_pruned_first():
    w = _weight(rows=4, cols=8)
    x, H = _hessian(cols=8)
    H[2, :] = 0
    H[:, 2] = 0
    result = sparsegpt_prune(w, H, 0.5)
    assert torch.all(result.weight[:, 2] == 0)


def test_non_positive_definite_hessian_raises_dampening():
    H = torch.diag(torch.tensor([1.0, 1.0, 1.0, -0.5]))
    before = H.clone()
    upper, used = inverse_hessian_factor(H, 0.01)
    assert used > 0.01
    assert torch.isfinite(upper).all()
    assert torch.equal(H, before)  # only overwrite=True may change the input
    again, _ = inverse_hessian_factor(H.clone(), 0.01, overwrite=True)
    assert torch.equal(again, upper)
    with pytest.raises(torch.linalg.LinAlgError, match="not positive definite"):
        inverse_hessian_factor(torch.diag(torch.tensor([1.0, -1e9])), 0.01)


def test_engine_warns_when_dampening_was_raised(monkeypatch):
    from conftest import QUIET, make_tiny_model

    from optimum_recon import PruningConfig, prune_model
    from optimum_recon.masks import sparsegpt as sgpt

    real = sgpt.inverse_hessian_factor
    monkeypatch.setattr(sgpt, "inverse_hessian_factor", lambda H, d, **kw: (real(H, d, **kw)[0], d * 10))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        prune_model(make_tiny_model("llama"), PruningConfig(reconstruction="layer"), torch.randint(0, 100, (4, 16)),
                    QUIET)
    assert any("not positive definite" in str(w.message) and "used 0.1" in str(w.message) for w in caught)


def test_unknown_method_lists_valid_ones():
    with pytest.raises(ValueError, match="choose one of alps, magnitude, sparsegpt, wanda"):
        get_mask_method("obs")


def test_hessian_memory_is_handed_over_on_last_use():
    """The engine marks the last layer sharing a Hessian; SparseGPT then factorizes the sums' own memory instead
    of a copy (one (in, in) matrix less at the peak), with the same result."""
    from optimum_recon.masks.statistics import HessianStatistics

    torch.manual_seed(0)
    x = torch.randn(64, 16)
    shared, last = HessianStatistics(16, torch.device("cpu")), HessianStatistics(16, torch.device("cpu"))
    shared.update(x)
    last.update(x)
    copy = shared.take_hessian()
    assert shared.xtx is not None and copy.data_ptr() != shared.xtx.data_ptr()  # still needed by another layer
    last.last_use = True
    pointer = last.xtx.data_ptr()
    owned = last.take_hessian()
    assert last.xtx is None and owned.data_ptr() == pointer
    torch.testing.assert_close(owned, copy)
    weight = torch.randn(8, 16)
    a = sparsegpt_prune(weight, copy.clone(), 0.5)
    b = sparsegpt_prune(weight, owned, 0.5, overwrite_hessian=True)
    assert torch.equal(a.mask, b.mask) and torch.equal(a.weight, b.weight)


def test_apply_masks_marks_the_last_user_of_shared_statistics():
    from conftest import make_tiny_model

    from optimum_recon.configuration import PruningConfig
    from optimum_recon.engine.steps import apply_masks
    from optimum_recon.masks import get_mask_method
    from optimum_recon.modeling.blocks import find_blocks, find_linear_layers

    model = make_tiny_model("llama")
    _, blocks = find_blocks(model)
    layers = find_linear_layers(blocks[0], None, None, "model.layers.0")
    method = get_mask_method("sparsegpt")
    seen = {}

    class Recording:
        def __init__(self, stats):
            self.inner = stats
            self.last_use = False

        @property
        def hessian(self):
            return self.inner.hessian

        def take_hessian(self):
            seen.setdefault(id(self), []).append(self.last_use)
            return self.inner.take_hessian()

    qkv = Recording(method.new_statistics(32, torch.device("cpu")))
    qkv.inner.update(torch.randn(40, 32))
    stats = {}
    for layer in layers:
        if layer.name.endswith(("q_proj", "k_proj", "v_proj")):
            stats[layer.name] = qkv
        else:
            own = Recording(method.new_statistics(layer.in_features, torch.device("cpu")))
            own.inner.update(torch.randn(40, layer.in_features))
            stats[layer.name] = own
    apply_masks(layers, stats, method, PruningConfig(), "model.layers.0")
    assert seen[id(qkv)] == [False, False, True]  # q, k: shared still; v: the last user
    assert all(flags == [True] for key, flags in seen.items() if key != id(qkv))
    assert stats == {}  # consumed
