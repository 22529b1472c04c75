"""Data parallelism over `torch.distributed`: the few collective operations the engine needs.

Launched with `torchrun` or `accelerate launch` (both set ``RANK``, ``WORLD_SIZE``, ``MASTER_ADDR`` ...), every
process loads the model, builds the same calibration windows and calls the same code; the engine then gives
each rank a share of the calibration *batches* (batch ``b`` goes to rank ``b % world``, so every forward pass
sees the same batch composition as a single-process run), sums the mask statistics and the reconstruction
errors over ranks, and averages the gradients of block training. With one process every function here is a
no-op, so there is one code path. NCCL is used on GPUs, Gloo on CPUs; every collective runs under the
process group's timeout (``OPTIMUM_RECON_DIST_TIMEOUT`` seconds, default 1800), so a rank that dies or
stalls gives an error on the others instead of a hang.

We use `torch.distributed` directly rather than `DistributedDataParallel`: a training step here runs a
window of blocks on a rank's share of a global batch whose size varies per rank (down to zero samples), and
the gradients must be *summed* with a scale chosen by the global batch, which DDP's mean does not express.
"""

from __future__ import annotations

import contextlib
import datetime
import hashlib
import json
import logging
import os
from typing import Any, Iterable, Iterator, Sequence

import torch

logger = logging.getLogger(__name__)

DEFAULT_TIMEOUT_S = 1800


class DistributedMismatchError(RuntimeError):
    """The ranks of a distributed run were not given the same configuration or data."""


class DistributedPeerError(RuntimeError):
    """A collective operation failed: another rank stalled past the timeout, died, or raised an error."""


@contextlib.contextmanager
def _collective(what: str) -> Iterator[None]:
    """Turn the backend's low-level failure of a collective into an error that says what to look at."""
    try:
        yield
    except DistributedMismatchError:
        raise
    except RuntimeError as err:  # DistBackendError and Gloo/NCCL timeouts are RuntimeErrors
        raise DistributedPeerError(
            f"rank {rank()} of {world_size()}: {what} did not complete (within the timeout of "
            f"{timeout().total_seconds():.0f} s, OPTIMUM_RECON_DIST_TIMEOUT): another rank stalled, died or failed; "
            f"its log has the cause. Backend error: {err}"
        ) from err


def is_distributed() -> bool:
    """Whether a `torch.distributed` process group with more than one rank is initialized."""
    return (torch.distributed.is_available() and torch.distributed.is_initialized()
            and torch.distributed.get_world_size() > 1)


def rank() -> int:
    return torch.distributed.get_rank() if is_distributed() else 0


def world_size() -> int:
    return torch.distributed.get_world_size() if is_distributed() else 1


def is_main_process() -> bool:
    """True on rank 0 (and in a single-process run): the process that writes files and pushes."""
    return rank() == 0


