"""The block-sequential loop: the in-place core that prunes any model with discoverable blocks.

Notation: x_d is the pruned model's hidden state entering block d, x̄_d the dense model's. Steps run
over sliding windows of ``w`` consecutive blocks (``w = 1`` for LR and BR; ``config.window`` for CR):
step i covers blocks [max(0, i) .. min(i + w - 1, L - 1)] for i = -(w - 1) .. L - 1, so for w = 2 the
windows are [0], [0, 1], [1, 2], ..., [L-2, L-1], [L-1] (the paper's schedule). In each step:

1. the window's last block e, if not yet pruned: statistics on its pruned-path input x_e (hooks on its
   linear layers), the dense path x̄_{e+1} = g_e(w̄; x̄_e), then its masks (chosen once per block);
2. reconstruction of the whole window from x_s toward the target: ``global`` (GP) x̄_{e+1}, ``local``
   the dense window applied to x_s;
3. blocks leaving the window are final: x_{s+1} = g_s(x_s), and their error against x̄_{s+1} is recorded
   (before and after reconstruction, on calibration and held-out windows).

LR therefore costs three forward passes per block (two for magnitude). Activations stay on the CPU;
only the window's blocks are on the execution device.

Under `torch.distributed` (see `optimum_recon.distributed`) each rank captures and propagates only its share of
the calibration batches; mask statistics and error meters are summed over ranks, and block training averages
its gradients over the global batch, so every rank holds the same model throughout.
"""

from __future__ import annotations

import contextlib
import copy
import logging
import time
import warnings

import torch
from torch import nn
from tqdm.auto import tqdm

from .. import distributed as dist
from ..configuration import PruningConfig
from ..data.calibration_set import CalibrationSet
from ..modeling.blocks import LinearLayer, find_blocks, find_linear_layers, layer_matches, layers_to_prune
from ..modeling.offload import check_device, execution_device, onload, release_host_memory
from ..reconstruction import WindowTask, get_reconstruction
from ..report import BlockRecord, PruningReport, peak_cuda_mib, peak_rss_mib, recorded_warnings
from .activations import ActivationStore
from .allocation import allocate
from .capture import capture_block_inputs
from .checkpoint import Checkpointer
from .runtime import Runtime
from .state import RunState, Split
from .steps import ErrorMeter, StatisticsHooks, apply_masks, param_masks

logger = logging.getLogger(__name__)


def validate_layers(plan: list[list[LinearLayer]], config: PruningConfig, blocks_path: str) -> None:
    """Fail before any heavy work when the chosen layers cannot be pruned as configured."""
    if not any(plan):
        raise ValueError(
            f"no linear layers to prune in {blocks_path}: targets={config.targets!r} ignore={config.ignore!r} "
            "leave nothing. Loosen them (targets=None prunes every linear layer of every block)."
        )
    nm = config.nm
    if nm is None:
        return
    for i, layers in enumerate(plan):
        for layer in layers:
            if layer.in_features % nm[1]:
                raise ValueError(
                    f"pattern={config.pattern!r} needs input widths divisible by {nm[1]}, but "
                    f"{blocks_path}.{i}.{layer.name} has {layer.in_features} inputs. Pick an M that divides it "
                    f"or leave the layer dense with ignore=[{layer.name!r}]."
                )


def _warn_unmatched(blocks, config: PruningConfig, blocks_path: str) -> None:
    """A `targets` / `ignore` entry that names no linear layer is almost always a typo: say so, with real names."""
    every = [(layer.name, f"{blocks_path}.{i}.{layer.name}") for i, block in enumerate(blocks)
             for layer in find_linear_layers(block)]
    examples = ", ".join(dict.fromkeys(name for name, _ in every[:3])) or "none"
    for label, entries in (("targets", config.targets or []), ("ignore", config.ignore)):
        for pattern in entries:
            if not any(layer_matches(pattern, name, *([full] if label == "ignore" else [])) for name, full in every):
                warnings.warn(f"{label} entry {pattern!r} matches no linear layer in {blocks_path} (names look like "
                              f"{examples}; see PruningConfig.targets for how entries match).", stacklevel=4)


