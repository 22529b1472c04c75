"""How many weights each pruned layer loses: the allocation of a model's sparsity over its layers.

Notation: layers l = 1..L are the pruned linear layers of the whole model, n_l their numbers of weights, N = sum n_l,
s the requested sparsity (`PruningConfig.sparsity`), s_l a layer's own sparsity, z_l its number of zeros.

Every policy produces fractions s_l with sum_l s_l n_l = s N, then integer counts: z_l = floor(s_l n_l) plus one for
the layers with the largest remainders s_l n_l - floor(s_l n_l), as many as make sum_l z_l = round(s N) (the largest
remainder method; ties go to the earlier layer). So the model's fraction of zeros is s to within half a weight, and
each layer is within one weight of its own s_l. A mask method then prunes exactly z_l weights in layer l (spread over
its rows or column blocks by `split_count`).

Policies:
- ``auto`` (the default): ``owl`` where it applies (unstructured, and s - 2 lambda >= 0 and s + 2 lambda < 1, so that no
  block can leave [0, 1) whatever the outlier ratios), else ``uniform`` (N:M fixes every layer's sparsity). See
  `resolve_policy`; docs/benchmarks.md has the measurements behind the choice.
- ``uniform``: s_l = s.
- ``owl``: outlier-weighted layerwise sparsity (Yin et al., ICML 2024). For block b, D_b is the fraction of its Wanda
  scores |W_ij| * ||X_j|| (over all of its pruned layers together, on the dense model's calibration inputs) that exceed
  ``M`` times their mean. Blocks with more outliers are pruned less: D is scaled linearly onto [0, 2 lambda]
  (the block with the fewest outliers at 0, the most at 2 lambda), and block b's density is that value minus its
  weighted mean plus (1 - s), so s_b spans at most 2 lambda around s and the blocks' weighted mean is s. The weights
  are the blocks' numbers of pruned weights (the paper's plain mean when all blocks are the same size). The paper's
  settings for LLaMA: M = 5, lambda = 0.08.
- a table ``{name: sparsity}``: a key is a pruned layer's full module name or a dotted prefix of it (a block,
  ``model.layers.3``, or a part of one, ``model.layers.3.mlp``); the longest matching key sets s_l. Layers the table
  does not name share the rest of the zeros equally, so that the total is still s N.

Everything here is plain numbers and tensors: the engine supplies the scores and the layer sizes.
"""

from __future__ import annotations

import math
from typing import Mapping, Sequence

import torch

POLICIES = ("auto", "uniform", "owl")


def resolve_policy(allocation: str | Mapping[str, float], sparsity: float, lam: float, nm: tuple[int, int] | None
                   ) -> str:
    """The policy a run uses: ``"table"`` for a table, ``auto`` turned into ``owl`` or ``uniform`` (module docstring).

    ``auto`` picks OWL with its paper's settings because that measured best (docs/benchmarks.md, SmolLM2-135M, 50-70%
    unstructured): after the default reconstruction OWL was lower in WikiText-2 perplexity in every setting measured
    but one (SparseGPT, Wanda and ALPS masks; -1.2% to -9.0%), +0.5% in that one (SparseGPT at 70%); without
    reconstruction (LR) lower in 7 of 9, at most 2% higher. OWL's published gains are on LLaMA-7B to 65B, so the
    choice does not rest on one model's scale. Its price is one dense forward pass over the calibration windows.
    """
    if not isinstance(allocation, str):
        return "table"
    if allocation != "auto":
        return allocation
    if nm is not None or not (sparsity - 2 * lam >= 0 and sparsity + 2 * lam < 1):
        return "uniform"
    return "owl"


class AllocationError(ValueError):
    """An allocation that cannot be realised: a layer would need a sparsity outside [0, 1)."""


def outlier_ratio(scores: Sequence[torch.Tensor], threshold: float) -> float:
    """OWL's layerwise outlier distribution D of one block: the fraction of all the entries of ``scores`` (each a
    layer's (out, in) Wanda scores) above ``threshold`` times the mean of all of them."""
    total = sum(float(s.double().sum()) for s in scores)
    count = sum(s.numel() for s in scores)
    if count == 0:
        return 0.0
    cut = threshold * total / count
    return sum(int((s > cut).sum()) for s in scores) / count


