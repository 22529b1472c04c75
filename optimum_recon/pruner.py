"""`ReconPruner`: load a model, prune it, evaluate it, save it. A thin facade over `prune_model`."""

from __future__ import annotations

import dataclasses
import logging
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterable, Sequence

import torch

from . import distributed as dist
from .configuration import PruningConfig
from .data.calibration_set import CalibrationSet, build_calibration_set, external_windows
from .data.default_model import DEFAULT_MODEL_NAME
from .data.sources import check_source
from .engine.checkpoint import check_checkpoint_dir
from .engine.runtime import Runtime
from .engine.sequential import prune_model
from .evaluation import PerplexityResult, evaluate_perplexity
from .folders import check_output_dir
from .modeling.loading import (
    check_memory_budget,
    check_model_exists,
    checkpoint_dtype,
    load_model,
    load_tokenizer,
    name_of_dtype,
    parse_dtype,
    resolve_model_path,
)
from .modeling.offload import check_offload_folder
from .report import PruningReport, recorded_warnings

if TYPE_CHECKING:  # pragma: no cover
    from huggingface_hub import CommitInfo
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

    from .evaluation.zero_shot import TaskResult

logger = logging.getLogger(__name__)


def _read_calibration(tokenizer, config: PruningConfig, read: bool) -> tuple[dict[str, Any], Any, list[str]]:
    """What `from_pretrained` reads of the calibration data before the model (or, for a model object, right away):
    the settings it was read with, the external windows (None when ``read`` is false) and the warnings raised."""
    with recorded_warnings() as notes:
        windows = external_windows(tokenizer, config.calibration) if read else None
    return dataclasses.asdict(config.calibration), windows, notes