class _Run(RunState):
    """One prune's steps, over the state of `RunState`."""

    # --- step 1: prune the window's new block -----------------------------------------------------------
    def prune_block(self, s: int, e: int, device: torch.device) -> None:
        self.started.setdefault(e, time.perf_counter())
        block, layers = self.blocks[e], self.plan[e]
        outputs_by_split = {}
        with StatisticsHooks(layers, self.method, device) as hooks:  # only this pass feeds the statistics
            for split in self.splits():
                same = s == e and split.sparse[s] is split.dense[e]
                keep_local = same or (self.window == 1 and self.config.propagation == "local")
                hooked = split is self.calib and hooks.needed  # held-out windows never influence the masks
                outputs = self.store.new()
                if hooked or keep_local:
                    for b, x in enumerate(split.sparse[s]):
                        hooks.active = hooked and (self.statistics_batches is None or b in self.statistics_batches)
                        x = split.passes.chain([self.blocks[j] for j in range(s, e)], s, b, x, device)
                        outputs.append(split.passes.run(block, e, b, x, device))
                outputs_by_split[id(split)] = (outputs, same, keep_local)
        for split in self.splits():  # the dense path, with the block's dense weights, after the hooks are gone
            outputs, same, keep_local = outputs_by_split[id(split)]
            if keep_local and self.window == 1:
                split.local[e] = outputs
            split.dense[e + 1] = outputs if same else split.passes.map(block, e, split.dense[e], device,
                                                                      out=self.store.new())
        hooks.all_reduce()  # every rank now holds the statistics of all the calibration windows
        stats = hooks.take()
        if self.config.propagation == "local" and self.window > 1 and self.trains:
            self.dense_copies[e] = copy.deepcopy(block).to("cpu")
        self.masks[e], self.layer_records[e] = apply_masks(layers, stats, self.method, self.config,
                                                           f"{self.path}.{e}", self.zero_counts)
        if self.before_at_masking:
            self.before_errors[e] = {split.name: self._block_error(split, e, device) for split in self.splits()}
        elif self.trains:
            self.snapshots[e] = {k: v.detach().to("cpu", copy=True) for k, v in block.state_dict().items()}

    # --- step 2: reconstruct the window -------------------------------------------------------------------
    def reconstruct(self, s: int, e: int, step: int, device: torch.device) -> None:
        calib = self.calib
        inputs = torch.cat(list(calib.sparse[s]))
        targets = torch.cat(list(self._targets(calib, s, e, device)))
        window = [self.blocks[j] for j in range(s, e + 1)]
        masks, owners = {}, {}
        for j in range(s, e + 1):
            block_masks, block_owners = param_masks(self.plan[j], self.masks[j])
            masks.update(block_masks)
            owners.update(block_owners)

        def forward(x: torch.Tensor) -> torch.Tensor:
            return calib.passes.chain_batch(window, s, x, device)

        task = WindowTask(window, forward, inputs, targets, masks, device, seed=self.config.calibration.seed + step,
                          modules=owners, progress=self.progress, sample_rows=self.sample_rows,
                          label=f"block {s}" if e == s else f"blocks {s}-{e}",
                          heldout_error=self._heldout_error(window, s, e, device))
        info = self.reconstruction.reconstruct(task, self.config)
        info["window"] = [s, e]
        for j in range(s, e + 1):
            self.train_info.setdefault(j, []).append(info)

    def _targets(self, split: Split, s: int, e: int, device: torch.device) -> list[torch.Tensor]:
        """What window ``s..e`` is trained toward on ``split``, per batch: x̄_{e+1} (global), or the dense window on
        the pruned inputs x_s (local)."""
        if self.config.propagation == "global":
            return split.dense[e + 1]
        if self.window == 1:
            return split.local[s]
        copies = [self.dense_copies[j].to(device) for j in range(s, e + 1)]
        try:
            return [split.passes.chain(copies, s, b, x, device) for b, x in enumerate(split.sparse[s])]
        finally:
            for c in copies:
                c.to("cpu")

    def _heldout_error(self, window: list[nn.Module], s: int, e: int, device: torch.device):
        """The guard's measure for window ``s..e``: its error (as ``config.loss`` measures it) on the held-out windows
        against their targets (summed over the ranks), or None when the run has no held-out windows or the guard is
        off."""
        held = self.heldout
        if held is None or self.config.guard is False:
            return None
        targets = self._targets(held, s, e, device)

        def heldout_error() -> float:
            meter = ErrorMeter()
            for b, x in enumerate(held.sparse[s]):
                meter.update(held.passes.chain(window, s, b, x, device), targets[b])
            return meter.all_reduce().value(self.config.loss)

        return heldout_error

    # --- step 3: finalize a block leaving the window ------------------------------------------------------
    def finalize(self, s: int, device: torch.device) -> BlockRecord:
        block = self.blocks[s]
        record = BlockRecord(index=s, error=0.0, error_normalized=0.0, error_local=None, sparsity=0.0, seconds=0.0,
                             layers=self.layer_records.pop(s), reconstruction={"windows": self.train_info.pop(s, [])})
        for split in self.splits():
            meter, local_meter = ErrorMeter(), ErrorMeter()
            outputs = self.store.new()
            for b, x in enumerate(split.sparse[s]):
                y = split.passes.run(block, s, b, x, device)
                meter.update(y, split.dense[s + 1][b])
                if s in split.local:
                    local_meter.update(y, split.local[s][b])
                outputs.append(y)
            meter.all_reduce()  # the errors over every rank's windows
            if s in split.local:
                local_meter.all_reduce()
            if s in self.before_errors:
                before = self.before_errors[s][split.name].all_reduce()
            elif s in self.snapshots:
                before = self._error_before(split, s, device).all_reduce()
            else:  # not trained: the error before is the error
                before = meter
            record.set_errors(split.name, meter, before,
                              local_meter if s in split.local else None)
            split.sparse[s + 1] = outputs
            split.drop(s)
            if s + 2 in split.dense:  # block s+1 is pruned already (a window of 2+): x̄_{s+1} has no use left
                split.drop(s + 1, ("dense",))
        self.before_errors.pop(s, None)
        self.snapshots.pop(s, None)
        self.masks.pop(s, None)
        self.dense_copies.pop(s, None)
        numel = sum(r.shape[0] * r.shape[1] for r in record.layers)
        record.sparsity = sum(r.sparsity * r.shape[0] * r.shape[1] for r in record.layers) / max(numel, 1)
        record.seconds = time.perf_counter() - self.started.pop(s)
        return record

    def _error_before(self, split: Split, s: int, device: torch.device) -> ErrorMeter:
        """The error with the masked but untrained weights, swapped in temporarily.

        The parameters' tensors are exchanged, not copied: on the CPU the untrained weights cost no memory
        beyond the snapshot (a clone of the trained block would be the block's size again).
        """
        snapshot = self.snapshots[s]
        params = [(p, snapshot[name].to(p.device)) for name, p in self.blocks[s].named_parameters()
                  if name in snapshot]
        trained = [p.data for p, _ in params]
        try:
            for p, untrained in params:
                p.data = untrained
            return self._block_error(split, s, device)
        finally:
            for (p, _), data in zip(params, trained):
                p.data = data

    def _block_error(self, split: Split, s: int, device: torch.device) -> ErrorMeter:
        """Block ``s``'s error as it stands, on its sparse inputs, against the dense target x̄_{s+1}."""
        meter = ErrorMeter()
        for b, x in enumerate(split.sparse[s]):
            meter.update(split.passes.run(self.blocks[s], s, b, x, device), split.dense[s + 1][b])
        return meter


