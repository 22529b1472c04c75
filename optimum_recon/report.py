"""`PruningReport`: what a prune did, block by block, in a form that is saved next to the model."""

from __future__ import annotations

import contextlib
import json
import os
import resource
import sys
import warnings
from dataclasses import asdict, dataclass, field
from typing import Any, Iterator

import torch

REPORT_NAME = "pruning_report.json"


@dataclass
class LayerRecord:
    name: str  # full module name, e.g. model.layers.3.mlp.up_proj
    shape: tuple[int, int]  # (out, in)
    sparsity: float  # measured fraction of zeros after pruning
    dampening: float | None = None  # SparseGPT: the dampening actually used


@dataclass
class BlockRecord:
    """One block's results. Errors are mean squared differences against the dense model's hidden states after
    the block; ``*_normalized`` divides by their mean square; ``*_relative`` is the mean over tokens of each token's
    squared error divided by its target's squared norm; ``*_before`` is with masked, untrained weights."""

    index: int
    error: float  # calibration data, after reconstruction (the paper's metric)
    error_normalized: float
    error_local: float | None  # against the dense block applied to the pruned inputs (window of 1 only)
    sparsity: float  # fraction of zeros over this block's pruned linear layers
    seconds: float
    layers: list[LayerRecord] = field(default_factory=list)
    reconstruction: dict[str, Any] = field(default_factory=dict)  # training windows and loss curves
    error_before: float | None = None
    error_before_normalized: float | None = None
    heldout_error: float | None = None
    heldout_error_normalized: float | None = None
    heldout_error_before: float | None = None
    heldout_error_before_normalized: float | None = None
    # each token's squared error divided by its target's squared norm, averaged over tokens (`loss="relative"`)
    error_relative: float | None = None
    error_before_relative: float | None = None
    heldout_error_relative: float | None = None
    heldout_error_before_relative: float | None = None

    @property
    def training(self) -> dict[str, Any] | None:
        """The record of the last window this block was trained in (BR: its own; CR: the window it left in), with
        the learning rate, and with the guard the held-out curve and the epoch kept; None when nothing was trained."""
        windows = self.reconstruction.get("windows", [])
        return windows[-1] if windows else None

    def set_errors(self, split: str, after, before, local=None) -> None:
        """Fill the fields of ``split`` ("calibration" or "heldout") from error meters."""
        prefix = "" if split == "calibration" else "heldout_"
        setattr(self, f"{prefix}error", after.mse)
        setattr(self, f"{prefix}error_normalized", after.normalized)
        setattr(self, f"{prefix}error_before", before.mse)
        setattr(self, f"{prefix}error_before_normalized", before.normalized)
        setattr(self, f"{prefix}error_relative", after.relative)
        setattr(self, f"{prefix}error_before_relative", before.relative)
        if split == "calibration" and local is not None:
            self.error_local = local.mse