def launched_distributed() -> bool:
    """Whether this process was started by a launcher with more than one process (``WORLD_SIZE`` > 1)."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def exact_statistics() -> bool:
    """Whether mask statistics are summed in float64, so that they (and the masks) do not depend on the order
    in which batches are added: always in a distributed run; in a single-process run when the environment
    variable ``OPTIMUM_RECON_EXACT_STATISTICS=1`` asks for it (to reproduce a distributed run's masks)."""
    return is_distributed() or os.environ.get("OPTIMUM_RECON_EXACT_STATISTICS", "") == "1"


def timeout() -> datetime.timedelta:
    seconds = float(os.environ.get("OPTIMUM_RECON_DIST_TIMEOUT", DEFAULT_TIMEOUT_S))
    return datetime.timedelta(seconds=seconds)


def init_distributed() -> bool:
    """Join the process group when launched by `torchrun` / `accelerate launch`; return whether distributed.

    Idempotent; does nothing in a single-process run or when the caller already initialized a group. The backend
    is NCCL when CUDA is available (each rank on ``cuda:LOCAL_RANK``), else Gloo.
    """
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return is_distributed()
    if not launched_distributed():
        return False
    if not torch.distributed.is_available():  # pragma: no cover - builds without distributed support
        raise RuntimeError("WORLD_SIZE > 1 but this PyTorch build has no torch.distributed.")
    backend = "gloo"
    if torch.cuda.is_available():
        backend = "nccl"
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    torch.distributed.init_process_group(backend=backend, timeout=timeout())
    logger.info("joined the process group: rank %d of %d (%s)", rank(), world_size(), backend)
    return is_distributed()


def _collective_device() -> torch.device:
    """NCCL reduces GPU tensors only; Gloo CPU tensors."""
    backend = torch.distributed.get_backend()
    return torch.device("cuda", torch.cuda.current_device()) if backend == "nccl" else torch.device("cpu")


def shard(items: Sequence[Any]) -> list[Any]:
    """This rank's share of ``items``: every ``world``-th one, starting at ``rank``."""
    return list(items[rank()::world_size()])


def owned(index: int) -> bool:
    return index % world_size() == rank()


def _in_place(tensor: torch.Tensor, what: str, operation) -> torch.Tensor:
    """Run the collective ``operation(buffer)`` on ``tensor``'s values and leave the result in ``tensor``: the
    buffer is ``tensor`` itself when it is contiguous on the backend's device, else a copy there."""
    if not is_distributed():
        return tensor
    device = _collective_device()
    buffer = tensor if tensor.device == device and tensor.is_contiguous() else tensor.to(device).contiguous()
    with _collective(what):
        operation(buffer)
    if buffer is not tensor:
        tensor.copy_(buffer)
    return tensor


def all_reduce_(tensor: torch.Tensor) -> torch.Tensor:
    """Sum ``tensor`` over ranks in place (moved to the backend's device and back when needed)."""
    return _in_place(tensor, "a sum over ranks", torch.distributed.all_reduce)


def broadcast_(tensor: torch.Tensor, src: int) -> torch.Tensor:
    """Overwrite ``tensor`` on every rank with rank ``src``'s values, in place."""
    return _in_place(tensor, f"receiving a result from rank {src}",
                     lambda buffer: torch.distributed.broadcast(buffer, src=src))


def all_reduce_numbers(values: Iterable[float]) -> list[float]:
    """Sum a few Python numbers over ranks (in float64)."""
    values = list(values)
    if not is_distributed():
        return values
    buffer = torch.tensor(values, dtype=torch.float64)
    return all_reduce_(buffer).tolist()


def all_reduce_gradients_(params: Iterable[torch.nn.Parameter]) -> None:
    """Sum the gradients of ``params`` over ranks in one flat buffer per dtype and device; a parameter
    without a gradient on this rank (it saw no samples this step) contributes zeros."""
    if not is_distributed():
        return
    groups: dict[tuple, list[torch.nn.Parameter]] = {}
    for p in params:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
        groups.setdefault((p.grad.dtype, p.grad.device), []).append(p)
    for group in groups.values():
        flat = torch.cat([p.grad.reshape(-1) for p in group])
        all_reduce_(flat)
        offset = 0
        for p in group:
            n = p.grad.numel()
            p.grad.copy_(flat[offset: offset + n].view_as(p.grad))
            offset += n


def all_gather_objects(obj: Any) -> list[Any]:
    """Every rank's ``obj`` (picklable), in rank order; ``[obj]`` in a single-process run."""
    if not is_distributed():
        return [obj]
    out: list[Any] = [None] * world_size()
    with _collective("gathering data from every rank"):
        torch.distributed.all_gather_object(out, obj)
    return out


def barrier() -> None:
    if is_distributed():
        with _collective("waiting for every rank"):
            torch.distributed.barrier()


def digest(*parts: Any) -> str:
    """A short hash of JSON-able parts and tensors, to compare what ranks were given."""
    h = hashlib.sha256()
    for part in parts:
        if isinstance(part, torch.Tensor):
            h.update(part.detach().cpu().contiguous().numpy().tobytes())
        else:
            h.update(json.dumps(part, sort_keys=True, default=str).encode())
    return h.hexdigest()[:16]


def _flatten(value: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(value, dict):
        return {k: v for key, item in value.items() for k, v in _flatten(item, f"{prefix}{key}.").items()}
    return {prefix.rstrip("."): value}


def check_same_on_all_ranks(what: dict[str, Any]) -> None:
    """Raise `DistributedMismatchError` on *every* rank when any entry of ``what`` differs between ranks.

    Values are short strings (e.g. `digest`s) or JSON-able dicts such as a recipe, whose differing fields are
    named in the error.
    """
    if not is_distributed():
        return
    gathered = all_gather_objects(what)
    problems = []
    for key in sorted({k for g in gathered for k in g}):
        values = [g.get(key) for g in gathered]
        if all(v == values[0] for v in values):
            continue
        flat = [_flatten(v) if isinstance(v, dict) else {"": v} for v in values]
        fields = sorted({f for fl in flat for f in fl if any(other.get(f) != fl.get(f) for other in flat)})
        shown = "; ".join(
            (f"{f}: " if f else "") + ", ".join(f"rank {r}={fl.get(f)!r}" for r, fl in enumerate(flat))
            for f in fields[:5]
        )
        problems.append(f"{key} ({shown})")
    if problems:
        raise DistributedMismatchError(
            f"the ranks of this distributed run were given different {'; '.join(problems)}. Start every rank with "
            "the same model, recipe and calibration data."
        )


def all_ranks_agree(flag: bool) -> bool:
    """True only when ``flag`` is true on every rank (e.g. a cache hit everywhere)."""
    return all_reduce_numbers([0.0 if flag else 1.0])[0] == 0.0


def run_on_main(fn, *args: Any, **kwargs: Any) -> Any:
    """Run ``fn`` on rank 0 only (writing files, pushing to the Hub) and return its result on every rank.

    The other ranks wait for it; when it fails they raise too (with rank 0's error) instead of going on. The
    result must be picklable. In a single-process run this is just ``fn(*args, **kwargs)``.
    """
    if not is_distributed():
        return fn(*args, **kwargs)
    result, error = None, None
    if is_main_process():
        try:
            result = fn(*args, **kwargs)
        except BaseException as err:  # noqa: BLE001 - re-raised below, after the other ranks are told
            error = err
    payload = [(result, None if error is None else f"{type(error).__name__}: {error}")]
    with _collective("waiting for rank 0"):
        torch.distributed.broadcast_object_list(payload, src=0)
    if error is not None:
        raise error
    result, message = payload[0]
    if message is not None:
        raise RuntimeError(f"rank 0 failed: {message}")
    return result
