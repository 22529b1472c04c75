"""Reconstruction plots (need the optional `matplotlib`: pip install "optimum-recon[plot]"): per-block errors, and
per-epoch training curves of guarded blocks."""

from __future__ import annotations

import os
from typing import Mapping

from .report import PruningReport


def plot_block_errors(
    reports: Mapping[str, PruningReport], path: str | os.PathLike, *, normalized: bool = True, title: str | None = None
) -> str:
    """Draw each report's per-block error on calibration (solid) and held-out windows (dashed) into a PNG.

    Args:
        reports: Label -> report, one line pair per setting compared (e.g. {"LR": ..., "BR+GP": ...}).
        path: Where to write the PNG.
        normalized: Plot errors divided by the dense hidden states' mean square (comparable across blocks)
            instead of the plain MSE (log scale either way).
    """
    plt = _pyplot()
    suffix = "_normalized" if normalized else ""
    fig, ax = plt.subplots(figsize=(8, 4.5), dpi=120)
    for i, (label, report) in enumerate(reports.items()):
        color = f"C{i % 10}"
        blocks = [b.index for b in report.blocks]
        ax.plot(blocks, [getattr(b, f"error{suffix}") for b in report.blocks], color=color, marker="o", ms=3,
                label=f"{label} (calibration)")
        heldout = [getattr(b, f"heldout_error{suffix}") for b in report.blocks]
        if all(v is not None for v in heldout):
            ax.plot(blocks, heldout, color=color, linestyle="--", label=f"{label} (held-out)")
    ax.set_yscale("log")
    ax.set_xlabel("block")
    ax.set_ylabel("error / mean square of dense hidden states" if normalized else "MSE vs dense hidden states")
    ax.set_title(title or "Reconstruction error after each block")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return str(path)


def plot_training_curves(report: PruningReport, path: str | os.PathLike, *, blocks: list[int] | None = None,
                         panels: int = 6, title: str | None = None) -> str:
    """Draw, per block, the training loss (calibration) and the held-out error per epoch, with the epoch the guard
    kept marked (a star) and the epochs after which ``lr="auto"`` halved the rate (dotted lines), into a PNG.

    Args:
        report: A report of a guarded run (blocks without a held-out curve are skipped).
        path: Where to write the PNG.
        blocks: The blocks to draw; default: ``panels`` of them, the ones that kept their masked-only weights or had
            their rate halved first, then evenly spread.
    """
    plt = _pyplot()
    curves = {b.index: b.training for b in report.blocks if b.training and "heldout_per_epoch" in b.training}
    if not curves:
        raise ValueError("no block of this report has a held-out curve: was it trained with the guard?")
    if blocks is None:
        odd = [i for i, w in curves.items() if w["reverted"] or w.get("lr_halved_after")]
        spread = list(curves)[:: max(1, len(curves) // panels)]
        blocks = sorted(dict.fromkeys(odd[: panels // 2] + spread))[:panels]
    cols = min(3, len(blocks))
    rows = -(-len(blocks) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4 * cols, 3 * rows), dpi=110, squeeze=False)
    for ax, index in zip(axes.flat, blocks):
        w = curves[index]
        heldout, loss = w["heldout_per_epoch"], w["loss_per_epoch"]
        ax.plot(range(len(heldout)), heldout, color="C1", marker="o", ms=3, label="held-out error")
        ax.plot(range(1, len(loss) + 1), loss, color="C0", marker="o", ms=3, label="training loss (calibration)")
        kept = w["epoch_kept"]
        ax.plot([kept], [heldout[kept]], marker="*", ms=14, color="C3", linestyle="none", label="kept")
        for epoch in w.get("lr_halved_after", []):
            ax.axvline(epoch, color="grey", linestyle=":", linewidth=1)
        state = " (masked-only kept)" if w["reverted"] else " (stopped early)" if w["stopped_early"] else ""
        ax.set_title(f"block {index}: lr {w.get('lr_final', w['lr']):.2g}{state}", fontsize=9)
        ax.set_yscale("log")
        ax.set_xlabel("epoch")
        ax.grid(True, which="both", alpha=0.3)
    for ax in list(axes.flat)[len(blocks):]:
        ax.axis("off")
    axes.flat[0].legend(fontsize=7)
    fig.suptitle(title or "Guarded training: error per epoch (epoch 0: masked only)", fontsize=10)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return str(path)


def _pyplot():
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as err:
        raise ImportError('plotting needs matplotlib: pip install "optimum-recon[plot]"') from err
    return plt
