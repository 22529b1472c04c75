"""`PruningReport`: what a prune did, block by block, in a form that is saved next to the model."""

from __future__ import annotations

import json
import os
import resource
import sys
from dataclasses import asdict, dataclass, field
from typing import Any

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
    index: int
    error: float  # MSE between the pruned and the dense model's hidden states after this block
    error_normalized: float  # error / mean square of the dense hidden states (comparable across blocks)
    error_local: float | None  # MSE against the dense block applied to the pruned inputs
    sparsity: float  # fraction of zeros over this block's pruned linear layers
    seconds: float
    layers: list[LayerRecord] = field(default_factory=list)
    reconstruction: dict[str, Any] = field(default_factory=dict)


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

    ``perplexity`` is filled by evaluation: ``{"wikitext2": {"dense": 17.2, "pruned": 25.1}}``.
    """

    blocks: list[BlockRecord] = field(default_factory=list)
    model_sparsity: float = 0.0  # zeros / weights over all pruned layers
    pruned_parameters: int = 0  # weights in pruned layers
    total_seconds: float = 0.0
    peak_rss_mib: float = 0.0
    peak_cuda_mib: float | None = None
    num_calibration_tokens: int = 0
    perplexity: dict[str, dict[str, float]] = field(default_factory=dict)
    config: dict[str, Any] = field(default_factory=dict)
    environment: dict[str, str] = field(default_factory=dict)

    @property
    def final_error(self) -> float | None:
        """The paper's headline number: the last block's reconstruction error on calibration data."""
        return self.blocks[-1].error if self.blocks else None

    def to_dict(self) -> dict[str, Any]:
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
        with open(path, "w", encoding="utf-8") as fh:
            json.dump(self.to_dict(), fh, indent=2)
            fh.write("\n")

    @classmethod
    def load(cls, path: str | os.PathLike) -> "PruningReport":
        with open(path, encoding="utf-8") as fh:
            return cls.from_dict(json.load(fh))

    def summary(self) -> str:
        """A short human-readable table."""
        lines = [
            f"pruned {self.pruned_parameters:,} weights to {self.model_sparsity:.2%} sparsity in "
            f"{self.total_seconds:.1f} s (peak RSS {self.peak_rss_mib:,.0f} MiB)",
            f"{'block':>5} {'sparsity':>8} {'error':>11} {'normalized':>10} {'seconds':>7}",
        ]
        for b in self.blocks:
            lines.append(
                f"{b.index:>5} {b.sparsity:>8.2%} {b.error:>11.4g} {b.error_normalized:>10.4g} {b.seconds:>7.1f}"
            )
        for name, values in self.perplexity.items():
            pairs = ", ".join(f"{k} {v:.3f}" for k, v in values.items())
            lines.append(f"perplexity {name}: {pairs}")
        return "\n".join(lines)