def _check_sizes(config: PruningConfig, reconstruction, num_blocks: int, calibration: CalibrationSet) -> None:
    num_samples = calibration.num_windows
    if reconstruction.window_size(config) > num_blocks:
        warnings.warn(f"window={config.window} is larger than the model's {num_blocks} blocks; using {num_blocks}.",
                      stacklevel=3)
    trains = reconstruction.trains and config.epochs > 0
    if trains and config.batch_size > num_samples:
        warnings.warn(f"batch_size={config.batch_size} is larger than the {num_samples} calibration windows; each "
                      "training step uses all of them.", stacklevel=3)
    if not trains:
        if config.guard:
            warnings.warn(f"guard=True has no effect with reconstruction={config.reconstruction!r} and "
                          f"epochs={config.epochs}: nothing is trained.", stacklevel=3)
        return
    if calibration.heldout is not None or config.guard is False:
        return
    if config.guard:
        raise ValueError("guard=True judges training on held-out windows, but this calibration set has none: pass "
                         "a CalibrationSet with held-out windows (or texts / a source instead of token ids), or "
                         "guard=False.")
    if config.calibration.heldout_samples != 0:  # (0: the user chose an unguarded run)
        warnings.warn("no held-out windows (calibration given as token ids, or no document left for them): "
                      "training is unguarded" + (", and lr='auto' uses the weights' scale alone" if config.lr == "auto"
                                                 else "") + ".", stacklevel=3)


