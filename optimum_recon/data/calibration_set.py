"""The calibration set of one prune: every window it uses, which of them feed the masks, and where each came from.

Built once (`build_calibration_set`) from a `CalibrationConfig` (external windows first, then the windows the dense
model generated itself), from a list of texts, or from token ids; the engine consumes it as it is and nothing else
re-derives it. Notation: N calibration windows of T tokens, of which the first K feed the mask statistics (all N
feed reconstruction); H held-out windows, never used for masks or training, on which errors are also measured.
"""

from __future__ import annotations

import contextlib
import dataclasses
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Sequence

import torch

from ..calibration_config import CalibrationConfig
from ..modeling.offload import onload
from ..report import recorded_warnings
from .calibration import sample_calibration_windows
from .self_fill import NO_FILL, plan_self_fill

if TYPE_CHECKING:  # pragma: no cover
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

    from ..configuration import PruningConfig


@dataclass(frozen=True)
class CalibrationSet:
    """The windows of one prune.

    Args:
        ids: (N, T) token ids; the first ``for_masks`` rows feed the mask statistics, all of them reconstruction.
        heldout: (H, T) held-out token ids, or None.
        for_masks: K, how many leading windows feed the masks (None: all N).
        self_generated: How many of the N windows the dense model generated itself (they come last).
        generation: The generation settings of those windows (for the report), if any.
        notes: What happened while the data was read (e.g. a fallback to the bundled copy), for the report.
    """

    ids: torch.Tensor
    heldout: torch.Tensor | None = None
    for_masks: int | None = None
    self_generated: int = 0
    generation: dict[str, Any] | None = field(default=None, compare=False)
    notes: tuple[str, ...] = field(default=(), compare=False)

    def __post_init__(self) -> None:
        for name, ids in (("calibration ids", self.ids), ("held-out ids", self.heldout)):
            if ids is not None and (not isinstance(ids, torch.Tensor) or ids.ndim != 2 or ids.shape[0] == 0):
                shape = tuple(ids.shape) if isinstance(ids, torch.Tensor) else type(ids).__name__
                raise ValueError(f"{name} must be (num_samples, seq_len), got {shape}.")
        if self.for_masks is not None and not 0 < self.for_masks <= self.num_windows:
            raise ValueError(f"for_masks={self.for_masks} is not valid: between 1 and the {self.num_windows} windows.")

    @classmethod
    def of(cls, data: "CalibrationSet | torch.Tensor") -> "CalibrationSet":
        """``data`` itself, or token ids (N, T) as a set without held-out windows whose every window feeds the masks."""
        return data if isinstance(data, CalibrationSet) else cls(data)

    @property
    def num_windows(self) -> int:
        return int(self.ids.shape[0])

    @property
    def num_for_masks(self) -> int:
        """K: the leading windows that feed the mask statistics."""
        return self.num_windows if self.for_masks is None else self.for_masks

    def describe(self) -> dict[str, Any]:
        """What the report records about the calibration data."""
        info = {"windows": self.num_windows, "seq_len": int(self.ids.shape[1]), "self_generated": self.self_generated,
                "external": self.num_windows - self.self_generated,
                "heldout": 0 if self.heldout is None else int(self.heldout.shape[0]), "for_masks": self.num_for_masks}
        if self.generation is not None:
            info["generation"] = self.generation
        return info


def external_windows(tokenizer, config: CalibrationConfig) -> tuple[torch.Tensor, torch.Tensor | None] | None:
    """The calibration and held-out windows of the external (not self-generated) part of ``config``'s source."""
    if config.external_source is None:
        return None
    external = dataclasses.replace(config, source=config.external_source)
    return sample_calibration_windows(tokenizer, external, with_heldout=True)


def build_calibration_set(
    tokenizer: PreTrainedTokenizerBase,
    config: CalibrationConfig,
    data: Sequence[str] | torch.Tensor | None = None,
    *,
    model: PreTrainedModel | None = None,
    external: tuple[torch.Tensor, torch.Tensor | None] | None = None,
    notes: Sequence[str] = (),
    progress: bool = False,
    pruning: PruningConfig | None = None,
    blocks_path: str | None = None,
    device: torch.device | str | None = None,
) -> CalibrationSet:
    """The calibration set of a prune.

    Args:
        tokenizer: The model's tokenizer.
        config: The calibration settings.
        data: Texts to cut the windows from, or token ids (N, T) (then without held-out windows); default: the
            settings' source.
        model: The dense model, needed when the source includes self-generated windows (``"c4+self:256"``).
        external: The external windows when they were already read (`external_windows`, e.g. before the model
            was loaded).
        notes: Notes of reading ``external`` (the warnings it raised), kept with the set.
        progress: Show the self-generation progress bar.
        pruning: The prune's settings, for ``config.self_generate="auto"`` (`self_fill.py`): with them and the model,
            windows read from ``config.source`` are topped up with self-generated ones when they are too few to
            train on.
        blocks_path: Where the model's blocks are (default: found), for the same.
        device: Where the blocks will run (default: the accelerator when there is one), for the same: the windows
            are generated there.
    """
    with recorded_warnings() as raised:
        extra = NO_FILL
        if pruning is not None and model is not None and data is None:
            extra = plan_self_fill(config, model, pruning, blocks_path, device)
        calibration = _build(tokenizer, config, data, model, external, progress, extra)
    return dataclasses.replace(calibration, notes=tuple(dict.fromkeys([*notes, *raised])))


def _build(tokenizer, config: CalibrationConfig, data, model, external, progress: bool,
           extra: tuple[int, dict[str, Any], torch.device | None] = NO_FILL) -> CalibrationSet:
    if isinstance(data, torch.Tensor):
        return CalibrationSet(data)
    if data is not None:
        ids, heldout = sample_calibration_windows(tokenizer, config, list(data), with_heldout=True)
        return CalibrationSet(ids, heldout)
    ids, heldout = external if external is not None else (external_windows(tokenizer, config) or (None, None))
    count = config.self_samples or extra[0]
    if not count:
        return CalibrationSet(ids, heldout)
    from .self_generate import generation_settings, load_or_generate

    if model is None:
        raise ValueError(f"calibration source {config.source!r} includes self-generated text: pass the dense model.")
    # where the blocks will run, when the model fits there (`plan_self_fill`); back where it was afterwards
    with onload(model, extra[2], keep_changes=False) if extra[2] is not None else contextlib.nullcontext():
        generated = load_or_generate(model, tokenizer, config, num_samples=count, progress=progress)
        if heldout is None and config.num_heldout:
            more = load_or_generate(model, tokenizer, dataclasses.replace(config, seed=config.seed + 1),
                                    num_samples=config.num_heldout, progress=progress)
            heldout = torch.tensor(more["input_ids"], dtype=torch.long)
    own = torch.tensor(generated["input_ids"], dtype=torch.long)
    # the paper's setting: self-generated windows feed reconstruction only, the masks come from the external ones
    masks_from_external = ids is not None and config.self_use == "reconstruction"
    return CalibrationSet(
        own if ids is None else torch.cat([ids, own]), heldout,
        for_masks=int(ids.shape[0]) if masks_from_external else None, self_generated=int(own.shape[0]),
        generation={**generation_settings(config, config.seq_len), **(extra[1] if not config.self_samples else {})})
