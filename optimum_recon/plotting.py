"""Per-block reconstruction-error plots (needs the optional `matplotlib`: pip install "optimum-recon[plot]")."""

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
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as err:
        raise ImportError('plotting needs matplotlib: pip install "optimum-recon[plot]"') from err
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