def peak_rss_mib() -> float:
    """Peak resident memory of this process so far, in MiB."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 1024 if sys.platform != "darwin" else peak / 2**20


def peak_cuda_mib() -> float | None:
    if not torch.cuda.is_available():
        return None
    return torch.cuda.max_memory_allocated() / 2**20


@dataclass
class PruningReport:
    """Per-block reconstruction errors and sparsity, overall sparsity, time and memory.

    ``perplexity`` is filled by evaluation: ``{"wikitext2": {"dense": 17.2, "pruned": 25.1}}``, and
    ``zero_shot`` by `ReconPruner.evaluate_tasks`: ``{"arc_easy": {"dense": 0.61, "pruned": 0.57}}`` (accuracy).
    """

    blocks: list[BlockRecord] = field(default_factory=list)
    model_sparsity: float = 0.0  # zeros / weights over all pruned layers
    pruned_parameters: int = 0  # weights in pruned layers
    total_seconds: float = 0.0  # with a resumed run, includes the interrupted earlier calls' time
    resumed_seconds: float = 0.0  # of total_seconds: the earlier calls' time up to their last checkpoint
    peak_rss_mib: float = 0.0
    peak_cuda_mib: float | None = None
    num_calibration_tokens: int = 0
    perplexity: dict[str, dict[str, float]] = field(default_factory=dict)
    zero_shot: dict[str, dict[str, float]] = field(default_factory=dict)  # task -> {"dense": acc, "pruned": acc}
    # how the last save wrote the weights: dtype, sparse_format, and for a compact save the bytes of the compressed
    # weights dense ("compressed_dense") and compact ("compressed"), and how many ("compressed_tensors")
    saved: dict[str, Any] = field(default_factory=dict)
    # how the sparsity was spread over the blocks: policy, each block's sparsity, OWL's outlier ratios and settings,
    # and the seconds the allocation took (OWL's dense pass)
    allocation: dict[str, Any] = field(default_factory=dict)
    config: dict[str, Any] = field(default_factory=dict)
    environment: dict[str, str] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)  # warnings raised while loading data and pruning
    calibration: dict[str, Any] = field(default_factory=dict)  # windows used: external, self-generated, for masks
    # how each perplexity was measured: dataset -> {"dense": protocol, "pruned": protocol} (PerplexityResult.protocol)
    evaluation: dict[str, dict[str, Any]] = field(default_factory=dict)
    # the inputs as published (hub/provenance.py): the model and data by name, local ones marked, with their hashes;
    # base_model, license and datasets for the card's metadata; never a local path
    provenance: dict[str, Any] = field(default_factory=dict)

    @property
    def final_error(self) -> float | None:
        """The paper's headline number: the last block's reconstruction error on calibration data."""
        return self.blocks[-1].error if self.blocks else None

    def guard_summary(self) -> dict[str, Any] | None:
        """What the held-out guard and ``lr="auto"`` decided over the run (None when nothing was trained): the
        learning rates (first and final peaks), the blocks that kept their masked-only weights, stopped early, or
        had their rate halved, and the epochs run."""
        trained = [(b.index, b.training) for b in self.blocks if b.training]
        if not trained:
            return None
        guarded = [(i, w) for i, w in trained if "epoch_kept" in w]
        return {
            "lr": [min(w["lr"] for _, w in trained), max(w["lr"] for _, w in trained)] if all(
                "lr" in w for _, w in trained) else None,
            "lr_auto": any(w.get("lr_auto") for _, w in trained),
            "guarded": len(guarded),
            "blocks": len(trained),
            "reverted": [i for i, w in guarded if w["reverted"]],
            "stopped_early": [i for i, w in guarded if w["stopped_early"]],
            "halved": [i for i, w in trained if w.get("lr_halved_after")],
            "epochs_run": sum(w.get("epochs_run", len(w.get("loss_per_epoch", []))) for _, w in trained),
            "epochs_planned": sum(int(self.config.get("epochs", 0)) for _ in trained) or None,
        }

    def guard_words(self) -> str | None:
        """One sentence on what the guard did, for summaries and the model card."""
        g = self.guard_summary()
        if g is None:
            return None
        lr = g["lr"]
        rate = "" if lr is None else (
            f"learning rate {'chosen per block (lr=auto): ' if g['lr_auto'] else ''}"
            + (f"{lr[0]:.3g}" if lr[0] == lr[1] else f"{lr[0]:.3g} to {lr[1]:.3g}")
            + (f", halved in {len(g['halved'])} blocks" if g["halved"] else "") + "; ")
        if not g["guarded"]:
            return f"{rate}training was not guarded (no held-out windows)."
        planned = f" of {g['epochs_planned']}" if g["epochs_planned"] else ""

        def some(blocks: list[int]) -> str:
            return f"{len(blocks)} ({', '.join(map(str, blocks[:8]))}{', ...' if len(blocks) > 8 else ''})" \
                if blocks else "none"

        return (f"{rate}every epoch judged on the held-out windows, the best kept: {g['epochs_run']}{planned} epochs "
                f"run; blocks stopped early: {some(g['stopped_early'])}; blocks whose training never beat their "
                f"masked-only weights (kept): {some(g['reverted'])}.")

    def to_dict(self) -> dict[str, Any]:
        """The report as plain JSON-able values (with `final_error`)."""
        data = asdict(self)
        data["final_error"] = self.final_error
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "PruningReport":
        data = dict(data)
        data.pop("final_error", None)
        blocks = []
        for block in data.pop("blocks", []):
            block = dict(block)
            layers = [LayerRecord(**{**layer, "shape": tuple(layer["shape"])}) for layer in block.pop("layers", [])]
            blocks.append(BlockRecord(**block, layers=layers))
        known = {k: v for k, v in data.items() if k in cls.__dataclass_fields__}
        return cls(blocks=blocks, **known)

    def save(self, path: str | os.PathLike) -> None:
        """Write the report as JSON (`pruning_report.json` in a saved model)."""
        with open(path, "w", encoding="utf-8") as fh:
            json.dump(self.to_dict(), fh, indent=2)
            fh.write("\n")

    @classmethod
    def load(cls, path: str | os.PathLike) -> "PruningReport":
        with open(path, encoding="utf-8") as fh:
            return cls.from_dict(json.load(fh))

    def summary(self) -> str:
        """A short human-readable table: errors after (and before) reconstruction, per block."""
        heldout = any(b.heldout_error is not None for b in self.blocks)
        trained = any(b.error_before is not None and b.error_before != b.error for b in self.blocks)
        lines = [
            f"pruned {self.pruned_parameters:,} weights to {self.model_sparsity:.2%} sparsity in "
            f"{self.total_seconds:.1f} s (peak RSS {self.peak_rss_mib:,.0f} MiB)",
            "errors: MSE against the dense model's hidden states after each block (normalized: / their mean square)",
        ]
        allocation = self.allocation or {}
        if allocation.get("policy") not in (None, "uniform"):
            spread = allocation.get("block_sparsity") or [0.0]
            how = (f"OWL (outlier ratio above {allocation.get('threshold', 0):g}x the block mean, lambda "
                   f"{allocation.get('owl_lambda', 0):g}; {allocation.get('seconds', 0):.1f} s)"
                   if allocation["policy"] == "owl" else "the allocation table")
            if allocation.get("requested") == "auto":
                how += ", the default allocation='auto' for unstructured sparsity"
            lines.insert(1, f"sparsity spread over the blocks by {how}: from {min(spread):.2%} to {max(spread):.2%}")
        generation = (self.calibration or {}).get("generation") or {}
        if generation.get("chosen") == "auto":
            lines.insert(1, f"calibration: {self.calibration.get('external')} windows, and "
                            f"{self.calibration.get('self_generated')} more written by the dense model for "
                            f"reconstruction (self_generate='auto': {generation['targets_per_weight']:.2g} target "
                            f"values per trained weight without them, {generation['targets_per_weight_after']:.2g} "
                            "with them)")
        header = f"{'block':>5} {'sparsity':>8} {'error':>10} {'normalized':>10}"
        if trained:
            header += f" {'before':>10} {'cut':>6}"
        if heldout:
            header += f" {'held-out':>10} {'norm.':>9}"
        if trained:
            header += f" {'lr':>8} {'epoch kept':>16}"
        lines.append(header + f" {'seconds':>7}")
        for b in self.blocks:
            row = f"{b.index:>5} {b.sparsity:>8.2%} {b.error:>10.4g} {b.error_normalized:>10.4g}"
            if trained:
                cut = 1 - b.error / b.error_before if b.error_before else 0.0
                row += f" {b.error_before:>10.4g} {cut:>6.1%}"
            if heldout:
                row += f" {b.heldout_error:>10.4g} {b.heldout_error_normalized:>9.3g}"
            if trained:
                row += f" {_lr_cell(b.training):>8} {_kept_cell(b.training):>16}"
            lines.append(row + f" {b.seconds:>7.1f}")
        words = self.guard_words()
        if words:
            lines.append(words[0].upper() + words[1:])
        for name, values in self.perplexity.items():
            pairs = " -> ".join(f"{k} {values[k]:.3f}" for k in ("dense", "pruned") if values.get(k) is not None)
            lines.append(f"{name} perplexity: {pairs}")
        return "\n".join(lines)


def _lr_cell(training: dict[str, Any] | None) -> str:
    if not training or "lr" not in training:
        return "-"
    final = training.get("lr_final", training["lr"])
    return f"{final:.2g}" + ("*" if final != training["lr"] else "")  # *: halved from the rule's rate


def _kept_cell(training: dict[str, Any] | None) -> str:
    if not training or "epoch_kept" not in training:
        return "-"
    cell = f"{training['epoch_kept']}/{training['epochs_run']}"
    return cell + (" masked-only" if training["reverted"] else " early" if training["stopped_early"] else "")


@contextlib.contextmanager
def recorded_warnings() -> Iterator[list[str]]:
    """Collect the messages of warnings raised inside the block (to record them), and still show them."""
    notes: list[str] = []
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            yield notes
        finally:
            notes.extend(str(w.message) for w in caught if issubclass(w.category, UserWarning))
    for w in caught:
        warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