def owl_sparsities(ratios: Sequence[float], sizes: Sequence[int], sparsity: float, lam: float) -> list[float]:
    """Each block's sparsity from its outlier ratio D_b (see the module docstring); ``sizes`` are the blocks'
    numbers of pruned weights. Equal ratios (or lam = 0) give every block ``sparsity``."""
    ratios = [float(r) for r in ratios]
    low, high = min(ratios), max(ratios)
    if high - low <= 0 or lam == 0:
        return [float(sparsity)] * len(ratios)
    scaled = [(r - low) / (high - low) * 2 * lam for r in ratios]  # in [0, 2 lam]
    mean = sum(v * n for v, n in zip(scaled, sizes)) / sum(sizes)
    return [1.0 - (v - mean + (1.0 - sparsity)) for v in scaled]


def table_sparsities(table: Mapping[str, float], names: Sequence[str], sizes: Sequence[int],
                     sparsity: float) -> list[float]:
    """Each layer's sparsity from a user's table (see the module docstring).

    Raises:
        AllocationError: a key names no pruned layer; or the layers outside the table would need a sparsity outside
            [0, 1) to make the total ``sparsity``; or the table covers every layer and its total is not ``sparsity``.
    """
    unused = [key for key in table if not any(_covers(key, name) for name in names)]
    if unused:
        examples = ", ".join(repr(n) for n in names[:2]) + (f", ... {names[-1]!r}" if len(names) > 2 else "")
        raise AllocationError(f"the allocation table names {', '.join(map(repr, unused))}, which is no pruned layer "
                              f"and no prefix of one (pruned layers: {examples}).")
    given: dict[int, float] = {}
    for i, name in enumerate(names):
        keys = [key for key in table if _covers(key, name)]
        if keys:
            given[i] = float(table[max(keys, key=len)])
    total = sparsity * sum(sizes)
    fixed = sum(given[i] * sizes[i] for i in given)
    rest = sum(n for i, n in enumerate(sizes) if i not in given)
    if rest == 0:
        overall = fixed / max(sum(sizes), 1)
        if abs(overall - sparsity) > 1e-6:
            raise AllocationError(f"the allocation table sets every pruned layer, and its overall sparsity is "
                                  f"{overall:.6g}, not sparsity={sparsity:g}: set sparsity={overall:.6g}, or leave "
                                  "some layers out of the table to take up the difference.")
        return [given[i] for i in range(len(names))]
    other = (total - fixed) / rest
    if not 0 <= other < 1:
        others = len(names) - len(given)
        raise AllocationError(f"with the allocation table's sparsities, the {others} layer{'s' * (others != 1)} it "
                              f"does not name would need a sparsity of {other:.4g} to reach sparsity={sparsity:g} "
                              "overall, outside [0, 1): lower or raise the table's values, or change sparsity.")
    return [given.get(i, other) for i in range(len(names))]


def _covers(key: str, name: str) -> bool:
    return name == key or name.startswith(key + ".")


def zero_counts(sparsities: Sequence[float], sizes: Sequence[int], sparsity: float) -> list[int]:
    """Integer zeros per layer: floor(s_l n_l), plus one for the largest remainders until the total is
    round(sparsity * N) (see the module docstring).

    Raises:
        AllocationError: some s_l is outside [0, 1).
    """
    for i, s in enumerate(sparsities):
        if not (math.isfinite(s) and 0 <= s < 1):
            raise AllocationError(f"the allocation gives layer {i} a sparsity of {s:.4g}, outside [0, 1).")
    exact = [s * n for s, n in zip(sparsities, sizes)]
    counts = [min(math.floor(x), n) for x, n in zip(exact, sizes)]
    wanted = round(sparsity * sum(sizes))
    missing = wanted - sum(counts)
    # (missing is in [0, L] up to floating point; a layer already full is skipped)
    order = sorted(range(len(exact)), key=lambda i: (-(exact[i] - counts[i]), i))
    for i in order:
        if missing <= 0:
            break
        if counts[i] < sizes[i]:
            counts[i] += 1
            missing -= 1
    return counts


def split_count(count: int, widths: Sequence[int]) -> list[int]:
    """``count`` zeros spread over consecutive parts of ``widths`` entries in proportion to their widths, by
    cumulative rounding: part k gets floor(count * W_k / W) - floor(count * W_{k-1} / W) with W_k the widths up to
    and including part k, so the parts add up to ``count`` exactly and equal parts differ by at most one."""
    total = sum(widths)
    out, done, before = [], 0, 0
    for width in widths:
        done += width
        upto = count * done // total
        out.append(upto - before)
        before = upto
    return out