def prune_model(
    model: nn.Module,
    config: PruningConfig,
    calibration: CalibrationSet | torch.Tensor,
    runtime: Runtime | None = None,
) -> PruningReport:
    """Prune (and reconstruct) ``model`` in place, block by block, on the calibration windows.

    Args:
        model: A causal LM whose decoder blocks can be found (see `optimum_recon.modeling.find_blocks`).
        config: What to prune and how; ``config.batch_size`` windows go through each forward pass.
        calibration: The `CalibrationSet` (calibration windows, which feed the masks, held-out windows), or just
            calibration token ids (num_samples, seq_len), unpadded, all feeding the masks, without held-out windows.
        runtime: Device, progress bars, checkpointing and activation placement (`Runtime`; default: its defaults).

    Returns:
        A `PruningReport` with per-block errors, sparsity and training curves.
    """
    calibration = CalibrationSet.of(calibration)
    with recorded_warnings() as notes:
        report = _prune(model, config, calibration, runtime if runtime is not None else Runtime())
    # what the run had to say (e.g. "resuming from ..."), after what reading the data had to say
    report.notes = list(dict.fromkeys([*calibration.notes, *notes]))
    return report


def _prune(model: nn.Module, config: PruningConfig, calibration: CalibrationSet, runtime: Runtime) -> PruningReport:
    input_ids, heldout_ids = calibration.ids, calibration.heldout
    device, progress = runtime.device, runtime.progress
    vocab = model.get_input_embeddings().num_embeddings
    for name, ids in (("input_ids", input_ids), ("heldout_ids", heldout_ids)):  # (shapes: CalibrationSet's)
        if ids is not None and (int(ids.max()) >= vocab or int(ids.min()) < 0):
            raise ValueError(f"{name} holds token ids outside the model's vocabulary of {vocab}: does the tokenizer "
                             "belong to this model?")
    device = check_device(device)
    start = time.perf_counter()
    dist.init_distributed()
    progress = progress and dist.is_main_process()
    path, blocks = find_blocks(model, runtime.blocks_path)
    plan = layers_to_prune(blocks, path, config.targets, config.ignore)
    _warn_unmatched(blocks, config, path)
    validate_layers(plan, config, path)
    reconstruction = get_reconstruction(config.reconstruction)
    _check_sizes(config, reconstruction, len(blocks), calibration)
    k = calibration.num_for_masks
    batches = [b for part in (input_ids[:k], input_ids[k:]) for b in part.split(config.batch_size) if len(b)]
    _check_ranks(config, model, input_ids, heldout_ids, k, len(batches))

    store = ActivationStore(runtime.activation_offload, runtime.activation_folder)
    was_training = model.training
    model.eval()
    try:
        # batch b belongs to rank b % world (all of them in a single process): each rank runs whole batches,
        # so every forward pass sees the batch a single-process run would
        starts = torch.tensor([0] + [len(b) for b in batches]).cumsum(0)
        mine = dist.shard(range(len(batches)))
        sample_rows = torch.full((input_ids.shape[0],), -1, dtype=torch.long)
        offset = 0
        for b in mine:
            sample_rows[starts[b]: starts[b + 1]] = torch.arange(offset, offset + len(batches[b]))
            offset += len(batches[b])
        trains = reconstruction.trains and config.epochs > 0
        batch = min(config.batch_size, input_ids.shape[0])
        # training batches are a global batch's windows that this rank holds: any size up to the batch size
        probes = (tuple(range(1, batch + 1)) if dist.is_distributed() else (batch,)) if trains else ()
        calib = capture_block_inputs(model, blocks, [batches[b] for b in mine], probe_sizes=probes)
        heldout = None if heldout_ids is None else capture_block_inputs(
            model, blocks, dist.shard(list(heldout_ids.split(config.batch_size))))
        first_k = -(-k // config.batch_size)  # global batches holding the first k windows
        run = _Run(model, blocks, path, plan, config, reconstruction, calib, heldout, device, store, clock=start,
                   progress=progress, statistics_batches={i for i, b in enumerate(mine) if b < first_k},
                   sample_rows=sample_rows)
        report = PruningReport(config=config.to_dict(), num_calibration_tokens=int(input_ids.numel()),
                               calibration=calibration.describe())
        # before `resume`, which loads finished blocks' pruned weights: OWL's statistics are the dense model's
        run.zero_counts, report.allocation = allocate(run)
        checkpointer, start_block = run.resume(report, runtime.checkpoint_dir, input_ids, heldout_ids)
        _loop(run, report, progress, checkpointer, start_block)
    finally:
        model.train(was_training)
        store.close()
    report.resumed_seconds = run.earlier_seconds
    _finish_report(report, start - run.earlier_seconds)
    return report


def _check_ranks(config: PruningConfig, model, input_ids, heldout_ids, statistics_samples: int,
                 num_batches: int) -> None:
    """In a distributed run: the same recipe, model and data on every rank, and a batch for each of them."""
    if not dist.is_distributed():
        return
    recipe = config.to_dict()
    recipe.pop("optimum_recon_version", None)
    params = sum(p.numel() for p in model.parameters())
    dist.check_same_on_all_ranks({
        "recipe": recipe,
        "model": dist.digest(str(getattr(model.config, "_name_or_path", type(model).__name__)), params),
        "calibration data": dist.digest(input_ids, statistics_samples),
        "held-out data": dist.digest(heldout_ids if heldout_ids is not None else "none"),
    })
    world = dist.world_size()
    if num_batches < world:
        raise ValueError(
            f"{input_ids.shape[0]} calibration windows in batches of {config.batch_size} make {num_batches} batches, "
            f"fewer than the {world} processes: each needs at least one. Use more windows, a smaller batch_size or "
            "fewer processes."
        )


@torch.no_grad()
def _loop(run: _Run, report: PruningReport, progress: bool, checkpointer: Checkpointer | None = None,
          start_block: int = 0) -> None:
    num_blocks, w = len(run.blocks), run.window
    # step i trains the window max(0, i)..i+w-1 and finishes block i; the first w-1 steps finish none
    first = start_block if start_block else -(w - 1)
    pruned: set[int] = set(range(min(start_block + w - 1, num_blocks))) if start_block else set()
    bar = tqdm(total=num_blocks, initial=start_block, desc="Pruning blocks", unit="block", disable=not progress)
    try:
        for i in range(first, num_blocks):
            s, e = max(0, i), min(i + w - 1, num_blocks - 1)
            next_start = max(0, i + 1) if i + 1 < num_blocks else num_blocks
            with contextlib.ExitStack() as stack:
                dev = None
                for j in range(s, e + 1):
                    block = run.blocks[j]
                    dev = stack.enter_context(onload(block, execution_device(block, run.requested_device)))
                if e not in pruned:
                    run.prune_block(s, e, dev)
                    pruned.add(e)
                if run.trains:
                    bar.set_description(f"Reconstructing blocks {s}-{e}" if e > s else f"Reconstructing block {s}")
                    run.reconstruct(s, e, i, dev)
                for j in range(s, next_start):
                    record = run.finalize(j, dev)
                    report.blocks.append(record)
                    report.environment["device"] = str(dev)
                    logger.info("block %d/%d: error %.4g (normalized %.4g)", j + 1, num_blocks, record.error,
                                record.error_normalized)
                    bar.set_postfix(error=f"{record.error:.3g}", norm=f"{record.error_normalized:.3g}")
                    bar.update(1)
                if checkpointer is not None and next_start > s:
                    run.save_checkpoint(report, checkpointer, s, e)
            release_host_memory()
    finally:
        bar.close()


def _finish_report(report: PruningReport, start: float) -> None:
    import transformers

    layers = [layer for block in report.blocks for layer in block.layers]
    total = sum(layer.shape[0] * layer.shape[1] for layer in layers)
    zeros = sum(layer.sparsity * layer.shape[0] * layer.shape[1] for layer in layers)
    report.pruned_parameters = total
    report.model_sparsity = zeros / max(total, 1)
    report.total_seconds = time.perf_counter() - start
    report.peak_rss_mib = peak_rss_mib()
    report.peak_cuda_mib = peak_cuda_mib()
    # the CPU thread count changes how floating-point sums are split: results are bit-identical only with the same one
    report.environment.update(torch=torch.__version__, transformers=transformers.__version__,
                              torch_threads=str(torch.get_num_threads()))