class ReconPruner:
    """Prune a causal language model block by block and reconstruct it.

    Args:
        model: A `transformers` causal LM (pruned in place).
        tokenizer: Its tokenizer.
        config: The pruning recipe.
        model_id: Where the model came from (recorded in the model card).

    Example:
        ```python
        >>> from optimum_recon import ReconPruner, PruningConfig
        >>> pruner = ReconPruner.from_pretrained("HuggingFaceTB/SmolLM2-135M", config=PruningConfig(sparsity=0.5))
        >>> report = pruner.prune()
        >>> pruner.save_pretrained("smollm2-50")
        ```
    """

    def __init__(self, model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, config: PruningConfig | None = None,
                 *, model_id: str | None = None, blocks_path: str | None = None):
        self.model = model
        self.tokenizer = tokenizer
        self.config = config if config is not None else PruningConfig()
        self.model_id = model_id
        self.blocks_path = blocks_path
        self.report: PruningReport | None = None
        self.source_folder: str | None = None  # the local folder the model was loaded from: never written
        # what save_pretrained writes by default: the checkpoint's own dtype (from_pretrained reads it from the
        # checkpoint's config before loading), else the dtype of the model in memory
        self.checkpoint_dtype: str | None = name_of_dtype(getattr(model, "dtype", "")) or None
        self._dense_perplexity: dict[str, float] = {}
        self._dense_protocol: dict[str, dict[str, Any]] = {}
        self._dense_zero_shot: dict[str, float] = {}

    @classmethod
    def from_pretrained(
        cls,
        model_id_or_path: str | os.PathLike | PreTrainedModel | None = None,
        config: PruningConfig | None = None,
        *,
        tokenizer: str | PreTrainedTokenizerBase | None = None,
        dtype: Any = None,
        device_map: Any = None,
        max_memory: dict | None = None,
        offload_folder: str | None = None,
        blocks_path: str | None = None,
        allow_missing_weights: bool = False,
        read_calibration: bool = True,
        **model_kwargs: Any,
    ) -> "ReconPruner":
        """Load a model from the Hub or a local folder (the bundled SmolLM2-135M-Instruct when omitted), or take a
        model already in memory (a `PreTrainedModel`: pruned in place) with its ``tokenizer`` (an object or where to
        load it from; for a model object, default: the folder or Hub id its config names).

        `device_map`, `max_memory` and `offload_folder` are passed to `from_pretrained`. Everything that can be
        checked without the weights is checked before they are loaded: the dtype, the folders, the tokenizer, and
        the calibration data (read and cut into windows here, so a bad file fails in seconds, not after loading a
        70B model; ``read_calibration=False`` skips this when you will pass your own data to `prune`). Weights
        missing from the checkpoint, or weights in it that the model does not have, are an error (`ModelLoadError`)
        unless ``allow_missing_weights``.

        Launched with `torchrun` or `accelerate launch`, every process joins the process group here and loads its
        own copy (leave ``device_map`` unset: each rank runs its blocks on its own GPU); an ``offload_folder`` gets
        one sub-folder per rank, since each rank writes its pruned weights back into its own.
        """
        dist.init_distributed()
        config = config if config is not None else PruningConfig()
        if isinstance(model_id_or_path, torch.nn.Module):
            return cls._from_model(model_id_or_path, config, tokenizer, read_calibration, blocks_path=blocks_path,
                                   given={"dtype": dtype, "device_map": device_map, "max_memory": max_memory,
                                          "offload_folder": offload_folder, **model_kwargs})
        if model_id_or_path is not None and not isinstance(model_id_or_path, (str, os.PathLike)):
            raise TypeError(f"model_id_or_path must be a Hub model id, a local folder or a transformers model, not "
                            f"{type(model_id_or_path).__name__}.")
        dtype = parse_dtype(dtype)
        if read_calibration and config.calibration.external_source is not None:  # fail before the model load
            check_source(config.calibration.external_source)
        path = resolve_model_path(None if model_id_or_path is None else str(model_id_or_path))
        check_model_exists(path, model_kwargs.get("trust_remote_code", False))
        if offload_folder is not None:
            if dist.is_distributed():
                offload_folder = os.path.join(offload_folder, f"rank{dist.rank()}")
            check_offload_folder(offload_folder)
        if max_memory:
            check_memory_budget(path, max_memory, dtype, blocks_path, model_kwargs.get("trust_remote_code", False))
        for key, value in (("device_map", device_map), ("max_memory", max_memory), ("offload_folder", offload_folder)):
            if value is not None:
                model_kwargs[key] = value
        if tokenizer is None or isinstance(tokenizer, (str, os.PathLike)):
            tokenizer = load_tokenizer(str(tokenizer or path), model_kwargs.get("trust_remote_code", False))
        prepared = _read_calibration(tokenizer, config, read_calibration)
        saved_dtype = checkpoint_dtype(path, model_kwargs.get("trust_remote_code", False))
        model = load_model(path, dtype=dtype, allow_missing_weights=allow_missing_weights, **model_kwargs)
        model_id = DEFAULT_MODEL_NAME if model_id_or_path is None else str(model_id_or_path)
        pruner = cls(model, tokenizer, config, model_id=model_id, blocks_path=blocks_path)
        pruner.source_folder = path if os.path.isdir(path) else None
        pruner.checkpoint_dtype = saved_dtype or pruner.checkpoint_dtype
        pruner._prepared = prepared
        return pruner

    @classmethod
    def _from_model(cls, model: torch.nn.Module, config: PruningConfig, tokenizer: Any, read_calibration: bool, *,
                    blocks_path: str | None, given: dict[str, Any]) -> "ReconPruner":
        """`from_pretrained` of a model object: nothing to load but the tokenizer (and the calibration data)."""
        loading = sorted(k for k, v in given.items() if v is not None and k != "trust_remote_code")
        if loading:
            raise ValueError(f"{', '.join(loading)} {'apply' if len(loading) > 1 else 'applies'} to loading a model, "
                             "and this one is already loaded: place it yourself (model.to(...), or load it with "
                             "from_pretrained(..., device_map=...)) or pass its id or folder instead.")
        if hasattr(model, "peft_config"):
            raise ValueError("this is a peft model: merge its adapters first (model = model.merge_and_unload()) and "
                             "pass the merged model; optimum-recon prunes the base weights, not adapters.")
        if not hasattr(model, "config") or not hasattr(model, "generate"):
            raise TypeError(f"{type(model).__name__} is not a transformers causal LM (a PreTrainedModel with a "
                            "config, as AutoModelForCausalLM.from_pretrained returns).")
        name = getattr(model.config, "_name_or_path", "") or None
        if tokenizer is None or isinstance(tokenizer, (str, os.PathLike)):
            where = str(tokenizer) if tokenizer is not None else name
            if where is None:
                raise ValueError("this model does not say where it was loaded from, so its tokenizer cannot be "
                                 "found: pass tokenizer= (the tokenizer object, or its Hub id or folder).")
            tokenizer = load_tokenizer(where, given.get("trust_remote_code", False))
        pruner = cls(model, tokenizer, config, model_id=name, blocks_path=blocks_path)
        pruner.source_folder = name if name and os.path.isdir(name) else None
        pruner._prepared = _read_calibration(tokenizer, config, read_calibration)
        return pruner

    def calibration_set(
        self, data: Sequence[str] | torch.Tensor | CalibrationSet | None = None, *, progress: bool = False,
        device: torch.device | str | None = None, heldout: torch.Tensor | Sequence[str] | None = None,
    ) -> CalibrationSet:
        """The `CalibrationSet` a `prune` with ``data`` (on ``device``) uses (see `build_calibration_set`): from
        ``config.calibration`` (read before the model was loaded, then the dense model's self-generated windows),
        from a list of texts, token ids (N, T) (held-out windows only with ``heldout``), or a `CalibrationSet` as
        it is. ``heldout``: held-out windows of your own, token ids (H, T) or texts cut like the calibration ones;
        they replace any the data would give."""
        if isinstance(data, CalibrationSet):
            if heldout is not None:
                raise ValueError("a CalibrationSet carries its own held-out windows: set them on it "
                                 "(dataclasses.replace(calibration, heldout=ids)) instead of passing heldout=.")
            return data
        calibration = self._calibration_set(data, progress=progress, device=device)
        if heldout is None:
            return calibration
        if not isinstance(heldout, torch.Tensor):
            from .data.calibration import sample_calibration_windows

            texts = [heldout] if isinstance(heldout, str) else list(heldout)
            heldout = sample_calibration_windows(self.tokenizer, dataclasses.replace(
                self.config.calibration, num_samples=self.config.calibration.num_heldout or 8), texts)
        if heldout.shape[-1] != calibration.ids.shape[-1]:
            raise ValueError(f"held-out windows of {heldout.shape[-1]} tokens do not match the calibration windows' "
                             f"{calibration.ids.shape[-1]}: cut them to the same length.")
        return dataclasses.replace(calibration, heldout=heldout)

    def _calibration_set(self, data, *, progress: bool, device) -> CalibrationSet:
        cal = self.config.calibration
        prepared = getattr(self, "_prepared", None)
        external = None
        if data is None and prepared is not None and prepared[0] == dataclasses.asdict(cal):
            external = prepared[1]  # read before the model was loaded (its notes were shown then)
        return build_calibration_set(self.tokenizer, cal, data, model=self.model, external=external,
                                     notes=prepared[2] if external is not None else (), progress=progress,
                                     pruning=self.config, blocks_path=self.blocks_path, device=device)

    def calibration_ids(
        self, data: Sequence[str] | torch.Tensor | None = None, *, progress: bool = False
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Calibration windows (N, seq_len) and held-out windows (or None) of `calibration_set`."""
        calibration = self.calibration_set(data, progress=progress)
        return calibration.ids, calibration.heldout

    def prune(
        self,
        calibration_data: Sequence[str] | torch.Tensor | CalibrationSet | None = None,
        *,
        heldout: torch.Tensor | Sequence[str] | None = None,
        device: torch.device | str | None = None,
        progress: bool = True,
        checkpoint_dir: str | os.PathLike | None = None,
        activation_offload: str = "cpu",
        activation_folder: str | os.PathLike | None = None,
    ) -> PruningReport:
        """Prune (and reconstruct) the model in place and return the `PruningReport`.

        Args:
            calibration_data: Texts to cut windows from, token ids (N, T), or a `CalibrationSet` (with its held-out
                windows); default: ``config.calibration``.
            heldout: Held-out windows for texts or token ids (H, T), or texts to cut them from: the guard and
                ``lr="auto"`` judge training on them (without any, training is unguarded).
            device: Where each block runs (default: the GPU when there is one).
            progress: Show progress bars (on rank 0 only in a distributed run).
            checkpoint_dir: Save progress after every block; a later call with the same folder (after a crash or
                Ctrl-C) continues from the last finished block and gives the same model (CR included).
            activation_offload: ``"disk"`` keeps the activations between blocks in files (under
                ``activation_folder``) instead of CPU memory, for calibration sets larger than RAM.
        """
        if self.report is not None:
            raise RuntimeError("this model is already pruned; load it again to prune with other settings.")
        if checkpoint_dir is not None:
            check_checkpoint_dir(checkpoint_dir, protect=[self.source_folder])
        runtime = Runtime(device=device, progress=progress, checkpoint_dir=checkpoint_dir,
                          activation_offload=activation_offload, activation_folder=activation_folder,
                          blocks_path=self.blocks_path)
        calibration = self.calibration_set(calibration_data, progress=progress, device=device, heldout=heldout)
        self._interrupted = True  # until prune_model returns: the weights in memory are half pruned
        report = prune_model(self.model, self.config, calibration, runtime)  # the engine writes the report
        self._interrupted = False
        self.report = report
        for name, value in self._dense_perplexity.items():
            self.report.perplexity.setdefault(name, {})["dense"] = value
            self.report.evaluation.setdefault(name, {})["dense"] = self._dense_protocol[name]
        for name, value in self._dense_zero_shot.items():
            self.report.zero_shot.setdefault(name, {})["dense"] = value
        return self.report

    def evaluate(
        self,
        datasets: str | Iterable[str] = ("wikitext2",),
        *,
        seq_len: int | None = None,
        max_tokens: int | None = None,
        batch_size: int = 1,
        progress: bool = True,
    ) -> dict[str, PerplexityResult]:
        """Perplexity on each dataset; recorded as `dense` before `prune()` and as `pruned` after it."""
        if isinstance(datasets, str):
            datasets = [d for d in datasets.split(",") if d]
        label = "pruned" if self.report is not None else "dense"
        results = {}
        for name in datasets:
            result = evaluate_perplexity(
                self.model, self.tokenizer, name, seq_len=seq_len, max_tokens=max_tokens, batch_size=batch_size,
                progress=progress,
            )
            results[name] = result
            if self.report is None:
                self._dense_perplexity[name] = result.perplexity
                self._dense_protocol[name] = result.protocol()
            else:
                self.report.perplexity.setdefault(name, {})[label] = result.perplexity
                self.report.evaluation.setdefault(name, {})[label] = result.protocol()
        return results

    def evaluate_tasks(
        self,
        tasks: str | Iterable[str] = "paper",
        *,
        limit: int | float | None = None,
        num_fewshot: int | None = None,
        batch_size: int = 1,
        include_path: str | os.PathLike | None = None,
    ) -> dict[str, TaskResult]:
        """Zero-shot accuracy with lm-eval on the model as it is now (needs ``optimum-recon[eval]``).

        Recorded like perplexity: as ``dense`` before `prune()` and ``pruned`` after it, so the model card's
        results table shows both. ``"paper"`` stands for the paper's seven tasks; see
        `optimum_recon.evaluation.zero_shot.evaluate_zero_shot` for the arguments.
        """
        from .evaluation.zero_shot import evaluate_zero_shot

        # lm-eval cannot split a live model's requests over our process group: rank 0 evaluates
        results = dist.run_on_main(evaluate_zero_shot, self.model, self.tokenizer, tasks, limit=limit,
                                   num_fewshot=num_fewshot, batch_size=batch_size, include_path=include_path)
        for name, result in results.items():
            if result.accuracy is None:
                continue
            if self.report is None:
                self._dense_zero_shot[name] = result.accuracy
            else:
                self.report.zero_shot.setdefault(name, {})["pruned"] = result.accuracy
        return results

    def check_output(self, save_directory: str | os.PathLike, *, overwrite: bool = False) -> Path:
        """Raise `OutputFolderError` now if `save_pretrained` would refuse ``save_directory`` (call it before
        `prune` to fail in seconds rather than after the prune)."""
        return check_output_dir(save_directory, kind="model", overwrite=overwrite, protect=[self.source_folder])

    def save_pretrained(self, save_directory: str | os.PathLike, *, overwrite: bool = False,
                        save_dtype: Any = None, sparse_format: str | None = None, **kwargs: Any):
        """Save weights (safetensors), tokenizer, recipe, report and model card, atomically.

        ``save_directory`` must be new, empty, or a model folder optimum-recon saved before; any other folder is
        refused (`OutputFolderError`) unless ``overwrite=True``, and the folder the model was loaded from (or one
        containing it) always is.

        The weights are written in ``save_dtype`` (`float32`, `bfloat16`, `float16`); by default in the dtype of the
        checkpoint the model was loaded from, whatever dtype pruning ran in (zeros stay zeros, N:M groups stay
        valid). By default they are dense tensors with zeros in them, which every tool reads; ``sparse_format=
        "bitmask"`` stores each pruned weight as its kept values plus a packed mask (for N:M, which N of every M),
        about 0.56 of its dense bytes at 50%. A compact folder loads with a plain
        ``AutoModelForCausalLM.from_pretrained(folder)`` once `optimum_recon` is imported, and
        ``optimum-recon decompress`` turns it into a dense one for other tools.

        Nothing written names a local path: a model or data file read from this machine is named by its base name
        (a relative path as given), marked local, data files with their SHA-256. ``kwargs`` fill the card's Hub
        metadata where it cannot be inferred: ``base_model_id`` (the Hub model a local folder is a copy of),
        ``license``, ``datasets`` (Hub dataset ids to list).

        Raises:
            RuntimeError: when `prune` was interrupted or failed: the weights in memory are then half pruned.
        """
        from .hub.save import save_pruned_model

        if getattr(self, "_interrupted", False):
            raise RuntimeError("prune() did not finish (it failed or was interrupted), so the model in memory is "
                               "half pruned and is not saved. Run it again (with checkpoint_dir to resume).")
        # every rank holds the same model: rank 0 writes it, the others wait (and fail if it fails)
        form = self._save_form(save_dtype, sparse_format)
        path = dist.run_on_main(
            save_pruned_model, self.model, self.tokenizer, self.config, self.report, save_directory,
            base_model=self.model_id, blocks_path=self.blocks_path, overwrite=overwrite,
            protect=(self.source_folder,), save_dtype=form[0], sparse_format=sparse_format, **kwargs
        )
        self._saved_to, self._saved_as = path, form
        return path

    def _save_form(self, save_dtype: Any, sparse_format: str | None) -> tuple[str | None, str | None]:
        from .hub.compact import dtype_name

        return dtype_name(save_dtype) if save_dtype is not None else self.checkpoint_dtype, sparse_format

    def push_to_hub(
        self,
        repo_id: str,
        *,
        save_directory: str | os.PathLike | None = None,
        private: bool | None = None,
        token: str | bool | None = None,
        revision: str | None = None,
        create_pr: bool = False,
        commit_message: str | None = None,
        save_dtype: Any = None,
        sparse_format: str | None = None,
        **card: Any,
    ) -> CommitInfo:
        """Upload the pruned model (with its recipe, report and model card) to the Hub.

        The folder last written by `save_pretrained` is uploaded (or ``save_directory``, saved first when it
        does not hold this model yet, with ``save_dtype`` and ``sparse_format`` as in `save_pretrained`); the upload
        only reads it, so a failed push leaves it intact. The pushed model card's load snippet names ``repo_id``.
        ``card``: ``base_model_id``, ``license``, ``datasets`` for a save made here (see `save_pretrained`).

        Returns:
            The `huggingface_hub` commit of the upload.

        Raises:
            HubUploadError: with the reason (invalid id, no or refused token, network loss, server error).
        """
        import tempfile

        from .hub.push import push_folder

        folder = Path(save_directory) if save_directory is not None else getattr(self, "_saved_to", None)
        asked = (save_dtype, sparse_format) != (None, None)
        if folder is None or (save_directory is None and asked and
                              getattr(self, "_saved_as", None) != self._save_form(save_dtype, sparse_format)):
            # nothing saved yet, or saved in another form: the user's folder is left as it is
            folder = Path(tempfile.mkdtemp(prefix="optimum-recon-push-")) / repo_id.split("/")[-1]
        if getattr(self, "_saved_to", None) != Path(folder).expanduser().resolve() or (
                asked and self._saved_as != self._save_form(save_dtype, sparse_format)):
            self.save_pretrained(folder, save_dtype=save_dtype, sparse_format=sparse_format, **card)
        return dist.run_on_main(push_folder, self._saved_to, repo_id, private=private, token=token,
                                revision=revision, create_pr=create_pr, commit_message=commit_message)
